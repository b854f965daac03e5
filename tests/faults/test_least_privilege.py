"""Least-privilege roles and tampering as an unprivileged role.

Each role is a real LOGIN role granted with ``pgoutbox db grant``; each test connects as it and
checks what it can do (publish / run a worker / audit) and what it cannot (everything else,
above all: forge, edit, delete or silence the audit log).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
from faultkit import Roles, dsn_of, run_cli

from pgoutbox import (
    DatabaseSessionManager,
    HandlerContext,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    publish_many,
    publish_operation,
)
from pgoutbox.audit import verify_chains
from pgoutbox.roles import RoleError, grant_roles, quote_role
from pgoutbox.settings import DatabaseSettings

DENIED = (asyncpg.InsufficientPrivilegeError,)


async def _publish(settings: DatabaseSettings, n: int, channel: str, **kw: Any) -> list[int]:
    sm = DatabaseSessionManager(settings)
    try:
        ids = []
        async with sm.session() as session:
            for i in range(n):
                ids.append(await publish_operation(session, "fault.op", {"i": i}, channel, **kw))
            await session.commit()
        return ids
    finally:
        await sm.close()


async def _denied(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    """Run ``sql`` expecting a refusal; return the error message."""
    with pytest.raises(DENIED) as excinfo:
        async with conn.transaction():
            await conn.execute(sql, *args)
    return str(excinfo.value)


def _tampering(s: str, op_id: int) -> list[str]:
    return [
        f"INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, "
        f"trigger, attempt, actor, recorded_at, hash) VALUES ({op_id}, 99, 'fault.op', "
        "'claimed', 'succeeded', 'succeed', 1, 'forger', now(), '\\x00')",
        f"UPDATE {s}.audit_log SET actor = 'someone else' WHERE operation_id = {op_id}",
        f"DELETE FROM {s}.audit_log WHERE operation_id = {op_id}",
        f"TRUNCATE {s}.audit_log",
        f"ALTER TABLE {s}.audit_log DISABLE TRIGGER audit_log_append_only",
        f"ALTER TABLE {s}.audit_log DISABLE TRIGGER ALL",
        f"ALTER TABLE {s}.operations DISABLE TRIGGER b_operations_before_update",
        f"DROP TRIGGER audit_log_append_only ON {s}.audit_log",
        f"INSERT INTO {s}.lifecycle_transitions VALUES ('default', 'pending', 'x', 'succeeded')",
        f"INSERT INTO {s}.lifecycle_types VALUES ('fault.op', 'anything')",
        f"DELETE FROM {s}.lifecycles",
        "SET session_replication_role = replica",
    ]


# -- granting ----------------------------------------------------------------------------------


def test_role_names_are_quoted_not_interpolated() -> None:
    assert quote_role('we"ird; DROP ROLE x') == '"we""ird; DROP ROLE x"'
    for bad in ("", "nul\x00", "r" * 64):
        with pytest.raises(RoleError):
            quote_role(bad)


async def test_grant_to_a_missing_role_is_refused_and_grants_nothing(
    db_settings: DatabaseSettings,
) -> None:
    with pytest.raises(RoleError, match="no such role"):
        await grant_roles(db_settings, publisher='nobody"; DROP SCHEMA public; --')
    proc = await run_cli("--dsn", dsn_of(db_settings), "db", "grant")
    assert proc.returncode == 2
    assert "name at least one of" in proc.stderr


# -- what each role can do ---------------------------------------------------------------------


async def test_publisher_can_publish_idempotently_and_nothing_else(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    publisher = roles.settings(roles.publisher)
    [first] = await _publish(publisher, 1, "c_pub", idempotency_key="k1")
    assert await _publish(publisher, 1, "c_pub", idempotency_key="k1") == [first]
    sm = DatabaseSessionManager(publisher)
    try:
        async with sm.session() as session:
            ids = await publish_many(
                session, [{"operation_type": "fault.op", "payload": {}, "channel": "c_pub"}] * 3
            )
            await session.commit()
    finally:
        await sm.close()
    assert len(ids) == 3
    assert await conn.fetchval(f"SELECT created_by FROM {s}.operations WHERE id = $1", first) == (
        roles.publisher
    )

    pub = await roles.connect(roles.publisher)
    try:
        await _denied(pub, f"UPDATE {s}.operations SET state = 'cancelled', transition = 'cancel'")
        await _denied(pub, f"DELETE FROM {s}.operations")
        await _denied(pub, f"SELECT * FROM {s}.audit_log")
        await _denied(pub, f"SELECT * FROM {s}.workers")
        for sql in _tampering(s, first):
            await _denied(pub, sql)
    finally:
        await pub.close()


async def test_worker_role_runs_operations_and_the_audit_names_it(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    ids = await _publish(roles.settings(roles.publisher), 20, "c_work")
    done: set[int] = set()
    router = WorkflowRouter()

    @router.on("fault.op")
    async def handle(ctx: HandlerContext, payload: Any) -> None:
        if payload["i"] % 5 == 4:
            raise RuntimeError("fails once")  # exercises record_failure too
        done.add(ctx.operation_id)

    settings = Settings(
        database=roles.settings(roles.worker),
        # auto_migrate stays on: at head it only reads schema_revision, which a worker role
        # may (it could not CREATE SCHEMA; `pgoutbox db upgrade` runs as the owner).
        workflow_system={"channel": "c_work", "lease_seconds": 5,
                         "poll_interval_seconds": 0.2},
    )  # fmt: skip
    async with WorkflowSystem(router=router, settings=settings) as system:
        for _ in range(200):
            states = await conn.fetch(f"SELECT state, count(*) FROM {s}.operations GROUP BY 1")
            counts = {r["state"]: r["count"] for r in states}
            if counts.get("succeeded") == 16 and counts.get("failed") == 4:
                break
            await asyncio.sleep(0.05)
        assert counts == {"succeeded": 16, "failed": 4}
        actors = await conn.fetch(
            f"SELECT DISTINCT actor FROM {s}.audit_log WHERE trigger <> 'publish'"
        )
        assert [r["actor"] for r in actors] == [system.worker_id]
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.workers") == 1
    assert done == set(ids) - {ids[i] for i in range(4, 20, 5)}

    worker = await roles.connect(roles.worker)
    try:
        # An operator's decision is not the worker role's to make.
        [op_id] = await _publish(roles.settings(roles.publisher), 1, "c_work2")
        cancel = (
            f"UPDATE {s}.operations SET state = 'cancelled', transition = 'cancel' WHERE id = $1"
        )
        await _denied(worker, cancel, op_id)
        # A raw state change without an actor is recorded as the role that made it, not as the
        # owner the audit trigger runs as.
        operator = await roles.connect(roles.operator)
        try:
            await operator.execute(cancel, op_id)
        finally:
            await operator.close()
        actor, db_role = await conn.fetchrow(
            f"SELECT actor, db_role FROM {s}.audit_log WHERE operation_id = $1 AND seq = 2", op_id
        )
        assert actor == db_role == roles.operator
        # Allowed UPDATE on operations still cannot break the lifecycle or the chain head.
        with pytest.raises(asyncpg.CheckViolationError, match="not allowed by lifecycle"):
            await worker.execute(
                f"UPDATE {s}.operations SET state = 'succeeded', transition = 'succeed' "
                "WHERE id = $1",
                op_id,
            )
        # The chain head is not among the columns it may update at all (revision 0010).
        await _denied(worker, f"UPDATE {s}.operations SET audit_hash = NULL WHERE id = $1", op_id)
        await _denied(worker, f"INSERT INTO {s}.operations (operation_type, channel, payload) "
                              "VALUES ('x', 'c', '{}')")  # fmt: skip
        await _denied(worker, f"DELETE FROM {s}.operations WHERE id = {op_id}")
        await _denied(worker, f"SELECT * FROM {s}.audit_log")
        for sql in _tampering(s, op_id):
            await _denied(worker, sql)
    finally:
        await worker.close()
    verification = await verify_chains(conn, roles.base.schema_name)
    assert verification.ok, str(verification.problem)


async def test_a_role_own_functions_first_in_its_search_path_change_nothing_audited(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    # An operator role given a schema of its own puts a fake clock, an "=" that calls every
    # payload equal, and its own "||", "+", "*", length, sha256, convert_to and text type ahead
    # of pg_catalog. The trigger functions ignore them all: the audit trigger names everything by
    # its schema, the others have a fixed search_path. Had any of them been used, the hash
    # would not verify (or the cast to the one-character text would fail the UPDATE).
    s = f'"{roles.base.schema_name}"'
    own = f"own_{roles.operator}"
    await conn.execute(f'CREATE SCHEMA "{own}" AUTHORIZATION "{roles.operator}"')
    [op_id, other_id] = await _publish(roles.settings(roles.publisher), 2, "c_path")
    worker = await roles.connect(roles.operator)
    try:
        await worker.execute(f"""
            CREATE FUNCTION "{own}".clock_timestamp() RETURNS timestamptz LANGUAGE sql
                AS $$ SELECT timestamptz '2000-01-01 00:00:00+00' $$;
            CREATE FUNCTION "{own}".always(jsonb, jsonb) RETURNS boolean LANGUAGE sql
                AS $$ SELECT true $$;
            CREATE OPERATOR "{own}".= (
                leftarg = jsonb, rightarg = jsonb, function = "{own}".always);
            CREATE FUNCTION "{own}".glue(text, text) RETURNS text LANGUAGE sql
                AS $$ SELECT 'glued' $$;
            CREATE OPERATOR "{own}".|| (leftarg = text, rightarg = text, function = "{own}".glue);
            CREATE FUNCTION "{own}".length(text) RETURNS integer LANGUAGE sql AS $$ SELECT 0 $$;
            CREATE FUNCTION "{own}".sha256(bytea) RETURNS bytea LANGUAGE sql
                AS $$ SELECT ''::bytea $$;
            CREATE FUNCTION "{own}".convert_to(text, name) RETURNS bytea LANGUAGE sql
                AS $$ SELECT ''::bytea $$;
            CREATE FUNCTION "{own}".times(numeric, numeric) RETURNS numeric LANGUAGE sql
                AS $$ SELECT 0::numeric $$;
            CREATE OPERATOR "{own}".* (leftarg = numeric, rightarg = numeric,
                                      function = "{own}".times);
            CREATE FUNCTION "{own}".plus(integer, integer) RETURNS integer LANGUAGE sql
                AS $$ SELECT 0 $$;
            CREATE OPERATOR "{own}".+ (leftarg = integer, rightarg = integer,
                                      function = "{own}".plus);
            CREATE DOMAIN "{own}".text AS varchar(1);
            SET search_path = "{own}", pg_catalog;
        """)  # fmt: skip
        assert await worker.fetchval("SELECT clock_timestamp()") < await conn.fetchval(
            "SELECT now() - interval '1 year'"
        )  # the fake clock is what an unqualified call gets in this session
        assert await worker.fetchval("SELECT length('abc') + length('a' || 'b')") == 0
        await worker.execute(
            f"UPDATE {s}.operations SET state = 'cancelled', transition = 'cancel' WHERE id = $1",
            op_id,
        )
        # The payload is not among the columns it may update at all.
        await _denied(
            worker,
            f"UPDATE {s}.operations SET payload = '{{\"forged\": true}}' WHERE id = $1",
            other_id,
        )
    finally:
        await worker.close()
    recorded_at = await conn.fetchval(
        f"SELECT recorded_at FROM {s}.audit_log WHERE operation_id = $1 AND seq = 2", op_id
    )
    assert recorded_at > await conn.fetchval("SELECT now() - interval '1 hour'")
    assert (
        await conn.fetchval(f"SELECT payload FROM {s}.operations WHERE id = $1", other_id)
        == '{"i": 1}'
    )
    verification = await verify_chains(conn, roles.base.schema_name)
    assert verification.ok, str(verification.problem)


async def test_auditor_reads_and_verifies_but_cannot_write_anything(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    [op_id] = await _publish(roles.settings(roles.publisher), 1, "c_aud")
    auditor = roles.settings(roles.auditor)
    proc = await run_cli("--dsn", dsn_of(auditor), "--schema", auditor.schema_name,
                         "audit", "verify")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: 1 audit rows of 1 operations verified")

    aud = await roles.connect(roles.auditor)
    try:
        for table in (
            "operations",
            "audit_log",
            "workers",
            "lifecycle_transitions",
            "lifecycles",
            "lifecycle_types",
        ):
            await aud.fetch(f"SELECT * FROM {s}.{table} LIMIT 1")
        await _denied(aud, f"INSERT INTO {s}.operations (operation_type, channel, payload) "
                           "VALUES ('x', 'c', '{}')")  # fmt: skip
        await _denied(aud, f"UPDATE {s}.operations SET priority = 1")
        await _denied(aud, f"DELETE FROM {s}.workers")
        for sql in _tampering(s, op_id):
            await _denied(aud, sql)
    finally:
        await aud.close()


async def test_operator_role_runs_the_operator_tools_and_the_audit_names_it(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    ids = await _publish(roles.settings(roles.publisher), 3, "c_ops")
    operator = roles.settings(roles.operator)
    base = ("--dsn", dsn_of(operator), "--schema", operator.schema_name)
    for args in (
        ("ops", "cancel", str(ids[0]), "--actor", "alice", "--reason", "duplicate order"),
        ("ops", "replay", str(ids[0]), "--actor", "bob", "--reason", "was not a duplicate"),
        ("ops", "list"),
        ("ops", "show", str(ids[1])),
        ("stats",),
        ("audit", "report"),
        ("audit", "verify"),
    ):
        proc = await run_cli(*base, *args)
        assert proc.returncode == 0, (args, proc.stdout + proc.stderr)
    rows = await conn.fetch(
        f"SELECT trigger, actor, db_role FROM {s}.audit_log WHERE operation_id = $1 ORDER BY seq",
        ids[0],
    )
    assert [tuple(r.values()) for r in rows] == [
        ("publish", roles.publisher, roles.publisher),
        ("cancel", "alice", roles.operator),
        ("replay", "bob", roles.operator),
    ]


async def test_a_role_granted_nothing_cannot_even_read(roles: Roles) -> None:
    s = f'"{roles.base.schema_name}"'
    outsider = await roles.connect(roles.outsider)
    try:
        await _denied(outsider, f"SELECT * FROM {s}.operations")
        await _denied(outsider, f"SELECT * FROM {s}.audit_log")
        for sql in _tampering(s, 1):
            await _denied(outsider, sql)
    finally:
        await outsider.close()


# -- the chain under concurrency, and tampering found by verify --------------------------------


async def test_16_concurrent_writers_produce_no_chain_fork(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    ids = await _publish(roles.settings(roles.publisher), 8, "c_race")
    writers, rounds = 16, 40
    flip = (
        f"UPDATE {s}.operations SET "
        "state = CASE WHEN state = 'pending' THEN 'cancelled' ELSE 'pending' END, "
        "transition = CASE WHEN state = 'pending' THEN 'cancel' ELSE 'replay' END, "
        "transition_actor = $2 WHERE id = $1"
    )

    async def writer(n: int) -> None:
        rng = random.Random(n)
        c = await roles.connect(roles.operator)
        try:
            for _ in range(rounds):
                await c.execute(flip, rng.choice(ids), f"writer-{n}")
        finally:
            await c.close()

    await asyncio.gather(*(writer(n) for n in range(writers)))

    rows = await conn.fetch(
        f"SELECT operation_id, array_agg(seq ORDER BY seq) AS seqs, count(*) AS n, "
        f"count(DISTINCT prev_hash) AS distinct_prev FROM {s}.audit_log GROUP BY 1"
    )
    assert sum(r["n"] for r in rows) == len(ids) + writers * rounds
    for r in rows:
        assert r["seqs"] == list(range(1, r["n"] + 1))  # no gap, no duplicate
        assert r["distinct_prev"] == r["n"] - 1  # every row but the first has its own parent
    per_writer = await conn.fetch(
        f"SELECT actor, count(*) FROM {s}.audit_log WHERE actor LIKE 'writer-%' GROUP BY 1"
    )
    assert {r["actor"]: r["count"] for r in per_writer} == {
        f"writer-{n}": rounds for n in range(writers)
    }
    verification = await verify_chains(conn, roles.base.schema_name)
    assert verification.ok, str(verification.problem)
    assert verification.rows == len(ids) + writers * rounds


@pytest.mark.parametrize("column", ["actor", "hash", "recorded_at"])
async def test_one_flipped_byte_is_found_by_audit_verify_at_the_right_row(
    column: str, roles: Roles, conn: asyncpg.Connection
) -> None:
    s = f'"{roles.base.schema_name}"'
    ids = await _publish(roles.settings(roles.publisher), 50, "c_flip")
    await conn.execute(
        f"UPDATE {s}.operations SET state = 'cancelled', transition = 'cancel', "
        "transition_actor = 'alice' WHERE id = ANY($1::bigint[])",
        ids,
    )
    await conn.execute(
        f"UPDATE {s}.operations SET state = 'pending', transition = 'replay', "
        "transition_actor = 'bob' WHERE id = ANY($1::bigint[])",
        ids,
    )
    target, seq = ids[31], 2
    change = {
        # one bit of one character: 'alice' -> 'alicd'
        "actor": "actor = overlay(actor placing chr(ascii(right(actor, 1)) # 1) from 5)",
        "hash": "hash = set_byte(hash, 7, get_byte(hash, 7) # 1)",
        "recorded_at": "recorded_at = recorded_at + interval '1 microsecond'",
    }[column]
    # Only the owner (or a superuser) can do this, and it takes switching the trigger off.
    async with conn.transaction():
        await conn.execute(f"ALTER TABLE {s}.audit_log DISABLE TRIGGER audit_log_append_only")
        await conn.execute(
            f"UPDATE {s}.audit_log SET {change} WHERE operation_id = $1 AND seq = $2", target, seq
        )
        await conn.execute(f"ALTER TABLE {s}.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only")

    auditor = roles.settings(roles.auditor)
    proc = await run_cli("--dsn", dsn_of(auditor), "--schema", auditor.schema_name,
                         "audit", "verify")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"FAILED: operation {target} seq {seq}: "), proc.stderr
