"""Lifecycles: which state changes an operation may make.

A lifecycle is declared once with the ``transitions`` library and compiled into a set of
``(from_state, trigger, to_state)`` rows. The same rows are the database's
``lifecycle_transitions`` table (which the audit trigger enforces) and the Python model used to
check and explain a change before it is sent. No ``Machine`` is ever built per operation.

Every operation type runs the default lifecycle unless it declares its own with
:meth:`Lifecycle.define`: extra states and triggers on top of the default's claim/retry/rescue
machinery. Its states are of three kinds:

- **working** states (``claimed`` and every extra state that is not parking) each run a step:
  a handler that ends by naming the trigger to fire next. That transition commits before the
  next step starts, so a crash resumes at the last recorded state.
- **parking** states run nothing: the operation waits there for an external trigger
  (:func:`pgoutbox.fire`, ``pgoutbox ops fire``) or for its optional timeout.
- the **final** states are the default's three: ``succeeded``, ``dead`` and ``cancelled``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
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
BUILTIN_STATES: Final = frozenset({PENDING, CLAIMED, SUCCEEDED, FAILED, DEAD, CANCELLED})

# Triggers pgoutbox fires itself (workers, rescuer, operators' retry/replay, the audit's
# refusal record): a custom lifecycle cannot declare them. ``give_up`` may be redeclared from a
# working state to send a step that gives up somewhere other than ``dead`` (compensation), and
# ``cancel`` from an extra state.
RESERVED_TRIGGERS: Final = frozenset(
    {"publish", "claim", "fail", "lose", "release", "retry", "replay", "reject", "snooze", "abort"}
)
# A running step's snooze (Retry-After: wait without spending an attempt) and an abort (its
# handler stopped at an operator's request) leave every working state: the first step's for
# pending and cancelled, a later step's for itself and cancelled.
SNOOZE: Final = "snooze"
ABORT: Final = "abort"
GIVE_UP: Final = "give_up"

_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,62}")


class TransitionNotAllowed(ValueError):
    """A trigger the operation's lifecycle does not allow from its current state."""


class LifecycleError(ValueError):
    """A lifecycle declared wrongly: the message names the state or trigger and the fix."""


@dataclass(frozen=True)
class Transition:
    """One allowed state change."""

    from_state: str
    trigger: str
    to_state: str


@dataclass(frozen=True)
class Timeout:
    """How long an operation may stay parked, and the trigger fired when that time is up."""

    after: timedelta
    trigger: str

    @property
    def seconds(self) -> float:
        """``after`` in seconds."""
        return self.after.total_seconds()


