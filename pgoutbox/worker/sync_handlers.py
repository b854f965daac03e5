"""Plain ``def`` handlers: run in a bounded thread pool, so blocking code (a synchronous HTTP
client, an SDK, the Django ORM) does not stall the worker's event loop.

A transactional ``def`` handler gets a synchronous guarded ``Session`` (over psycopg 3, on a
connection carrying the worker's key): its writes and the operation's success transition commit
in that one transaction, exactly as for an ``async def`` handler (the executor's
``_execute_transactional``). Everything else -- claiming, the heartbeat, recording failures --
is the dispatcher's, on the event loop, whatever kind the handler is.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from pgoutbox.context import HandlerContext, SyncGuardedSession
from pgoutbox.db import SESSION_SETTINGS_KEY
from pgoutbox.router import HandlerSpec
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import Query
from pgoutbox.worker.attempts import Claimed, LeaseLost, Outcome, next_state, success_args


class SyncHandlerError(TypeError):
    """A ``def`` handler returned an awaitable: it should have been declared ``async def``."""


def is_sync(spec: HandlerSpec) -> bool:
    """Whether ``spec``'s handler is a plain function, to be run in a thread."""
    return not inspect.iscoroutinefunction(spec.fn)


class SyncHandlers:
    """The thread pool (and, for transactional ones, the synchronous sessions) of one worker's
    ``def`` handlers.

    ``threads`` is the worker's ``n_workers``: no more handlers run at once anyway, so an attempt
    never waits for a thread.
    """

    def __init__(self, threads: int, sessions: sessionmaker[Session] | None) -> None:
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="pgoutbox-handler")
        self._sessions = sessions

    @classmethod
    def for_handlers(
        cls,
        handlers: Mapping[str, HandlerSpec],
        settings: DatabaseSettings,
        threads: int,
        worker_key: str,
    ) -> SyncHandlers | None:
        """What ``handlers`` need: None if none of them is a ``def``."""
        steps = [step for spec in handlers.values() for step in spec.all_steps()]
        if not any(is_sync(step) for step in steps):
            return None
        sessions = None
        if any(is_sync(step) and step.transactional for step in steps):
            from pgoutbox.sync import create_sync_engine  # needs psycopg: the `sync` extra

            engine = create_sync_engine(settings, pool_size=threads, worker_key=worker_key)
            # As the async sessions: a handler publishing on ctx.session uses these settings.
            sessions = sessionmaker(
                engine, expire_on_commit=False, info={SESSION_SETTINGS_KEY: settings}
            )
        return cls(threads, sessions)

    def handles(self, spec: HandlerSpec) -> bool:
        """Whether this step's handler runs here (it is a ``def``)."""
        return is_sync(spec)

    async def call(self, fn: Callable[[Any, Any], Any], ctx: HandlerContext, payload: Any) -> Any:
        """Run a non-transactional ``def`` handler in a thread; its return value."""
        return await self._in_thread(_checked, fn, ctx, payload)

    async def execute_transactional(
        self,
        op: Claimed,
        payload: Any,
        make_context: Callable[[SyncGuardedSession], HandlerContext],
        record_success: Query,
        worker_id: str,
    ) -> Outcome:
        """Run a transactional ``def`` handler in a thread, in one transaction with the
        recording of its success (fenced: a lost lease rolls all of it back)."""
        assert self._sessions is not None
        sessions = self._sessions

        def attempt() -> Outcome:
            with sessions() as session, session.begin():
                result = _checked(op.spec.fn, make_context(SyncGuardedSession(session)), payload)
                outcome = Outcome(op, committed=True)
                outcome.trigger, outcome.to_state = next_state(op, result)
                recorded = session.execute(
                    record_success.clause(),
                    {**success_args([outcome]), "worker_id": worker_id},
                )
                if recorded.first() is None:
                    raise LeaseLost(op.id)
            return outcome

        outcome: Outcome = await self._in_thread(attempt)
        op.finished = True  # committed: nothing left for the heartbeat to extend
        return outcome

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        # The attempt's context (its trace span, for one) goes with it into the thread.
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        thread = loop.run_in_executor(self._threads, context.run, fn, *args)
        # A thread cannot be interrupted: whatever cancels this await (an operator's cancel, the
        # worker stopping) leaves the handler running, and recording a cancel or a release
        # while it may still act outside would be a lie. So the attempt ends when the handler
        # does, with what it did; the cancel is taken as having come too late (the
        # executor's attempt and the dispatcher's _work_loop see it is still pending).
        while True:
            try:
                return await asyncio.shield(thread)
            except asyncio.CancelledError:
                if thread.cancelled():
                    raise  # never started: the pool was shut down

    def close(self) -> None:
        """Stop the threads once their handlers return (a thread cannot be interrupted: a
        handler still running after the stop's grace period finishes on its own, and what it
        records then is fenced like any late result) and close the sessions' connections."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._sessions is not None:
            engine = self._sessions.kw["bind"]
            engine.dispose()


def _checked(fn: Callable[[Any, Any], Any], ctx: HandlerContext, payload: Any) -> Any:
    result = fn(ctx, payload)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: say so here, not in a RuntimeWarning later
        raise SyncHandlerError(
            f"the handler of {ctx.operation_type!r} returned {type(result).__name__}, an "
            "awaitable: declare it `async def` (a plain `def` handler runs in a thread)"
        )
    return result
