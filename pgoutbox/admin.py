"""The operator's Python API: inspect, retry, cancel, replay, report on and purge operations.

Everything the ``pgoutbox ops``, ``stats``, ``workers`` and ``audit report`` commands do is a
method of :class:`Admin`, usable the same way from a web application or a notebook. Usage::

    from datetime import timedelta
    from pgoutbox import Settings
    from pgoutbox.admin import Admin, OperationFilter

    async with Admin(Settings().database) as admin:
        stuck = await admin.list_operations(OperationFilter(stale=True))
        failed = [op.id for op in stuck if op.state == "failed"]
        for result in await admin.retry(failed, actor="alice", reason="provider is back"):
            print(result.message)

State changes go through the database's lifecycle check like every other: each action is an
``UPDATE`` naming its transition (``retry``, ``cancel``, ``replay``) and the acting person, which
the audit trigger records in the operation's hash chain -- or refuses, when the operation's
lifecycle does not allow it from its current state. Every timestamp is the database's.

Methods return frozen dataclasses; :func:`as_json` turns any of them into plain JSON values
(ISO-8601 timestamps, durations in seconds, hashes in hex), as ``--json`` prints them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Literal

import asyncpg

from pgoutbox import flow_admin
from pgoutbox.audit import AuditVerification, verify_audit
from pgoutbox.db import create_pool
from pgoutbox.fire import Fired, fire_on
from pgoutbox.flow import Rate
from pgoutbox.flow_admin import LimitInfo, PauseInfo, Scope
from pgoutbox.lifecycle import (
    BUILTIN_STATES,
    CANCELLED,
    DEAD,
    DEFAULT_LIFECYCLE,
    PENDING,
    SUCCEEDED,
    Lifecycle,
)
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import Query, queries

__all__ = [
    "LIVE_WITHIN",
    "PURGE_BATCH_SIZE",
    "STALE_AFTER",
    "ActionResult",
    "Admin",
    "AdminError",
    "Attempt",
    "AuditRecord",
    "Operation",
    "OperationDetail",
    "OperationFilter",
    "OperationNotFound",
    "PurgePreview",
    "PurgeResult",
    "Stats",
    "TransitionRefused",
    "TypeStats",
    "When",
    "WorkerInfo",
    "as_json",
    "attempts_from_audit",
]

LIVE_WITHIN: Final = timedelta(seconds=30)
"""A worker is live when its heartbeat is at most this old: three default heartbeat intervals
(the heartbeat runs every ``lease_seconds / 3`` = 10 s by default)."""

STALE_AFTER: Final = timedelta(minutes=5)
"""How long an operation may be due (or its lease expired) before it is listed as stale."""

PURGE_BATCH_SIZE: Final = 1000
"""Operations deleted per transaction by :meth:`Admin.purge`."""

When = datetime | timedelta
"""A point in time: an aware ``datetime``, or a ``timedelta`` meaning that long before the
database's ``now()``."""

Action = Literal["retry", "cancel", "replay"]

_MAX_ACTOR_CHARS: Final = 200


class AdminError(Exception):
    """An operator action that could not be done; the message says why."""


class OperationNotFound(AdminError, LookupError):
    """No operation (and no audit trail) with this id."""


class TransitionRefused(AdminError):
    """The operation's lifecycle does not allow the action from its current state; the
    database refused it and nothing changed."""

    def __init__(self, message: str, operation_id: int, state: str, action: str) -> None:
        super().__init__(message)
        self.operation_id = operation_id
        self.state = state
        self.action = action


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperationFilter:
    """Which operations :meth:`Admin.list_operations` returns (all given filters must match).

    ``operation_types`` are exact names or patterns with ``*`` (``billing.*``); ``since`` and
    ``until`` bound ``created_at`` (``since`` inclusive, ``until`` exclusive). ``stale`` keeps
    only operations that look stuck: ones waiting for a step (pending, failed, or resting in a
    later working state of their lifecycle) that no live worker of their channel handles, or
    that have been due for longer than ``older_than``, and ones running a step whose lease
    expired longer than ``older_than`` ago without being rescued. Parked operations wait for a
    person by design and are never listed as stale.
    """

    states: tuple[str, ...] = ()
    operation_types: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    since: When | None = None
    until: When | None = None
    stale: bool = False
    older_than: timedelta = STALE_AFTER
    limit: int = 100


