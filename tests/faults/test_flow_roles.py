"""Flow control's history against its own roles, as real LOGIN roles with raw SQL.

Who paused what, and who overrode a limit, is recorded in ``flow_pauses`` and
``flow_overrides``. Those records must not lie either: only an operator writes them, the
database role and the time are the database's, and nobody -- not even the owner -- deletes a
pause or changes an override after the fact.
"""

from __future__ import annotations

import asyncpg
import pytest
from faultkit import Roles

from pgoutbox import Admin

REFUSED = (asyncpg.InsufficientPrivilegeError, asyncpg.CheckViolationError)


async def test_an_operator_pauses_and_the_database_records_its_role_and_time(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    async with Admin(roles.settings(roles.operator)) as admin:
        await admin.pause("type", "charge", actor="alice", reason="INC-1")
    op = await roles.connect(roles.operator)
    try:
        # Raw SQL claiming another role and an earlier time: the database puts in its own.
        await op.execute(
            f"INSERT INTO {roles.s}.flow_pauses (scope, target, paused_by, pause_reason, "
            "paused_role, paused_at) VALUES ('type', 'refund', 'bob', 'x', 'postgres', "
            "'2000-01-01')"
        )
        await op.execute(
            f"UPDATE {roles.s}.flow_pauses SET resumed_by = 'bob', resume_reason = 'done' "
            "WHERE target = 'charge'"
        )
        with pytest.raises(REFUSED, match="was resumed already"):
            await op.execute(
                f"UPDATE {roles.s}.flow_pauses SET resumed_by = 'eve', resume_reason = 'x' "
                "WHERE target = 'charge'"
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute(f"UPDATE {roles.s}.flow_pauses SET paused_by = 'eve'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute(f"DELETE FROM {roles.s}.flow_pauses")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute(f"UPDATE {roles.s}.flow_overrides SET actor = 'eve'")
    finally:
        await op.close()
    rows = await conn.fetch(
        f"SELECT target, paused_role, paused_at > now() - interval '1 hour' AS recent, "
        f"resumed_by, resumed_role FROM {roles.s}.flow_pauses ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("charge", roles.operator, True, "bob", roles.operator),
        ("refund", roles.operator, True, None, None),
    ]


@pytest.mark.parametrize("kind", ["worker", "publisher", "auditor", "outsider"])
async def test_only_an_operator_pauses_or_overrides(roles: Roles, kind: str) -> None:
    role = getattr(roles, kind)
    c = await roles.connect(role)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await c.execute(
                f"INSERT INTO {roles.s}.flow_pauses (scope, target, paused_by, pause_reason) "
                "VALUES ('channel', 'default', 'mallory', 'x')"
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await c.execute(
                f"INSERT INTO {roles.s}.flow_overrides (limit_name, concurrency, actor, reason) "
                "VALUES ('stripe', 1000, 'mallory', 'x')"
            )
    finally:
        await c.close()


async def test_not_even_the_owner_deletes_a_pause_or_rewrites_an_override(
    roles: Roles, conn: asyncpg.Connection
) -> None:
    async with Admin(roles.settings(roles.operator)) as admin:
        await admin.pause("channel", "default", actor="alice", reason="maintenance")
    await conn.execute(
        f"INSERT INTO {roles.s}.flow_limits (name, operation_types, concurrency) "
        "VALUES ('stripe', '{charge}', 5)"
    )
    async with Admin(roles.settings(roles.operator)) as admin:
        await admin.override_limit("stripe", concurrency=1, actor="alice", reason="INC-2")
    with pytest.raises(REFUSED, match="keeps its history"):
        await conn.execute(f"DELETE FROM {roles.s}.flow_pauses")
    with pytest.raises(REFUSED, match="an override cannot be changed"):
        await conn.execute(f"UPDATE {roles.s}.flow_overrides SET concurrency = 50")
    with pytest.raises(REFUSED, match="a pause can only be resumed"):
        await conn.execute(f"UPDATE {roles.s}.flow_pauses SET pause_reason = 'nothing'")
    # The replication-role switch does not turn the triggers off (ENABLE ALWAYS).
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        with pytest.raises(REFUSED, match="keeps its history"):
            await conn.execute(f"DELETE FROM {roles.s}.flow_overrides")
    assert await conn.fetchval(f"SELECT count(*) FROM {roles.s}.flow_pauses") == 1
    assert await conn.fetchval(f"SELECT concurrency FROM {roles.s}.flow_overrides") == 1


async def test_a_worker_role_declares_limits_and_moves_buckets_but_reads_pauses_only(
    roles: Roles,
) -> None:
    w = await roles.connect(roles.worker)
    try:
        await w.execute(
            f"INSERT INTO {roles.s}.flow_limits (name, operation_types, rate_count, "
            "rate_period_seconds) VALUES ('mail', '{send}', 10, 1)"
        )
        await w.execute(
            f"INSERT INTO {roles.s}.flow_buckets (limit_name, tat) VALUES ('mail', now())"
        )
        assert await w.fetchval(f"SELECT count(*) FROM {roles.s}.flow_pauses") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await w.execute(f"UPDATE {roles.s}.flow_pauses SET resumed_by = 'w'")
    finally:
        await w.close()
