"""A worker app that sends itself its stop signal at a chosen moment of its start-up, for
test_worker_stop_signals.py.

Run it as ``pgoutbox worker stop_app:router`` or ``pgoutbox worker stop_app:system`` from this
directory. Settings come from ``PGOUTBOX_...`` variables, and:

- ``STOP_APP_SIGNAL``: the signal it sends itself, ``SIGTERM`` (default) or ``SIGINT``;
- ``STOP_APP_SIGNAL_AT=import``: send it while the CLI imports this module, before anything
  has connected;
- ``stop_app:system`` sends it from inside ``start()``, once the worker holds an operation.

Its one handler, ``stop.hold``, waits until it is cancelled: an operation it runs when the
worker stops is handed back by the stop (shutdown_timeout_seconds), not finished.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from pgoutbox import HandlerContext, Settings, WorkflowRouter, WorkflowSystem

HELD_WITHIN = 30.0  # seconds start() waits to hold an operation

router = WorkflowRouter(prefix="stop")


@router.on("hold")
async def hold(ctx: HandlerContext, payload: Any) -> None:
    await asyncio.Event().wait()


def signal_self() -> None:
    os.kill(os.getpid(), signal.Signals[os.environ.get("STOP_APP_SIGNAL", "SIGTERM")])


class SignalledWhileStarting(WorkflowSystem):
    """Sends the signal at the end of ``start()``, when the worker has claimed and is running
    an operation: the CLI's stop then has something to hand back."""

    async def start(self) -> None:
        await super().start()
        # Bounded, so that a worker that never claims fails its start (and the test) rather
        # than running until the test gives up on it.
        async with asyncio.timeout(HELD_WITHIN):
            while not self.dispatcher.held_versions():  # noqa: ASYNC110 (nothing to await)
                await asyncio.sleep(0.01)
        signal_self()


system = SignalledWhileStarting(router=router, settings=Settings())

if os.environ.get("STOP_APP_SIGNAL_AT") == "import":
    signal_self()