@dataclass(frozen=True)
class Operation:
    """One row of ``<schema>.operations`` (without its payload).

    ``stale_reason`` says why the operation looks stuck: ``"unhandled"`` (no live worker of its
    channel handles its type), ``"overdue"`` (due for longer than the stale threshold) or
    ``"lease_expired"`` (claimed, and its lease expired longer ago than that); ``None`` if not.
    """

    id: int
    operation_type: str
    channel: str
    lifecycle: str
    state: str
    attempts: int
    max_attempts: int | None
    priority: int
    run_at: datetime
    idempotency_key: str | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    last_error: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    version: int
    stale_reason: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One row of ``<schema>.audit_log``: a state change, who made it, when (hashes in hex).

    ``actor`` is who the change was declared to be by (a worker id, an operator's name);
    ``db_role`` the database role that made it, as the database authenticated it (None on rows
    written before revision 0010).
    """

    operation_id: int
    seq: int
    operation_type: str
    from_state: str | None
    to_state: str
    trigger: str
    attempt: int
    actor: str
    db_role: str | None
    detail: str | None
    recorded_at: datetime
    prev_hash: str | None
    hash: str


@dataclass(frozen=True)
class Attempt:
    """One attempt, derived from the audit log: a ``claim`` row and the row that ended it.

    ``outcome`` is the ending transition (``succeed``, ``fail``, ``give_up``, ``lose``,
    ``release``) or ``running``; ``state_after`` the state it led to; ``error`` the ending row's
    detail (error and traceback of a failure, the reason of a ``lose``).
    """

    number: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    duration_seconds: float | None
    outcome: str
    state_after: str
    error: str | None


@dataclass(frozen=True)
class OperationDetail:
    """An operation, every attempt, and its full audit trail.

    ``operation`` and ``payload`` are ``None`` when the operation was purged: its audit trail
    outlives it.
    """

    operation_id: int
    operation: Operation | None
    payload: Any
    attempts: list[Attempt]
    audit: list[AuditRecord]


@dataclass(frozen=True)
class ActionResult:
    """What one retry/cancel/replay did to one operation.

    ``ok`` is False when the operation does not exist (``state_before`` is ``None``) or its
    lifecycle refused the action (nothing changed); ``message`` says which, naming the
    operation, its state and what is allowed.
    """

    operation_id: int
    action: str
    ok: bool
    state_before: str | None
    state: str | None
    message: str


@dataclass(frozen=True)
class TypeStats:
    """Counts for one operation type (or all of them, ``operation_type`` ``"*"``).

    ``counts`` maps state to number of operations; ``oldest_pending_seconds`` is how long the
    longest-waiting due ``pending`` operation has waited (``now() - run_at``); the failure rate
    is over attempt outcomes recorded since :attr:`Stats.since`: ``failed_attempts`` (``fail``,
    ``give_up``, ``lose``) divided by ``finished_attempts`` (those and ``succeed``).
    """

    operation_type: str
    counts: dict[str, int]
    total: int
    oldest_pending_seconds: float | None
    finished_attempts: int
    failed_attempts: int
    failure_rate: float | None


@dataclass(frozen=True)
class Stats:
    """Operations per state and type, queue age and failure rate, at ``generated_at``."""

    generated_at: datetime
    since: datetime
    total: TypeStats
    by_type: list[TypeStats]
    oldest_pending_id: int | None
    pauses: list[PauseInfo] = dataclasses.field(default_factory=list)  # in force now


@dataclass(frozen=True)
class WorkerInfo:
    """A registered worker: where it runs, what it handles, its heartbeat, what it holds.

    ``live`` is true when its heartbeat is at most ``live_within`` old (see :data:`LIVE_WITHIN`);
    a worker killed without stopping stays registered but not live.
    """

    id: str
    hostname: str
    pid: int
    channel: str
    operation_types: list[str]
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    live: bool
    held: list[int]


@dataclass(frozen=True)
class PurgePreview:
    """What :meth:`Admin.purge` would delete: finished operations per state."""

    finished_before: datetime
    include_dead: bool
    counts: dict[str, int]
    total: int


@dataclass(frozen=True)
class PurgeResult:
    """A completed purge, as recorded in ``<schema>.purges`` (row ``purge_id``)."""

    purge_id: int
    actor: str
    finished_before: datetime
    include_dead: bool
    deleted: int
    counts: dict[str, int]
    batches: int
    started_at: datetime
    finished_at: datetime


def as_json(value: Any) -> Any:
    """``value`` (a result dataclass, or lists/dicts of them) as plain JSON values.

    Usage::

        json.dumps(as_json(await admin.stats()))

    Timestamps become ISO-8601 strings; keys are the dataclasses' field names.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


# -- the API ---------------------------------------------------------------------------------


class Admin:
    """Operator actions on the pgoutbox schema ``settings`` points at.

    Usage::

        async with Admin(settings.database) as admin:
            detail = await admin.get_operation(42)
            await admin.replay([42], actor="alice", reason="card updated, see ticket 1234")

    It holds a small asyncpg pool, so one ``Admin`` can serve a web application's concurrent
    requests. ``live_within`` is how recent a worker's heartbeat must be for it to count as live
    (for :meth:`workers` and stale operations).
    """

    def __init__(self, settings: DatabaseSettings, *, live_within: timedelta = LIVE_WITHIN) -> None:
        if live_within <= timedelta(0):
            raise ValueError(f"live_within must be positive, not {live_within}")
        self.settings = settings
        self.live_within = live_within
        self._q = queries(settings.schema_name)
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Connect (done by ``async with``)."""
        if self._pool is None:
            self._pool = await create_pool(self.settings, max_size=self.settings.pool_size)

    async def close(self) -> None:
        """Close the connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> Admin:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (after :meth:`open`)."""
        if self._pool is None:
            raise RuntimeError("Admin is not open: use `async with Admin(settings) as admin:`")
        return self._pool

    # -- reading ---------------------------------------------------------------------------

    async def now(self) -> datetime:
        """The database's clock."""
        async with self.pool.acquire() as conn:
            now: datetime = await self._q["database_now"].fetchval(conn)
            return now

    async def list_operations(self, filters: OperationFilter | None = None) -> list[Operation]:
        """Operations matching ``filters``, newest first, at most ``filters.limit``.

        Usage::

            dead = await admin.list_operations(OperationFilter(states=("dead",)))
        """
        f = filters or OperationFilter()
        if f.limit < 1:
            raise ValueError(f"limit must be at least 1, not {f.limit}")
        if f.older_than < timedelta(0):
            raise ValueError(f"older_than must not be negative, not {f.older_than}")
        async with self.pool.acquire() as conn:
            rows = await self._q["operations_admin_list"].fetch(
                conn,
                states=list(f.states) or None,
                type_patterns=_like_patterns(f.operation_types),
                channels=list(f.channels) or None,
                since=await _resolve_optional(conn, self._q, f.since),
                until=await _resolve_optional(conn, self._q, f.until),
                stale=f.stale,
                older_than_seconds=f.older_than.total_seconds(),
                live_within_seconds=self.live_within.total_seconds(),
                limit=f.limit,
            )
        return [Operation(**dict(row)) for row in rows]

    async def get_operation(self, operation_id: int) -> OperationDetail:
        """One operation, every attempt (with worker, duration, outcome and error) and its full
        audit trail. Raises :class:`OperationNotFound` when neither the operation nor any audit
        row of it exists; a purged operation has an audit trail and ``operation=None``."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            row = await self._q["operations_admin_get"].fetchrow(conn, id=operation_id)
            audit_rows = await self._q["audit_log_of_operation"].fetch(
                conn, operation_id=operation_id
            )
        if row is None and not audit_rows:
            raise OperationNotFound(f"no operation {operation_id}")
        audit = [_audit_record(r) for r in audit_rows]
        operation = payload = None
        if row is not None:
            fields = dict(row)
            payload = json.loads(fields.pop("payload"))
            operation = Operation(**fields)
        return OperationDetail(operation_id, operation, payload, attempts_from_audit(audit), audit)

    def report(
        self,
        since: When | None = None,
        until: When | None = None,
        operation_types: Sequence[str] = (),
    ) -> AsyncIterator[AuditRecord]:
        """Every audit row recorded in ``[since, until)``, in the order it was recorded: one
        row per state change with who, what and when -- the report for an auditor. Without
        ``since`` it starts at the first row; without ``until`` it ends at the database's
        ``now()`` (use :meth:`resolve` first to know which instant that was).

        Usage::

            async for record in admin.report(datetime(2026, 10, 1, tzinfo=UTC),
                                             datetime(2026, 11, 1, tzinfo=UTC)):
                writer.writerow(as_json(record))

        Rows stream from one consistent snapshot, so the log can be large; stop early with
        ``contextlib.aclosing``. ``operation_types`` are names or ``*`` patterns.
        """
        return self._report(since, until, tuple(operation_types))

    async def _report(
        self, since: When | None, until: When | None, operation_types: tuple[str, ...]
    ) -> AsyncIterator[AuditRecord]:
        q = self._q["audit_log_report"]
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            args = q.args(
                since=await _resolve_optional(conn, self._q, since),
                until=await _resolve(conn, self._q, timedelta(0) if until is None else until),
                type_patterns=_like_patterns(operation_types),
            )
            async for row in conn.cursor(q.asyncpg_sql, *args, prefetch=1000):
                yield _audit_record(row)

    async def resolve(self, when: When) -> datetime:
        """The instant ``when`` stands for: an aware datetime as it is, a timedelta counted back
        from the database's clock (``timedelta(0)``: the database's ``now()``)."""
        async with self.pool.acquire() as conn:
            return await _resolve(conn, self._q, when)

    async def stats(self, since: When = timedelta(hours=24)) -> Stats:
        """Operations per state and type, the oldest due pending operation's wait, and the
        attempt failure rate since ``since`` (default: the last 24 hours)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            now = await self._q["database_now"].fetchval(conn)
            since_at = await _resolve(conn, self._q, since)
            counts = await self._q["operations_admin_stats"].fetch(conn)
            outcomes = await self._q["audit_log_attempt_outcomes"].fetch(conn, since=since_at)
            oldest = await self._q["operations_oldest_pending"].fetchrow(conn)
            paused = await flow_admin.pauses(conn, self._q)
        per_type: dict[str, dict[str, int]] = {}
        waiting: dict[str, float] = {}
        for row in counts:
            per_type.setdefault(row["operation_type"], {})[row["state"]] = row["operations"]
            if row["oldest_pending_seconds"] is not None:
                waiting[row["operation_type"]] = row["oldest_pending_seconds"]
        finished = {row["operation_type"]: (row["finished"], row["failed"]) for row in outcomes}
        by_type = [
            _type_stats(
                name, per_type.get(name, {}), waiting.get(name), *finished.get(name, (0, 0))
            )
            for name in sorted(set(per_type) | set(finished))
        ]
        all_counts: dict[str, int] = {}
        for t in by_type:
            for state, n in t.counts.items():
                all_counts[state] = all_counts.get(state, 0) + n
        total = _type_stats(
            "*",
            all_counts,
            oldest["waiting_seconds"] if oldest else None,
            sum(t.finished_attempts for t in by_type),
            sum(t.failed_attempts for t in by_type),
        )
        return Stats(now, since_at, total, by_type, oldest["id"] if oldest else None, paused)

    async def workers(self) -> list[WorkerInfo]:
        """Registered workers, whether each is live, and the operations each holds."""
        async with self.pool.acquire() as conn:
            rows = await self._q["workers_admin_list"].fetch(
                conn,
                live_within_seconds=self.live_within.total_seconds(),
            )
        return [WorkerInfo(**dict(row)) for row in rows]

    async def audit_row_count(self) -> int:
        """How many audit rows there are (e.g. for a progress bar)."""
        async with self.pool.acquire() as conn:
            count: int = await self._q["audit_log_count"].fetchval(conn)
            return count

    async def verify(self, progress: Callable[[int], None] | None = None) -> AuditVerification:
        """Recompute every audit hash chain and check the schema's triggers and functions (see
        :func:`pgoutbox.audit.verify_audit`); ``progress`` is called with the number of rows
        checked so far."""
        async with self.pool.acquire() as conn:
            return await verify_audit(conn, self.settings.schema_name, progress=progress)

    # -- acting ----------------------------------------------------------------------------

    async def retry(
        self, ids: Iterable[int], *, actor: str, reason: str | None = None
    ) -> list[ActionResult]:
        """Run failed operations now instead of at their scheduled retry (``failed`` →
        ``pending``, ``run_at = now()``), audited with ``actor`` and ``reason``.

        Each id is done (or refused) on its own; see :class:`ActionResult`.
        """
        return await self._act("retry", ids, actor, reason)

    async def cancel(
        self,
        ids: Iterable[int],
        *,
        actor: str,
        reason: str | None = None,
        wait_seconds: float = 0.0,
    ) -> list[ActionResult]:
        """Cancel pending, failed or dead operations (→ ``cancelled``), audited with ``actor``
        and ``reason`` (a dead one: it will not be pursued, and operations ordered after it by
        an ordering key may run).

        A running operation (``claimed``, or a custom lifecycle's working step, leased to a
        worker) is asked to stop: the request is recorded in the database and the worker
        holding it, on whatever host, cancels its handler and records ``abort`` (→
        ``cancelled``, audited with ``actor``); if its lease has expired, the rescuer does.
        This waits up to ``wait_seconds`` for the answer: ``ok`` only when the operation ended
        cancelled. If the handler finished first, its real outcome stands and the message says
        so; if nobody acted in time, the request stands and the message says that.
        """
        if wait_seconds < 0:
            raise ValueError(f"wait_seconds must be 0 or more, not {wait_seconds}")
        return await self._act("cancel", ids, actor, reason, wait_seconds=wait_seconds)

    async def replay(
        self,
        ids: Iterable[int],
        *,
        actor: str,
        reason: str | None = None,
        extra_attempts: int = 1,
    ) -> list[ActionResult]:
        """Run dead or cancelled operations again, now (→ ``pending``), audited with ``actor``
        and ``reason``; each gets ``extra_attempts`` more attempts (default 1).

        ``attempts`` keeps counting, so every attempt keeps its own number in the audit trail,
        and ``max_attempts`` becomes ``attempts + extra_attempts``: by default the operation
        runs once more and, if that fails, is ``dead`` again for a person to decide. With more
        extra attempts, failures are retried with the handler's backoff.
        """
        if extra_attempts < 1:
            raise ValueError(f"extra_attempts must be at least 1, not {extra_attempts}")
        return await self._act("replay", ids, actor, reason, extra_attempts)

    async def fire(
        self, operation_id: int, trigger: str, *, actor: str, detail: str | None = None
    ) -> Fired:
        """Fire a declared trigger at an operation (e.g. ``approve`` at a refund parked in
        ``awaiting_approval``), audited with ``actor`` and ``detail``, in its own transaction.
        Raises :class:`pgoutbox.fire.FireRefused` (nothing changed) when it is not allowed;
        see :func:`pgoutbox.fire.fire`."""
        async with self.pool.acquire() as conn:
            return await fire_on(conn, self._q, operation_id, trigger, actor=actor, detail=detail)

    # -- flow control (docs/flow-control.md) -------------------------------------------------

    async def pause(
        self,
        scope: Scope,
        target: str,
        *,
        actor: str,
        reason: str,
        partition: str | None = None,
    ) -> PauseInfo:
        """Stop workers claiming a channel's, a type's or a limit's operations (``scope``
        ``"channel"``, ``"type"`` or ``"limit"``; with ``partition``, only that partition of
        the limit), within one poll interval, cluster wide; running work finishes. Recorded
        with ``actor``, ``reason`` and the database role. Usage::

            await admin.pause("type", "charge", actor="alice", reason="gateway outage INC-42")

        Raises :class:`pgoutbox.flow_admin.FlowControlError` if it is paused already.
        """
        async with self.pool.acquire() as conn:
            return await flow_admin.pause(
                conn, self._q, scope, target, partition=partition, actor=actor, reason=reason
            )

    async def resume(
        self,
        scope: Scope,
        target: str,
        *,
        actor: str,
        reason: str,
        partition: str | None = None,
    ) -> datetime:
        """End a pause (recorded with ``actor``, ``reason`` and the database role); workers
        claim again within one poll interval. Returns when it had been paused. Raises
        :class:`pgoutbox.flow_admin.FlowControlError` if it is not paused."""
        async with self.pool.acquire() as conn:
            return await flow_admin.resume(
                conn, self._q, scope, target, partition=partition, actor=actor, reason=reason
            )

    async def pauses(self) -> list[PauseInfo]:
        """The pauses in force, oldest first."""
        async with self.pool.acquire() as conn:
            return await flow_admin.pauses(conn, self._q)

    async def limits(self) -> list[LimitInfo]:
        """Every limit the workers declared, with the numbers in force and what runs now."""
        async with self.pool.acquire() as conn:
            return await flow_admin.limits(conn, self._q)

    async def override_limit(
        self,
        name: str,
        *,
        actor: str,
        reason: str,
        concurrency: int | None = None,
        rate: Rate | str | None = None,
        burst: int | None = None,
    ) -> None:
        """Change a declared limit's numbers at run time, cluster wide within one poll
        interval (None: as declared; none given: back to the declaration). Recorded with
        ``actor``, ``reason`` and the database role."""
        async with self.pool.acquire() as conn:
            await flow_admin.override_limit(
                conn, self._q, name, concurrency=concurrency, rate=rate, burst=burst,
                actor=actor, reason=reason,
            )  # fmt: skip

    async def _act(
        self,
        action: Action,
        ids: Iterable[int],
        actor: str,
        reason: str | None,
        extra_attempts: int | None = None,
        *,
        wait_seconds: float = 0.0,
    ) -> list[ActionResult]:
        actor = _checked_actor(actor)
        # One transaction per id, on purpose (not one batch statement): a refusal aborts its
        # statement, and must not undo or block the others.
        results = []
        running: list[_CancelRequest] = []
        async with self.pool.acquire() as conn:
            for operation_id in ids:
                result = await self._act_one(
                    conn, action, operation_id, actor, reason, extra_attempts
                )
                if isinstance(result, _CancelRequest):
                    running.append(result)
                    results.append(_cancel_pending(result, actor))
                else:
                    results.append(result)
            # Answered once every request is made (and committed), each within the same wait.
            if running:
                answers = await self._await_cancels(conn, running, actor, wait_seconds)
                results = [answers.get(r.operation_id, r) for r in results]
        return results

    async def _act_one(
        self,
        conn: asyncpg.Connection,
        action: Action,
        operation_id: int,
        actor: str,
        reason: str | None,
        extra_attempts: int | None,
    ) -> ActionResult | _CancelRequest:
        """The action's result; or, for a cancel of a running operation, the request made."""
        state_before: str | None = None
        args: dict[str, Any] = {"id": operation_id, "actor": actor, "reason": reason}
        try:
            async with conn.transaction():
                locked = await self._q["operations_lock_for_admin"].fetchrow(conn, id=operation_id)
                if locked is None:
                    raise OperationNotFound(
                        f"cannot {action} operation {operation_id}: no such operation"
                    )
                state_before = locked["state"]
                lifecycle = _lifecycle(locked["lifecycle"], locked["definition"])
                if action == "cancel" and locked["lease_owner"] is not None:
                    if not locked["cancel_requested"]:  # else: wait for the standing one
                        await self._q["operations_request_cancel"].fetchrow(conn, **args)
                    return _CancelRequest(
                        operation_id, state_before, locked["version"], locked["audit_seq"]
                    )
                # A later step runs in the state it rests in, where retry is allowed: only the
                # lease tells that it is running now (and must not be started twice).
                if locked["lease_owner"] is not None and lifecycle.sources(action) >= {
                    state_before
                }:
                    raise TransitionRefused(
                        f"cannot {action} operation {operation_id}: it is running step "
                        f"{state_before!r} on worker {locked['lease_owner']}",
                        operation_id,
                        state_before,
                        action,
                    )
                if action == "replay":
                    # Where it stopped, never before: a step that completed is not run again.
                    to_state = _resume_state(locked["stopped_in"], lifecycle)
                    timeout = lifecycle.timeouts.get(to_state)
                    args.update(
                        extra_attempts=extra_attempts,
                        to_state=to_state,
                        wait_seconds=timeout.seconds if timeout is not None else None,
                    )
                try:
                    row = await self._q[f"operations_{action}"].fetchrow(conn, **args)
                except asyncpg.exceptions.CheckViolationError as exc:
                    if not str(exc).startswith("pgoutbox:"):
                        raise
                    raise _refusal(action, operation_id, locked["state"], lifecycle) from exc
        except AdminError as exc:
            return ActionResult(operation_id, action, False, state_before, state_before, str(exc))
        assert row is not None  # the row is locked: the update found it
        state = row["state"]
        return ActionResult(
            operation_id,
            action,
            True,
            state_before,
            state,
            f"operation {operation_id}: {state_before} -> {state} ({action}, by {actor})",
        )

    async def _await_cancels(
        self,
        conn: asyncpg.Connection,
        requests: list[_CancelRequest],
        actor: str,
        wait_seconds: float,
    ) -> dict[int, ActionResult]:
        """Poll (database time) until each requested attempt has ended or ``wait_seconds``
        passed; the result of each."""
        q = self._q["operations_cancel_outcome"]
        answers: dict[int, ActionResult] = {}
        waiting = list(requests)
        deadline = None
        delay = 0.05
        while True:
            for request in list(waiting):
                row = await q.fetchrow(
                    conn, id=request.operation_id, version=request.version, seq=request.seq
                )
                assert row is not None  # operations are deleted only when finished
                if deadline is None:
                    deadline = row["now"] + timedelta(seconds=wait_seconds)
                if row["ended"] and row["trigger"] is not None:
                    answers[request.operation_id] = _cancel_answer(request, actor, row)
                    waiting.remove(request)
                elif row["now"] >= deadline:
                    answers[request.operation_id] = _cancel_unanswered(request, row, wait_seconds)
                    waiting.remove(request)
            if not waiting:
                return answers
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def purge_preview(
        self, finished_before: When, *, include_dead: bool = False
    ) -> PurgePreview:
        """How many operations :meth:`purge` would delete now, per state (nothing is deleted)."""
        async with self.pool.acquire() as conn:
            before = await _resolve(conn, self._q, finished_before)
            rows = await self._q["operations_count_purgeable"].fetch(
                conn,
                states=_purgeable_states(include_dead),
                finished_before=before,
            )
        counts = {row["state"]: row["operations"] for row in rows}
        return PurgePreview(before, include_dead, counts, sum(counts.values()))

    async def purge(
        self,
        finished_before: When,
        *,
        actor: str,
        include_dead: bool = False,
        batch_size: int = PURGE_BATCH_SIZE,
    ) -> PurgeResult:
        """Delete finished operations whose last transition was before ``finished_before``:
        ``succeeded`` and ``cancelled`` ones, and ``dead`` ones only with ``include_dead``.

        Usage::

            result = await admin.purge(timedelta(days=90), actor="retention-job")

        The purge is recorded in ``<schema>.purges`` with ``actor`` before anything is deleted;
        it deletes ``batch_size`` operations per transaction, each adding its count to that
        record in the same transaction. The audit rows of deleted operations are kept (the
        audit log is append-only), and ``audit verify`` still checks their chains.
        """
        actor = _checked_actor(actor)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        states = _purgeable_states(include_dead)
        counts: dict[str, int] = {}
        batches = 0
        async with self.pool.acquire() as conn:
            before = await _resolve(conn, self._q, finished_before)
            start = await self._q["purges_start"].fetchrow(
                conn,
                actor=actor,
                finished_before=before,
                include_dead=include_dead,
                batch_size=batch_size,
            )
            assert start is not None
            while True:
                # Each batch is its own transaction: a long purge never holds locks on more
                # than one batch, and stopping it keeps what was done so far. The deletion
                # trigger records each deleted operation's purge in its chain with this
                # purge's id and actor.
                async with conn.transaction():
                    await self._q["purge_name_for_trigger"].execute(
                        conn, purge_id=str(start["id"]), actor=actor
                    )
                    rows = await self._q["operations_purge_batch"].fetch(
                        conn,
                        states=states,
                        finished_before=before,
                        batch_size=batch_size,
                        purge_id=start["id"],
                    )
                deleted = sum(row["operations"] for row in rows)
                if deleted == 0:
                    break
                batches += 1
                for row in rows:
                    counts[row["state"]] = counts.get(row["state"], 0) + row["operations"]
            finished_at = await self._q["purges_finish"].fetchval(conn, purge_id=start["id"])
        return PurgeResult(
            start["id"],
            actor,
            before,
            include_dead,
            sum(counts.values()),
            counts,
            batches,
            start["started_at"],
            finished_at,
        )


