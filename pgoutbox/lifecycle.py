"""Lifecycles: which state changes an operation may make.

A lifecycle is declared once with the ``transitions`` library and compiled into a set of
``(from_state, trigger, to_state)`` rows. The same rows are the database's
``lifecycle_transitions`` table (which the audit trigger enforces) and the Python model used to
check and explain a change before it is sent. No ``Machine`` is ever built per operation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from transitions import Machine

State = Literal["pending", "claimed", "succeeded", "failed", "dead", "cancelled"]
PENDING: Final = "pending"
CLAIMED: Final = "claimed"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
DEAD: Final = "dead"
CANCELLED: Final = "cancelled"

CLAIMABLE_STATES: Final = frozenset({PENDING, FAILED})
FINISHED_STATES: Final = frozenset({SUCCEEDED, DEAD, CANCELLED})


class TransitionNotAllowed(ValueError):
    """A trigger the operation's lifecycle does not allow from its current state."""


@dataclass(frozen=True)
class Transition:
    """One allowed state change."""

    from_state: str
    trigger: str
    to_state: str


@dataclass(frozen=True)
class Lifecycle:
    """A compiled lifecycle: its states and allowed transitions."""

    name: str
    states: tuple[str, ...]
    initial: str
    transitions: frozenset[Transition]

    @classmethod
    def declare(
        cls,
        name: str,
        states: Sequence[str],
        transitions: Iterable[Mapping[str, Any]],
        initial: str = PENDING,
    ) -> Lifecycle:
        """Declare a lifecycle in ``transitions``' own vocabulary and compile it.

        ``transitions`` items are dicts as ``transitions.Machine`` takes them:
        ``{"trigger": "claim", "source": ["pending", "failed"], "dest": "claimed"}``. The
        Machine is used once, here, and discarded. A transition from or to a state not in
        ``states`` (or an ``initial`` not in it) raises ``ValueError``.
        """
        if initial not in states:
            # transitions would silently add it as an extra state.
            raise ValueError(
                f"lifecycle {name!r}: initial state {initial!r} is not in {list(states)}"
            )
        machine = Machine(
            model=None,
            states=list(states),
            transitions=list(transitions),
            initial=initial,
            auto_transitions=False,
        )
        compiled = frozenset(
            Transition(source, trigger, str(transition.dest))
            for trigger, event in machine.events.items()
            for source, group in event.transitions.items()
            for transition in group
        )
        # transitions does not check that sources and destinations are declared states (and
        # compiles an internal transition, dest=None, to the state "None").
        for t in compiled:
            for state in (t.from_state, t.to_state):
                if state not in machine.states:
                    raise ValueError(
                        f"lifecycle {name!r}: transition {t.trigger!r} from {t.from_state!r} "
                        f"to {t.to_state!r} names unknown state {state!r}"
                    )
        return cls(name, tuple(machine.states), initial, compiled)

    def targets(self, from_state: str, trigger: str) -> frozenset[str]:
        """States ``trigger`` may lead to from ``from_state`` (empty: not allowed)."""
        return frozenset(
            t.to_state
            for t in self.transitions
            if t.from_state == from_state and t.trigger == trigger
        )

    def sources(self, trigger: str) -> frozenset[str]:
        """States ``trigger`` may be fired from (empty: the lifecycle has no such trigger)."""
        return frozenset(t.from_state for t in self.transitions if t.trigger == trigger)

    def allowed_triggers(self, from_state: str) -> list[str]:
        """The triggers allowed from ``from_state``, sorted."""
        return sorted({t.trigger for t in self.transitions if t.from_state == from_state})

    def check(self, from_state: str, trigger: str, to_state: str) -> None:
        """Raise :class:`TransitionNotAllowed` unless the change is allowed."""
        if to_state not in self.targets(from_state, trigger):
            allowed = self.allowed_triggers(from_state)
            raise TransitionNotAllowed(
                f"lifecycle {self.name!r} does not allow {trigger!r} from {from_state!r} "
                f"to {to_state!r}; from {from_state!r} it allows: {', '.join(allowed) or 'nothing'}"
            )

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The lifecycle as rows of the database's ``lifecycle_transitions`` table."""
        return sorted((self.name, t.from_state, t.trigger, t.to_state) for t in self.transitions)


DEFAULT_LIFECYCLE: Final = Lifecycle.declare(
    "default",
    states=[PENDING, CLAIMED, SUCCEEDED, FAILED, DEAD, CANCELLED],
    transitions=[
        {"trigger": "claim", "source": [PENDING, FAILED], "dest": CLAIMED},
        {"trigger": "succeed", "source": CLAIMED, "dest": SUCCEEDED},
        {"trigger": "fail", "source": CLAIMED, "dest": FAILED},
        {"trigger": "give_up", "source": CLAIMED, "dest": DEAD},
        # Lease expired (worker lost): retried or dead, per the handler's on_lost policy.
        {"trigger": "lose", "source": CLAIMED, "dest": FAILED},
        {"trigger": "lose", "source": CLAIMED, "dest": DEAD},
        # Graceful stop hands back what did not finish.
        {"trigger": "release", "source": CLAIMED, "dest": PENDING},
        # Operators: run a failed operation now instead of at its scheduled retry (0002).
        {"trigger": "retry", "source": FAILED, "dest": PENDING},
        {"trigger": "cancel", "source": [PENDING, FAILED], "dest": CANCELLED},
        {"trigger": "replay", "source": [DEAD, CANCELLED], "dest": PENDING},
    ],
)
