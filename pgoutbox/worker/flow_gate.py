"""The flow gate: what a worker may claim right now, and the claim of limited types.

The gate splits the worker's operation types three ways, from the limits its router declares
and the overrides and pauses in the database (read again every poll interval):

- paused ones (their channel, type or limit is paused) are not claimed at all;
- free ones, with no limit, are claimed by the ordinary statements, exactly as without flow
  control (a worker with no limits and no pauses pays one small query per poll interval);
- limited ones are claimed by :meth:`FlowGate.claim`: under an advisory lock per limit, it
  counts what holds a lease, reads the rate buckets, and leases what
  :func:`pgoutbox.flow.plan_claims` allows, in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg

from pgoutbox.flow import (
    Candidate,
    Limit,
    LimitInForce,
    Rate,
    blocked,
    default_burst,
    partition_of,
    plan_claims,
)
from pgoutbox.router import HandlerSpec
from pgoutbox.sql import Query


@dataclass(frozen=True)
class Pause:
    """An open pause: of a channel, a type, or a limit's types (one partition, or all)."""

    scope: str
    target: str
    partition: str | None


@dataclass
class _Split:
    free: list[str] = field(default_factory=list)
    limited: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)


class FlowGate:
    """One worker's view of the limits and pauses that apply to its types."""

    def __init__(
        self,
        queries: Mapping[str, Query],
        schema: str,
        channel: str,
        handlers: Mapping[str, HandlerSpec],
        refresh_seconds: float,
    ) -> None:
        self._q, self._schema, self._channel = queries, schema, channel
        self._handlers = handlers
        self._refresh_seconds = refresh_seconds
        self._declared: dict[str, Limit] = {}
        self._types_of: dict[str, list[str]] = {}
        for operation_type, spec in sorted(handlers.items()):
            for limit in spec.limits:
                self._declared[limit.name] = limit
                self._types_of.setdefault(limit.name, []).append(operation_type)
        self.limits: dict[str, LimitInForce] = {
            name: _in_force(limit, self._types_of[name], None)
            for name, limit in self._declared.items()
        }
        self.pauses: list[Pause] = []
        self._refreshed_at: float | None = None
        self._split = self._compute_split()

    # -- what to claim -------------------------------------------------------------------

    @property
    def free_types(self) -> list[str]:
        """Types the ordinary claim statements take: neither paused nor limited."""
        return self._split.free

    @property
    def limited_types(self) -> list[str]:
        """Types only :meth:`claim` takes."""
        return self._split.limited

    @property
    def paused_types(self) -> list[str]:
        """Types nobody on this worker claims now."""
        return self._split.paused

    def _compute_split(self) -> _Split:
        split = _Split()
        paused: set[str] = set()
        for pause in self.pauses:
            if pause.scope == "channel" and pause.target == self._channel:
                paused |= set(self._handlers)
            elif pause.scope == "type":
                paused.add(pause.target)
            elif pause.scope == "limit" and pause.partition is None:
                paused |= set(self._types_of.get(pause.target, ()))
        limited = {t for types in self._types_of.values() for t in types}
        for operation_type in sorted(self._handlers):
            if operation_type in paused:
                split.paused.append(operation_type)
            elif operation_type in limited:
                split.limited.append(operation_type)
            else:
                split.free.append(operation_type)
        return split

    # -- the database's view -------------------------------------------------------------

    async def declare(self, conn: asyncpg.Connection) -> None:
        """Upsert this router's limits into ``flow_limits`` (operators see and override them)."""
        if not self._declared:
            return
        limits = list(self._declared.values())
        rates = [limit.steady_rate for limit in limits]
        await self._q["flow_limits_declare"].execute(
            conn,
            names=[limit.name for limit in limits],
            types=[" ".join(self._types_of[limit.name]) for limit in limits],
            partition_bys=[limit.partition_by for limit in limits],
            concurrencies=[limit.concurrency for limit in limits],
            rate_counts=[r.count if r else None for r in rates],
            rate_periods=[r.period_seconds if r else None for r in rates],
            bursts=[_burst(limit) for limit in limits],
        )

    def refresh_due(self) -> bool:
        """Whether the overrides and pauses are older than one poll interval."""
        return (
            self._refreshed_at is None
            or time.monotonic() - self._refreshed_at >= self._refresh_seconds
        )

    async def refresh(self, conn: asyncpg.Connection) -> None:
        """Read the overrides and pauses in force again."""
        if self._refreshed_at is None:
            await self.declare(conn)
        pauses = await self._q["flow_pauses_open"].fetch(conn)
        self.pauses = [Pause(p["scope"], p["target"], p["partition"]) for p in pauses]
        if self._declared:
            overrides = {
                row["limit_name"]: row
                for row in await self._q["flow_overrides_in_force"].fetch(conn)
            }
            self.limits = {
                name: _in_force(limit, self._types_of[name], overrides.get(name))
                for name, limit in self._declared.items()
            }
        self._split = self._compute_split()
        self._refreshed_at = time.monotonic()

    # -- the limited claim ---------------------------------------------------------------

    async def claim(
        self,
        conn: asyncpg.Connection,
        *,
        want: int,
        worker_id: str,
        lease_seconds: float,
        lifecycles: Mapping[str, str],
        step_pairs: list[tuple[str, str]],
    ) -> tuple[list[asyncpg.Record], float | None]:
        """Lease up to ``want`` operations of the limited types that their limits allow, in one
        transaction; the rows leased (as the other claims return them) and, when a rate held
        some back, the seconds until the next start conforms."""
        types = set(self.limited_types)
        limits = {
            name: limit
            for name, limit in sorted(self.limits.items())
            if types.intersection(limit.operation_types)
        }
        names = list(limits)
        q = self._q
        async with conn.transaction():
            now = await q["flow_lock"].fetchval(conn, schema=self._schema, names=names)
            running = await self._running(conn, names, limits)
            buckets: dict[tuple[str, str], float] = {}
            if any(limit.rate is not None for limit in limits.values()):
                for row in await q["flow_buckets_of"].fetch(conn, names=names):
                    buckets[row["limit_name"], row["partition"]] = row["tat"]
            held_back = blocked(limits, running, buckets, now)
            held_back |= {
                (p.target, p.partition)
                for p in self.pauses
                if p.scope == "limit" and p.partition is not None and p.target in limits
            }
            wait = _rate_wait(limits, buckets, held_back, now)
            rows = await self._candidates(
                conn, limits, held_back, lifecycles, step_pairs, scan=max(4 * want, 20)
            )
            candidates = [
                Candidate(
                    row["id"],
                    {
                        name: row["partitions"][i]
                        for i, name in enumerate(names)
                        if row["operation_type"] in limits[name].operation_types
                    },
                )
                for row in rows
            ]
            if rows:
                now = rows[0]["now"]
            plan = plan_claims(candidates, limits, running, buckets, now, want)
            leased: list[asyncpg.Record] = []
            if plan.ids:
                leased = await q["operations_flow_claim"].fetch(
                    conn, ids=plan.ids, worker_id=worker_id, lease_seconds=lease_seconds
                )
            if plan.buckets:
                keys = list(plan.buckets)
                await q["flow_buckets_save"].execute(
                    conn,
                    names=[k[0] for k in keys],
                    partitions=[k[1] for k in keys],
                    tats=[plan.buckets[k] for k in keys],
                )
        if plan.wait is not None:
            wait = plan.wait if wait is None else min(wait, plan.wait)
        return leased, wait

    async def _candidates(
        self,
        conn: asyncpg.Connection,
        limits: Mapping[str, LimitInForce],
        held_back: set[tuple[str, str]],
        lifecycles: Mapping[str, str],
        step_pairs: list[tuple[str, str]],
        scan: int,
    ) -> list[asyncpg.Record]:
        """Up to ``scan`` due operations of the limited types, locked, none of a held-back
        (limit, partition), each with its partition under every limit (in ``limits`` order).
        More than the claim wants: some may go back (more of one partition than it has room
        for)."""
        types = set(self.limited_types)
        exclusions = [
            (t, limits[name].partition_kind, limits[name].partition_path, partition)
            for name, partition in sorted(held_back)
            for t in limits[name].operation_types
            if t in types
        ]
        first = sorted(types)
        steps = [(t, s) for t, s in step_pairs if t in types]
        rows: list[asyncpg.Record] = await self._q["operations_flow_candidates"].fetch(
            conn,
            channel=self._channel,
            operation_types=first,
            lifecycles=[lifecycles[t] for t in first],
            step_types=[t for t, _ in steps],
            step_states=[s for _, s in steps],
            x_types=[x[0] for x in exclusions],
            x_kinds=[x[1] for x in exclusions],
            x_paths=[x[2] for x in exclusions],
            x_values=[x[3] for x in exclusions],
            kinds=[limit.partition_kind for limit in limits.values()],
            paths=[limit.partition_path for limit in limits.values()],
            scan=scan,
        )
        return rows

    async def _running(
        self, conn: asyncpg.Connection, names: list[str], limits: Mapping[str, LimitInForce]
    ) -> dict[tuple[str, str], int]:
        """(limit, partition) -> operations of the limit's types holding a lease now."""
        rows = [
            (i, t, limits[name].partition_kind, limits[name].partition_path)
            for i, name in enumerate(names)
            if limits[name].concurrency is not None
            for t in limits[name].operation_types
        ]
        if not rows:
            return {}
        found = await self._q["operations_flow_running"].fetch(
            conn,
            numbers=[r[0] for r in rows],
            types=[r[1] for r in rows],
            kinds=[r[2] for r in rows],
            paths=[r[3] for r in rows],
        )
        running: dict[tuple[str, str], int] = {}
        for row in found:
            key = (names[row["n"]], row["partition"])
            running[key] = running.get(key, 0) + row["running"]
        return running