# -- helpers ---------------------------------------------------------------------------------


def attempts_from_audit(audit: Sequence[AuditRecord]) -> list[Attempt]:
    """The attempts an audit trail records: each ``claim`` row paired with the next row, which
    ends the step it started (``reject`` rows, which change nothing, are skipped). An attempt
    with no such row yet is ``running``."""
    attempts: list[Attempt] = []
    claim: AuditRecord | None = None
    for row in audit:
        if row.trigger == "claim":
            if claim is not None:  # not possible: a running step is never claimed; shown
                attempts.append(_attempt(claim, None))
            claim = row
        elif claim is not None and row.trigger != "reject":
            attempts.append(_attempt(claim, row))
            claim = None
    if claim is not None:
        attempts.append(_attempt(claim, None))
    return attempts


@dataclass(frozen=True)
class _CancelRequest:
    """A cancel request of a running attempt (its version), made at audit row ``seq``."""

    operation_id: int
    state: str
    version: int
    seq: int


def _cancel_pending(request: _CancelRequest, actor: str) -> ActionResult:
    return ActionResult(
        request.operation_id,
        "cancel",
        False,
        request.state,
        request.state,
        f"operation {request.operation_id}: cancel requested by {actor}",
    )


def _cancel_answer(request: _CancelRequest, actor: str, row: Any) -> ActionResult:
    """What became of a cancel request whose attempt ended."""
    operation_id = request.operation_id
    if row["trigger"] == "abort":
        return ActionResult(
            operation_id,
            "cancel",
            True,
            request.state,
            row["to_state"],
            f"operation {operation_id}: {request.state} -> {row['to_state']} (cancel, by "
            f"{actor}: the worker stopped its running handler)",
        )
    return ActionResult(
        operation_id,
        "cancel",
        False,
        request.state,
        row["state"],
        f"cannot cancel operation {operation_id}: its handler finished first "
        f"({row['trigger']} -> {row['to_state']}), and that outcome stands; it is "
        f"{row['state']} now",
    )


