# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""Running controls: snoozes, and cancelling an operation while its handler runs.

Revision ID: 0012_running_controls
Revises: 0011_flow_control
Create Date: 2026-12-03

- **Snooze** (a handler's ``Snooze(seconds)``: "429, retry after 30 s"): a running step goes
  back to waiting until ``run_at`` without spending one of its attempts. The transition
  ``snooze`` leads ``claimed`` to ``pending`` and a later step to itself. The database checks
  its arithmetic: the lease holder ends its unexpired lease, ``version`` and the new column
  ``snoozes`` go up by one, ``step_attempts`` (which ``max_attempts`` applies to) goes down by
  the one its claim added, ``attempts`` (every run of a handler, the audit trail's attempt
  number) stays, ``max_attempts``, ``last_error`` and ``priority`` stay, and ``run_at`` is not
  before ``now()``. No other transition changes ``snoozes``.
- **Cancelling a running operation** is a request and an answer. An operator sets
  ``cancel_requested_by`` and ``cancel_request_reason`` (no transition; a trigger stamps the
  time, the database role and the version, i.e. the attempt, it is for, and refuses it unless
  the operation is leased, the role acts as operator and no request for this attempt stands).
  The worker holding the lease answers by stopping the handler and recording ``abort`` (to
  ``cancelled``), audited with the requesting operator as actor and the worker's role as
  ``db_role``; once the lease has expired any worker's rescuer may. The database refuses an
  ``abort`` without a request for that very attempt, by a session without the lease's key
  (before expiry), or with another actor: a worker role cannot claim that an operator
  cancelled something.
- A step's result keeps ``step_attempts`` unless it enters another step (an extra state of a
  custom lifecycle), where it starts at 0 (before, only ``attempts`` was held still by a
  result: a failure could reset its step's count and escape ``max_attempts``).

The row trigger keeps 0009's rule: every function, operator and type in it is written with its
schema, and no construct that looks up ``=`` by search_path is used in it.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration, split_statements

revision = "0012_running_controls"
down_revision = "0011_flow_control"
branch_labels = None
depends_on = None

_0010 = runpy.run_path(str(Path(__file__).with_name("0010_roles_enforced.py")))
_eq, _same, _plus_one, _unchanged = (
    _0010["_eq"],
    _0010["_same"],
    _0010["_plus_one"],
    _0010["_unchanged"],
)
_NOW = _0010["_NOW"]

ADDED_DEFAULT_TRANSITIONS = [
    ("claimed", "snooze", "pending"),
    ("claimed", "abort", "cancelled"),
]

_CONDITIONS = {
    **_0010["_CONDITIONS"],
    "is_snooze": _eq("NEW.transition", "'snooze'"),
    "is_abort": _eq("NEW.transition", "'abort'"),
    "snoozes_kept": _unchanged("snoozes"),
    "snooze_counts": " AND ".join(
        [
            _unchanged("attempts", "max_attempts", "last_error", "priority"),
            _eq("NEW.step_attempts", "OLD.step_attempts OPERATOR(pg_catalog.-) 1"),
            _plus_one("snoozes"),
            f"coalesce(NEW.run_at OPERATOR(pg_catalog.>=) {_NOW}, false)",
        ]
    ),
    "requested": ("coalesce(" + _eq("OLD.cancel_request_version", "OLD.version") + ", false)"),
    "abort_by": (
        f"(key_hash IS NOT NULL AND ({_same('OLD.lease_key_hash', 'key_hash')} "
        f"OR OLD.lease_expires_at OPERATOR(pg_catalog.<) {_NOW}))"
    ),
    # A result keeps the step's attempt count, or starts it afresh entering another step (an
    # extra state of a custom lifecycle: not one of the six built-in states).
    "step_attempts_kept": (
        f"({_unchanged('step_attempts')} OR ({_eq('NEW.step_attempts', '0')} "
        f"AND NOT {_eq('NEW.state', 'OLD.state')} AND "
        + " AND ".join(
            f"NEW.state OPERATOR(pg_catalog.<>) '{state}'"
            for state in ("pending", "claimed", "failed", "succeeded", "dead", "cancelled")
        )
        + "))"
    ),
}

# 0010's row trigger, with the branches of this revision inserted (each replacement asserted).
_EDITS = [
    # An abort is a worker's transition, whatever the actor it names.
    (
        "    kind := CASE\n",
        "    kind := CASE\n        WHEN <is_abort> THEN 'worker'\n",
    ),
    (
        "    bad := CASE\n        WHEN <is_claim> THEN CASE\n",
        """    bad := CASE
        WHEN NOT <is_snooze> AND NOT (<snoozes_kept>) THEN 'only a snooze changes snoozes'
        WHEN <is_abort> THEN CASE
            WHEN OLD.lease_owner IS NULL THEN 'it is not running (not leased): an operator cancels it directly'
            WHEN NOT <requested> THEN 'no operator requested that this attempt be cancelled (pgoutbox ops cancel); a worker aborts a running operation only on request'
            WHEN NOT <abort_by> THEN 'only the lease holder (' OPERATOR(pg_catalog.||) OLD.lease_owner OPERATOR(pg_catalog.||) ', with its key) aborts its handler on request; another worker only once the lease has expired'
            WHEN NOT <same_requester> THEN 'an abort is audited with the operator who requested it (' OPERATOR(pg_catalog.||) coalesce(OLD.cancel_requested_by, '?') OPERATOR(pg_catalog.||) ') as its actor'
            WHEN NOT (<ends_lease> AND <keeps_attempts>) THEN 'an abort ends the lease, adds one to version and leaves attempts alone'
            END
        WHEN <is_snooze> THEN CASE
            WHEN OLD.lease_owner IS NULL THEN 'it is not leased: only a running step snoozes'
            WHEN NOT <holder> THEN 'only the worker holding its lease (' OPERATOR(pg_catalog.||)
                OLD.lease_owner OPERATOR(pg_catalog.||) ', with its key) snoozes it'
            WHEN <expired> THEN
                'its lease expired at ' OPERATOR(pg_catalog.||) OLD.lease_expires_at::pg_catalog.text
            WHEN NOT (<ends_lease> AND <snooze_counts>) THEN
                'a snooze ends the lease, adds one to version and snoozes, gives the step its attempt back (step_attempts one less), leaves attempts, max_attempts, last_error and priority alone, and sets run_at no earlier than now()'
            END
        WHEN <is_claim> THEN CASE
""",
    ),
    (
        "            WHEN NOT (<ends_lease> AND <keeps_attempts_only>) THEN\n"
        "                'a result ends the lease, adds one to version and leaves attempts alone'\n",
        "            WHEN NOT (<ends_lease> AND <keeps_attempts_only>) THEN\n"
        "                'a result ends the lease, adds one to version and leaves attempts alone'\n"
        "            WHEN NOT <step_attempts_kept> THEN\n"
        "                'a result keeps step_attempts, or starts it at 0 entering another step'\n",
    ),
    # The abort's actor is the requesting operator, checked above instead of the worker's key.
    (
        "    IF bad IS NULL AND kind OPERATOR(pg_catalog.=) 'worker' THEN\n",
        "    IF bad IS NULL AND kind OPERATOR(pg_catalog.=) 'worker' AND NOT <is_abort> THEN\n",
    ),
]
_CONDITIONS["same_requester"] = _same("actor", "OLD.cancel_requested_by")


def _row_trigger() -> str:
    body: str = _0010["ROW_TRIGGER"]
    for old, new in _EDITS:
        assert body.count(old) == 1, old
        body = body.replace(old, new)
    for name, condition in _CONDITIONS.items():
        body = body.replace(f"<{name}>", condition)
    assert not re.search(r"<[a-z_]+>", body), body
    return body.replace("{hash_of_change}", _0010["_HASH_OF_CHANGE"]).strip().rstrip(";")


def _insert_trigger_of_0010() -> str:
    statement = next(
        s
        for s in split_statements(_0010["UPGRADE"])
        if "FUNCTION {s}.operations_before_insert()" in s
    )
    return statement.replace("{hash_of_new_row}", _0010["_hash_of_new_row"]()).strip().rstrip(";")


def _insert_trigger() -> str:
    """0010's insert check, with this revision's columns starting at their defaults."""
    old = "        WHEN NEW.transition IS NOT NULL THEN 'transition'\n"
    new = (
        "        WHEN NEW.snoozes <> 0 THEN 'snoozes'\n"
        "        WHEN num_nonnulls(NEW.cancel_requested_at, NEW.cancel_requested_by,\n"
        "                          NEW.cancel_request_reason, NEW.cancel_requested_role,\n"
        "                          NEW.cancel_request_version) > 0\n"
        "            THEN 'cancel_request_* (a cancel request)'\n" + old
    )
    statement = _insert_trigger_of_0010()
    assert statement.count(old) == 1
    return statement.replace(old, new)


_UNAUDITED = """
CREATE TRIGGER a_operations_unaudited
    BEFORE UPDATE OF attempts, step_attempts, max_attempts, run_at, priority, version, last_error{snoozes}
    ON {s}.operations FOR EACH ROW
    WHEN (NEW.transition IS NULL
          AND (OLD.attempts, OLD.step_attempts, OLD.max_attempts, OLD.run_at, OLD.priority,
               OLD.version, OLD.last_error{old_snoozes})
              IS DISTINCT FROM (NEW.attempts, NEW.step_attempts, NEW.max_attempts, NEW.run_at,
                                NEW.priority, NEW.version, NEW.last_error{new_snoozes}))
    EXECUTE FUNCTION {s}.operations_refuse_unaudited();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_unaudited;
"""


def _unaudited(with_snoozes: bool) -> str:
    extra = {
        "{snoozes}": ", snoozes",
        "{old_snoozes}": ", OLD.snoozes",
        "{new_snoozes}": ", NEW.snoozes",
    }
    text = _UNAUDITED
    for key, value in extra.items():
        text = text.replace(key, value if with_snoozes else "")
    return "DROP TRIGGER a_operations_unaudited ON {s}.operations;\n" + text


_CANCEL_COLUMNS = (
    "cancel_requested_at, cancel_requested_by, cancel_request_reason, "
    "cancel_requested_role, cancel_request_version"
)

UPGRADE = """
ALTER TABLE {s}.operations
    ADD COLUMN snoozes integer NOT NULL DEFAULT 0,
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN cancel_requested_by text,
    ADD COLUMN cancel_request_reason text,
    ADD COLUMN cancel_requested_role text,
    ADD COLUMN cancel_request_version bigint;
COMMENT ON COLUMN {s}.operations.snoozes IS
    'Times a handler snoozed the operation (Snooze / Retry-After): each gave its step the attempt back.';
COMMENT ON COLUMN {s}.operations.cancel_requested_by IS
    'The operator who asked that the running attempt be cancelled (with cancel_requested_at, cancel_request_reason, cancel_requested_role and cancel_request_version, the version of the attempt it is for).';

INSERT INTO {s}.lifecycle_transitions VALUES {default_rows};

{insert_trigger};

{row_trigger};

{unaudited}

-- A cancel request: made by an operator (or the owner) on a running attempt, once; stamped
-- with the database's time, the role and the attempt's version.
CREATE FUNCTION {s}.operations_cancel_request() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad text;
BEGIN
    IF NEW.transition IS NOT NULL THEN
        bad := 'a cancel request is made on its own, not in the UPDATE of a transition';
    ELSIF OLD.lease_owner IS NULL THEN
        bad := format('it is %s and not running: an operator cancels it directly (transition cancel)', OLD.state);
    ELSIF OLD.cancel_request_version = OLD.version THEN
        bad := format('a cancel of this attempt was requested already, by %s at %s', OLD.cancel_requested_by, OLD.cancel_requested_at);
    ELSIF NEW.cancel_requested_by IS NULL OR btrim(NEW.cancel_requested_by) = '' THEN
        bad := 'a cancel request names who asks (cancel_requested_by)';
    ELSIF NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'USAGE')
          AND NOT EXISTS (
              SELECT 1 FROM {s}.role_grants g JOIN pg_roles r ON r.rolname = g.role
              WHERE g.kind = 'operator' AND pg_has_role(r.oid, 'USAGE')) THEN
        bad := format('role %s does not act as operator (pgoutbox db grant --operator)', current_user);
    END IF;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgoutbox: operation %: cancel request refused: %', OLD.id, bad
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.cancel_requested_at := clock_timestamp();
    NEW.cancel_requested_role := current_user;
    NEW.cancel_request_version := OLD.version;
    RETURN NEW;
END $$;
CREATE TRIGGER a_operations_cancel_request BEFORE UPDATE OF {cancel_columns}
    ON {s}.operations FOR EACH ROW
    WHEN ((OLD.cancel_requested_at, OLD.cancel_requested_by, OLD.cancel_request_reason,
           OLD.cancel_requested_role, OLD.cancel_request_version)
          IS DISTINCT FROM (NEW.cancel_requested_at, NEW.cancel_requested_by,
                            NEW.cancel_request_reason, NEW.cancel_requested_role,
                            NEW.cancel_request_version))
    EXECUTE FUNCTION {s}.operations_cancel_request();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_cancel_request;
"""

DOWNGRADE = """
DROP TRIGGER a_operations_cancel_request ON {s}.operations;
DROP FUNCTION {s}.operations_cancel_request();
{unaudited}
{insert_trigger};
{row_trigger};
DELETE FROM {s}.lifecycle_transitions
WHERE lifecycle = 'default' AND (from_state, trigger, to_state) IN ({default_rows});
ALTER TABLE {s}.operations
    DROP COLUMN snoozes,
    DROP COLUMN cancel_requested_at,
    DROP COLUMN cancel_requested_by,
    DROP COLUMN cancel_request_reason,
    DROP COLUMN cancel_requested_role,
    DROP COLUMN cancel_request_version;
"""


def upgrade() -> None:
    s = schema_for_migration()
    rows = ", ".join(f"('default', '{f}', '{t}', '{to}')" for f, t, to in ADDED_DEFAULT_TRANSITIONS)
    script = (
        UPGRADE.replace("{default_rows}", rows)
        .replace("{insert_trigger}", _insert_trigger())
        .replace("{row_trigger}", _row_trigger())
        .replace("{unaudited}", _unaudited(True))
        .replace("{cancel_columns}", _CANCEL_COLUMNS)
        .replace("{s}", s)
    )
    execute_script(script)
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    rows = ", ".join(f"('{f}', '{t}', '{to}')" for f, t, to in ADDED_DEFAULT_TRANSITIONS)
    script = (
        DOWNGRADE.replace("{default_rows}", rows)
        .replace("{insert_trigger}", _insert_trigger_of_0010())
        .replace("{row_trigger}", _0010["_row_trigger"]().strip().rstrip(";"))
        .replace("{unaudited}", _unaudited(False))
        .replace("{s}", s)
    )
    execute_script(script)
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
