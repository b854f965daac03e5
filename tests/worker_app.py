"""A small pgoutbox worker application, run as a real OS process by the integration tests.

Run it as ``python tests/worker_app.py``. Configuration comes from the environment:

- ``PGOUTBOX_DATABASE__DSN``, ``PGOUTBOX_DATABASE__SCHEMA``, ``PGOUTBOX_WORKFLOW_SYSTEM__...``:
  read by :class:`pgoutbox.Settings` as in any deployment;
- ``WORKER_APP_EFFECTS_SCHEMA``: where the ``effects`` table lives (default
  ``<pgoutbox schema>_effects``; the test creates it);
- ``WORKER_APP_PARENT_PID``: if set, the process exits at once when that process (the test
  run) is gone, so a killed test run leaves no workers behind.

Handlers (prefix ``test``):

- ``test.work``: on_lost="retry" (the default);
- ``test.once``: on_lost="dead", for side effects that must never be repeated blindly.

Both first record their execution in ``effects`` through the app's own asyncpg pool (an external
effect: committed at once, whatever happens to the attempt afterwards), then sleep for
``payload["sleep"][str(attempt)]`` seconds if the payload asks for it, so a test can make one
attempt hang while the next one runs straight through.

After ``WorkflowSystem.start()`` it prints ``ready <worker id>`` on stdout (and nothing else
there; logs go to stderr). SIGTERM or SIGINT stops the system gracefully and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import asyncpg

from pgoutbox import HandlerContext, Settings, WorkflowRouter, WorkflowSystem

EFFECTS_SCHEMA_ENV = "WORKER_APP_EFFECTS_SCHEMA"
PARENT_PID_ENV = "WORKER_APP_PARENT_PID"


def effects_schema(settings: Settings) -> str:
    """The schema holding the ``effects`` table for this app's settings."""
    return os.environ.get(EFFECTS_SCHEMA_ENV) or f"{settings.database.schema_name}_effects"


def build_router(effects: asyncpg.Pool, schema: str, pid: int) -> WorkflowRouter:
    """The app's handlers, recording their executions through ``effects``."""
    router = WorkflowRouter(prefix="test")
    insert = (
        f'INSERT INTO "{schema}".effects (operation_id, attempt, worker_pid, worker_id, started_at)'
        " VALUES ($1, $2, $3, $4, clock_timestamp())"
    )

    async def run(ctx: HandlerContext, payload: Any) -> None:
        await effects.execute(insert, ctx.operation_id, ctx.attempt, pid, ctx.worker_id)
        delay = float((payload.get("sleep") or {}).get(str(ctx.attempt), 0))
        if delay > 0:
            await asyncio.sleep(delay)

    @router.on("work")
    async def work(ctx: HandlerContext, payload: Any) -> None:
        await run(ctx, payload)

    @router.on("once", on_lost="dead")
    async def once(ctx: HandlerContext, payload: Any) -> None:
        await run(ctx, payload)

    return router


async def exit_when_orphaned(parent_pid: int) -> None:
    """Exit hard once ``parent_pid`` is no longer our parent (it died; we were re-parented)."""
    # Polling: nothing signals a parent's death to an event loop.
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    os._exit(3)


async def main() -> int:
    """Run a worker until SIGTERM/SIGINT; return the exit code."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    parent_pid = os.environ.get(PARENT_PID_ENV)
    watchdog = asyncio.create_task(exit_when_orphaned(int(parent_pid))) if parent_pid else None
    settings = Settings()
    effects = await asyncpg.create_pool(
        min_size=1,
        max_size=min(settings.workflow_system.n_workers, 4),
        **settings.database.connect_kwargs(),
    )
    try:
        router = build_router(effects, effects_schema(settings), os.getpid())
        system = WorkflowSystem(router=router, settings=settings)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await system.start()
        try:
            print(f"ready {system.worker_id}", flush=True)
            await stopping.wait()
            logging.getLogger("worker_app").info("signal received; stopping")
        finally:
            await system.stop()
    finally:
        await effects.close()
        if watchdog is not None:
            watchdog.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