def _cancel_unanswered(request: _CancelRequest, row: Any, wait_seconds: float) -> ActionResult:
    """A cancel request that no worker answered in time: it stands."""
    operation_id = request.operation_id
    holder = row["lease_owner"] or "?"
    expires = row["lease_expires_at"]
    return ActionResult(
        operation_id,
        "cancel",
        False,
        request.state,
        row["state"],
        f"cancel of operation {operation_id} requested, but its worker {holder} did not act "
        f"within {wait_seconds:g} s; the request stands: the worker stops the handler when it "
        f"sees it, or a rescuer cancels the operation once its lease expires "
        f"({expires.isoformat() if expires is not None else '?'}), unless the handler "
        "finishes first",
    )


def _attempt(claim: AuditRecord, end: AuditRecord | None) -> Attempt:
    if end is None:
        return Attempt(
            claim.attempt,
            claim.actor,
            claim.recorded_at,
            None,
            None,
            "running",
            claim.to_state,
            None,
        )
    return Attempt(
        number=claim.attempt,
        worker=claim.actor,
        started_at=claim.recorded_at,
        ended_at=end.recorded_at,
        duration_seconds=(end.recorded_at - claim.recorded_at).total_seconds(),
        outcome=end.trigger,
        state_after=end.to_state,
        error=end.detail,
    )


