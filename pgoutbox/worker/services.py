"""Background services of a worker: heartbeat, rescuer, listener.

All share one outline: a validated config from :class:`WorkflowSystemSettings`, ``start()`` /
``stop()``, and ``run_once()`` returning a small result. Tests call ``run_once()`` directly
instead of sleeping for a ticker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import asyncpg

from pgoutbox import observability
from pgoutbox.lifecycle import FINISHED_STATES
from pgoutbox.router import HandlerSpec
from pgoutbox.service import Service
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import Query

log = logging.getLogger("pgoutbox.worker")


@dataclass(frozen=True)
class HeartbeatResult:
    """Leases extended, and operations not extended: no longer held (finished, or their lease
    was lost) or locked at that moment by their own recording or by a rescue."""

    extended: int
    not_extended: tuple[int, ...]
    cancel_requested: tuple[int, ...] = ()  # an operator asked to cancel these attempts


class Heartbeat(Service):
    """Extends the leases of everything this worker holds, and marks the worker alive."""

    name = "heartbeat"

    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Mapping[str, Query],
        worker_id: str,
        lease_seconds: float,
        interval: float,
        held: Callable[[], Mapping[int, int]],
        on_cancel_requests: Callable[[Mapping[int, str]], object] | None = None,
    ) -> None:
        super().__init__(interval)
        self._pool, self._q, self._worker_id = pool, queries, worker_id
        self._lease_seconds = lease_seconds
        self._held = held  # operation id -> version, read fresh each round
        # Given operation id -> requesting operator for each held attempt whose cancel an
        # operator requested: the database is where the request lives, whoever notified.
        self._on_cancel_requests = on_cancel_requests

    async def run_once(self) -> HeartbeatResult:
        held = dict(self._held())
        async with self._pool.acquire() as conn:
            await self._q["workers_heartbeat"].execute(conn, worker_id=self._worker_id)
            if not held:
                return HeartbeatResult(0, ())
            q = self._q["operations_extend_leases"]
            rows = await q.fetch(
                conn,
                ids=list(held),
                versions=list(held.values()),
                lease_seconds=self._lease_seconds,
                worker_id=self._worker_id,
            )
        extended = {row["id"] for row in rows}
        not_extended = tuple(sorted(set(held) - extended))
        if not_extended:
            # Usually an outcome being recorded right now. A real loss shows up, audited, as a
            # refused ("reject") result when the attempt finishes.
            log.debug("leases not extended: %s", not_extended)
        requests = {row["id"]: row["cancel_requested_by"] for row in rows}
        requests = {op_id: by for op_id, by in requests.items() if by is not None}
        if requests and self._on_cancel_requests is not None:
            self._on_cancel_requests(requests)
        return HeartbeatResult(len(extended), not_extended, tuple(sorted(requests)))


@dataclass(frozen=True)
class RescueResult:
    """Operations whose expired lease was recovered: retried (failed) or dead; and workers
    forgotten because their heartbeat stopped long ago."""

    retried: int
    dead: int
    workers_pruned: int = 0
    timed_out: int = 0  # parked operations whose timeout trigger fired
    cancelled: int = 0  # an operator had asked to cancel them: cancelled, not retried


class Rescuer(Service):
    """Recovers operations whose lease expired (their worker crashed or stalled), fires the
    timeout trigger of operations parked too long, wakes the dispatcher for what is due now,
    and forgets workers silent for ``stale_worker_seconds``."""

    name = "rescuer"

    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Mapping[str, Query],
        worker_id: str,
        channel: str,
        handlers: Mapping[str, HandlerSpec],
        interval: float,
        batch: int = 1000,
        on_rescued: Callable[[], None] | None = None,
        stale_worker_seconds: float = 300.0,
    ) -> None:
        super().__init__(interval)
        self._pool, self._q, self._worker_id = pool, queries, worker_id
        self._channel, self._batch = channel, batch
        self._on_rescued, self._stale_worker_seconds = on_rescued, stale_worker_seconds
        steps = [step for s in handlers.values() for step in s.all_steps()]
        self._policy = {
            "operation_types": [s.operation_type for s in steps],
            "steps": [s.step for s in steps],
            "on_lost_dead": [s.on_lost == "dead" for s in steps],
            "max_attempts": [s.max_attempts for s in steps],
        }
        lifecycles = {s.lifecycle.name: s.lifecycle for s in handlers.values()}
        timeouts = [
            (lc, state, t.trigger, lc.exits(state)[t.trigger])
            for lc in lifecycles.values()
            for state, t in sorted(lc.timeouts.items())
        ]
        self._timeouts = {
            "lifecycles": [lc.name for lc, *_ in timeouts],
            "states": [state for _, state, _, _ in timeouts],
            "triggers": [trigger for *_, trigger, _ in timeouts],
            "to_states": [to for *_, to in timeouts],
            "new_steps": [to not in FINISHED_STATES for *_, to in timeouts],
        }

    async def run_once(self) -> RescueResult:
        q = self._q["operations_rescue_expired"]
        async with self._pool.acquire() as conn:
            rows = await q.fetch(
                conn,
                **self._policy,
                channel=self._channel,
                limit=self._batch,
                worker_id=self._worker_id,
            )
            pruned = await self._q["workers_prune"].fetch(
                conn, stale_seconds=self._stale_worker_seconds
            )
            timed_out = []
            if self._timeouts["lifecycles"]:
                q = self._q["operations_expire_parked"]
                timed_out = await q.fetch(
                    conn,
                    **self._timeouts,
                    channel=self._channel,
                    limit=self._batch,
                    worker_id=self._worker_id,
                )
        dead = sum(1 for row in rows if row["state"] == "dead")
        cancelled = sum(1 for row in rows if row["state"] == "cancelled")
        if observability.metrics is not None:
            for row in rows:  # the worker that ran these is gone: its rescuer counts them
                observability.metrics.count_attempt(row["operation_type"], "lost")
        if rows:
            log.warning("rescued %d operations with expired leases (%d dead)", len(rows), dead)
        if timed_out:
            log.info("%d parked operations timed out", len(timed_out))
        if (len(rows) > dead + cancelled or timed_out) and self._on_rescued is not None:
            self._on_rescued()  # the retries (and steps after a timeout) are due now
        return RescueResult(
            len(rows) - dead - cancelled, dead, len(pruned), len(timed_out), cancelled
        )


@dataclass(frozen=True)
class ListenerResult:
    """Whether the LISTEN connection is up after this round, and whether it was (re)made."""

    connected: bool
    reconnected: bool


class Listener(Service):
    """Keeps a LISTEN connection on the channel and calls ``on_notify`` for each notification.

    Each round checks the connection (a query with a timeout, which also catches half-open
    connections) and reconnects when it is gone; a dropped connection triggers a round at once.
    ``on_notify`` is also called after a reconnect, since notifications sent meanwhile are lost.
    A notification ``cancel:<id>`` (an operator's cancel request) calls ``on_cancel`` instead:
    the request itself is read from the database, never taken from the notification.
    """

    name = "listener"

    def __init__(
        self,
        settings: DatabaseSettings,
        channel: str,
        on_notify: Callable[[], None],
        interval: float,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(interval)
        self._settings, self._channel, self._on_notify = settings, channel, on_notify
        self._on_cancel = on_cancel
        self._conn: asyncpg.Connection | None = None
        # One round at a time: a manual run_once() overlapping the loop's must not open a
        # second LISTEN connection.
        self._round = asyncio.Lock()

    async def run_once(self) -> ListenerResult:
        async with self._round:
            return await self._check_or_reconnect()

    async def _check_or_reconnect(self) -> ListenerResult:
        if self._conn is not None and not self._conn.is_closed():
            try:
                await self._conn.fetchval("SELECT 1", timeout=max(self.interval, 1.0))
                return ListenerResult(True, False)
            except Exception as exc:
                # Any failure of a trivial query on this dedicated connection means it is
                # unusable, including asyncpg's InternalClientError when the server has just
                # terminated the backend and the client has not yet seen the socket close.
                log.warning("listener connection is unhealthy (%r); reconnecting", exc)
                self._conn.terminate()
        self._conn = None
        conn = await asyncpg.connect(timeout=10, **self._settings.connect_kwargs())
        try:
            conn.add_termination_listener(lambda _conn: self.kick())
            await conn.add_listener(self._channel, self._notified)
        except BaseException:
            # Including a stop() that cancels this round right after start(): the connection
            # is not self._conn yet, so nothing else would ever close it.
            conn.terminate()
            raise
        self._conn = conn
        self._on_notify()
        return ListenerResult(True, True)

    def _notified(self, _conn: object, _pid: object, _channel: object, payload: object) -> None:
        if self._on_cancel is not None and str(payload).startswith("cancel:"):
            self._on_cancel()
        else:
            self._on_notify()

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection (for operators and tests)."""
        return None if self._conn is None else int(self._conn.get_server_pid())

    async def stop(self) -> None:
        """Stop the loop and close the connection."""
        await super().stop()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
