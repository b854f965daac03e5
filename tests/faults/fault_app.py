"""A worker process that kills itself (SIGKILL) at seeded random points of its attempts.

Run as ``pgoutbox worker fault_app:system`` from this directory, so that its start-up, signals
and stop are the CLI's, as in a deployment. Settings come from ``PGOUTBOX_...`` variables, and:

- ``FAULT_SEED``: the seed; whether attempt *a* of operation *n* is killed, and where, is a pure
  function of (seed, n, a), so a failing seed replays the same kill decisions;
- ``FAULT_KILL_RATE``: the share of attempts that end in ``kill -9`` (default 0.05);
- ``FAULT_EFFECTS_SCHEMA``: where the ``effects`` table is (one row per handler execution,
  written through the app's own pool: an external effect the dispatcher cannot roll back);
- ``FAULT_PARENT_PID``: exit at once when the test run is gone;
- ``FAULT_CLOCK_SKEW_SECONDS``: shift this process's wall clock (``time.time``,
  ``datetime.now``) by that much, as a badly set host clock would.

Kill points: ``before_effect`` (claimed, nothing done outside), ``after_effect`` (done outside,
not recorded), ``mid_handler`` (a few ms later, other handlers running), ``after_return`` (a
timer fired after the handler returned: lands while the outcome is being recorded, or during
the next claim). Every kill also interrupts whatever else the process holds.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import signal
import time
from typing import Any

import asyncpg
from appkit import PooledSystem, prepare_process

from pgoutbox import HandlerContext, Settings, WorkflowRouter

KILL_POINTS = ("before_effect", "after_effect", "mid_handler", "after_return")


def kill_decision(seed: int, operation_id: int, attempt: int, rate: float) -> tuple[str, float]:
    """Where attempt ``attempt`` of ``operation_id`` is killed ("" if it is not), and a delay."""
    rng = random.Random(f"{seed}:{operation_id}:{attempt}")
    killed = rng.random() < rate
    point = rng.choice(KILL_POINTS)
    delay = rng.uniform(0.0, 0.02)
    return (point if killed else ""), delay


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Effects:
    """The handlers' own pool to the ``effects`` table, open while the worker runs."""

    def __init__(self, settings: Settings, schema: str) -> None:
        self._settings = settings
        self._insert = (
            f'INSERT INTO "{schema}".effects (operation_id, attempt, worker_pid) '
            "VALUES ($1, $2, $3)"
        )
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            min_size=1, max_size=2, **self._settings.database.connect_kwargs()
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def record(self, ctx: HandlerContext) -> None:
        assert self._pool is not None, "handlers run only between open() and close()"
        await self._pool.execute(self._insert, ctx.operation_id, ctx.attempt, os.getpid())


def build_router(effects: Effects, seed: int, rate: float) -> WorkflowRouter:
    router = WorkflowRouter(prefix="fault")

    @router.on("work")
    async def work(ctx: HandlerContext, payload: Any) -> None:
        point, delay = kill_decision(seed, ctx.operation_id, ctx.attempt, rate)
        if point == "before_effect":
            die()
        await effects.record(ctx)
        if point == "after_effect":
            die()
        # the "external call": a few ms, or as long as the payload asks
        await asyncio.sleep(float(payload.get("sleep", 0)) or (delay if point else delay / 4))
        if point == "mid_handler":
            die()
        if point == "after_return":
            asyncio.get_running_loop().call_later(delay, die)

    return router


def skew_wall_clock(seconds: float) -> None:
    """Make this process's wall clock wrong by ``seconds`` (monotonic time is left alone, as
    NTP-less hosts leave it)."""
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + seconds
    time.time_ns = lambda: real_time_ns() + int(seconds * 1e9)
    real_datetime = datetime.datetime

    class SkewedDatetime(real_datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> SkewedDatetime:
            return super().now(tz) + datetime.timedelta(seconds=seconds)  # type: ignore[return-value]

        @classmethod
        def utcnow(cls) -> SkewedDatetime:
            return cls.now(datetime.UTC).replace(tzinfo=None)

    datetime.datetime = SkewedDatetime  # type: ignore[misc]


def build_system() -> PooledSystem:
    prepare_process()
    skew = float(os.environ.get("FAULT_CLOCK_SKEW_SECONDS", "0"))
    if skew:
        skew_wall_clock(skew)
    settings = Settings()
    effects = Effects(settings, os.environ["FAULT_EFFECTS_SCHEMA"])
    router = build_router(
        effects,
        int(os.environ.get("FAULT_SEED", "0")),
        float(os.environ.get("FAULT_KILL_RATE", "0.05")),
    )
    return PooledSystem(effects, router, settings)


system = build_system()