def _audit_record(row: Any) -> AuditRecord:
    fields = dict(row)
    fields["hash"] = fields["hash"].hex()
    fields["prev_hash"] = fields["prev_hash"].hex() if fields["prev_hash"] is not None else None
    return AuditRecord(**fields)


def _type_stats(
    name: str, counts: dict[str, int], oldest: float | None, finished: int, failed: int
) -> TypeStats:
    # States in lifecycle order (pending, claimed, ...), then any others by name.
    order = {state: i for i, state in enumerate(DEFAULT_LIFECYCLE.states)}
    counts = dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    return TypeStats(
        operation_type=name,
        counts=counts,
        total=sum(counts.values()),
        oldest_pending_seconds=oldest,
        finished_attempts=finished,
        failed_attempts=failed,
        failure_rate=failed / finished if finished else None,
    )


def _refusal(action: str, operation_id: int, state: str, lifecycle: Lifecycle) -> TransitionRefused:
    sources = " or ".join(sorted(lifecycle.sources(action))) or "no"
    allowed = ", ".join(lifecycle.allowed_triggers(state)) or "nothing"
    message = (
        f"cannot {action} operation {operation_id}: it is {state}; {action} applies only "
        f"to {sources} operations (from {state}, lifecycle {lifecycle.name!r} allows: "
        f"{allowed})"
    )
    return TransitionRefused(message, operation_id, state, action)


