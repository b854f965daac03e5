"""The executor: run one attempt of a claimed operation and say how it ended.

It runs the handler (``async def`` on the event loop, ``def`` in a thread: sync_handlers.py),
inside its trace span when tracing is on, under its timeout, stoppable by an operator's
cancel; a transactional one in the transaction that also records its success. It never
records anything else: the dispatcher's record loop does, from the :class:`Outcome`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pgoutbox import observability
from pgoutbox.context import DoNotRetry, GuardedSession, HandlerContext, SyncGuardedSession
from pgoutbox.settings import WorkflowSystemSettings
from pgoutbox.sql import Query
from pgoutbox.worker.attempts import Claimed, LeaseLost, Outcome, next_state, success_args
from pgoutbox.worker.running import Aborted, HandlerTimedOut

if TYPE_CHECKING:
    from pgoutbox.worker.sync_handlers import SyncHandlers

handler_log = logging.getLogger("pgoutbox.handler")


class Executor:
    """Runs attempts for one worker (``worker_id``)."""

    def __init__(
        self,
        queries: Mapping[str, Query],
        settings: WorkflowSystemSettings,
        worker_id: str,
        sessions: async_sessionmaker[AsyncSession] | None,
        sync_handlers: SyncHandlers | None,
    ) -> None:
        self._q, self._settings, self.worker_id = queries, settings, worker_id
        self._sessions, self._sync = sessions, sync_handlers

    async def attempt(
        self, op: Claimed, traced: bool, task: asyncio.Task[Any] | None = None
    ) -> Outcome:
        """Run one attempt under its timeout, stoppable by an operator's cancel: the three
        kinds of cancellation are told apart here (running.py). Runs in the work loop's own
        task, not one per attempt: a task per attempt costs the hot path. The loop passes its
        task in (``task``; None: looked up here), so it is not looked up per attempt."""
        if op.abort is not None:  # requested while it was queued: nothing ran
            return Outcome(op, Aborted(f"{self.worker_id} cancelled it before its handler ran"))
        timeout = op.spec.timeout_seconds or self._settings.handler_timeout_seconds
        if self._sync is not None and self._sync.handles(op.spec):
            timeout = None  # a thread cannot be interrupted (the router refuses timeout=)
        op.task = task if task is not None else asyncio.current_task()
        try:
            # Untraced, the usual case, the handler's coroutine is awaited without the
            # _execute frame in between (a coroutine more per attempt costs the hot path).
            if timeout is None:  # the usual case: asyncio.timeout(None) costs ~3 us an attempt
                outcome = await (self._execute(op) if traced else self._run(op))
            else:
                async with asyncio.timeout(timeout):
                    outcome = await (self._execute(op) if traced else self._run(op))
            if op.abort is not None and op.task is not None:
                # Asked to stop, it finished anyway (it caught the CancelledError abort() sent
                # and returned): its real outcome stands, and the cancel is counted off this
                # loop's task, or the loop would take the next operation's cancel for stop()'s.
                op.task.uncancel()
            return outcome
        except TimeoutError:
            # Only the timeout's own expiry gets here: _run turns a handler's TimeoutError
            # into its outcome.
            assert timeout is not None
            return Outcome(op, HandlerTimedOut(timeout))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # An operator's cancel, and nothing else (stop() cancelling too): recorded.
            if op.abort is not None and task is not None and task.uncancel() == 0:
                return Outcome(
                    op,
                    Aborted(f"{self.worker_id} cancelled the running handler (CancelledError)"),
                )
            raise
        finally:
            op.task = None

    async def _execute(self, op: Claimed) -> Outcome:
        """Run one attempt in its trace span (tracing is on)."""
        with observability.attempt_span(op, self.worker_id) as span:
            outcome = await self._run(op)
            if outcome.error is not None:
                observability.record_attempt_failure(span, outcome.error)
            elif outcome.refused:  # the lease was lost before the handler's commit
                observability.record_attempt_failure(
                    span, None, "lease lost before the transaction committed"
                )
            return outcome

    async def _run(self, op: Claimed) -> Outcome:
        """Run the handler once and say how the attempt ended."""
        ctx_logger = logging.LoggerAdapter(
            handler_log, {"operation_id": op.id, "operation_type": op.operation_type}
        )
        try:
            payload = json.loads(op.payload)
            if op.spec.transactional:
                return await self._execute_transactional(op, payload, ctx_logger)
            ctx = self._context(op, None, ctx_logger)
            if self._sync is not None and self._sync.handles(op.spec):
                result = await self._sync.call(op.spec.fn, ctx, payload)
            else:
                result = await op.spec.fn(ctx, payload)
            trigger, to_state = next_state(op, result)
            return Outcome(op, trigger=trigger, to_state=to_state)
        except LeaseLost:
            refused = (
                f"attempt {op.attempt} by {self.worker_id} refused: lease lost before its "
                "transaction committed; nothing of it was kept"
            )
            return Outcome(op, refused=refused)
        except DoNotRetry as exc:
            return Outcome(op, exc, give_up=True)
        except Exception as exc:
            return Outcome(op, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # stop() is cancelling this work loop
            # Leaked from inside the handler (e.g. it awaited a task someone else cancelled):
            # an ordinary failure. Letting it propagate would end this work loop and leave the
            # operation claimed, its lease extended by the heartbeat for ever.
            return Outcome(op, exc)

    async def _execute_transactional(
        self, op: Claimed, payload: Any, ctx_logger: logging.LoggerAdapter[logging.Logger]
    ) -> Outcome:
        if self._sync is not None and self._sync.handles(op.spec):
            return await self._sync.execute_transactional(
                op,
                payload,
                lambda session: self._context(op, session, ctx_logger),
                self._q["operations_record_success"],
                self.worker_id,
            )
        assert self._sessions is not None
        q = self._q["operations_record_success"]
        # The handler's writes and the success transition share this one transaction: the
        # commit makes both visible or neither. Any exception (the handler's, a lost lease, or
        # the commit's own) rolls it all back and is recorded as this attempt's failure.
        async with self._sessions() as session:
            async with session.begin():
                result = await op.spec.fn(
                    self._context(op, GuardedSession(session), ctx_logger), payload
                )
                outcome = Outcome(op, committed=True)
                outcome.trigger, outcome.to_state = next_state(op, result)
                recorded = await session.execute(
                    q.clause(), {**success_args([outcome]), "worker_id": self.worker_id}
                )
                if recorded.first() is None:
                    raise LeaseLost(op.id)
            op.finished = True  # committed: nothing left for the heartbeat to extend
        return outcome

    def _context(
        self,
        op: Claimed,
        session: GuardedSession | SyncGuardedSession | None,
        logger: logging.LoggerAdapter[logging.Logger],
    ) -> HandlerContext:
        return HandlerContext(
            operation_id=op.id,
            operation_type=op.operation_type,
            attempt=op.step_attempt,
            max_attempts=op.max_attempts,
            idempotency_key=op.idempotency_key,
            session=session,
            logger=logger,
            worker_id=self.worker_id,
            step=op.step,
        )
