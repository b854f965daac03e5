"""What the command line says when the database refuses a real role, or refuses the input.

Each role is a real LOGIN role granted with ``pgoutbox db grant`` (the ``roles`` fixture). A
permission the database denies -- a missing GRANT, or pgoutbox's trigger refusing a transition
to a role not granted its kind -- is one line naming the command, the schema, the role, the
server's message and a hint, exit 1: the database works, this role may not do this. Input the
database refuses as invalid (SQLSTATE class 22, check violations) is one line, exit 2. Neither
is "database unavailable", and neither writes anything.
"""

from __future__ import annotations

import asyncpg
import click
import pytest
from faultkit import Roles, dsn_of, run_cli

from pgoutbox import DatabaseSessionManager, publish_operation
from pgoutbox.cli import cli
from pgoutbox.cli_errors import CliError, Refused, database_error
from pgoutbox.settings import DatabaseSettings


async def _publish(roles: Roles) -> int:
    sm = DatabaseSessionManager(roles.settings(roles.publisher))
    try:
        async with sm.session() as session:
            op_id = int(await publish_operation(session, "fault.op", {"i": 1}, "c_refusals"))
            await session.commit()
        return op_id
    finally:
        await sm.close()


async def _written(conn: asyncpg.Connection, s: str, op_id: int) -> tuple[object, ...]:
    """What an action on ``op_id`` would change: its state and version, its audit rows."""
    row = await conn.fetchrow(f"SELECT state, version FROM {s}.operations WHERE id = $1", op_id)
    audit = await conn.fetchval(
        f"SELECT count(*) FROM {s}.audit_log WHERE operation_id = $1", op_id
    )
    return (tuple(row.values()), audit)


async def _as(roles: Roles, role: str, *args: str) -> tuple[int, str, str]:
    settings = roles.settings(role)
    proc = await run_cli("--dsn", dsn_of(settings), "--schema", settings.schema_name, *args)
    return proc.returncode, proc.stdout, proc.stderr


def _on(settings: DatabaseSettings, role: str) -> str:
    """Where and as whom, as the error line says it."""
    server = (
        f"the Unix socket in {settings.host} (port {settings.port})"
        if settings.host.startswith("/")
        else f"{settings.host}:{settings.port}"
    )
    database = settings.database
    return f"in schema {settings.schema_name} at {server} (database {database}) as role {role}"


# -- permission denied: exit 1 ---------------------------------------------------------------


