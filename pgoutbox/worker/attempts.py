"""What the worker's parts share about an attempt: the operation it holds (``Claimed``), how
the attempt ended (``Outcome``), and the step result's meaning (``next_state``,
``success_args``). The dispatcher claims and records; the executor runs (executor.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pgoutbox.context import Snooze
from pgoutbox.lifecycle import FINISHED_STATES
from pgoutbox.router import HandlerSpec


class LeaseLost(Exception):
    """The operation's lease went to someone else before its outcome could be recorded."""


class StepResultError(Exception):
    """A step returned something that is not a trigger its state allows: the attempt fails."""


@dataclass(slots=True)
class Claimed:
    """An operation this worker holds."""

    id: int
    operation_type: str
    payload: str
    attempt: int  # of the operation, as its audit rows number them
    step_attempt: int  # of the step running now; max_attempts applies to it
    max_attempts: int
    version: int
    idempotency_key: str
    spec: HandlerSpec  # the step's
    step: str  # the state the step runs in: claimed, or a later working state
    trace_context: str | None = None  # the publisher's, as JSON (see pgoutbox.observability)
    started: bool = False  # a work loop took it: its handler may have acted outside
    finished: bool = False  # the handler is done: the heartbeat leaves it to the recorder
    task: asyncio.Task[None] | None = None  # the work loop running its handler
    abort: str | None = None  # an operator asked to cancel it: who (see running.py)


@dataclass(slots=True)
class Outcome:
    """How an attempt ended. ``committed``: its success is recorded already (a transactional
    one, or by an earlier statement of its batch). ``refused``: its result is not the
    operation's any more (its lease was lost); only a 'reject' audit event, with this detail,
    records it."""

    op: Claimed
    error: BaseException | None = None
    give_up: bool = False
    committed: bool = False
    refused: str | None = None
    trigger: str = "succeed"  # on success: the trigger the step named
    to_state: str = "succeeded"


def next_state(op: Claimed, result: Any) -> tuple[str, str]:
    """The trigger a finished step named and the state it leads to. The default lifecycle's
    one step always succeeds; a custom lifecycle's step must name one of its state's exits.
    A returned :class:`Snooze` is raised, as if the handler had raised it."""
    if isinstance(result, Snooze):
        raise result
    if not op.spec.lifecycle.custom:
        return "succeed", "succeeded"
    exits = op.spec.lifecycle.exits(op.step)
    if not isinstance(result, str) or result not in exits:
        raise StepResultError(
            f"step {op.step!r} of {op.operation_type!r} returned {result!r}; it must return the "
            f"trigger to fire next, one of: {', '.join(sorted(exits))}"
        )
    return result, exits[result]


def success_args(outcomes: list[Outcome]) -> dict[str, Any]:
    """Parameters of ``operations_record_success`` for these successful steps."""
    timeouts = [o.op.spec.lifecycle.timeouts.get(o.to_state) for o in outcomes]
    return {
        "ids": [o.op.id for o in outcomes],
        "versions": [o.op.version for o in outcomes],
        "to_states": [o.to_state for o in outcomes],
        "triggers": [o.trigger for o in outcomes],
        "new_steps": [
            o.to_state != o.op.step and o.to_state not in FINISHED_STATES for o in outcomes
        ],
        "wait_seconds": [t.seconds if t is not None else None for t in timeouts],
    }
