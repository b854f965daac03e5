"""Flow control across 4 worker processes on one database (``pgoutbox worker flow_app:system``).

Limits and pauses hold cluster wide because the database coordinates them: each test runs four
real worker processes and measures what they did on the database's clock -- the handlers'
start and end times (``intervals``, written by flow_app.py) and the claims in the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from faultkit import Supervisor, run_cli

from pgoutbox import DatabaseSessionManager, publish_many
from pgoutbox.settings import DatabaseSettings

POLL_INTERVAL = 0.5  # the Supervisor's PGOUTBOX_WORKFLOW_SYSTEM__POLL_INTERVAL_SECONDS
DEADLINE = 180.0  # generous: four processes on a loaded two-core machine


@pytest.fixture
async def intervals(db_settings: DatabaseSettings, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The schema of the ``intervals`` table flow_app.py's handlers write to."""
    schema = f"{db_settings.schema_name}_effects"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(
        f'CREATE TABLE "{schema}".intervals (id bigserial PRIMARY KEY, operation_id bigint, '
        "attempt int, worker_pid int, started_at timestamptz, ended_at timestamptz)"
    )
    yield schema
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextlib.asynccontextmanager
async def four_workers(
    db_settings: DatabaseSettings, intervals: str, log_dir: Path, **env: str
) -> AsyncIterator[Supervisor]:
    """Four flow_app worker processes, stopped (SIGTERM) at the end."""
    supervisor = Supervisor(
        db_settings, "flow", intervals, log_dir, size=4, app="flow_app:system", extra_env=env
    )
    supervisor.start()
    try:
        yield supervisor
    finally:
        codes = await supervisor.stop()
        assert codes == [0, 0, 0, 0], supervisor.logs()


@pytest.fixture
async def workers(
    db_settings: DatabaseSettings, intervals: str, tmp_path: Path
) -> AsyncIterator[Supervisor]:
    """Four flow_app worker processes, each holding up to 8 operations (4 running)."""
    async with four_workers(db_settings, intervals, tmp_path) as supervisor:
        yield supervisor


@pytest.fixture
async def small_workers(
    db_settings: DatabaseSettings, intervals: str, tmp_path: Path
) -> AsyncIterator[Supervisor]:
    """Four flow_app worker processes with one handler each: a limit of 3 is reached only by
    three processes at once."""
    async with four_workers(
        db_settings,
        intervals,
        tmp_path,
        PGOUTBOX_WORKFLOW_SYSTEM__N_WORKERS="1",
        PGOUTBOX_WORKFLOW_SYSTEM__BATCH_SIZE="1",
    ) as supervisor:
        yield supervisor


async def publish(db_settings: DatabaseSettings, items: list[dict[str, object]]) -> list[int]:
    sm = DatabaseSessionManager(db_settings)
    try:
        async with sm.session() as session:
            ids = await publish_many(session, [{"channel": "flow", **i} for i in items])
            await session.commit()
        return list(ids)
    finally:
        await sm.close()


async def wait_until_finished(
    conn: asyncpg.Connection, schema: str, ids: list[int], supervisor: Supervisor
) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        left = await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".operations WHERE id = ANY($1) '
            "AND state <> 'succeeded'",
            ids,
        )
        if left == 0:
            return
        assert not supervisor.replace_dead(), supervisor.logs()
        await asyncio.sleep(0.2)
    raise AssertionError(f"{left} operations unfinished after {DEADLINE}s\n{supervisor.logs()}")


def most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The largest number of spans open at one instant (an end before a start at a tie)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


async def test_a_concurrency_limit_of_3_is_never_exceeded_by_4_worker_processes(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    intervals: str,
    small_workers: Supervisor,
) -> None:
    ids = await publish(
        db_settings, [{"operation_type": "flow.three", "payload": {"sleep": 0.3}}] * 36
    )
    await wait_until_finished(conn, db_settings.schema_name, ids, small_workers)

    rows = await conn.fetch(
        f'SELECT worker_pid, started_at, ended_at FROM "{intervals}".intervals '
        "WHERE operation_id = ANY($1)",
        ids,
    )
    assert len(rows) == 36  # each ran once: no retries, nothing lost
    spans = [(r["started_at"], r["ended_at"]) for r in rows]
    assert most_at_once(spans) == 3  # never more, and the limit was reached
    # One handler per process (N_WORKERS=1): 3 at once took three processes, all held to one
    # limit.
    assert len({r["worker_pid"] for r in rows}) >= 3
    # Throughput stays near the limit: the handlers' busy time over the span of the run is the
    # average number running at once (3 at best). Half of it is the bound a loaded machine can
    # guarantee; a limiter that let only one run at a time would give at most 1.
    makespan = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()
    busy = sum((e - s).total_seconds() for s, e in spans)
    assert busy / makespan >= 1.5, (busy, makespan)


