"""Custom lifecycles (``Lifecycle.define``): every declaration mistake is refused with a
:class:`LifecycleError` naming the culprit, and a valid declaration compiles into exactly the
rows the database enforces (declared transitions plus pgoutbox's machinery), a stable digest,
a definition that round-trips, and a diagram. Pure Python: no database."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pgoutbox.lifecycle import (
    DEFAULT_LIFECYCLE,
    RESERVED_TRIGGERS,
    Lifecycle,
    LifecycleError,
    Timeout,
    Transition,
)


def _example(name: str) -> ModuleType:
    """An example script, loaded by path: ``examples`` is a directory, not a package."""
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pgoutbox_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The example is the documented showcase; testing it keeps the documentation honest.
REFUND: Lifecycle = _example("refund").REFUND
EXTRA = ("awaiting_approval", "approved", "charged", "compensating")
FINALS = ("succeeded", "dead", "cancelled")

# A small valid lifecycle each error case breaks in exactly one place.
BASE_STATES = ["review", "waiting"]
BASE_PARKING = ["waiting"]
BASE_TRANSITIONS = [
    {"trigger": "start", "source": "claimed", "dest": "review"},
    {"trigger": "ask", "source": "review", "dest": "waiting"},
    {"trigger": "done", "source": "review", "dest": "succeeded"},
    {"trigger": "answer", "source": "waiting", "dest": "review"},
    {"trigger": "expire", "source": "waiting", "dest": "dead"},
]


def _define(
    name: str = "base",
    *,
    states: Any = None,
    parking: Any = None,
    transitions: Any = None,
    extra: Sequence[Mapping[str, Any]] = (),
    timeouts: Mapping[str, Any] | None = None,
) -> Lifecycle:
    """The base lifecycle with some parts replaced (or transitions added through ``extra``)."""
    return Lifecycle.define(
        name,
        states=BASE_STATES if states is None else states,
        parking=BASE_PARKING if parking is None else parking,
        transitions=[*(BASE_TRANSITIONS if transitions is None else transitions), *extra],
        timeouts=timeouts,
    )


def _refund(**changes: Any) -> Lifecycle:
    """The refund lifecycle declared again from scratch, optionally with one part changed."""
    spec: dict[str, Any] = {
        "states": list(EXTRA),
        "parking": ["awaiting_approval"],
        "timeouts": {"awaiting_approval": ("expire", timedelta(days=2))},
        "transitions": [
            {"trigger": "request_approval", "source": "claimed", "dest": "awaiting_approval"},
            {"trigger": "charge", "source": ["claimed", "approved"], "dest": "charged"},
            {"trigger": "approve", "source": "awaiting_approval", "dest": "approved"},
            {"trigger": "deny", "source": "awaiting_approval", "dest": "cancelled"},
            {"trigger": "expire", "source": "awaiting_approval", "dest": "dead"},
            {"trigger": "send_receipt", "source": "charged", "dest": "succeeded"},
            {"trigger": "give_up", "source": "charged", "dest": "compensating"},
            {"trigger": "compensated", "source": "compensating", "dest": "cancelled"},
        ],
    }
    name = changes.pop("name", "refund")
    spec.update(changes)
    return Lifecycle.define(name, **spec)


def test_the_base_case_is_valid() -> None:
    # Every error case below changes one thing of this: it must itself be accepted.
    lifecycle = _define()
    assert lifecycle.working == {"claimed", "review"}
    assert lifecycle.parking == {"waiting"}


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["default", "Refund", "1refund", "_refund", "re-fund", "", "a" * 64, 3, None]
)
def test_invalid_lifecycle_name_is_refused_naming_it(name: Any) -> None:
    with pytest.raises(LifecycleError) as excinfo:
        _define(name)
    assert str(excinfo.value).startswith(f"invalid lifecycle name {name!r}:")


def test_longest_valid_lifecycle_name_is_accepted() -> None:
    # 63 characters: PostgreSQL's identifier limit, which the refusal message promises.
    assert _define("a" * 63).name == "a" * 63


@pytest.mark.parametrize("state", ["Review", "2nd", "has space", "", "b" * 64, 7])
def test_invalid_state_name_is_refused_naming_it(state: Any) -> None:
    with pytest.raises(LifecycleError, match=r"^lifecycle 'base': invalid state name ") as excinfo:
        _define(states=["review", "waiting", state])
    assert repr(state) in str(excinfo.value)


@pytest.mark.parametrize(
    "state", ["pending", "claimed", "succeeded", "failed", "dead", "cancelled"]
)
def test_builtin_state_listed_as_extra_is_refused(state: str) -> None:
    with pytest.raises(LifecycleError, match=rf"^lifecycle 'base': state '{state}' is built in"):
        _define(states=["review", "waiting", state])


def test_state_listed_twice_is_refused() -> None:
    with pytest.raises(LifecycleError, match=r"name a state twice") as excinfo:
        _define(states=["review", "waiting", "review"])
    assert "['review', 'waiting', 'review']" in str(excinfo.value)


def test_parking_state_that_is_not_an_extra_state_is_refused_naming_it() -> None:
    with pytest.raises(
        LifecycleError, match=r"parking states \['elsewhere'\] are not among the extra states"
    ):
        _define(parking=["waiting", "elsewhere"])


def test_builtin_state_cannot_be_parking() -> None:
    with pytest.raises(LifecycleError, match=r"parking states \['claimed'\] are not among"):
        _define(parking=["waiting", "claimed"])


# -- triggers -------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", sorted(RESERVED_TRIGGERS))
def test_reserved_trigger_is_refused_naming_it(trigger: str) -> None:
    with pytest.raises(LifecycleError, match=rf"trigger '{trigger}' is pgoutbox's own"):
        _define(extra=[{"trigger": trigger, "source": "review", "dest": "cancelled"}])


def test_reserved_triggers_are_exactly_the_ones_pgoutbox_fires() -> None:
    # The brief of the feature: these are fired by workers, the rescuer and operators.
    assert {
        "claim",
        "fail",
        "lose",
        "release",
        "retry",
        "replay",
        "reject",
        "publish",
        "snooze",  # a handler's Snooze (Retry-After), 0012
        "abort",  # a running handler stopped at an operator's request, 0012
    } == RESERVED_TRIGGERS


def test_invalid_trigger_name_is_refused_naming_it() -> None:
    with pytest.raises(LifecycleError, match=r"invalid trigger name 'Done'"):
        _define(extra=[{"trigger": "Done", "source": "review", "dest": "cancelled"}])


@pytest.mark.parametrize("final", FINALS)
def test_exit_from_a_final_state_is_refused(final: str) -> None:
    with pytest.raises(
        LifecycleError,
        match=rf"'{final}' is a final state and cannot have exits \(trigger 'revive' to 'review'\)",
    ):
        _define(extra=[{"trigger": "revive", "source": final, "dest": "review"}])


@pytest.mark.parametrize("source", ["pending", "failed"])
def test_transition_leaving_pending_or_failed_is_refused(source: str) -> None:
    with pytest.raises(LifecycleError, match=rf"trigger 'jump' leaves '{source}'"):
        _define(extra=[{"trigger": "jump", "source": source, "dest": "review"}])


@pytest.mark.parametrize("dest", ["claimed", "pending", "failed"])
def test_transition_entering_claimed_pending_or_failed_is_refused(dest: str) -> None:
    # Entering 'claimed' by a declared trigger would be a "running" state nobody claimed.
    with pytest.raises(LifecycleError, match=rf"trigger 'back' enters '{dest}'"):
        _define(extra=[{"trigger": "back", "source": "review", "dest": dest}])


def test_give_up_from_a_parking_state_is_refused() -> None:
    with pytest.raises(
        LifecycleError, match=r"'give_up' is fired by a step .* 'waiting' is a parking state"
    ):
        _define(extra=[{"trigger": "give_up", "source": "waiting", "dest": "cancelled"}])


def test_trigger_leading_from_one_state_to_two_is_refused() -> None:
    with pytest.raises(
        LifecycleError,
        match=r"trigger 'done' from 'review' leads to both 'cancelled' and 'succeeded'",
    ):
        _define(extra=[{"trigger": "done", "source": "review", "dest": "cancelled"}])


def test_same_trigger_from_two_states_is_fine() -> None:
    lifecycle = _define(extra=[{"trigger": "done", "source": "waiting", "dest": "succeeded"}])
    assert lifecycle.sources("done") == {"review", "waiting"}


# -- exits, reachability ------------------------------------------------------------------


def test_working_state_without_exit_is_refused() -> None:
    transitions = [t for t in BASE_TRANSITIONS if t["source"] != "review"]
    with pytest.raises(LifecycleError, match=r"working state 'review' has no declared exit"):
        _define(transitions=transitions)


def test_working_state_whose_only_exit_is_give_up_is_refused() -> None:
    # give_up is what a failing step does; a step that succeeds needs somewhere to go.
    transitions = [t for t in BASE_TRANSITIONS if t["source"] != "review"]
    with pytest.raises(LifecycleError, match=r"working state 'review' has no declared exit"):
        _define(
            transitions=transitions,
            extra=[{"trigger": "give_up", "source": "review", "dest": "waiting"}],
        )


def test_claimed_without_exit_is_refused() -> None:
    transitions = [t for t in BASE_TRANSITIONS if t["source"] != "claimed"]
    with pytest.raises(LifecycleError, match=r"working state 'claimed' has no declared exit"):
        _define(transitions=transitions)


def test_parking_state_without_exit_is_refused() -> None:
    transitions = [t for t in BASE_TRANSITIONS if t["source"] != "waiting"]
    with pytest.raises(LifecycleError, match=r"parking state 'waiting' has no exit"):
        _define(transitions=transitions)


def test_unreachable_state_is_refused_naming_it() -> None:
    # 'orphan' leads on, but nothing enters it (replay into it does not count).
    with pytest.raises(LifecycleError, match=r"states \['orphan'\] are unreachable from 'pending'"):
        _define(
            states=[*BASE_STATES, "orphan"],
            extra=[{"trigger": "finish", "source": "orphan", "dest": "succeeded"}],
        )


def test_cycle_of_parking_states_away_from_every_final_state_is_refused() -> None:
    with pytest.raises(
        LifecycleError,
        match=r"from states \['hold_a', 'hold_b'\] no path leads to succeeded, dead or cancelled",
    ):
        _define(
            states=[*BASE_STATES, "hold_a", "hold_b"],
            parking=["waiting", "hold_a", "hold_b"],
            extra=[
                {"trigger": "hold", "source": "review", "dest": "hold_a"},
                {"trigger": "swap", "source": "hold_a", "dest": "hold_b"},
                {"trigger": "swap", "source": "hold_b", "dest": "hold_a"},
            ],
        )


def test_transition_naming_an_unknown_state_is_refused() -> None:
    with pytest.raises(LifecycleError, match=r"names unknown state 'nowhere'"):
        _define(extra=[{"trigger": "lost", "source": "review", "dest": "nowhere"}])
    with pytest.raises(LifecycleError, match=r"names unknown state 'elsewhere'"):
        _define(extra=[{"trigger": "found", "source": "elsewhere", "dest": "review"}])


# -- timeouts ---------------------------------------------------------------------------------


def test_timeout_on_a_parking_state_with_a_declared_exit_is_kept() -> None:
    lifecycle = _define(timeouts={"waiting": ("expire", 90)})
    assert lifecycle.timeouts == {"waiting": Timeout(timedelta(seconds=90), "expire")}
    assert lifecycle.timeouts["waiting"].seconds == 90.0


@pytest.mark.parametrize("state", ["review", "claimed", "pending"])
def test_timeout_on_a_state_that_is_not_parking_is_refused(state: str) -> None:
    with pytest.raises(LifecycleError, match=rf"timeout on '{state}': only parking states"):
        _define(timeouts={state: ("done", 60)})


def test_timeout_with_a_trigger_that_is_no_exit_of_the_state_is_refused() -> None:
    # 'done' is declared, but from 'review', not from 'waiting'.
    with pytest.raises(
        LifecycleError,
        match=r"timeout trigger 'done' is not a declared exit of 'waiting' "
        r"\(its exits: \['answer', 'expire'\]\)",
    ):
        _define(timeouts={"waiting": ("done", 60)})


@pytest.mark.parametrize("after", [0, -1, timedelta(0), timedelta(seconds=-5)])
def test_non_positive_timeout_is_refused(after: Any) -> None:
    with pytest.raises(LifecycleError, match=r"timeout on 'waiting' must be positive"):
        _define(timeouts={"waiting": ("expire", after)})


def test_timeout_that_is_not_a_pair_is_refused_showing_what_was_given() -> None:
    with pytest.raises(
        LifecycleError,
        match=r"timeout on 'waiting' must be \(trigger, after\), e\.g\. \('expire', "
        r"timedelta\(days=2\)\); got \('expire',\)$",
    ):
        _define(timeouts={"waiting": ("expire",)})


@pytest.mark.parametrize("after", ["2d", None, True])
def test_timeout_that_is_not_a_duration_is_refused(after: Any) -> None:
    with pytest.raises(
        LifecycleError,
        match=rf"timeout on 'waiting': after must be a timedelta or a number of seconds, "
        rf"not {re.escape(repr(after))}",
    ):
        _define(timeouts={"waiting": ("expire", after)})


def test_lifecycles_differing_only_in_a_timeout_are_not_equal() -> None:
    short = _define(timeouts={"waiting": ("expire", 60)})
    long = _define(timeouts={"waiting": ("expire", 120)})
    assert short != long
    assert short.digest != long.digest
    assert short == _define(timeouts={"waiting": ("expire", timedelta(minutes=1))})


def test_a_lifecycle_that_can_never_succeed_says_so() -> None:
    with pytest.raises(
        LifecycleError, match=r"^lifecycle 'base': no path leads to 'succeeded'; declare a trigger"
    ):
        _define(
            transitions=[
                {"trigger": "start", "source": "claimed", "dest": "review"},
                {"trigger": "ask", "source": "review", "dest": "waiting"},
                {"trigger": "answer", "source": "waiting", "dest": "cancelled"},
            ]
        )


# -- the refund example: what a valid definition compiles to ---------------------------------


def test_refund_working_and_parking_states() -> None:
    assert REFUND.custom
    assert REFUND.working == {"claimed", "approved", "charged", "compensating"}
    assert REFUND.step_states == {"approved", "charged", "compensating"}
    assert REFUND.parking == {"awaiting_approval"}
    assert REFUND.states == ("pending", "claimed", *EXTRA, "failed", *FINALS)
    assert REFUND.timeouts == {"awaiting_approval": Timeout(timedelta(days=2), "expire")}


def test_refund_exits_are_the_declared_triggers_without_give_up() -> None:
    assert REFUND.exits("claimed") == {
        "request_approval": "awaiting_approval",
        "charge": "charged",
    }
    assert REFUND.exits("awaiting_approval") == {
        "approve": "approved",
        "deny": "cancelled",
        "expire": "dead",
    }
    assert REFUND.exits("approved") == {"charge": "charged"}
    assert REFUND.exits("charged") == {"send_receipt": "succeeded"}
    assert REFUND.exits_including_give_up("charged") == {
        "send_receipt": "succeeded",
        "give_up": "compensating",
    }
    assert REFUND.exits("compensating") == {"compensated": "cancelled"}
    # Machinery (claim, fail...) is never an exit a step may return.
    for state in ("pending", "failed", *FINALS):
        assert REFUND.exits(state) == {}


def test_give_up_target_is_the_declared_one_or_dead() -> None:
    assert REFUND.give_up_target("charged") == "compensating"
    for state in ("claimed", "approved", "compensating"):
        assert REFUND.give_up_target(state) == "dead"
    # Only the declared give_up is compiled: no second way out of 'charged' by giving up.
    assert REFUND.targets("charged", "give_up") == {"compensating"}
    assert REFUND.targets("approved", "give_up") == {"dead"}


def test_replay_resumes_from_dead_or_cancelled_into_pending_or_any_extra_state() -> None:
    for final in ("dead", "cancelled"):
        assert REFUND.targets(final, "replay") == {"pending", *EXTRA}
    # Out of dead, only the operators' replay and cancel ("not pursued"); out of cancelled,
    # only replay.
    assert REFUND.allowed_triggers("dead") == ["cancel", "replay"]
    assert REFUND.targets("dead", "cancel") == {"cancelled"}
    assert REFUND.allowed_triggers("cancelled") == ["replay"]
    # Nothing leaves succeeded; replay is fired from the two other final states only.
    assert REFUND.allowed_triggers("succeeded") == []
    assert REFUND.sources("replay") == {"dead", "cancelled"}


@pytest.mark.parametrize("state", ["approved", "charged", "compensating"])
def test_later_steps_are_claimed_retried_and_released_in_place(state: str) -> None:
    for trigger in ("claim", "fail", "release", "retry"):
        assert REFUND.targets(state, trigger) == {state}, trigger
    # A lost worker: retried in place, or dead (on_lost="dead").
    assert REFUND.targets(state, "lose") == {state, "dead"}


def test_first_step_keeps_the_default_machinery() -> None:
    assert REFUND.targets("pending", "claim") == {"claimed"}
    assert REFUND.targets("failed", "claim") == {"claimed"}
    assert REFUND.targets("claimed", "fail") == {"failed"}
    assert REFUND.targets("claimed", "lose") == {"failed", "dead"}
    assert REFUND.targets("claimed", "release") == {"pending"}
    assert REFUND.targets("failed", "retry") == {"pending"}
    assert REFUND.targets("pending", "cancel") == {"cancelled"}
    assert REFUND.targets("failed", "cancel") == {"cancelled"}
    assert REFUND.targets("dead", "cancel") == {"cancelled"}
    # The default lifecycle's 'succeed' is not part of a custom one: steps name their exits.
    assert REFUND.sources("succeed") == frozenset()


def test_parking_state_gets_no_machinery_only_its_declared_exits() -> None:
    # Nothing runs there: no claim, fail, lose or give_up.
    assert REFUND.allowed_triggers("awaiting_approval") == ["approve", "deny", "expire"]


def test_refund_rows_are_exactly_declared_plus_machinery() -> None:
    declared = {
        ("claimed", "request_approval", "awaiting_approval"),
        ("claimed", "charge", "charged"),
        ("approved", "charge", "charged"),
        ("awaiting_approval", "approve", "approved"),
        ("awaiting_approval", "deny", "cancelled"),
        ("awaiting_approval", "expire", "dead"),
        ("charged", "send_receipt", "succeeded"),
        ("charged", "give_up", "compensating"),
        ("compensating", "compensated", "cancelled"),
    }
    first_step_and_operators = {
        ("pending", "claim", "claimed"),
        ("failed", "claim", "claimed"),
        ("claimed", "fail", "failed"),
        ("claimed", "lose", "failed"),
        ("claimed", "release", "pending"),
        ("failed", "retry", "pending"),
        ("pending", "cancel", "cancelled"),
        ("failed", "cancel", "cancelled"),
        ("dead", "cancel", "cancelled"),
    }
    give_up_to_dead = {(s, "give_up", "dead") for s in ("claimed", "approved", "compensating")}
    lost_to_dead = {(s, "lose", "dead") for s in ("claimed", "approved", "charged", "compensating")}
    in_place = {
        (s, trigger, s)
        for s in ("approved", "charged", "compensating")
        for trigger in ("claim", "fail", "lose", "release", "retry")
    }
    replay = {(f, "replay", s) for f in ("dead", "cancelled") for s in ("pending", *EXTRA)}
    # 0012: every working step snoozes (the first back to pending, a later one in place) and
    # is aborted to cancelled at an operator's request.
    working = ("claimed", "approved", "charged", "compensating")
    running_controls = {
        ("claimed", "snooze", "pending"),
        *((s, "snooze", s) for s in working[1:]),
        *((s, "abort", "cancelled") for s in working),
    }
    expected = (
        declared
        | first_step_and_operators
        | give_up_to_dead
        | lost_to_dead
        | in_place
        | replay
        | running_controls
    )

    rows = REFUND.rows()

    assert rows == sorted(rows)
    assert {row[0] for row in rows} == {"refund"}
    assert [row[1:] for row in rows] == sorted(expected)
    assert REFUND.declared == {Transition(*t) for t in declared}


# -- digest, definition, diagram ----------------------------------------------------------


def test_digest_is_stable_across_identical_declarations() -> None:
    assert _refund().digest == _refund().digest == REFUND.digest
    assert _refund() == REFUND
    assert len(REFUND.digest) == 64


def test_digest_does_not_depend_on_the_order_transitions_are_listed_in() -> None:
    transitions = _refund().definition()["declared"]
    shuffled = [{"trigger": t, "source": f, "dest": d} for f, t, d in transitions]
    random.Random(4).shuffle(shuffled)
    assert _refund(transitions=shuffled).digest == REFUND.digest


@pytest.mark.parametrize(
    "change",
    [
        {"name": "refund_v2"},
        {"timeouts": {"awaiting_approval": ("expire", timedelta(days=3))}},
        {"timeouts": {"awaiting_approval": ("deny", timedelta(days=2))}},
        {"timeouts": {}},
        {"parking": ["awaiting_approval", "approved"]},
        {"states": [*EXTRA, "audited"]},
    ],
    ids=["name", "timeout-after", "timeout-trigger", "no-timeout", "parking", "state"],
)
def test_digest_changes_when_anything_changes(change: dict[str, Any]) -> None:
    if "states" in change:  # a new state must be entered and left to be valid
        transitions = [
            *REFUND.definition()["declared"],
            ["charged", "audit", "audited"],
            ["audited", "send_receipt", "succeeded"],
        ]
        change["transitions"] = [{"trigger": t, "source": f, "dest": d} for f, t, d in transitions]
    assert _refund(**change).digest != REFUND.digest


def test_digest_changes_when_one_declared_transition_changes() -> None:
    transitions = [
        {"trigger": t, "source": f, "dest": "dead" if t == "deny" else d}
        for f, t, d in REFUND.definition()["declared"]
    ]
    changed = _refund(transitions=transitions)
    assert changed.targets("awaiting_approval", "deny") == {"dead"}
    assert changed.digest != REFUND.digest


def _assert_same(restored: Lifecycle, original: Lifecycle) -> None:
    assert restored.name == original.name
    assert restored.states == original.states
    assert restored.rows() == original.rows()
    assert restored.working == original.working
    assert restored.parking == original.parking
    assert restored.declared == original.declared
    assert dict(restored.timeouts) == dict(original.timeouts)
    assert restored.digest == original.digest
    assert restored == original


def test_from_definition_round_trips() -> None:
    _assert_same(Lifecycle.from_definition(REFUND.definition()), REFUND)


def test_from_definition_round_trips_through_json() -> None:
    # As the registry stores it (jsonb) and reads it back.
    stored = json.loads(json.dumps(REFUND.definition()))
    restored = Lifecycle.from_definition(stored)
    _assert_same(restored, REFUND)
    assert restored.exits("claimed") == REFUND.exits("claimed")
    assert restored.give_up_target("charged") == "compensating"


def test_definition_records_the_timeout_in_seconds() -> None:
    assert REFUND.definition()["timeouts"] == {
        "awaiting_approval": {"trigger": "expire", "after_seconds": 172800.0}
    }


def test_mermaid_draws_the_declared_path() -> None:
    diagram = REFUND.mermaid()
    for edge in [
        "claimed --> charged: charge",
        "approved --> charged: charge",
        "claimed --> awaiting_approval: request_approval",
        "awaiting_approval --> approved: approve",
        "awaiting_approval --> dead: expire",
        "charged --> succeeded: send_receipt",
        "charged --> compensating: give_up",
        "compensating --> cancelled: compensated",
        "pending --> claimed: claim",
    ]:
        assert edge in diagram, edge
    assert "lifecycle refund" in diagram
    # The machinery is left out by default.
    assert "replay" not in diagram
    assert "release" not in diagram


def test_mermaid_with_machinery_adds_replay_rescue_and_in_place_edges() -> None:
    diagram = REFUND.mermaid(machinery=True)
    for edge in [
        "dead --> pending: replay",
        "cancelled --> charged: replay",
        "claimed --> pending: release",
        "failed --> pending: retry",
        "charged --> dead: lose",
    ]:
        assert edge in diagram, edge
    assert "charged --> charged: claim | fail | lose | release | retry" in diagram
    assert "claimed --> charged: charge" in diagram


# -- the default lifecycle is not a custom one --------------------------------------------


def test_default_lifecycle_is_unchanged_by_custom_lifecycles() -> None:
    assert not DEFAULT_LIFECYCLE.custom
    assert DEFAULT_LIFECYCLE.step_states == frozenset()
    assert DEFAULT_LIFECYCLE.working == {"claimed"}
    assert DEFAULT_LIFECYCLE.parking == frozenset()
    assert dict(DEFAULT_LIFECYCLE.timeouts) == {}
    assert DEFAULT_LIFECYCLE.targets("claimed", "succeed") == {"succeeded"}
    assert DEFAULT_LIFECYCLE.targets("dead", "replay") == {"pending"}
    assert DEFAULT_LIFECYCLE.give_up_target("claimed") == "dead"
    # Defining a custom lifecycle leaves the default's rows as they were.
    before = DEFAULT_LIFECYCLE.rows()
    _refund()
    assert DEFAULT_LIFECYCLE.rows() == before
