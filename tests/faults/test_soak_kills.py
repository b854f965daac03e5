"""Soak: thousands of operations through worker processes that are ``kill -9``-ed at seeded
random points, and restarted. Nothing lost, nothing lies.

Size: ``PGOUTBOX_FAULT_SCALE`` operations (default 1000; the full run is 10000). The seed is
printed; ``PGOUTBOX_FAULT_SEED=<seed>`` replays the same kill decisions (which attempt of which
operation dies, and where). Which other operations a kill interrupts depends on timing and is
not replayed; the invariants hold whatever it is.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from faultkit import Supervisor, fault_scale, fault_seed

from pgoutbox import DatabaseSessionManager, publish_many
from pgoutbox.audit import verify_chains
from pgoutbox.settings import DatabaseSettings

CHANNEL = "fault_soak"


async def check_invariants(
    conn: asyncpg.Connection, s: str, effects: str, total: int, seed: int
) -> dict[str, int]:
    """Assert "nothing lost, nothing lies" and return the measured figures."""
    where = f"(seed {seed}; replay with PGOUTBOX_FAULT_SEED={seed})"
    states = dict(
        (r["state"], r["count"])
        for r in await conn.fetch(f'SELECT state, count(*) FROM "{s}".operations GROUP BY 1')
    )
    assert states == {"succeeded": total}, f"lost or unfinished operations {states} {where}"
    # Zero `succeeded` without its audit row: the chain head of every operation is its
    # `succeed` row.
    unaudited = await conn.fetch(
        f'SELECT o.id FROM "{s}".operations o WHERE NOT EXISTS (SELECT 1 FROM "{s}".audit_log a '
        "WHERE a.operation_id = o.id AND a.seq = o.audit_seq AND a.trigger = 'succeed' "
        "AND a.to_state = 'succeeded' AND a.hash = o.audit_hash)"
    )
    assert unaudited == [], f"succeeded without its audit row: {unaudited[:10]} {where}"
    stranded = await conn.fetchval(
        f'SELECT count(*) FROM "{s}".operations WHERE lease_owner IS NOT NULL '
        "OR lease_expires_at IS NOT NULL"
    )
    assert stranded == 0
    # Effects: exactly one per operation unless an attempt of it was interrupted (its lease
    # was lost: audited as `lose`), then at most one per attempt, and each from a claimed one.
    rows = await conn.fetch(
        f"""
        WITH e AS (SELECT operation_id, count(*) AS n, count(DISTINCT attempt) AS attempts_run,
                          bool_and(attempt >= 1) AS positive, max(attempt) AS last_attempt
                   FROM "{effects}".effects GROUP BY 1),
             a AS (SELECT operation_id, count(*) FILTER (WHERE trigger = 'lose') AS lost,
                          count(*) FILTER (WHERE trigger = 'claim') AS claims
                   FROM "{s}".audit_log GROUP BY 1)
        SELECT o.id, o.attempts, coalesce(e.n, 0) AS effects, e.attempts_run, e.last_attempt,
               a.lost, a.claims
        FROM "{s}".operations o JOIN a ON a.operation_id = o.id
        LEFT JOIN e ON e.operation_id = o.id
        """
    )
    interrupted = 0
    for r in rows:
        assert r["claims"] == r["attempts"], dict(r)
        assert r["effects"] >= 1, f"succeeded but its handler never ran: {dict(r)} {where}"
        assert r["effects"] == r["attempts_run"], f"an attempt ran twice: {dict(r)} {where}"
        assert r["last_attempt"] <= r["attempts"], dict(r)
        if r["lost"] == 0:
            assert r["effects"] == 1, f"{dict(r)} {where}"
            assert r["attempts"] == 1, f"{dict(r)} {where}"
        else:
            interrupted += 1
            assert r["attempts"] == r["lost"] + 1, f"{dict(r)} {where}"
    verification = await verify_chains(conn, s)
    assert verification.ok, f"{verification.problem} {where}"
    attempts = await conn.fetchval(f'SELECT sum(attempts) FROM "{s}".operations')
    effects_total = await conn.fetchval(f'SELECT count(*) FROM "{effects}".effects')
    return {
        "operations": total,
        "attempts": int(attempts),
        "effects": int(effects_total),
        "interrupted_operations": interrupted,
        "audit_rows": verification.rows,
        "lost": 0,
    }


@pytest.mark.slow
async def test_soak_with_seeded_kill_9_loses_nothing_and_every_chain_verifies(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    effects: str,
    tmp_path: Path,
) -> None:
    total, seed = fault_scale(), fault_seed()
    rate = float(os.environ.get("PGOUTBOX_FAULT_KILL_RATE", "0.05"))
    print(f"soak: {total} operations, kill rate {rate}, PGOUTBOX_FAULT_SEED={seed}")
    s = db_settings.schema_name
    supervisor = Supervisor(
        db_settings,
        CHANNEL,
        effects,
        tmp_path,
        extra_env={"FAULT_SEED": str(seed), "FAULT_KILL_RATE": str(rate)},
    )
    began = time.monotonic()
    supervisor.start()
    try:
        for start in range(0, total, 500):
            async with sm.session() as session:
                await publish_many(
                    session,
                    [
                        # max_attempts: every kill also interrupts what else the process held,
                        # so an unlucky operation can be interrupted many times; it must end
                        # succeeded, not dead.
                        {"operation_type": "fault.work", "payload": {"n": n}, "channel": CHANNEL,
                         "max_attempts": 1000}
                        for n in range(start, min(total, start + 500))
                    ],
                )  # fmt: skip
                await session.commit()
            supervisor.replace_dead()
        deadline = time.monotonic() + 120 + total * 0.2
        while True:
            supervisor.replace_dead()
            done = await conn.fetchval(
                f"SELECT count(*) FROM \"{s}\".operations WHERE state = 'succeeded'"
            )
            if done == total:
                break
            assert time.monotonic() < deadline, (
                f"only {done}/{total} succeeded (seed {seed})\n{supervisor.logs()}"
            )
            await asyncio.sleep(0.1)
        supervisor.replace_dead()
        # Some of these may have been spawned a moment ago and be starting up: SIGTERM is an
        # orderly stop for them too (docs/workers.md, "Stopping").
        stopped = Counter(await supervisor.stop())
    finally:
        supervisor.kill_all()
    elapsed = time.monotonic() - began
    # While working, a process ends only by its own kill -9.
    assert set(supervisor.exits) <= {-9}, (
        f"unexpected exits {supervisor.exits}\n{supervisor.logs()}"
    )
    # SIGTERMed, each exits 0, unless a kill timer of its last attempts fired during the stop.
    assert set(stopped) <= {0, -9}, f"unexpected exits on SIGTERM {stopped}\n{supervisor.logs()}"
    kills = supervisor.exits[-9] + stopped[-9]
    figures = await check_invariants(conn, s, effects, total, seed)
    figures.update(
        kills=kills, restarts=supervisor.started - supervisor.size, seconds=round(elapsed)
    )
    print(f"soak result (seed {seed}): {figures}")
    assert kills > 0