async def test_a_rate_limit_of_50_per_second_holds_over_2000_operations(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    workers: Supervisor,
) -> None:
    ids = await publish(db_settings, [{"operation_type": "flow.rated", "payload": {}}] * 2000)
    await wait_until_finished(conn, db_settings.schema_name, ids, workers)

    starts = [
        r["recorded_at"].timestamp()
        for r in await conn.fetch(
            f'SELECT recorded_at FROM "{db_settings.schema_name}".audit_log '
            "WHERE trigger = 'claim' AND operation_id = ANY($1) ORDER BY recorded_at",
            ids,
        )
    ]
    assert len(starts) == 2000
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert 45 <= rate <= 55, rate  # 50/s within 10 %
    # No one-second window holds more than the rate plus the declared burst (5).
    j, most = 0, 0
    for i, t in enumerate(starts):
        while starts[j] <= t - 1.0:
            j += 1
        most = max(most, i - j + 1)
    assert most <= 55, most


async def test_pause_stops_every_worker_within_a_poll_interval_and_resume_restarts_them(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    workers: Supervisor,
) -> None:
    schema = db_settings.schema_name
    ids = await publish(
        db_settings, [{"operation_type": "flow.free", "payload": {"sleep": 0.2}}] * 300
    )
    dsn = ["--dsn", db_settings.dsn or "", "--schema", schema]
    deadline = time.monotonic() + DEADLINE
    while (
        await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".operations WHERE id = ANY($1) AND attempts > 0', ids
        )
        < 20
    ):
        assert time.monotonic() < deadline, workers.logs()
        await asyncio.sleep(0.05)

    paused = await run_cli(*dsn, "pause", "flow.free", "--actor", "alice", "--reason", "INC-1")
    assert paused.returncode == 0, paused.stderr
    pause = await conn.fetchrow(
        f'SELECT paused_at, paused_by, pause_reason, paused_role FROM "{schema}".flow_pauses'
    )
    assert (pause["paused_by"], pause["pause_reason"]) == ("alice", "INC-1")
    # Wait well past a poll interval, then look: no claim after one poll interval (plus the
    # claim's own round trip) from the pause.
    await asyncio.sleep(POLL_INTERVAL * 6)
    cutoff = pause["paused_at"] + timedelta(seconds=POLL_INTERVAL + 0.5)
    late_claims = await conn.fetchval(
        f"SELECT count(*) FROM \"{schema}\".audit_log WHERE trigger = 'claim' AND recorded_at > $1",
        cutoff,
    )
    assert late_claims == 0
    waiting = await conn.fetchval(
        f"SELECT count(*) FROM \"{schema}\".operations WHERE id = ANY($1) AND state = 'pending'",
        ids,
    )
    assert waiting > 0  # paused work waits; running work finished (nothing is claimed now)
    assert (
        await conn.fetchval(f"SELECT count(*) FROM \"{schema}\".operations WHERE state = 'claimed'")
        == 0
    )

    resumed = await run_cli(*dsn, "resume", "flow.free", "--actor", "bob", "--reason", "fixed")
    assert resumed.returncode == 0, resumed.stderr
    await wait_until_finished(conn, schema, ids, workers)
    closed = await conn.fetchrow(
        f'SELECT resumed_by, resume_reason, resumed_at FROM "{schema}".flow_pauses'
    )
    assert (closed["resumed_by"], closed["resume_reason"]) == ("bob", "fixed")


async def test_a_partitioned_limit_runs_one_per_merchant_and_merchants_side_by_side(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    intervals: str,
    workers: Supervisor,
) -> None:
    items = [
        {"operation_type": "flow.merchant", "payload": {"merchant": f"m{i % 4}", "sleep": 0.2}}
        for i in range(24)
    ]
    ids = await publish(db_settings, items)
    await wait_until_finished(conn, db_settings.schema_name, ids, workers)
    rows = await conn.fetch(
        f"SELECT o.payload->>'merchant' AS merchant, i.started_at, i.ended_at "
        f'FROM "{intervals}".intervals i JOIN "{db_settings.schema_name}".operations o '
        "ON o.id = i.operation_id WHERE o.id = ANY($1)",
        ids,
    )
    by_merchant: dict[str, list[tuple[datetime, datetime]]] = {}
    for r in rows:
        by_merchant.setdefault(r["merchant"], []).append((r["started_at"], r["ended_at"]))
    assert sorted(by_merchant) == ["m0", "m1", "m2", "m3"]
    assert all(most_at_once(spans) == 1 for spans in by_merchant.values())
    assert most_at_once([s for spans in by_merchant.values() for s in spans]) >= 2
