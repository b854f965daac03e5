"""The default lifecycle: what DESIGN §3 allows, and the same table the migration installs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from pgoutbox import DEFAULT_LIFECYCLE, Lifecycle, TransitionNotAllowed, migrations

# DESIGN §3, one (from_state, trigger, to_state) per arrow, plus the graceful-stop hand-back
# and the operators' retry.
DESIGN_TRANSITIONS = {
    ("pending", "claim", "claimed"),
    ("claimed", "succeed", "succeeded"),
    ("claimed", "fail", "failed"),
    ("claimed", "give_up", "dead"),
    ("claimed", "lose", "failed"),
    ("claimed", "lose", "dead"),
    ("failed", "claim", "claimed"),
    ("pending", "cancel", "cancelled"),
    ("failed", "cancel", "cancelled"),
    ("dead", "replay", "pending"),
    ("cancelled", "replay", "pending"),
    ("claimed", "release", "pending"),
    # 0002: an operator runs a failed operation now (`pgoutbox ops retry`).
    ("failed", "retry", "pending"),
    # 0006: an operator acknowledges a dead operation will not be pursued (and releases the
    # operations ordered after it by an ordering key).
    ("dead", "cancel", "cancelled"),
    # 0012: a handler snoozes (Retry-After) without spending an attempt; a running handler is
    # stopped at an operator's request.
    ("claimed", "snooze", "pending"),
    ("claimed", "abort", "cancelled"),
}


def _migration(filename: str) -> ModuleType:
    """A revision file, loaded by path: ``versions`` is a directory, not a package."""
    path = Path(migrations.versions_path()) / filename
    spec = importlib.util.spec_from_file_location(f"pgoutbox_migration_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_lifecycle_rows_are_exactly_the_designed_transitions() -> None:
    rows = DEFAULT_LIFECYCLE.rows()

    assert {row[0] for row in rows} == {"default"}
    assert {row[1:] for row in rows} == DESIGN_TRANSITIONS
    assert len(rows) == len(DESIGN_TRANSITIONS)


def test_default_lifecycle_rows_are_sorted_and_stable() -> None:
    assert DEFAULT_LIFECYCLE.rows() == sorted(DEFAULT_LIFECYCLE.rows())
    assert DEFAULT_LIFECYCLE.rows() == DEFAULT_LIFECYCLE.rows()


def test_default_lifecycle_starts_pending_with_the_six_states() -> None:
    assert DEFAULT_LIFECYCLE.initial == "pending"
    assert set(DEFAULT_LIFECYCLE.states) == {
        "pending",
        "claimed",
        "succeeded",
        "failed",
        "dead",
        "cancelled",
    }


def test_finished_states_allow_only_replay_and_cancelling_dead() -> None:
    def exits(state: str) -> set[str]:
        return {t.trigger for t in DEFAULT_LIFECYCLE.transitions if t.from_state == state}

    assert exits("succeeded") == set()
    assert exits("dead") == {"replay", "cancel"}
    assert exits("cancelled") == {"replay"}


def test_lose_may_lead_to_failed_or_dead() -> None:
    assert DEFAULT_LIFECYCLE.targets("claimed", "lose") == {"failed", "dead"}


def test_retry_brings_a_failed_operation_back_to_pending_only() -> None:
    assert DEFAULT_LIFECYCLE.targets("failed", "retry") == {"pending"}
    assert DEFAULT_LIFECYCLE.sources("retry") == {"failed"}


def test_sources_and_allowed_triggers_explain_a_refusal() -> None:
    assert DEFAULT_LIFECYCLE.sources("cancel") == {"pending", "failed", "dead"}
    assert DEFAULT_LIFECYCLE.sources("approve") == frozenset()
    assert DEFAULT_LIFECYCLE.allowed_triggers("failed") == ["cancel", "claim", "retry"]
    assert DEFAULT_LIFECYCLE.allowed_triggers("succeeded") == []


def test_targets_of_a_disallowed_trigger_are_empty() -> None:
    assert DEFAULT_LIFECYCLE.targets("pending", "succeed") == frozenset()
    assert DEFAULT_LIFECYCLE.targets("claimed", "approve") == frozenset()


@pytest.mark.parametrize(("from_state", "trigger", "to_state"), sorted(DESIGN_TRANSITIONS))
def test_check_accepts_every_designed_transition(
    from_state: str, trigger: str, to_state: str
) -> None:
    DEFAULT_LIFECYCLE.check(from_state, trigger, to_state)


def test_check_refuses_a_trigger_naming_trigger_states_and_alternatives() -> None:
    with pytest.raises(TransitionNotAllowed) as excinfo:
        DEFAULT_LIFECYCLE.check("pending", "succeed", "succeeded")

    assert str(excinfo.value) == (
        "lifecycle 'default' does not allow 'succeed' from 'pending' to 'succeeded'; "
        "from 'pending' it allows: cancel, claim"
    )


def test_check_refuses_an_allowed_trigger_to_the_wrong_state() -> None:
    with pytest.raises(TransitionNotAllowed, match=r"'lose' from 'claimed' to 'pending'"):
        DEFAULT_LIFECYCLE.check("claimed", "lose", "pending")


def test_check_from_a_terminal_state_says_nothing_is_allowed() -> None:
    with pytest.raises(TransitionNotAllowed, match=r"from 'succeeded' it allows: nothing$"):
        DEFAULT_LIFECYCLE.check("succeeded", "replay", "pending")


def test_transition_not_allowed_is_a_value_error() -> None:
    assert issubclass(TransitionNotAllowed, ValueError)


def test_declared_lifecycle_compiles_its_own_states_and_triggers() -> None:
    approval = Lifecycle.declare(
        "approval",
        states=["pending", "awaiting_approval", "claimed", "succeeded"],
        transitions=[
            {"trigger": "submit", "source": "pending", "dest": "awaiting_approval"},
            {"trigger": "approve", "source": "awaiting_approval", "dest": "claimed"},
            {"trigger": "succeed", "source": "claimed", "dest": "succeeded"},
        ],
    )

    assert approval.rows() == [
        ("approval", "awaiting_approval", "approve", "claimed"),
        ("approval", "claimed", "succeed", "succeeded"),
        ("approval", "pending", "submit", "awaiting_approval"),
    ]
    with pytest.raises(TransitionNotAllowed, match="'approve' from 'pending'"):
        approval.check("pending", "approve", "claimed")


def test_declaring_a_transition_to_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown state 'nowhere'"):
        Lifecycle.declare(
            "broken",
            states=["pending", "claimed"],
            transitions=[{"trigger": "go", "source": "pending", "dest": "nowhere"}],
        )


def test_migrations_install_the_default_lifecycle_rows() -> None:
    installed = [
        *_migration("0001_initial.py").DEFAULT_TRANSITIONS,
        *_migration("0002_operator_tools.py").ADDED_DEFAULT_TRANSITIONS,
        *_migration("0006_custom_lifecycles.py").ADDED_DEFAULT_TRANSITIONS,
        *_migration("0012_running_controls.py").ADDED_DEFAULT_TRANSITIONS,
    ]

    assert len(installed) == len(set(installed))
    assert sorted(installed) == [row[1:] for row in DEFAULT_LIFECYCLE.rows()]


def test_declaring_a_transition_from_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown state 'elsewhere'"):
        Lifecycle.declare(
            "broken",
            states=["pending", "claimed"],
            transitions=[{"trigger": "go", "source": "elsewhere", "dest": "claimed"}],
        )


def test_declaring_an_unknown_initial_state_is_refused() -> None:
    with pytest.raises(ValueError, match="initial state 'created'"):
        Lifecycle.declare(
            "broken",
            states=["pending", "claimed"],
            transitions=[{"trigger": "go", "source": "pending", "dest": "claimed"}],
            initial="created",
        )
