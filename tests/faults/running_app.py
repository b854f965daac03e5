"""A worker process for the running-controls tests: handlers that hang, snooze or race a cancel.

Run as ``pgoutbox worker running_app:system`` from this directory (tests/faults). Settings come
from ``PGOUTBOX_...`` variables, and ``FAULT_EFFECTS_SCHEMA`` (where the ``events`` table is)
and ``FAULT_PARENT_PID`` (exit when the test run is gone), as for fault_app.py.

Every handler writes what happened to ``events`` (operation id, attempt, process id, event, the
database's clock) through the app's own pool -- an external side effect, committed at once:

- ``run.hang`` (``timeout=1``, retried at once, 2 attempts): attempt 1 never returns by itself
  (``started``, then ``cancelled`` when its CancelledError arrives); later attempts return;
- ``run.long``: ``started``, then sleeps ``payload["sleep"]`` seconds (default: an hour), and
  ``cancelled`` if it is cancelled meanwhile, else ``finished``;
- ``run.snooze`` (``max_snoozes=3``, one attempt): snoozes ``payload["seconds"]`` until
  it has run ``payload["runs"]`` times, then returns.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
from appkit import PooledSystem, prepare_process

from pgoutbox import HandlerContext, RetryPolicy, Settings, Snooze, WorkflowRouter

NO_WAIT = RetryPolicy(base_seconds=0, max_seconds=0, jitter=0)


class Events:
    """The handlers' own pool to the ``events`` table, open while the worker runs."""

    def __init__(self, settings: Settings, schema: str) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._insert = (
            f'INSERT INTO "{schema}".events (operation_id, attempt, worker_pid, event) '
            "VALUES ($1, $2, $3, $4)"
        )
        self._count = f'SELECT count(*) FROM "{schema}".events WHERE operation_id = $1'

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            min_size=1, max_size=4, **self._settings.database.connect_kwargs()
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def add(self, ctx: HandlerContext, event: str) -> None:
        assert self._pool is not None, "handlers run only between open() and close()"
        await self._pool.execute(self._insert, ctx.operation_id, ctx.attempt, os.getpid(), event)

    async def count(self, ctx: HandlerContext) -> int:
        assert self._pool is not None
        return int(await self._pool.fetchval(self._count, ctx.operation_id))

    async def sleep(self, ctx: HandlerContext, seconds: float) -> None:
        """Sleep, recording ``cancelled`` if cancelled meanwhile, else ``finished``."""
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            # Cleaning up after a cancel: shielded, so the record is written before it ends.
            await asyncio.shield(self.add(ctx, "cancelled"))
            raise
        await self.add(ctx, "finished")


def build_router(events: Events) -> WorkflowRouter:
    router = WorkflowRouter(prefix="run")

    @router.on("hang", timeout=1, retry=NO_WAIT, max_attempts=2)
    async def hang(ctx: HandlerContext, payload: Any) -> None:
        await events.add(ctx, "started")
        if ctx.attempt == 1:
            await events.sleep(ctx, 3600)

    @router.on("long")
    async def long(ctx: HandlerContext, payload: Any) -> None:
        await events.add(ctx, "started")
        await events.sleep(ctx, float(payload.get("sleep", 3600)))

    @router.on("snooze", max_snoozes=3, max_attempts=1)
    async def snooze(ctx: HandlerContext, payload: Any) -> None:
        await events.add(ctx, "started")
        if await events.count(ctx) < int(payload["runs"]):
            raise Snooze(float(payload["seconds"]), reason="provider said 429")

    return router


def build_system() -> PooledSystem:
    prepare_process()
    settings = Settings()
    events = Events(settings, os.environ["FAULT_EFFECTS_SCHEMA"])
    return PooledSystem(events, build_router(events), settings)


system = build_system()
