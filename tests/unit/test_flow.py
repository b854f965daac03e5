"""Flow control's pure parts: declaring limits and rates, and the claim planner."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgoutbox import Limit, LimitError, Rate, RouterError, WorkflowRouter
from pgoutbox.flow import (
    Candidate,
    LimitInForce,
    blocked,
    default_burst,
    partition_of,
    plan_claims,
)


async def handler(ctx: Any, payload: Any) -> None:
    return None


# -- declaring ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("100/s", 100, 1.0),
        ("1000/min", 1000, 60.0),
        ("5/10s", 5, 10.0),
        ("3600/h", 3600, 3600.0),
        (" 7 / 2.5 seconds ", 7, 2.5),
    ],
)
def test_rates_parse_from_text(text: str, count: int, period: float) -> None:
    assert Rate.parse(text) == Rate(count, period)


@pytest.mark.parametrize("text", ["", "100", "0/s", "-1/s", "10/0s", "10/fortnight", "x/s"])
def test_a_bad_rate_is_refused_with_examples(text: str) -> None:
    with pytest.raises(LimitError, match="invalid rate"):
        Rate.parse(text)


def test_rate_text_round_trips() -> None:
    assert [str(Rate.parse(t)) for t in ("100/s", "60/min", "5/h", "3/10s")] == [
        "100/s", "60/min", "5/h", "3/10s",
    ]  # fmt: skip


def test_the_default_burst_is_what_accrues_in_50_ms() -> None:
    assert default_burst(Rate(50, 1.0)) == 3
    assert default_burst(Rate(1000, 1.0)) == 50
    assert default_burst(Rate(1, 60.0)) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "invalid limit name"),
        ({"name": "x"}, "give a concurrency, a rate, or both"),
        ({"name": "x", "concurrency": 0}, "invalid concurrency 0"),
        ({"name": "x", "concurrency": True}, "invalid concurrency True"),
        ({"name": "x", "concurrency": 1, "burst": 2}, "burst needs a rate"),
        ({"name": "x", "rate": "1/s", "burst": 0}, "invalid burst 0"),
        ({"name": "x", "rate": "1/s", "partition_by": "payload"}, "invalid partition_by"),
        ({"name": "x", "rate": "1/s", "partition_by": "payload.a b"}, "invalid partition_by"),
    ],
)
def test_a_bad_limit_is_refused_naming_the_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LimitError, match=message):
        Limit(**kwargs)


def test_partitions_come_from_the_ordering_key_or_a_payload_path() -> None:
    assert partition_of(None, "x") == ("none", "")
    assert partition_of("ordering_key", "x") == ("ordering_key", "")
    assert partition_of("payload.merchant.id", "x") == ("payload", "merchant.id")


def test_the_router_gives_a_type_its_own_limit_and_shared_ones_for_every_step() -> None:
    stripe = Limit("stripe", concurrency=10, rate="100/s")
    router = WorkflowRouter(prefix="billing")
    router.on("charge", concurrency=2, limit=stripe)(handler)
    router.on("refund", limit=[stripe])(handler)
    specs = router.handlers()
    charge = specs["billing.charge"].limits
    assert [limit.name for limit in charge] == ["billing.charge", "stripe"]
    assert charge[0].concurrency == 2
    assert charge[0].rate is None
    assert specs["billing.refund"].limits == (stripe,)


def test_two_different_limits_of_one_name_are_refused() -> None:
    router = WorkflowRouter()
    router.on("a", limit=Limit("shared", concurrency=1))(handler)
    with pytest.raises(RouterError, match="two different limits are both named 'shared'"):
        router.on("b", limit=Limit("shared", concurrency=2))(handler)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "invalid concurrency 0"),
        ({"rate": "fast"}, "invalid rate 'fast'"),
        ({"limit": "stripe"}, "limit must be a Limit"),
        ({"limit": [Limit("a", concurrency=1), Limit("a", concurrency=1)]}, "given twice"),
    ],
)
def test_bad_limit_options_are_refused_at_registration(
    kwargs: dict[str, Any], message: str
) -> None:
    router = WorkflowRouter()
    with pytest.raises(RouterError, match=message):
        router.on("charge", **kwargs)(handler)
    assert router.handlers() == {}


# -- planning -------------------------------------------------------------------------------


def in_force(
    name: str = "l",
    concurrency: int | None = None,
    rate: Rate | None = None,
    burst: int = 1,
    types: tuple[str, ...] = ("t",),
) -> LimitInForce:
    return LimitInForce(name, types, "none", "", concurrency, rate, burst)


def test_concurrency_takes_only_the_free_slots_of_each_partition() -> None:
    limits = {"l": in_force(concurrency=2)}
    candidates = [Candidate(i, {"l": p}) for i, p in enumerate("aaabbc")]
    plan = plan_claims(candidates, limits, {("l", "a"): 1}, {}, now=0.0, want=10)
    assert plan.ids == [0, 3, 4, 5]  # a has one slot left; b two; c two
    assert plan.wait is None


def test_a_rate_takes_the_burst_then_one_per_interval() -> None:
    limits = {"l": in_force(rate=Rate(10, 1.0), burst=3)}
    candidates = [Candidate(i, {"l": ""}) for i in range(10)]
    plan = plan_claims(candidates, limits, {}, {}, now=100.0, want=10)
    assert plan.ids == [0, 1, 2]
    assert plan.buckets == {("l", ""): pytest.approx(100.3)}
    assert plan.wait == pytest.approx(0.1)  # the next start conforms 0.1 s later
    later = plan_claims(candidates[3:], limits, {}, plan.buckets, now=100.1, want=10)
    assert later.ids == [3]


def test_a_candidate_needs_every_one_of_its_limits() -> None:
    limits = {"type": in_force("type", concurrency=5), "group": in_force("group", concurrency=1)}
    candidates = [Candidate(1, {"type": "", "group": ""}), Candidate(2, {"type": ""})]
    plan = plan_claims(candidates, limits, {("group", ""): 1}, {}, now=0.0, want=5)
    assert plan.ids == [2]


def test_blocked_partitions_are_the_full_and_the_early_ones() -> None:
    limits = {"c": in_force("c", concurrency=1), "r": in_force("r", rate=Rate(1, 1.0))}
    running = {("c", "a"): 1, ("c", "b"): 0}
    buckets = {("r", "x"): 10.5, ("r", "y"): 9.0}
    assert blocked(limits, running, buckets, now=10.0) == {("c", "a"), ("r", "x")}


# A claim is modelled as (time step, how many it wants); operations finish after `hold` steps.
claims = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 8), st.integers(1, 4)), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(
    claims=claims,
    concurrency=st.integers(1, 5),
    count=st.integers(1, 20),
    burst=st.integers(1, 6),
    partitions=st.integers(1, 3),
)
def test_no_sequence_of_claims_exceeds_a_limit(
    claims: list[tuple[int, int, int]], concurrency: int, count: int, burst: int, partitions: int
) -> None:
    """Claims one after another (as the flow lock orders them), each over a fresh supply of
    candidates in several partitions: at no time do more than `concurrency` of a partition
    hold a lease, and no window of w seconds holds more than count * w + burst starts."""
    rate = Rate(count, 1.0)
    limits = {"l": in_force(concurrency=concurrency, rate=rate, burst=burst)}
    now, next_id = 0.0, 0
    buckets: dict[tuple[str, str], float] = {}
    running: list[tuple[str, float]] = []  # (partition, ends at)
    starts: dict[str, list[float]] = {}
    for step, want, hold in claims:
        now += step * 0.05
        running = [(p, end) for p, end in running if end > now]
        counts: dict[tuple[str, str], int] = {}
        for p, _ in running:
            counts["l", p] = counts.get(("l", p), 0) + 1
        candidates = []
        for _ in range(want * 2):
            candidates.append(Candidate(next_id, {"l": str(next_id % partitions)}))
            next_id += 1
        plan = plan_claims(candidates, limits, counts, buckets, now, want)
        assert len(plan.ids) <= want
        buckets.update(plan.buckets)
        for op_id in plan.ids:
            p = str(op_id % partitions)
            running.append((p, now + hold * 0.05))
            starts.setdefault(p, []).append(now)
        for p in {p for p, _ in running}:
            assert sum(1 for q, _ in running if q == p) <= concurrency
    for times in starts.values():
        for i, t in enumerate(times):
            for window in (0.0, 0.5, 1.0, 3.0):
                inside = sum(1 for u in times[i:] if u <= t + window + 1e-9)
                assert inside <= math.floor(count * window + 1e-9) + burst