@dataclass(frozen=True)
class Lifecycle:
    """A compiled lifecycle: its states, allowed transitions, and which states run steps."""

    name: str
    states: tuple[str, ...]
    initial: str
    transitions: frozenset[Transition]
    working: frozenset[str] = frozenset({CLAIMED})
    parking: frozenset[str] = frozenset()
    timeouts: Mapping[str, Timeout] = field(default_factory=dict, hash=False)
    declared: frozenset[Transition] = frozenset()  # the user's own, for diagrams and steps

    @classmethod
    def declare(
        cls,
        name: str,
        states: Sequence[str],
        transitions: Iterable[Mapping[str, Any]],
        initial: str = PENDING,
    ) -> Lifecycle:
        """Compile a complete lifecycle given in ``transitions``' own vocabulary.

        ``transitions`` items are dicts as ``transitions.Machine`` takes them:
        ``{"trigger": "claim", "source": ["pending", "failed"], "dest": "claimed"}``. The
        Machine is used once, here, and discarded. A transition from or to a state not in
        ``states`` (or an ``initial`` not in it) raises ``ValueError``. This is how the default
        lifecycle is built; operation types declare theirs with :meth:`define`.
        """
        compiled_states, compiled = _compile(name, states, transitions, initial)
        return cls(name, compiled_states, initial, compiled)

    @classmethod
    def define(
        cls,
        name: str,
        *,
        states: Sequence[str],
        transitions: Iterable[Mapping[str, Any]],
        parking: Iterable[str] = (),
        timeouts: Mapping[str, tuple[str, timedelta | float]] | None = None,
    ) -> Lifecycle:
        """Declare an operation type's own lifecycle on top of the default one.

        Usage::

            REFUND = Lifecycle.define(
                "refund",
                states=["awaiting_approval", "approved", "charged", "compensating"],
                parking=["awaiting_approval"],
                timeouts={"awaiting_approval": ("expire", timedelta(days=2))},
                transitions=[
                    {"trigger": "request_approval", "source": "claimed",
                     "dest": "awaiting_approval"},
                    {"trigger": "approve", "source": "awaiting_approval", "dest": "approved"},
                    {"trigger": "expire", "source": "awaiting_approval", "dest": "dead"},
                    {"trigger": "charge", "source": ["claimed", "approved"], "dest": "charged"},
                    {"trigger": "send_receipt", "source": "charged", "dest": "succeeded"},
                    {"trigger": "give_up", "source": "charged", "dest": "compensating"},
                    {"trigger": "compensated", "source": "compensating", "dest": "cancelled"},
                ],
            )

        ``states`` are the extra states; ``claimed`` and every extra state not in ``parking``
        are working states, each run by a step handler that returns the trigger to fire next.
        ``transitions`` leave ``claimed`` or an extra state, for ``claimed``, an extra state or
        one of the final states ``succeeded``, ``dead``, ``cancelled``. pgoutbox adds the
        machinery every working state needs (claim, fail, give_up to ``dead`` unless declared,
        lose, release, retry) and ``replay`` from ``dead``/``cancelled`` back to where the
        operation stopped. ``timeouts`` maps a parking state to ``(trigger, after)``: the
        trigger (a declared exit of that state) fires when the operation has waited that long.

        Raises :class:`LifecycleError` naming the problem: an unknown or unreachable state, a
        trigger to an unknown state, an exit from a final state, an entry into ``pending``,
        ``failed`` or ``claimed``, a reserved trigger, a state with no way out, or an
        ambiguous trigger.
        """
        return _define(name, states, transitions, parking, timeouts or {})

    @property
    def custom(self) -> bool:
        """Whether this is an operation type's own lifecycle (not the default)."""
        return self.name != DEFAULT_NAME

    @property
    def step_states(self) -> frozenset[str]:
        """Working states other than ``claimed``: rested in between steps, claimed in place."""
        return self.working - {CLAIMED}

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

    def exits(self, from_state: str) -> dict[str, str]:
        """The declared triggers out of ``from_state`` and where each leads (what a step may
        return, or what may be fired at a parked operation)."""
        exits = self.exits_including_give_up(from_state)
        exits.pop(GIVE_UP, None)
        return exits

    def give_up_target(self, state: str) -> str:
        """Where a step in ``state`` goes when it gives up: declared, or ``dead``."""
        declared = self.exits_including_give_up(state).get(GIVE_UP)
        return declared or DEAD

    def exits_including_give_up(self, from_state: str) -> dict[str, str]:
        """Like :meth:`exits`, with a declared ``give_up`` too."""
        return {t.trigger: t.to_state for t in self.declared if t.from_state == from_state}

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

    def definition(self) -> dict[str, Any]:
        """The lifecycle as JSON-able data (stored with each registered version)."""
        return {
            "name": self.name,
            "states": list(self.states),
            "working": sorted(self.working),
            "parking": sorted(self.parking),
            "timeouts": {
                state: {"trigger": t.trigger, "after_seconds": t.seconds}
                for state, t in sorted(self.timeouts.items())
            },
            "declared": sorted([t.from_state, t.trigger, t.to_state] for t in self.declared),
            "transitions": [list(row[1:]) for row in self.rows()],
        }

    @property
    def digest(self) -> str:
        """sha256 of :meth:`definition`: equal digests, equal lifecycles."""
        encoded = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()

    @classmethod
    def from_definition(cls, definition: Mapping[str, Any]) -> Lifecycle:
        """The lifecycle :meth:`definition` describes (as read back from the database)."""
        return cls(
            name=definition["name"],
            states=tuple(definition["states"]),
            initial=PENDING,
            transitions=frozenset(Transition(*row) for row in definition["transitions"]),
            working=frozenset(definition["working"]),
            parking=frozenset(definition["parking"]),
            timeouts={
                state: Timeout(timedelta(seconds=t["after_seconds"]), t["trigger"])
                for state, t in definition["timeouts"].items()
            },
            declared=frozenset(Transition(*row) for row in definition["declared"]),
        )

    def mermaid(self, *, machinery: bool = False) -> str:
        """The lifecycle as a Mermaid state diagram, drawn by ``transitions``' diagram
        extension. By default only the path an operation takes (publish, claim, the declared
        triggers, give-up and timeouts); ``machinery=True`` adds every retry, rescue, release
        and replay edge the database also allows."""
        from transitions.extensions.diagrams import GraphMachine

        shown = self.transitions if machinery else self._main_path()
        model = type("LifecycleDiagram", (), {})()
        GraphMachine(
            model=model,
            states=list(self.states),
            transitions=[
                {"trigger": t.trigger, "source": t.from_state, "dest": t.to_state}
                for t in sorted(shown, key=lambda t: (t.from_state, t.trigger, t.to_state))
            ],
            initial=PENDING,
            auto_transitions=False,
            graph_engine="mermaid",
            title=f"lifecycle {self.name}",
            show_state_attributes=False,
        )
        return str(model.get_graph().draw(None))

    def _main_path(self) -> frozenset[Transition]:
        main = {
            Transition(PENDING, "claim", CLAIMED),
            Transition(CLAIMED, "fail", FAILED),
            Transition(FAILED, "claim", CLAIMED),
        }
        main |= {t for t in self.transitions if t.trigger == GIVE_UP}
        if not self.custom:
            main |= {t for t in self.transitions if t.trigger == "succeed"}
        return frozenset(main | self.declared)


