"""A worker process for the flow-control tests: every handler records when it ran.

Run as ``pgoutbox worker flow_app:system`` from this directory (tests/faults). Settings come
from ``PGOUTBOX_...`` variables, and ``FAULT_EFFECTS_SCHEMA`` (where the ``intervals`` table is)
and ``FAULT_PARENT_PID`` (exit when the test run is gone), as for fault_app.py.

Each handler inserts its operation id, attempt and process id with the database's
``clock_timestamp()`` when it starts and stores the time again when it ends, through the app's
own pool: the tests count overlaps and starts per second on the database's clock. A payload's
``sleep`` (seconds) makes the handler take that long.

Types (prefix ``flow``):

- ``three``: at most 3 at once cluster wide (``Limit("flow.three", concurrency=3)``);
- ``rated``: at most 50 starts per second, burst 5;
- ``merchant``: one at a time per ``payload.merchant`` (a partitioned limit);
- ``free``: no limit.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
from appkit import PooledSystem, prepare_process

from pgoutbox import HandlerContext, Limit, Settings, WorkflowRouter

THREE = Limit("flow.three", concurrency=3)
RATED = Limit("flow.rated", rate="50/s", burst=5)
PER_MERCHANT = Limit("flow.merchant", concurrency=1, partition_by="payload.merchant")


class Intervals:
    """The handlers' own pool to the ``intervals`` table, open while the worker runs."""

    def __init__(self, settings: Settings, schema: str) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._start = (
            f'INSERT INTO "{schema}".intervals (operation_id, attempt, worker_pid, started_at) '
            "VALUES ($1, $2, $3, clock_timestamp()) RETURNING id"
        )
        self._end = f'UPDATE "{schema}".intervals SET ended_at = clock_timestamp() WHERE id = $1'

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            min_size=1, max_size=4, **self._settings.database.connect_kwargs()
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def run(self, ctx: HandlerContext, payload: Any) -> None:
        pool = self._pool
        assert pool is not None, "handlers run only between open() and close()"
        row = await pool.fetchval(self._start, ctx.operation_id, ctx.attempt, os.getpid())
        await asyncio.sleep(float(payload.get("sleep", 0)))
        await pool.execute(self._end, row)


def build_router(intervals: Intervals) -> WorkflowRouter:
    router = WorkflowRouter(prefix="flow")
    for name, limit in (("three", THREE), ("rated", RATED), ("merchant", PER_MERCHANT)):
        router.on(name, limit=limit)(intervals.run)
    router.on("free")(intervals.run)
    return router


def build_system() -> PooledSystem:
    prepare_process()
    settings = Settings()
    intervals = Intervals(settings, os.environ["FAULT_EFFECTS_SCHEMA"])
    return PooledSystem(intervals, build_router(intervals), settings)


system = build_system()
