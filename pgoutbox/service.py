"""The outline every background service shares (heartbeat, rescuer, listener, gauge refresher).

A config with validated defaults, ``start()`` / ``stop()``, and ``run_once()`` returning a small
result. Tests call ``run_once()`` directly instead of sleeping for a ticker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any

import asyncpg

log = logging.getLogger("pgoutbox.worker")

# Errors that mean "the database is unreachable right now": retried, never fatal to a worker.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    TimeoutError,
)


class Service(ABC):
    """A loop calling :meth:`run_once` every ``interval`` seconds until stopped."""

    name = "service"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    @abstractmethod
    async def run_once(self) -> Any:
        """Do one round of work and say what was done."""

    def start(self) -> None:
        """Start the loop in the background."""
        self._task = asyncio.create_task(self._loop(), name=f"pgoutbox-{self.name}")

    def kick(self) -> None:
        """Run the next round now instead of at the next interval."""
        self._kick.set()

    async def stop(self) -> None:
        """Stop the loop (a round in progress is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except CONNECTION_ERRORS as exc:
                log.warning("%s: database unreachable (%s); retrying", self.name, exc)
            except Exception:
                log.exception("%s: round failed; retrying", self.name)
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.interval)
