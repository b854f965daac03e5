"""The dispatcher: claim a batch, run handlers, record outcomes in batches.

Three kinds of loop share the in-flight table:

- the claim loop leases up to ``batch_size`` due operations per statement, whenever there is
  room, and sleeps until woken (notification, a freed slot, the next ``run_at``, or the poll
  interval);
- ``n_workers`` work loops take claimed operations from a queue and run each attempt through
  the executor (executor.py: timeouts, cancels, transactions, ``def`` handlers in threads);
- the record loop writes every outcome that has piled up, one fenced statement per kind, in
  up to ``RECORD_LANES`` batches at once. A batch of successes is recorded by the statement
  that also claims as many as it frees, so the usual cycle is one round trip and one commit;
  the claim loop claims only when nothing is being recorded (at start, after idling).

Limited and paused types go through the flow gate (flow_gate.py) instead of the ordinary claim
statements.

An operation stays in flight (its lease extended by the heartbeat) from its claim until its
outcome is committed, so a crash at any point leaves it ``claimed`` until the rescuer finds
its lease expired.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pgoutbox import observability
from pgoutbox.context import (
    Snooze,
)
from pgoutbox.lifecycle import CLAIMED, DEAD, FAILED, FINISHED_STATES, PENDING
from pgoutbox.router import HandlerSpec
from pgoutbox.service import CONNECTION_ERRORS
from pgoutbox.settings import WorkflowSystemSettings
from pgoutbox.sql import Query
from pgoutbox.worker.attempts import (
    Claimed,
    Outcome,
    success_args,
)
from pgoutbox.worker.executor import Executor
from pgoutbox.worker.flow_gate import FlowGate
from pgoutbox.worker.running import (
    Aborted,
    SnoozeLimitReached,
    abort_args,
    snooze_args,
)

if TYPE_CHECKING:
    from pgoutbox.worker.sync_handlers import SyncHandlers

log = logging.getLogger("pgoutbox.worker")

# Batches recorded at once, each on its own connection: while one statement's backend works,
# the other's result is being handled or its commit flushed. The bare protocol drained 1.3x
# faster at batch 10 and 1.4x at batch 100 with two than with one; with three, 1.1x faster
# than two at batch 10 and 0.9x at batch 100 (benchmarks/bench_bound.py, docs/benchmarks.md).
RECORD_LANES = 2

_LAST_ERROR_CHARS = 1000


class Dispatcher:
    """Claims, runs and records operations for one WorkflowSystem."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Mapping[str, Query],
        settings: WorkflowSystemSettings,
        schema: str,
        handlers: Mapping[str, HandlerSpec],
        worker_id: str,
        sessions: async_sessionmaker[AsyncSession] | None,
        sync_handlers: SyncHandlers | None = None,  # where `def` handlers run
    ) -> None:
        self._pool, self._q, self._settings = pool, queries, settings
        self._schema, self._handlers, self.worker_id = schema, handlers, worker_id
        self._executor = Executor(queries, settings, worker_id, sessions, sync_handlers)
        self._types = sorted(handlers)
        self._lifecycle_of = {t: handlers[t].lifecycle.name for t in self._types}
        later = [(t, s) for t in self._types for s in sorted(handlers[t].lifecycle.step_states)]
        self._step_pairs = later
        self._step_types = [t for t, _ in later]
        # Limits and pauses: which types the ordinary statements claim, which only the gate.
        self._gate = FlowGate(
            queries, schema, settings.channel, handlers, settings.poll_interval_seconds
        )
        self._rate_wait: float | None = None  # until a rate-limited start conforms
        # A worker with later steps claims them first, so only the claim loop claims for it.
        self._record_claims = not self._step_types
        # Room for one more batch than the handlers can run: the next claim overlaps the
        # recording of the last batch. Claimed operations wait in the queue, their leases
        # extended by the heartbeat.
        self.capacity = settings.n_workers + settings.batch_size
        self.in_flight: dict[int, Claimed] = {}
        self._queue: asyncio.Queue[Claimed] = asyncio.Queue()
        self._outcomes: list[Outcome] = []
        self._wake = asyncio.Event()
        self._record_wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._claiming = True
        # Claims and recordings run concurrently; the room each claim sees counts what the
        # recordings under way free (their outcomes) and what the other claims may lease.
        self._recording = 0  # outcomes in recordings under way
        self._reserved = 0  # operations the claims under way may lease
        self._no_claims = asyncio.Event()  # no claim under way
        self._no_claims.set()
        self._lanes = asyncio.Semaphore(RECORD_LANES)
        # A claiming statement lost its connection, maybe after its commit: this worker may
        # hold leases it does not know of. No claim runs until they are handed back.
        self._orphans = False
        self._traced = False  # whether attempts get trace spans (see _queue_claimed)
        self._flushes: set[asyncio.Task[None]] = set()
        self._claim_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim, work and record loops."""
        self._claim_task = asyncio.create_task(self._claim_loop(), name="pgoutbox-claim")
        self._tasks = [
            self._claim_task,
            asyncio.create_task(self._record_loop(), name="pgoutbox-record"),
        ]
        for i in range(self._settings.n_workers):
            task = asyncio.create_task(self._work_loop(), name=f"pgoutbox-work-{i}")
            self._running.add(task)

    def wake(self) -> None:
        """Look for due operations now (a notification arrived, or a slot freed)."""
        self._wake.set()

    def abort(self, requests: Mapping[int, str]) -> list[int]:
        """Cancel the handlers of these operations (id -> the operator who asked), whose
        cancel requests the database holds; the ids found still running or queued. One not yet
        started is recorded as aborted without running; one already finished keeps its real
        outcome."""
        found = []
        for op_id, operator in requests.items():
            op = self.in_flight.get(op_id)
            if op is None or op.finished or op.abort is not None:
                continue
            op.abort = operator
            found.append(op_id)
            if op.task is not None:
                op.task.cancel(f"cancel requested by {operator}")
        return found

    def held_versions(self) -> dict[int, int]:
        """Operation id -> claimed version of what is queued or running (for the heartbeat)."""
        return {op_id: op.version for op_id, op in self.in_flight.items() if not op.finished}

    async def stop(self, grace_seconds: float) -> None:
        """Stop claiming; let running handlers finish for up to ``grace_seconds``; release
        what is left (claimed but not started, or still running) in an audited transition."""
        self._claiming = False
        self.wake()
        # Let a claim already sent finish, so what it leases is queued (and handed back below)
        # rather than left claimed with nobody holding it.
        if self._claim_task is not None:
            await asyncio.wait([self._claim_task], timeout=grace_seconds)
            self._claim_task.cancel()
        # The same for recordings that are claiming too.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_claims.wait(), grace_seconds)
        while not self._queue.empty():
            self._queue.get_nowait()
        # Not started (queued, or taken by a work loop after stopping began): nothing happened
        # outside, so hand them back at once, whatever on_lost.
        unstarted = [op for op in self.in_flight.values() if not op.started]
        await self._release(unstarted, started=False)
        if self.in_flight:
            self._idle.clear()
            self._record_wake.set()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_seconds)
            except TimeoutError:
                log.warning(
                    "%d handlers still running after %.1fs; cancelling them",
                    len(self.in_flight),
                    grace_seconds,
                )
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        # What is left is recorded here (after the recordings under way), not by the loop.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            # Bounded: with the database unreachable, stop() must still return. What is not
            # recorded stays claimed and is rescued when its lease expires.
            await asyncio.wait_for(self._flush(), max(grace_seconds, 1.0))
        except TimeoutError:
            log.warning("could not record the last outcomes in time; the rescuer will")
            for task in self._flushes:
                task.cancel()
            await asyncio.gather(*self._flushes, return_exceptions=True)
        # Still in flight now: handlers that were cancelled mid-run (and anything a claim that
        # outlasted the grace period leased, never started).
        left = list(self.in_flight.values())
        await self._release([op for op in left if not op.started], started=False)
        await self._release([op for op in left if op.started], started=True)

    # -- claim -------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        poll = self._settings.poll_interval_seconds
        while self._claiming:
            self._wake.clear()  # before claiming, so a wake-up during the claim is not lost
            timeout: float | None = None
            if self._orphans and not self._reserved:
                await self._release_orphans()
            # Outcomes waiting or being recorded: that recording claims what they free, and
            # wakes this loop if it leaves room. Claiming here too would only split one
            # statement into two. (The poll interval is the backstop, as everywhere.)
            recorder_claims = self._record_claims and not self._gate.limited_types
            if self._orphans or (recorder_claims and (self._outcomes or self._recording)):
                timeout = poll
            elif (room := self._room()) > 0:
                want = min(room, self._settings.batch_size)
                claimed: list[Claimed] = []
                try:
                    claimed = await self.claim(want)
                except CONNECTION_ERRORS as exc:
                    log.warning("claim failed, database unreachable (%s); retrying", exc)
                    self._orphans = True
                    want = 0
                except Exception:
                    log.exception("claim failed; retrying after the poll interval")
                    want = 0
                if want and len(claimed) == want:
                    continue  # a full batch: more may be due right now
                timeout = await self._idle_timeout() if want else poll
                if want and self._rate_wait is not None:
                    timeout = min(timeout, self._rate_wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def claim(self, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due operations and queue them for the work loops: later steps
        of workflows already under way first, then operations waiting for their first step."""
        rows: list[asyncpg.Record] = []
        with self._reserve(limit):
            async with self._pool.acquire() as conn:
                started = time.perf_counter()
                await self._refresh_gate(conn)
                free = set(self._gate.free_types)
                steps = [(t, s) for t, s in self._step_pairs if t in free]
                if steps:
                    q = self._q["operations_claim_steps"]
                    rows += await q.fetch(
                        conn,
                        channel=self._settings.channel,
                        worker_id=self.worker_id,
                        lease_seconds=self._settings.lease_seconds,
                        step_types=[t for t, _ in steps],
                        step_states=[s for _, s in steps],
                        batch_size=limit,
                    )
                if len(rows) < limit and free:
                    q = self._q["operations_record_and_claim"]
                    rows += await q.fetch(
                        conn, **NOTHING_RECORDED, **self._claim_args(limit - len(rows))
                    )
                self._rate_wait = None
                # A limited operation takes a slot of its limit from its claim on: claim only
                # what a handler will start now, or the slots would wait in this worker's
                # queue while other workers' handlers stand idle.
                limited = len(rows) < limit and bool(self._gate.limited_types)
                idle = self._idle_handlers() - len(rows) if limited else 0
                if idle > 0:
                    leased, self._rate_wait = await self._gate.claim(
                        conn,
                        want=min(limit - len(rows), idle),
                        worker_id=self.worker_id,
                        lease_seconds=self._settings.lease_seconds,
                        lifecycles=self._lifecycle_of,
                        step_pairs=self._step_pairs,
                    )
                    rows += leased
                elapsed = time.perf_counter() - started
            return self._queue_claimed(rows, elapsed)

    async def _release_orphans(self) -> None:
        """Hand back what a claiming statement leased to this worker although its reply never
        arrived (the connection dropped after the commit). No handler of them ran, so they go
        back to where their step starts, whatever their on_lost, instead of waiting for their
        leases to expire."""
        try:
            async with self._pool.acquire() as conn:
                q = self._q["operations_leased_to"]
                rows = await q.fetch(conn, worker_id=self.worker_id, held=list(self.in_flight))
                if rows:
                    await self._q["operations_release"].fetch(
                        conn,
                        ids=[row["id"] for row in rows],
                        versions=[row["version"] for row in rows],
                        on_lost_dead=[False] * len(rows),
                        to_states=[
                            PENDING if row["state"] == CLAIMED else row["state"] for row in rows
                        ],
                        worker_id=self.worker_id,
                        detail="claimed by a statement whose reply was lost; the handler never ran",
                    )
        except CONNECTION_ERRORS as exc:
            log.warning("could not look for leases of lost claims (%s); retrying", exc)
            return
        self._orphans = False
        if rows:
            log.warning("handed back %d operations whose claim's reply was lost", len(rows))

    def _idle_handlers(self) -> int:
        """Handlers that would have nothing to run once what is queued has started."""
        busy = sum(1 for op in self.in_flight.values() if not op.finished)
        return self._settings.n_workers - busy

    def _room(self) -> int:
        """How many more operations this worker may claim: its capacity less what it will
        hold once the recordings and claims under way are done."""
        held = len(self.in_flight) - self._recording + self._reserved
        return self.capacity - held

    @contextlib.contextmanager
    def _reserve(self, limit: int) -> Iterator[None]:
        """Count ``limit`` more operations as held while a claim for them runs (until what it
        leased is queued)."""
        self._reserved += limit
        self._no_claims.clear()
        try:
            yield
        finally:
            self._reserved -= limit
            if not self._reserved:
                self._no_claims.set()

    async def _refresh_gate(self, conn: asyncpg.Connection) -> None:
        """Read the limits' overrides and the pauses again if a poll interval has passed."""
        if self._gate.refresh_due():
            await self._gate.refresh(conn)

    def _claim_args(self, limit: int) -> dict[str, Any]:
        """The claiming parameters of ``operations_record_and_claim``: up to ``limit`` of the
        types neither paused nor limited."""
        types = self._gate.free_types
        return {
            "channel": self._settings.channel,
            "worker_id": self.worker_id,
            "lease_seconds": self._settings.lease_seconds,
            "operation_types": types,
            "lifecycles": [self._lifecycle_of[t] for t in types],
            "batch_size": limit if types else 0,
        }

    def _queue_claimed(self, rows: list[asyncpg.Record], elapsed: float) -> list[Claimed]:
        """Hold the operations a statement claimed and queue them for the work loops."""
        if observability.metrics is not None:
            observability.metrics.observe_claim(elapsed, rows)
        # Asked per batch: per attempt, looking for a tracer provider cost more than a no-op
        # handler (an environment lookup and two ABC isinstance checks).
        self._traced = observability.tracing_active()
        claimed = []
        for row in rows:
            step = row["state"]
            spec = self._handlers[row["operation_type"]].for_step(step)
            key = row["idempotency_key"] or f"pgoutbox-{self._schema}-{row['id']}"
            op = Claimed(
                id=row["id"],
                operation_type=row["operation_type"],
                payload=row["payload"],
                attempt=row["attempts"],
                step_attempt=row["step_attempts"],
                max_attempts=row["max_attempts"] or spec.max_attempts,
                version=row["version"],
                # Every step of a multi-step lifecycle has its own stable key.
                idempotency_key=f"{key}:{step}" if spec.lifecycle.custom else key,
                spec=spec,
                step=step,
                trace_context=row["trace_context"],
            )
            self.in_flight[op.id] = op
            self._queue.put_nowait(op)
            claimed.append(op)
        return claimed

    async def _idle_timeout(self) -> float:
        """Seconds to sleep when nothing more is due: until the next run_at, at most the poll
        interval. Only free types count: a limited one held back is due and waits for a slot
        (this worker's own finish wakes it; another's claims itself) or for its rate (the
        claim loop's rate wait), and waking every 50 ms to find it still held back would only
        load the database."""
        poll = self._settings.poll_interval_seconds
        q = self._q["operations_next_run_at"]
        free = set(self._gate.free_types)
        if not free:
            return poll
        types = [t for t in self._types if t in free]
        steps = [(t, s) for t, s in self._step_pairs if t in free]
        try:
            async with self._pool.acquire() as conn:
                wait = await q.fetchval(
                    conn,
                    channel=self._settings.channel,
                    operation_types=types,
                    has_steps=bool(steps),
                    step_types=[t for t, _ in steps],
                    step_states=[s for _, s in steps],
                )
        except CONNECTION_ERRORS:
            return poll
        if wait is None:
            return poll
        # Due but not claimed means another worker holds it locked right now: look again soon.
        return min(poll, max(float(wait.total_seconds()), 0.05))

    # -- run ---------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        task = asyncio.current_task()  # this loop's, asked once (not per attempt)
        assert task is not None
        while True:
            op = await self._queue.get()
            if not self._claiming:
                continue  # stopping: stop() hands it back as never started
            op.started = True
            # Checked per operation, not once: the metrics can be switched off (tests do).
            metrics = observability.metrics
            started = time.perf_counter() if metrics is not None else 0.0
            outcome = await self._executor.attempt(op, self._traced, task)
            if metrics is not None:
                metrics.observe_attempt(op.operation_type, time.perf_counter() - started)
            op.finished = True
            self._outcomes.append(outcome)
            self._record_wake.set()
            if task.cancelling():
                # stop() cancelled this loop, and the handler returned anyway (a def handler's
                # thread is waited for; an async one may catch it): its outcome is recorded by
                # stop()'s last flush, and the loop ends as stop() asked.
                raise asyncio.CancelledError

    # -- record ------------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        while True:
            await self._record_wake.wait()
            await self._lanes.acquire()  # what piles up meanwhile goes in the next batch
            self._record_wake.clear()
            if not self._outcomes:
                self._lanes.release()
                continue
            # At most a batch per statement: two batches finished together are recorded side
            # by side, each claiming the batch it frees. Recorded as one, they would claim one
            # batch and leave the other to a claim of its own, and stay merged from then on.
            size = self._settings.batch_size
            batch, self._outcomes = self._outcomes[:size], self._outcomes[size:]
            if self._outcomes:
                self._record_wake.set()
            task = asyncio.create_task(self._flush_in_lane(batch), name="pgoutbox-record-batch")
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush_in_lane(self, batch: list[Outcome]) -> None:
        try:
            await self._flush_batch(batch)
        finally:
            self._lanes.release()

    async def _flush(self) -> None:
        """Record every outcome gathered so far, after the recordings under way."""
        if self._flushes:
            await asyncio.wait(set(self._flushes))
        while self._outcomes:
            batch, self._outcomes = self._outcomes, []
            await self._flush_batch(batch)

    async def _flush_batch(self, batch: list[Outcome]) -> None:
        """Record ``batch``, retrying while the database is unreachable."""
        self._recording += len(batch)
        try:
            delay = 0.1
            retrying = False
            while True:
                try:
                    if retrying and await self._recorded_before(batch):
                        break
                    await self._record(batch)
                    break
                except (*CONNECTION_ERRORS, asyncpg.TransactionRollbackError) as exc:
                    # Unreachable, or chosen as a deadlock victim: the batch's transaction
                    # rolled back -- or committed with its reply lost, which the retry checks.
                    log.warning("recording %d outcomes failed (%s); retrying", len(batch), exc)
                    retrying = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                except Exception:
                    # Not a connection problem, so something about one outcome: record them
                    # one by one, so the others are not rerun by the rescuer because of it.
                    log.exception(
                        "recording %d outcomes failed; recording them one by one", len(batch)
                    )
                    await self._record_singly(batch)
                    break
        finally:
            self._recording -= len(batch)
        for outcome in batch:
            self.in_flight.pop(outcome.op.id, None)
        # Room left means the recording claimed less than it freed (or claimed nothing): the
        # claim loop looks. Otherwise waking it would only race the next recording.
        if self._room() > 0 or self._orphans:
            self.wake()
        if not self.in_flight:
            self._idle.set()

    async def _record_singly(self, batch: list[Outcome]) -> None:
        for outcome in batch:
            try:
                await self._record([outcome])
            except Exception:
                # Left claimed: the rescuer moves it on when its lease expires, audited.
                log.exception(
                    "recording operation %d failed; leaving it to the rescuer", outcome.op.id
                )

    async def _recorded_before(self, batch: list[Outcome]) -> bool:
        """Whether the batch's last recording committed although its reply was lost.

        Without this check the retry would find its own outcomes and audit them as refused.
        Outcomes already marked recorded or refused are not looked for. A batch recorded in one
        transaction committed whole or not at all: one of its outcomes in the audit log under
        this worker's name means all of them are. A batch of successes only was recorded by one
        statement, and its refusals by a second one: the successes that statement did not
        record are marked refused (their leases were lost), and False is returned so that the
        retry records the refusals.
        """
        looked_for = [o for o in batch if not (o.committed or o.refused)]
        if not looked_for:
            return False
        q = self._q["audit_log_outcomes_recorded"]
        async with self._pool.acquire() as conn:
            rows = await q.fetch(
                conn,
                ids=[o.op.id for o in looked_for],
                attempts=[o.op.attempt for o in looked_for],
                worker_id=self.worker_id,
            )
        if not rows:
            return False
        log.info("the last recording committed before its connection dropped; not retried")
        if _successes_only(batch):
            self._mark_successes(batch, {row["id"] for row in rows})
            return not _refusals(batch)
        return True

    async def _record(self, batch: list[Outcome]) -> None:
        successes = [o for o in batch if o.error is None and not o.committed and not o.refused]
        failures = [o for o in batch if o.error is not None and not o.refused]
        failed_into: dict[int, str] = {}  # operation id -> the state its failure recorded
        if _successes_only(batch):
            # Successes only, the usual batch: one statement, atomic by itself, so no BEGIN and
            # COMMIT round trips; it claims the next batch too. Late results (leases lost) are
            # refused in a second statement; the first one's outcomes are marked before it, so
            # a retry after a dropped connection records only the refusals (see
            # _recorded_before).
            done = await self._record_and_claim(successes)
            self._mark_successes(successes, done)
            if len(done) < len(successes):
                async with self._pool.acquire() as conn:
                    await self._record_refused(conn, _refusals(batch))
        else:
            # One transaction for the batch: after a dropped connection the retry must not find
            # its own committed successes and refuse them as if another worker had taken the
            # lease. Outcomes are marked only once it has committed.
            async with self._pool.acquire() as conn, conn.transaction():
                done = await self._record_successes(conn, successes) if successes else set()
                if failures:
                    failed_into = await self._record_failures(conn, failures)
                late = {
                    **{o.op.id: self._late(o) for o in successes if o.op.id not in done},
                    **{o.op.id: self._late(o) for o in failures if o.op.id not in failed_into},
                }
                await self._record_refused(conn, _refusals(batch) | late)
            self._mark_successes(successes, done)
            for o in failures:
                o.refused = late.get(o.op.id)
        # Counted once committed: a batch retried after a dropped connection counts once.
        # One increment per type and outcome, not per attempt.
        if observability.metrics is not None:
            counts: collections.Counter[tuple[str, observability.AttemptOutcome]] = (
                collections.Counter()
            )
            for o in batch:
                if o.refused:
                    outcome: observability.AttemptOutcome = "rejected"
                elif o.error is None:  # a success, recorded above or in its own transaction
                    outcome = "succeeded"
                else:
                    outcome = _failure_outcome(o, failed_into[o.op.id])
                counts[o.op.operation_type, outcome] += 1
            for (operation_type, outcome), n in counts.items():
                observability.metrics.count_attempt(operation_type, outcome, n)

    async def _record_failures(
        self, conn: asyncpg.Connection, failures: list[Outcome]
    ) -> dict[int, str]:
        """Record failed attempts, snoozes and aborts, each fenced by its lease; operation id
        -> the state each entered. A snooze past its operation's max_snoozes becomes a
        failed attempt."""
        into: dict[int, str] = {}
        snoozes = [o for o in failures if isinstance(o.error, Snooze)]
        if snoozes:
            q = self._q["operations_record_snooze"]
            args = snooze_args(snoozes, self._settings.max_snoozes, self.worker_id)
            over = {}
            for row in await q.fetch(conn, **args):
                if row["snoozed"]:
                    into[row["id"]] = row["state"]
                else:
                    over[row["id"]] = row["snoozes"]
            for o in snoozes:
                if o.op.id in over:
                    o.error = SnoozeLimitReached(
                        f"snoozed {over[o.op.id]} times, the most allowed (max_snoozes); this "
                        f"snooze counts as a failed attempt ({o.error})"
                    )
        aborts = [o for o in failures if isinstance(o.error, Aborted)]
        if aborts:
            q = self._q["operations_record_abort"]
            rows = await q.fetch(conn, **abort_args(aborts, self.worker_id))
            into.update({row["id"]: row["state"] for row in rows})
        failed = [o for o in failures if not isinstance(o.error, Snooze | Aborted)]
        if failed:
            q = self._q["operations_record_failure"]
            rows = await q.fetch(conn, **self._failure_args(failed))
            into.update({row["id"]: row["state"] for row in rows})
        return into

    async def _record_and_claim(self, successes: list[Outcome]) -> set[int]:
        """Record these successes and claim as many as there is room for (up to a batch) in
        the same statement; the ids recorded.

        Only a worker whose operations all run their first step claims here: one with later
        steps claims them first, in the claim loop.
        """
        want = 0
        if self._claiming and self._record_claims and not self._orphans:
            want = max(0, min(self._room(), self._settings.batch_size))
        q = self._q["operations_record_and_claim"]
        with self._reserve(want):
            try:
                async with self._pool.acquire() as conn:
                    if want:
                        await self._refresh_gate(conn)
                    started = time.perf_counter()
                    rows = await q.fetch(conn, **success_args(successes), **self._claim_args(want))
                    elapsed = time.perf_counter() - started
            except CONNECTION_ERRORS:
                if want:  # the claim may have committed, its reply lost
                    self._orphans = True
                raise
            if want:
                self._queue_claimed([row for row in rows if not row["recorded"]], elapsed)
        return {row["id"] for row in rows if row["recorded"]}

    async def _record_successes(
        self, conn: asyncpg.Connection, successes: list[Outcome]
    ) -> set[int]:
        """Record these successes, each fenced by its lease; the ids recorded."""
        q = self._q["operations_record_success"]
        rows = await q.fetch(conn, **success_args(successes), worker_id=self.worker_id)
        return {row["id"] for row in rows}

    def _mark_successes(self, successes: list[Outcome], done: set[int]) -> None:
        """After their statement committed: recorded, or refused as late."""
        for o in successes:
            if o.op.id in done:
                o.committed = True
            else:
                o.refused = self._late(o)

    def _late(self, outcome: Outcome) -> str:
        """The audit detail of a result that came after its lease was lost."""
        what = (
            "the handler returned success" if outcome.error is None else _error_line(outcome.error)
        )
        return (
            f"late result of attempt {outcome.op.attempt} by {self.worker_id} refused "
            f"(its lease was lost): {what}"
        )

    async def _record_refused(self, conn: asyncpg.Connection, refused: dict[int, str]) -> None:
        """Audit refused results (operation id -> detail): a 'reject' event each, no state
        change."""
        if refused:
            q = self._q["operations_record_rejected"]
            await q.execute(
                conn, ids=list(refused), details=list(refused.values()), worker_id=self.worker_id
            )

    def _failure_args(self, failures: list[Outcome]) -> dict[str, Any]:
        limit = self._settings.error_max_chars
        ops = [o.op for o in failures]
        return {
            "ids": [op.id for op in ops],
            "versions": [op.version for op in ops],
            "errors": [_error_line(o.error)[:_LAST_ERROR_CHARS] for o in failures],
            "details": [_error_detail(o, limit) for o in failures],
            "give_ups": [o.give_up for o in failures],
            "max_attempts": [op.max_attempts for op in ops],
            "backoff_bases": [op.spec.retry.base_seconds for op in ops],
            "backoff_maxes": [op.spec.retry.max_seconds for op in ops],
            "jitters": [op.spec.retry.jitter for op in ops],
            # The first step waits for its retry in `failed`; a later one in its own state.
            "retry_states": [FAILED if op.step == CLAIMED else op.step for op in ops],
            "give_up_states": [op.spec.lifecycle.give_up_target(op.step) for op in ops],
            "give_up_new_steps": [
                op.spec.lifecycle.give_up_target(op.step) not in FINISHED_STATES for op in ops
            ],
            "worker_id": self.worker_id,
        }

    async def _release(self, ops: list[Claimed], *, started: bool) -> None:
        """Hand ``ops`` back. A started handler may have acted outside, so ``on_lost="dead"``
        applies to it; one that never started is simply pending again."""
        if not ops:
            return
        q = self._q["operations_release"]
        try:
            async with self._pool.acquire() as conn:
                rows = await q.fetch(
                    conn,
                    ids=[op.id for op in ops],
                    versions=[op.version for op in ops],
                    on_lost_dead=[started and op.spec.on_lost == "dead" for op in ops],
                    to_states=[_released_to(op, started) for op in ops],
                    worker_id=self.worker_id,
                    detail="worker stopped before the handler finished",
                )
        except CONNECTION_ERRORS as exc:
            log.warning("could not release %d operations (%s); the rescuer will", len(ops), exc)
        else:
            if observability.metrics is not None:
                released = {row["id"] for row in rows}
                for op in ops:
                    if op.id in released:
                        dead = started and op.spec.on_lost == "dead"
                        observability.metrics.count_attempt(
                            op.operation_type, "dead" if dead else "released"
                        )
        for op in ops:
            self.in_flight.pop(op.id, None)


