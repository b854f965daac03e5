"""Worker processes under hostile conditions: a killed LISTEN connection, a starved pool with
slow external calls, a long transaction holding back xmin, and a wrong wall clock."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from faultkit import Supervisor

from pgoutbox import DatabaseSessionManager, publish_many
from pgoutbox.audit import verify_chains
from pgoutbox.settings import DatabaseSettings

CHANNEL = "fault_workers"


async def _publish(
    sm: DatabaseSessionManager, n: int, payload: dict[str, Any] | None = None, **kw: Any
) -> list[int]:
    async with sm.session() as session:
        ids = await publish_many(
            session,
            [
                {"operation_type": "fault.work", "payload": payload or {}, "channel": CHANNEL, **kw}
                for _ in range(n)
            ],
        )
        await session.commit()
    return ids


async def _until_succeeded(
    conn: asyncpg.Connection, s: str, ids: list[int], within: float, sup: Supervisor
) -> float:
    """Seconds until every one of ``ids`` succeeded."""
    began = time.monotonic()
    while True:
        done = await conn.fetchval(
            f'SELECT count(*) FROM "{s}".operations WHERE id = ANY($1::bigint[]) '
            "AND state = 'succeeded'",
            ids,
        )
        if done == len(ids):
            return time.monotonic() - began
        assert time.monotonic() - began < within, f"{done}/{len(ids)} done\n{sup.logs()}"
        await asyncio.sleep(0.05)


async def _each_ran_once(conn: asyncpg.Connection, s: str, effects: str) -> None:
    """One attempt, one execution, no lost lease, for every operation; chains verify."""
    rows = await conn.fetch(
        f'SELECT o.id, o.attempts, (SELECT count(*) FROM "{effects}".effects e '
        "WHERE e.operation_id = o.id) AS runs, "
        f'(SELECT count(*) FROM "{s}".audit_log a WHERE a.operation_id = o.id '
        "AND a.trigger IN ('lose', 'reject')) AS lost "
        f'FROM "{s}".operations o'
    )
    bad = [dict(r) for r in rows if (r["attempts"], r["runs"], r["lost"]) != (1, 1, 0)]
    assert bad == []
    verification = await verify_chains(conn, s)
    assert verification.ok, str(verification.problem)


def _supervisor(db: DatabaseSettings, effects: str, tmp: Path, **env: str) -> Supervisor:
    return Supervisor(db, CHANNEL, effects, tmp, size=1, extra_env={"FAULT_KILL_RATE": "0", **env})


async def _wait_ready(conn: asyncpg.Connection, s: str, count: int) -> None:
    for _ in range(300):
        if await conn.fetchval(f'SELECT count(*) FROM "{s}".workers') >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("workers did not start")


async def test_killed_listener_connection_is_replaced_and_wakeups_keep_working(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    effects: str,
    tmp_path: Path,
) -> None:
    s = db_settings.schema_name
    # Polling every 60 s: only a working LISTEN connection gets work done within seconds.
    sup = _supervisor(
        db_settings, effects, tmp_path, PGOUTBOX_WORKFLOW_SYSTEM__POLL_INTERVAL_SECONDS="60"
    )
    sup.start()
    try:
        await _wait_ready(conn, s, 1)
        assert await _until_succeeded(conn, s, await _publish(sm, 5), 10, sup) < 10
        for _ in range(2):
            listening = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND datname = "
                "current_database()"
            )
            assert len(listening) == 1
            await conn.execute("SELECT pg_terminate_backend($1)", listening[0]["pid"])
            await asyncio.sleep(0.5)
            assert await _until_succeeded(conn, s, await _publish(sm, 5), 10, sup) < 10
        sup.replace_dead()
        assert not sup.exits
        assert await sup.stop() == [0]
    finally:
        sup.kill_all()
    await _each_ran_once(conn, s, effects)


async def test_tiny_pool_many_slow_handlers_hold_no_transaction_and_keep_their_leases(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    effects: str,
    tmp_path: Path,
) -> None:
    s = db_settings.schema_name
    # 24 handlers on a 4-connection pool (the minimum), each "calling out" for 5 s: more than
    # two leases of 2 s, so only heartbeats that get a connection keep the operations.
    sup = _supervisor(
        db_settings,
        effects,
        tmp_path,
        PGOUTBOX_DATABASE__POOL_SIZE="1",
        PGOUTBOX_WORKFLOW_SYSTEM__N_WORKERS="24",
        PGOUTBOX_WORKFLOW_SYSTEM__BATCH_SIZE="24",
    )
    sup.start()
    try:
        await _wait_ready(conn, s, 1)
        ids = await _publish(sm, 48, {"sleep": 5})
        idle_in_transaction = 0
        began = time.monotonic()
        while time.monotonic() - began < 4:
            idle_in_transaction = max(
                idle_in_transaction,
                await conn.fetchval(
                    # Recording batches are short transactions; none may span a 5 s call.
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgoutbox' "
                    "AND datname = current_database() "
                    "AND clock_timestamp() - xact_start > interval '1 second'"
                ),
            )
            await asyncio.sleep(0.1)
        await _until_succeeded(conn, s, ids, 60, sup)
        assert idle_in_transaction == 0
        assert await sup.stop() == [0]
    finally:
        sup.kill_all()
    await _each_ran_once(conn, s, effects)


async def test_long_transaction_holding_xmin_does_not_make_claims_wrong(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    database_dsn: str,
    effects: str,
    tmp_path: Path,
) -> None:
    s = db_settings.schema_name
    old = await asyncpg.connect(database_dsn)
    tx = old.transaction(isolation="repeatable_read")
    await tx.start()
    await old.fetchval(f'SELECT count(*) FROM "{s}".operations')  # the snapshot is now held
    sup = _supervisor(db_settings, effects, tmp_path)
    sup.size = 2
    sup.start()
    try:
        ids = await _publish(sm, 300)
        await _until_succeeded(conn, s, ids, 120, sup)
        # Every claim and transition made dead row versions the old snapshot still pins; none
        # of them was claimed twice or lost.
        assert await old.fetchval(f'SELECT count(*) FROM "{s}".operations') == 0
        assert await sup.stop() == [0, 0]
    finally:
        sup.kill_all()
        await tx.rollback()
        await old.close()
    await _each_ran_once(conn, s, effects)


async def test_skewed_worker_clock_changes_nothing_deadlines_are_database_time(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    effects: str,
    tmp_path: Path,
) -> None:
    s = db_settings.schema_name
    for skew in ("3600", "-3600"):
        sup = _supervisor(db_settings, effects, tmp_path, FAULT_CLOCK_SKEW_SECONDS=skew)
        sup.start()
        try:
            await _wait_ready(conn, s, 1)
            due: datetime = await conn.fetchval("SELECT now() + interval '3 seconds'")
            delayed = await _publish(sm, 3, run_at=due)
            # Handlers outlast the lease (2 s): a lease computed from a wrong clock would be
            # lost (ahead) or held for an hour after a crash (behind).
            slow = await _publish(sm, 3, {"sleep": 3})
            await _until_succeeded(conn, s, delayed + slow, 30, sup)
            started = await conn.fetch(
                f'SELECT operation_id, at FROM "{effects}".effects '
                "WHERE operation_id = ANY($1::bigint[])",
                delayed,
            )
            assert len(started) == 3
            assert all(r["at"] >= due for r in started), (skew, started, due)
            assert all((r["at"] - due).total_seconds() < 10 for r in started)
            leases = await conn.fetchval(
                f'SELECT count(*) FROM "{s}".audit_log WHERE operation_id = ANY($1::bigint[]) '
                "AND trigger IN ('lose', 'reject')",
                slow,
            )
            assert leases == 0
            assert await sup.stop() == [0]
        finally:
            sup.kill_all()
    await _each_ran_once(conn, s, effects)