def _burst(limit: Limit, rate: Rate | None = None) -> int:
    """The declared burst, or the default for ``rate`` (the declared one unless given)."""
    if limit.burst is not None:
        return limit.burst
    rate = rate or limit.steady_rate
    return default_burst(rate) if rate is not None else 1


def _in_force(limit: Limit, types: list[str], override: asyncpg.Record | None) -> LimitInForce:
    """``limit`` as declared, with the numbers an operator's override sets instead."""
    kind, path = partition_of(limit.partition_by, limit.name)
    concurrency, rate = limit.concurrency, limit.steady_rate
    burst: int | None = None
    if override is not None:
        if override["concurrency"] is not None:
            concurrency = override["concurrency"]
        if override["rate_count"] is not None:
            rate = Rate(override["rate_count"], override["rate_period_seconds"])
        burst = override["burst"]
    if burst is None:
        burst = _burst(limit, rate)
    return LimitInForce(limit.name, tuple(types), kind, path, concurrency, rate, burst)


def _rate_wait(
    limits: Mapping[str, LimitInForce],
    buckets: Mapping[tuple[str, str], float],
    held_back: set[tuple[str, str]],
    now: float,
) -> float | None:
    """Seconds until the earliest rate-held partition may start again (None: none is)."""
    waits = [
        buckets[key] - now - limits[key[0]].tolerance
        for key in held_back
        if key in buckets and limits[key[0]].rate is not None
    ]
    waits = [w for w in waits if w > 0]
    return min(waits) if waits else None