def _released_to(op: Claimed, started: bool) -> str:
    """Where a graceful stop hands an operation back: dead for a started step whose side effect
    must not be repeated blindly, else where its step starts again."""
    if started and op.spec.on_lost == "dead":
        return DEAD
    return PENDING if op.step == CLAIMED else op.step


def _failure_outcome(outcome: Outcome, state: str) -> observability.AttemptOutcome:
    """How the metrics count an attempt recorded by _record_failures."""
    if isinstance(outcome.error, Snooze):
        return "snoozed"
    if isinstance(outcome.error, Aborted):
        return "cancelled"
    return "dead" if state == DEAD else "failed"


def _successes_only(batch: list[Outcome]) -> bool:
    """Whether ``batch`` is successes none of which is recorded or refused yet: the batch
    recorded by one statement (its refusals, if any, by a second one)."""
    return bool(batch) and all(o.error is None and not o.committed and not o.refused for o in batch)


def _refusals(batch: list[Outcome]) -> dict[int, str]:
    """Operation id -> audit detail of the results in ``batch`` already known to be refused."""
    return {o.op.id: o.refused for o in batch if o.refused}


# The recording parameters of ``operations_record_and_claim`` when it only claims.
NOTHING_RECORDED: Mapping[str, list[Any]] = success_args([])


def _storable(text: str) -> str:
    """``text`` with what PostgreSQL's text type refuses spelled out: NUL characters, and lone
    surrogates (e.g. from undecodable bytes) that are not valid UTF-8. Either, in one error
    message, would fail the whole recording batch."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _error_line(error: BaseException | None) -> str:
    return _storable(f"{type(error).__name__}: {error}") if error is not None else ""


def _error_detail(outcome: Outcome, limit: int) -> str:
    """What the audit row keeps of a failed attempt: a headline and the traceback, truncated
    in the middle so both the outermost and the innermost frames survive."""
    op, error = outcome.op, outcome.error
    assert error is not None
    verdict = "not retried (DoNotRetry)" if outcome.give_up else f"of {op.max_attempts}"
    step = "" if op.step == CLAIMED else f" of step {op.step}"
    head = f"attempt {op.step_attempt}{step} {verdict}: {_error_line(error)}\n"
    text = head + _storable("".join(traceback.format_exception(error)))
    if len(text) <= limit:
        return text
    marker = f"\n... [{len(text) - limit} characters truncated] ...\n"
    keep = limit - len(marker)
    return text[: keep // 2] + marker + text[-(keep - keep // 2) :]