def _compile(
    name: str, states: Sequence[str], transitions: Iterable[Mapping[str, Any]], initial: str
) -> tuple[tuple[str, ...], frozenset[Transition]]:
    if initial not in states:
        # transitions would silently add it as an extra state.
        raise LifecycleError(
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
                raise LifecycleError(
                    f"lifecycle {name!r}: transition {t.trigger!r} from {t.from_state!r} "
                    f"to {t.to_state!r} names unknown state {state!r}; declare it in states"
                )
    return tuple(machine.states), compiled


def _define(
    name: str,
    states: Sequence[str],
    transitions: Iterable[Mapping[str, Any]],
    parking: Iterable[str],
    timeouts: Mapping[str, tuple[str, timedelta | float]],
) -> Lifecycle:
    def fail(message: str) -> LifecycleError:
        return LifecycleError(f"lifecycle {name!r}: {message}")

    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == DEFAULT_NAME:
        raise LifecycleError(
            f"invalid lifecycle name {name!r}: lower-case letters, digits and _, starting with a "
            f"letter, at most 63 characters, and not {DEFAULT_NAME!r}"
        )
    extra = list(states) if not isinstance(states, str) else [states]
    for state in extra:
        if not isinstance(state, str) or not _NAME.fullmatch(state):
            raise fail(
                f"invalid state name {state!r}: lower-case letters, digits and _, starting "
                "with a letter"
            )
        if state in BUILTIN_STATES:
            raise fail(
                f"state {state!r} is built in; list only the extra states (the default "
                f"lifecycle's {', '.join(sorted(BUILTIN_STATES))} are always there)"
            )
    if len(set(extra)) != len(extra):
        raise fail(f"states {extra} name a state twice")
    parked = frozenset([parking] if isinstance(parking, str) else parking)
    if not parked <= set(extra):
        raise fail(
            f"parking states {sorted(parked - set(extra))} are not among the extra states {extra}"
        )
    all_states = [PENDING, CLAIMED, *extra, FAILED, SUCCEEDED, DEAD, CANCELLED]
    declared = _compile(name, all_states, transitions, PENDING)[1]
    working = frozenset({CLAIMED, *extra}) - parked

    sources_allowed = {CLAIMED, *extra}
    dests_allowed = {*extra, SUCCEEDED, DEAD, CANCELLED}
    seen: dict[tuple[str, str], str] = {}
    for t in sorted(declared, key=lambda t: (t.from_state, t.trigger, t.to_state)):
        if t.trigger in RESERVED_TRIGGERS:
            raise fail(
                f"trigger {t.trigger!r} is pgoutbox's own; name yours differently "
                f"(reserved: {', '.join(sorted(RESERVED_TRIGGERS))})"
            )
        if not _NAME.fullmatch(t.trigger):
            raise fail(
                f"invalid trigger name {t.trigger!r}: lower-case letters, digits and _, "
                "starting with a letter"
            )
        if t.from_state in FINISHED_STATES:
            raise fail(
                f"{t.from_state!r} is a final state and cannot have exits (trigger "
                f"{t.trigger!r} to {t.to_state!r}); pgoutbox adds only 'replay' (and 'cancel' "
                "from dead)"
            )
        if t.from_state not in sources_allowed:
            raise fail(
                f"trigger {t.trigger!r} leaves {t.from_state!r}, which only workers (claim) and "
                "operators (cancel, retry) move; declared triggers leave 'claimed' or an extra "
                "state"
            )
        if t.to_state not in dests_allowed:
            raise fail(
                f"trigger {t.trigger!r} enters {t.to_state!r}: 'claimed' is entered only by a "
                "worker's claim, and 'pending'/'failed' only by pgoutbox's retry machinery; "
                "lead to an extra state or to succeeded, dead or cancelled"
            )
        if t.trigger == GIVE_UP and t.from_state not in working:
            raise fail(
                f"'give_up' is fired by a step that gives up; {t.from_state!r} is a parking "
                "state and runs no step"
            )
        key = (t.from_state, t.trigger)
        if key in seen:
            raise fail(
                f"trigger {t.trigger!r} from {t.from_state!r} leads to both {seen[key]!r} and "
                f"{t.to_state!r}; a trigger must name one next state"
            )
        seen[key] = t.to_state

    for state in sorted(working):
        if not any(t.from_state == state and t.trigger != GIVE_UP for t in declared):
            raise fail(
                f"working state {state!r} has no declared exit: its step could never finish; "
                "add a transition from it (or list it in parking)"
            )
    for state in sorted(parked):
        if not any(t.from_state == state for t in declared):
            raise fail(
                f"parking state {state!r} has no exit: an operation parked there would wait "
                "forever; declare the trigger that moves it on"
            )

    resolved_timeouts: dict[str, Timeout] = {}
    for state, spec in timeouts.items():
        if state not in parked:
            raise fail(
                f"timeout on {state!r}: only parking states time out (parking: {sorted(parked)})"
            )
        try:
            trigger, after = spec
        except (TypeError, ValueError):
            raise fail(
                f"timeout on {state!r} must be (trigger, after), e.g. "
                f"('expire', timedelta(days=2)); got {spec!r}"
            ) from None
        if isinstance(after, bool) or not isinstance(after, timedelta | int | float):
            raise fail(
                f"timeout on {state!r}: after must be a timedelta or a number of seconds, "
                f"not {after!r}"
            )
        after = after if isinstance(after, timedelta) else timedelta(seconds=after)
        if after <= timedelta(0):
            raise fail(f"timeout on {state!r} must be positive, not {after}")
        if (state, trigger) not in seen:
            raise fail(
                f"timeout trigger {trigger!r} is not a declared exit of {state!r} "
                f"(its exits: {sorted(t for s, t in seen if s == state)})"
            )
        resolved_timeouts[state] = Timeout(after, trigger)

    machinery: list[Transition] = [
        Transition(PENDING, "claim", CLAIMED),
        Transition(FAILED, "claim", CLAIMED),
        Transition(CLAIMED, "fail", FAILED),
        Transition(CLAIMED, "lose", FAILED),
        Transition(CLAIMED, "release", PENDING),
        Transition(FAILED, "retry", PENDING),
        Transition(PENDING, "cancel", CANCELLED),
        Transition(FAILED, "cancel", CANCELLED),
        Transition(DEAD, "cancel", CANCELLED),
        Transition(CLAIMED, SNOOZE, PENDING),
    ]
    for state in sorted(working):
        machinery.append(Transition(state, ABORT, CANCELLED))
        if (state, GIVE_UP) not in seen:
            machinery.append(Transition(state, GIVE_UP, DEAD))
        machinery.append(Transition(state, "lose", DEAD))
    for state in sorted(working - {CLAIMED}):
        # A later step rests in its own state between attempts and is claimed in place.
        machinery += [Transition(state, trigger, state) for trigger in ("claim", "fail", "lose")]
        machinery += [Transition(state, "release", state), Transition(state, "retry", state)]
        machinery.append(Transition(state, SNOOZE, state))
    for final in (DEAD, CANCELLED):
        # Replay resumes where the operation stopped, never before: no step runs twice.
        machinery += [Transition(final, "replay", s) for s in (PENDING, *extra)]
    compiled = frozenset(machinery) | declared

    _check_reachable(name, all_states, compiled)
    return Lifecycle(
        name=name,
        states=tuple(all_states),
        initial=PENDING,
        transitions=compiled,
        working=working,
        parking=parked,
        timeouts=resolved_timeouts,
        declared=declared,
    )


def _check_reachable(name: str, states: Sequence[str], transitions: Iterable[Transition]) -> None:
    edges = [(t.from_state, t.to_state) for t in transitions if t.trigger != "replay"]

    def closure(start: set[str], forward: bool) -> set[str]:
        seen, todo = set(start), list(start)
        while todo:
            here = todo.pop()
            for a, b in edges:
                nxt = b if forward else a
                if (a if forward else b) == here and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    unreachable = [s for s in states if s not in closure({PENDING}, True)]
    if SUCCEEDED in unreachable:
        raise LifecycleError(
            f"lifecycle {name!r}: no path leads to 'succeeded'; declare a trigger into it "
            "(e.g. from the last step)"
        )
    if unreachable:
        raise LifecycleError(
            f"lifecycle {name!r}: states {unreachable} are unreachable from 'pending'; add a "
            "transition into them or remove them"
        )
    trapped = [s for s in states if s not in closure(set(FINISHED_STATES), False)]
    if trapped:
        raise LifecycleError(
            f"lifecycle {name!r}: from states {trapped} no path leads to succeeded, dead or "
            "cancelled; an operation there could never finish"
        )


DEFAULT_NAME: Final = "default"
DEFAULT_LIFECYCLE: Final = Lifecycle.declare(
    DEFAULT_NAME,
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
        # Operators: dead is acknowledged as not pursued (and ordering keys released) (0006).
        {"trigger": "cancel", "source": [PENDING, FAILED, DEAD], "dest": CANCELLED},
        {"trigger": "replay", "source": [DEAD, CANCELLED], "dest": PENDING},
        # The handler asked to wait (Snooze / Retry-After), its attempt given back (0012).
        {"trigger": SNOOZE, "source": CLAIMED, "dest": PENDING},
        # Operators: a running handler stopped on request, recorded by its worker (0012).
        {"trigger": ABORT, "source": CLAIMED, "dest": CANCELLED},
    ],
)
