"""Flow control: concurrency and rate limits, declared on the router and held cluster wide.

Usage::

    stripe = Limit("stripe", concurrency=10, rate="100/s", partition_by="payload.merchant_id")

    @router.on("charge", limit=stripe)
    async def charge(ctx, payload): ...

    @router.on("send_email", concurrency=5, rate="1000/min")  # a limit of this type alone
    async def send_email(ctx, payload): ...

A limit counts the operations of its types that hold a lease (a worker claims them only for a
handler free to start them, so that is what runs) and the starts (claims) per period, per
partition when ``partition_by`` is given. Workers claim
limited types under a transaction-scoped advisory lock per limit, so two workers never both see
the last free slot; the plan of what to claim is :func:`plan_claims`, pure, below. Rates are
GCRA (the "theoretical arrival time" form of a token bucket): a start conforms when it is no
more than ``(burst - 1)`` emission intervals early, so any window of ``w`` seconds holds at most
``rate * w + burst`` starts -- smooth, with no burst of a whole period's worth at its boundary.
Operators override a limit's numbers at run time (``pgoutbox limits set``) and pause work
(``pgoutbox pause``); see docs/flow-control.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

PartitionKind = Literal["none", "ordering_key", "payload"]

_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(s|sec|second|m|min|minute|h|hour)s?\s*")
_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS |= {"h": 3600.0, "hour": 3600.0}
_LIMIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")
_PAYLOAD_PATH = re.compile(r"payload(\.[A-Za-z0-9_-]+)+")
# A default burst lets one claim take what accrued during about one claim round trip: with a
# burst of 1 a busy worker could start at most one operation per round trip.
_DEFAULT_BURST_SECONDS = 0.05


class LimitError(ValueError):
    """A limit declared or overridden wrongly (bad name, number, rate or partition)."""


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts per ``period_seconds``. ``Rate.parse("100/s")``, ``"1000/min"``,
    ``"5/10s"``, ``"3600/h"``."""

    count: int
    period_seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise LimitError(f"invalid rate count {self.count!r}: an integer >= 1")
        period = self.period_seconds
        if isinstance(period, bool) or not isinstance(period, int | float) or not period > 0:
            raise LimitError(f"invalid rate period {period!r}: seconds > 0")
        if not math.isfinite(period) or period > 366 * 24 * 3600:
            raise LimitError(f"invalid rate period {period!r}: at most a year")

    @classmethod
    def parse(cls, value: Rate | str) -> Rate:
        """``value`` as a Rate: a Rate, or text like ``"100/s"`` (units s, min, h)."""
        if isinstance(value, Rate):
            return value
        match = _RATE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise LimitError(
                f"invalid rate {value!r}: write starts per period, e.g. '100/s', '1000/min', "
                "'5/10s' or '3600/h'"
            )
        count, many, unit = match.groups()
        return cls(int(count), float(many or 1) * _UNITS[unit])

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate (GCRA's emission interval)."""
        return self.period_seconds / self.count

    def __str__(self) -> str:
        period = self.period_seconds
        for unit, seconds in (("h", 3600.0), ("min", 60.0), ("s", 1.0)):
            if period == seconds:
                return f"{self.count}/{unit}"
        return f"{self.count}/{period:g}s"


def default_burst(rate: Rate) -> int:
    """The burst a rate gets when none is declared: what accrues in 50 ms, at least 1."""
    return max(1, math.ceil(_DEFAULT_BURST_SECONDS / rate.interval))


@dataclass(frozen=True)
class Limit:
    """A concurrency and/or rate limit shared by every operation type it is given to.

    ``concurrency``: at most this many of them hold a lease at once, cluster wide.
    ``rate``: at most this many start per period (``"100/s"``), smoothly; ``burst`` is how many
    may start at once after a quiet spell (default: what accrues in 50 ms, at least 1).
    ``partition_by``: apply the limit per value of ``"ordering_key"`` or of a payload field
    (``"payload.merchant_id"``, nested with dots) instead of to all of them together.
    """

    name: str
    concurrency: int | None = None
    rate: Rate | str | None = None
    burst: int | None = None
    partition_by: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _LIMIT_NAME.fullmatch(self.name):
            raise LimitError(
                f"invalid limit name {self.name!r}: letters, digits and _ . : - (at most 200)"
            )
        check_concurrency(self.concurrency, self.name)
        if self.rate is not None:
            object.__setattr__(self, "rate", Rate.parse(self.rate))
        if self.burst is not None:
            if self.rate is None:
                raise LimitError(f"limit {self.name!r}: burst needs a rate")
            check_burst(self.burst, self.name)
        if self.concurrency is None and self.rate is None:
            raise LimitError(f"limit {self.name!r}: give a concurrency, a rate, or both")
        partition_of(self.partition_by, self.name)

    @property
    def steady_rate(self) -> Rate | None:
        """The rate, parsed (``rate`` as given may be text until ``__post_init__`` ran)."""
        return self.rate if isinstance(self.rate, Rate) else None


def check_concurrency(value: object, name: str) -> None:
    """Raise :class:`LimitError` unless ``value`` is None or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LimitError(f"limit {name!r}: invalid concurrency {value!r}, an integer >= 1")


def check_burst(value: object, name: str) -> None:
    """Raise :class:`LimitError` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LimitError(f"limit {name!r}: invalid burst {value!r}, an integer >= 1")


def partition_of(partition_by: str | None, name: str) -> tuple[PartitionKind, str]:
    """How a limit partitions: (kind, dotted payload path or '')."""
    if partition_by is None:
        return "none", ""
    if partition_by == "ordering_key":
        return "ordering_key", ""
    if isinstance(partition_by, str) and _PAYLOAD_PATH.fullmatch(partition_by):
        return "payload", partition_by.removeprefix("payload.")
    raise LimitError(
        f"limit {name!r}: invalid partition_by {partition_by!r}: 'ordering_key' or a payload "
        "field such as 'payload.merchant_id' (nested fields with dots)"
    )


@dataclass(frozen=True)
class LimitInForce:
    """A limit as the workers apply it: its types, and its numbers after any override."""

    name: str
    operation_types: tuple[str, ...]
    partition_kind: PartitionKind
    partition_path: str
    concurrency: int | None
    rate: Rate | None
    burst: int

    @property
    def tolerance(self) -> float:
        """GCRA's tolerance: how early (seconds) a start may be and still conform."""
        assert self.rate is not None
        return (self.burst - 1) * self.rate.interval


@dataclass(frozen=True)
class Candidate:
    """A due operation the claim may take, with its partition under each limit it is subject
    to (limit name -> partition value, '' when the limit is not partitioned)."""

    id: int
    partitions: Mapping[str, str]


@dataclass
class Plan:
    """What a claim takes: ``ids`` in candidate order, the rate buckets it moves
    (``(limit, partition) -> new theoretical arrival time``), and ``wait``: seconds until a
    start held back by a rate conforms (None: none was held back by a rate)."""

    ids: list[int] = field(default_factory=list)
    buckets: dict[tuple[str, str], float] = field(default_factory=dict)
    wait: float | None = None


def plan_claims(
    candidates: Sequence[Candidate],
    limits: Mapping[str, LimitInForce],
    running: Mapping[tuple[str, str], int],
    buckets: Mapping[tuple[str, str], float],
    now: float,
    want: int,
) -> Plan:
    """Choose up to ``want`` candidates, in order, that every limit they are subject to allows.

    ``running``: (limit, partition) -> operations holding a lease now; ``buckets``: (limit,
    partition) -> theoretical arrival time (epoch seconds; absent: none, the bucket is full);
    ``now``: the database's clock. A candidate is taken only if, for each of its limits, its
    partition has a free slot and a conforming start; taking it uses both. Skipped candidates
    leave everything as it was, so a later one of another partition may still go.
    """
    plan = Plan()
    taken: dict[tuple[str, str], int] = {}
    tat: dict[tuple[str, str], float] = {}
    for candidate in candidates:
        if len(plan.ids) >= want:
            break
        ok = True
        for name, partition in candidate.partitions.items():
            limit, key = limits[name], (name, partition)
            if limit.concurrency is not None:
                held = running.get(key, 0) + taken.get(key, 0)
                if held >= limit.concurrency:
                    ok = False
            if limit.rate is not None:
                arrival = tat.get(key, buckets.get(key, now))
                early = arrival - now
                if early > limit.tolerance:
                    ok = False
                    wait = early - limit.tolerance
                    plan.wait = wait if plan.wait is None else min(plan.wait, wait)
        if not ok:
            continue
        plan.ids.append(candidate.id)
        for name, partition in candidate.partitions.items():
            limit, key = limits[name], (name, partition)
            taken[key] = taken.get(key, 0) + 1
            if limit.rate is not None:
                tat[key] = max(tat.get(key, buckets.get(key, now)), now) + limit.rate.interval
    plan.buckets = tat
    return plan


def blocked(
    limits: Mapping[str, LimitInForce],
    running: Mapping[tuple[str, str], int],
    buckets: Mapping[tuple[str, str], float],
    now: float,
) -> set[tuple[str, str]]:
    """The (limit, partition) pairs that can take nothing now: every slot held, or the next
    start not conforming yet. The claim leaves their operations out of the candidates, so a
    busy partition does not crowd out the others."""
    full = {
        key
        for key, n in running.items()
        if (c := limits[key[0]].concurrency) is not None and n >= c
    }
    early = {
        key
        for key, arrival in buckets.items()
        if (limit := limits[key[0]]).rate is not None and arrival - now > limit.tolerance
    }
    return full | early