def _lifecycle(name: str, definition: str | None) -> Lifecycle:
    """The operation's lifecycle: the default, or the newest registered version of its own."""
    if definition is None:
        return DEFAULT_LIFECYCLE
    return Lifecycle.from_definition(json.loads(definition))


def _resume_state(stopped_in: str | None, lifecycle: Lifecycle) -> str:
    """Where a replay resumes: a later step or parking state the operation stopped in, or
    ``pending`` (its first step) for everything else."""
    if stopped_in is not None and stopped_in in set(lifecycle.states) - BUILTIN_STATES:
        return stopped_in
    return PENDING


def _purgeable_states(include_dead: bool) -> list[str]:
    return [SUCCEEDED, CANCELLED, *([DEAD] if include_dead else [])]


def _checked_actor(actor: str) -> str:
    if not isinstance(actor, str) or not actor.strip() or len(actor) > _MAX_ACTOR_CHARS:
        raise ValueError(
            f"invalid actor {actor!r}: name who acts (a person or job), "
            f"1 to {_MAX_ACTOR_CHARS} characters"
        )
    return actor


def _like_patterns(names: Sequence[str]) -> list[str] | None:
    """Operation type names with ``*`` wildcards as LIKE patterns (``_`` and ``%`` literal)."""
    if not names:
        return None
    return [
        n.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
        for n in names
    ]


async def _resolve(conn: asyncpg.Connection, q: dict[str, Query], when: When) -> datetime:
    """An absolute time: a timedelta counts back from the database's clock. A ValueError names
    a ``when`` that is no instant a datetime can hold (years 1 to 9999 in UTC), instead of the
    OverflowError of the arithmetic or of the driver's conversion to UTC."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError(f"{when!r} has no timezone: pass an aware datetime")
        try:
            when.astimezone(UTC)  # as asyncpg sends it: 9999-12-31T23:00-05:00 is past 9999
        except OverflowError:
            raise ValueError(
                f"{when.isoformat()} is out of range: in UTC it is before the year 1 or after 9999"
            ) from None
        return when
    now: datetime = await q["database_now"].fetchval(conn)
    try:
        return now - when
    except OverflowError:
        raise ValueError(
            f"{when!r} before the database's clock ({now.isoformat()}) is out of range: the "
            "result must fall in the years 1 to 9999"
        ) from None


async def _resolve_optional(
    conn: asyncpg.Connection, q: dict[str, Query], when: When | None
) -> datetime | None:
    return None if when is None else await _resolve(conn, q, when)
