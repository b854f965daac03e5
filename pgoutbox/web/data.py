"""What the console's pages read: the operator API (:class:`pgoutbox.admin.Admin`) for
everything it already answers, and the console's own named queries (``web_*`` in
``queries.sql``) for keyset pages, the chart, lifecycles and one operation's chain."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from pgoutbox.admin import Admin, Operation, OperationFilter, Stats, WorkerInfo, _like_patterns
from pgoutbox.audit import AuditVerification, verify_operation_chain
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE, Lifecycle
from pgoutbox.sql import queries

PAGE_SIZE: Final = 50
"""Operations per page of the list."""

SCAN_ROWS: Final = 100_000
"""How many operations (by id, newest first) one filtered page reads at most: a filter that
matches rarely (a payload search) gives a short page and a link to search further back,
instead of one slow request over the whole table."""

CHART_HOURS: Final = 24
STALE_SHOWN: Final = 20

_MAX_ID: Final = 2**63 - 1


@dataclass(frozen=True)
class ListFilter:
    """The operations list's filters (all given must match) and its keyset position."""

    states: tuple[str, ...] = ()
    operation_types: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    idempotency_key: str | None = None
    ordering_key: str | None = None
    search: str | None = None
    before: int | None = None

    @property
    def filtered(self) -> bool:
        """Whether any filter narrows the list (the keyset position is no filter)."""
        return any(
            (
                self.states,
                self.operation_types,
                self.channels,
                self.since,
                self.until,
                self.ordering_key,
                self.search,
            )
        )


@dataclass(frozen=True)
class ListPage:
    """A page of operations. ``next_before``: the keyset position of the next (older) page, or
    None at the end; ``scan_stopped`` is true when the page is short because it read its
    :data:`SCAN_ROWS` operations, not because no older operation matches."""

    rows: list[dict[str, Any]]
    next_before: int | None
    scan_stopped: bool = False


@dataclass(frozen=True)
class Bucket:
    """Attempt outcomes in one hour of the overview's chart."""

    start: datetime
    succeeded: int
    failed: int


@dataclass(frozen=True)
class Overview:
    """What the overview page shows."""

    stats: Stats
    workers: list[WorkerInfo]
    stale: list[Operation]
    chart: list[Bucket]
    paused_types: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RegisteredLifecycle:
    """One registered version of a lifecycle, and the operation types that run it now."""

    lifecycle: Lifecycle
    version: int | None
    digest: str
    registered_at: datetime | None
    registered_by: str | None
    operation_types: list[str]


class ConsoleData:
    """Reads for the console's pages, on an open :class:`Admin`'s pool."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self._q = queries(admin.settings.schema_name)

    async def overview(self) -> Overview:
        """Counts by state and type, the chart, stale operations and workers."""
        stats = await self.admin.stats(timedelta(hours=CHART_HOURS))
        workers = await self.admin.workers()
        stale = await self.admin.list_operations(OperationFilter(stale=True, limit=STALE_SHOWN))
        async with self.admin.pool.acquire() as conn:
            rows = await self._q["web_attempt_outcomes_over_time"].fetch(
                conn, since=_hour_floor(stats.since), bucket_seconds=3600.0
            )
        found = {row["bucket"]: row for row in rows}
        start = _hour_floor(stats.since)
        chart = []
        for hour in range(CHART_HOURS + 1):
            at = start + timedelta(hours=hour)
            row = found.get(at)
            chart.append(Bucket(at, row["succeeded"] if row else 0, row["failed"] if row else 0))
        # What is paused (a type, a channel, a limit or one of its partitions), by pause.
        return Overview(stats, workers, stale, chart, paused_types=[p.what for p in stats.pauses])

    async def operations(self, f: ListFilter) -> ListPage:
        """One page of the operations list (keyset on id, newest first)."""
        async with self.admin.pool.acquire() as conn:
            before = _MAX_ID if f.before is None else f.before
            floor = 0
            if f.idempotency_key is not None:
                # Unique: the index finds the one operation; the page then reads only it.
                found = await self._q["web_operation_by_idempotency_key"].fetchval(
                    conn, idempotency_key=f.idempotency_key
                )
                if found is None or found >= before:
                    return ListPage([], None)
                before, floor = found + 1, found
            elif f.filtered:
                lowest = await self._q["web_operations_scan_floor"].fetchval(
                    conn, before=before, scan=SCAN_ROWS
                )
                floor = lowest if lowest is not None else 0
            rows = await self._q["web_operations_page"].fetch(
                conn,
                before=before,
                floor=floor,
                states=list(f.states) or None,
                type_patterns=_like_patterns(f.operation_types),
                channels=list(f.channels) or None,
                since=f.since,
                until=f.until,
                ordering_key=f.ordering_key,
                search=f.search,
                limit=PAGE_SIZE + 1,
            )
        page = [dict(row) for row in rows[:PAGE_SIZE]]
        if len(rows) > PAGE_SIZE:
            return ListPage(page, page[-1]["id"])
        if floor > 1 and f.idempotency_key is None:
            # Read up to the scan floor without filling the page: older operations may match.
            return ListPage(page, floor, scan_stopped=True)
        return ListPage(page, None)

    async def chain(self, operation_id: int) -> AuditVerification:
        """This operation's audit chain, verified."""
        async with self.admin.pool.acquire() as conn:
            return await verify_operation_chain(conn, self.admin.settings.schema_name, operation_id)

    async def lifecycle_named(self, name: str) -> Lifecycle:
        """The newest registered version of a lifecycle (the default one needs none)."""
        if name == DEFAULT_LIFECYCLE.name:
            return DEFAULT_LIFECYCLE
        async with self.admin.pool.acquire() as conn:
            rows = await self._q["lifecycles_latest"].fetch(conn, names=[name])
        if not rows:
            return DEFAULT_LIFECYCLE
        return Lifecycle.from_definition(json.loads(rows[0]["definition"]))

    async def lifecycles(self) -> list[RegisteredLifecycle]:
        """The default lifecycle, then every registered version of every other."""
        async with self.admin.pool.acquire() as conn:
            versions = await self._q["web_lifecycles_all"].fetch(conn)
            types = await self._q["web_lifecycle_types_all"].fetch(conn)
        by_lifecycle: dict[str, list[str]] = {}
        for row in types:
            by_lifecycle.setdefault(row["lifecycle"], []).append(row["operation_type"])
        found = [
            RegisteredLifecycle(
                DEFAULT_LIFECYCLE, None, DEFAULT_LIFECYCLE.digest, None, None, ["(every other)"]
            )
        ]
        for row in versions:
            found.append(
                RegisteredLifecycle(
                    Lifecycle.from_definition(json.loads(row["definition"])),
                    row["version"],
                    row["digest"],
                    row["registered_at"],
                    row["registered_by"],
                    by_lifecycle.get(row["name"], []),
                )
            )
        return found


def _hour_floor(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)
