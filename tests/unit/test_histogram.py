"""pgoutbox's own histogram exports what prometheus_client's Histogram would for the same
observations (its oracle here), bucket by bucket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as ReferenceHistogram

from pgoutbox.observability import ATTEMPT_BUCKETS, Histogram

values = st.floats(min_value=0, max_value=1e6, allow_nan=False)
# Exactly on a bound is the edge that matters: Prometheus buckets are "less than or equal".
on_bounds = st.sampled_from(ATTEMPT_BUCKETS)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but the ``_created`` timestamps, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.one_of(values, on_bounds)), max_size=50),
    st.booleans(),
)
def test_same_samples_as_prometheus_client(
    observations: list[tuple[str, float]], many: bool
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("h_seconds", "doc", ["kind"], ATTEMPT_BUCKETS, ours)
    reference = ReferenceHistogram(
        "h_seconds", "doc", ["kind"], buckets=ATTEMPT_BUCKETS, registry=theirs
    )
    for kind, value in observations:
        reference.labels(kind).observe(value)
        if not many:
            histogram.observe(value, kind)
    if many:
        for kind in ("a", "b"):
            mine = [value for k, value in observations if k == kind]
            if mine:
                histogram.observe_many(mine, kind)
    assert samples(ours) == pytest.approx(samples(theirs))


def test_wrong_number_of_labels_is_refused_and_records_nothing() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "doc", ["kind"], ATTEMPT_BUCKETS, registry)
    with pytest.raises(ValueError, match=r"h_seconds: expected labels \('kind',\), got \(\)"):
        histogram.observe(1.0)
    assert samples(registry) == {}


def test_a_name_taken_on_the_registry_is_refused() -> None:
    registry = CollectorRegistry()
    Histogram("h_seconds", "doc", [], ATTEMPT_BUCKETS, registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Histogram("h_seconds", "doc", [], ATTEMPT_BUCKETS, registry)
