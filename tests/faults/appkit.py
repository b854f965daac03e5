"""What the fault suite's worker apps (fault_app, flow_app, running_app) share: the process
set-up every one of them does, and a worker that keeps the handlers' own pool open while it
runs (the pool its handlers record their external effects through)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Protocol

from pgoutbox import Settings, WorkflowRouter, WorkflowSystem


class HandlersPool(Protocol):
    """The handlers' own connections: opened before the worker claims, closed after it."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...


def exit_when_orphaned(parent_pid: int) -> None:
    # A thread, not a task: it also covers start-up, before the worker's loop runs.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(3)


def prepare_process() -> None:
    """Log warnings to stderr with the pid, and exit at once when the test run
    (FAULT_PARENT_PID) is gone, so a killed test run leaves no workers behind."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    parent = os.environ.get("FAULT_PARENT_PID")
    if parent:
        threading.Thread(target=exit_when_orphaned, args=(int(parent),), daemon=True).start()


class PooledSystem(WorkflowSystem):
    """The worker, with ``pool`` open from before it claims until after it stops."""

    def __init__(self, pool: HandlersPool, router: WorkflowRouter, settings: Settings) -> None:
        self.pool = pool
        super().__init__(router=router, settings=settings)

    async def start(self) -> None:
        await self.pool.open()
        try:
            await super().start()
        except BaseException:
            await self.pool.close()
            raise

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            await self.pool.close()
