"""Controls of a running attempt: its timeout, a snooze, and an operator's cancel.

Three things can stop a handler while it runs, and each is recorded differently:

- the worker stopping (``stop()`` cancels the work loops): the operation is released, as
  before (or dead, for a started step with ``on_lost="dead"``);
- its timeout (``@router.on(..., timeout=)`` or the ``handler_timeout_seconds`` setting):
  the attempt fails with "timed out after N s" and is retried per its policy;
- an operator's cancel (``pgoutbox ops cancel`` on a running operation): the database holds
  the request, the heartbeat (or a notification) brings it to the worker holding the lease,
  which cancels the handler and records ``abort`` (to ``cancelled``).

Cancellation is asyncio's: the handler sees ``CancelledError`` at its next ``await`` and may
clean up. A handler that returns anyway has finished: its real outcome is recorded.

A handler's :class:`~pgoutbox.Snooze` gives its attempt back and waits until the time it names
(database time), up to ``max_snoozes`` times per operation; past that a snooze is an ordinary
failed attempt (:class:`SnoozeLimitReached`).
"""

from __future__ import annotations

from typing import Any

from pgoutbox.context import Snooze
from pgoutbox.lifecycle import CLAIMED, PENDING

__all__ = [
    "Aborted",
    "HandlerTimedOut",
    "SnoozeLimitReached",
    "abort_args",
    "seconds_text",
    "snooze_args",
]


class HandlerTimedOut(Exception):
    """The handler ran longer than its timeout and was cancelled: a failed attempt."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds_text(seconds)}")
        self.seconds = seconds


class Aborted(Exception):
    """The handler was stopped (or never started) at an operator's request: recorded as
    ``abort``, to ``cancelled``."""


class SnoozeLimitReached(Exception):
    """A snooze beyond the operation's ``max_snoozes``: recorded as a failed attempt."""


def seconds_text(seconds: float) -> str:
    """``30 s``, ``1.5 s``: how durations read in audit details."""
    return f"{seconds:g} s"


def snooze_args(outcomes: list[Any], default_max: int, worker_id: str) -> dict[str, Any]:
    """Parameters of ``operations_record_snooze`` for outcomes whose error is a Snooze."""
    snoozes: list[Snooze] = [o.error for o in outcomes]
    return {
        "ids": [o.op.id for o in outcomes],
        "versions": [o.op.version for o in outcomes],
        "seconds": [s.seconds for s in snoozes],
        "max_snoozes": [
            o.op.spec.max_snoozes if o.op.spec.max_snoozes is not None else default_max
            for o in outcomes
        ],
        # The first step waits in pending; a later one in its own state.
        "to_states": [PENDING if o.op.step == CLAIMED else o.op.step for o in outcomes],
        "details": [
            f"attempt {o.op.step_attempt} given back: snoozed for {seconds_text(s.seconds)}"
            + (f": {s.reason}" if s.reason else "")
            for o, s in zip(outcomes, snoozes, strict=True)
        ],
        "worker_id": worker_id,
    }


def abort_args(outcomes: list[Any], worker_id: str) -> dict[str, Any]:
    """Parameters of ``operations_record_abort`` for outcomes whose error is Aborted."""
    return {
        "ids": [o.op.id for o in outcomes],
        "versions": [o.op.version for o in outcomes],
        "details": [str(o.error) for o in outcomes],
        "worker_id": worker_id,
    }