async def test_an_auditor_running_ops_cancel_is_denied_naming_the_role_and_the_grant(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    op_id = await _publish(roles)
    before = await _written(conn, s, op_id)

    code, out, err = await _as(roles, roles.auditor, "ops", "cancel", str(op_id), "--actor", "x")

    assert (code, out) == (1, "")
    assert err == (
        f"Error: permission denied for pgoutbox ops cancel {_on(roles.base, roles.auditor)}: "
        "permission denied for table operations; hint: the schema's owner grants it: "
        f"pgoutbox db grant --operator {roles.auditor} (docs/security.md)\n"
    )
    assert await _written(conn, s, op_id) == before


async def test_a_worker_running_ops_retry_is_denied(roles: Roles, conn: asyncpg.Connection) -> None:
    s = f'"{roles.base.schema_name}"'
    op_id = await _publish(roles)
    before = await _written(conn, s, op_id)

    code, out, err = await _as(roles, roles.worker, "ops", "retry", str(op_id), "--actor", "x")

    # A worker may not read the audit log, which an action reads first.
    assert (code, out) == (1, "")
    assert err == (
        f"Error: permission denied for pgoutbox ops retry {_on(roles.base, roles.worker)}: "
        "permission denied for table audit_log; hint: the schema's owner grants it: "
        f"pgoutbox db grant --operator {roles.worker} (docs/security.md)\n"
    )
    assert await _written(conn, s, op_id) == before


async def test_the_triggers_refusal_of_an_operator_transition_is_shown_with_its_hint(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    """A role that may read everything and update operations (a worker also granted as an
    auditor) gets past the GRANTs: the audit trigger refuses the cancel, and its message and
    hint are what the operator reads."""
    s = f'"{roles.base.schema_name}"'
    base = roles.base
    granted = await run_cli(
        "--dsn", base.dsn or "", "--schema", base.schema_name, "db", "grant",
        "--auditor", roles.worker,
    )  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    op_id = await _publish(roles)
    before = await _written(conn, s, op_id)

    code, out, err = await _as(roles, roles.worker, "ops", "cancel", str(op_id), "--actor", "x")

    assert (code, out) == (1, "")
    assert err == (
        f"Error: permission denied for pgoutbox ops cancel {_on(roles.base, roles.worker)}: "
        f'pgoutbox: role {roles.worker} may not make operator transitions ("cancel") in schema '
        f"{base.schema_name}; hint: The owner grants it: pgoutbox db grant --operator "
        f"{roles.worker}\n"
    )
    assert await _written(conn, s, op_id) == before


async def test_a_role_granted_nothing_listing_operations_is_denied(roles: Roles) -> None:
    code, out, err = await _as(roles, roles.outsider, "ops", "list")

    assert (code, out) == (1, "")
    assert err == (
        f"Error: permission denied for pgoutbox ops list {_on(roles.base, roles.outsider)}: "
        f"permission denied for schema {roles.base.schema_name}; hint: the schema's owner "
        f"grants it: pgoutbox db grant --auditor {roles.outsider} (docs/security.md)\n"
    )


# -- invalid input: exit 2 -------------------------------------------------------------------


async def test_an_actor_that_is_not_valid_utf8_is_invalid_input(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    op_id = await _publish(roles)
    before = await _written(conn, s, op_id)

    # The byte 0xff on the command line: Python reads it as the lone surrogate U+DCFF, which
    # the driver cannot send as text (SQLSTATE class 22, raised by asyncpg).
    args = ("ops", "cancel", str(op_id), "--actor", "\udcff")
    code, out, err = await _as(roles, roles.operator, *args)

    assert (code, out) == (2, "")
    assert err == (
        "Error: invalid input for pgoutbox ops cancel: invalid input for query argument $1: "
        "'\\udcff' ('utf-8' codec can't encode character '\\udcff' in position 0: surrogates "
        "not allowed)\n"
    )
    assert await _written(conn, s, op_id) == before


async def test_a_value_out_of_the_columns_range_is_invalid_input(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    op_id = await _publish(roles)
    # Dead after one attempt, moved by the owner as a worker would move it.
    for state, trigger in (("claimed", "claim"), ("dead", "give_up")):
        await conn.execute(
            f"UPDATE {s}.operations SET state = $2, transition = $3, transition_actor = 'w', "
            "attempts = attempts + (CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END), "
            "step_attempts = step_attempts + (CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END), "
            "lease_owner = CASE WHEN $3 = 'claim' THEN 'w' END, "
            "lease_expires_at = CASE WHEN $3 = 'claim' THEN now() + interval '1 hour' END, "
            "version = version + 1 WHERE id = $1",
            op_id,
            state,
            trigger,
        )
    before = await _written(conn, s, op_id)

    # max_attempts = step_attempts (1) + 2147483647: past integer, refused by the server.
    args = ("ops", "replay", str(op_id), "--attempts", str(2**31 - 1), "--actor", "x")
    code, out, err = await _as(roles, roles.operator, *args)

    assert (code, out) == (2, "")
    assert err == "Error: invalid input for pgoutbox ops replay: integer out of range\n"
    assert await _written(conn, s, op_id) == before


def test_a_check_violation_is_invalid_input_with_the_servers_hint() -> None:
    """pgoutbox's triggers raise check_violation (23514) for a row they refuse; the admin API
    turns the ones it expects into refusals, any other reaching the command line is bad
    input. (Built here: no command reaches one deterministically.)"""
    refused = asyncpg.PostgresError.new(
        {"S": "ERROR", "C": "23514", "M": "pgoutbox: no", "H": "Do this."}
    )
    denied = asyncpg.PostgresError.new({"S": "ERROR", "C": "42501", "M": "nope"})
    command = cli.commands["ops"]
    assert isinstance(command, click.Group)
    parent = click.Context(cli, info_name="pgoutbox")
    with click.Context(command.commands["fire"], parent=parent, info_name="ops fire"):
        error = database_error(refused, None)
        permission = database_error(denied, None)
    assert type(error) is CliError
    assert (error.exit_code, error.message) == (
        2,
        "invalid input for pgoutbox ops fire: pgoutbox: no; hint: Do this.",
    )
    assert type(permission) is Refused
    assert (permission.exit_code, permission.message) == (
        1,
        "permission denied for pgoutbox ops fire: nope; hint: the schema's owner grants it: "
        "pgoutbox db grant --operator ROLE (docs/security.md)",
    )


@pytest.mark.parametrize("sqlstate", ["22P02", "22003", "22021"])
def test_every_data_exception_is_invalid_input(sqlstate: str) -> None:
    error = database_error(asyncpg.PostgresError.new({"S": "ERROR", "C": sqlstate, "M": "x"}), None)
    assert (type(error), error.exit_code, error.message) == (
        CliError,
        2,
        "invalid input for pgoutbox: x",
    )
