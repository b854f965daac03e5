"""Ordering keys across worker processes: one at a time, in publish order, and a dead
operation holds back the rest of its key until an operator replays it.

Four ``pgoutbox worker steps_app:router`` processes, each with several handlers and claiming in
batches, compete for interleaved keys. Every handler journals its start and end in ``runs``
with ``clock_timestamp()`` (one clock, the database's: no skew between processes), so overlap
and order are judged from the database's own timeline. Some keyed operations are multi-step
(``steps.pay``): resting between its steps, such an operation must still hold its key.

Size: ``PGOUTBOX_FAULT_SCALE`` (default 1000) gives 20 keys of ``max(10, scale // 100)``
operations each, plus ``scale // 25`` unkeyed ones.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from faultkit import fault_scale
from steps_app import Workers, create_tables, router, wait_for

from pgoutbox import Admin, DatabaseSessionManager, publish_many
from pgoutbox.audit import verify_chains
from pgoutbox.registry import register
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

CHANNEL = "fault_ordering"
KEYS = 20
# Operation type -> its audit trail and handler runs when nothing goes wrong.
EXPECTED = {
    "steps.ordered": (("publish", "claim", "succeed"), 1),
    "steps.pay": (("publish", "claim", "charge", "claim", "send_receipt", "claim", "archive"), 3),
}


@pytest.fixture
async def steps_schema(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> AsyncIterator[str]:
    """The schema of steps_app's runs, side_effects and fail_switch tables."""
    schema = f"{db_settings.schema_name}_steps"
    await create_tables(conn, schema)
    yield schema
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def workers(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, steps_schema: str, tmp_path: Path
) -> AsyncIterator[Workers]:
    """steps_app worker processes (lifecycle registered first); killed at teardown."""
    s = db_settings.schema_name
    await register(conn, queries(s), s, router.handlers())
    started = Workers(db_settings, steps_schema, CHANNEL, tmp_path)
    try:
        yield started
    finally:
        await started.close()
        print(started.logs())


# -- helpers ------------------------------------------------------------------------------------


def keyed(key: int, n: int, operation_type: str = "steps.ordered") -> dict[str, Any]:
    return {
        "operation_type": operation_type,
        "payload": {"tag": f"k{key:02}-{n}", "max_sleep": 0.02},
        "channel": CHANNEL,
        "ordering_key": f"k{key:02}",
    }


def unkeyed(n: int) -> dict[str, Any]:
    return {
        "operation_type": "steps.ordered",
        "payload": {"tag": f"free-{n}", "max_sleep": 0.02},
        "channel": CHANNEL,
    }


async def publish_in_order(sm: DatabaseSessionManager, items: list[dict[str, Any]]) -> list[int]:
    """Publish ``items`` in a few transactions, one after the other (one publisher: commit order
    is id order), while the workers are already claiming."""
    ids: list[int] = []
    chunk = max(1, len(items) // 4)
    for start in range(0, len(items), chunk):
        async with sm.session() as session:
            ids += await publish_many(session, items[start : start + chunk])
            await session.commit()
    assert ids == sorted(ids)
    return ids


async def count_in(conn: asyncpg.Connection, s: str, ids: list[int], states: list[str]) -> int:
    n: int = await conn.fetchval(
        f'SELECT count(*) FROM "{s}".operations WHERE id = ANY($1::bigint[]) '
        "AND state = ANY($2::text[])",
        ids,
        states,
    )
    return n


async def until_succeeded(
    conn: asyncpg.Connection, s: str, ids: list[int], within: float, workers: Workers
) -> None:
    deadline = time.monotonic() + within
    while (done := await count_in(conn, s, ids, ["succeeded"])) < len(ids):
        states = await conn.fetch(
            f'SELECT state, count(*) FROM "{s}".operations WHERE id = ANY($1::bigint[]) GROUP BY 1',
            ids,
        )
        assert "dead" not in {r["state"] for r in states}, [tuple(r) for r in states]
        assert time.monotonic() < deadline, (
            f"{done}/{len(ids)} succeeded: {[tuple(r) for r in states]}\n{workers.logs()}"
        )
        await asyncio.sleep(0.1)


async def key_timelines(
    conn: asyncpg.Connection, s: str, x: str
) -> dict[str, list[asyncpg.Record]]:
    """Per ordering key, its operations in id order, each with the span its handler runs
    covered (first start, last end, over all its steps and attempts) and who ran them."""
    rows = await conn.fetch(
        f"""
        SELECT o.ordering_key, o.id, o.operation_type, min(r.started_at) AS started,
               max(r.ended_at) AS ended, count(r.id) AS runs,
               count(r.id) FILTER (WHERE r.ended_at IS NULL) AS unfinished,
               array_agg(DISTINCT r.pid) AS pids
        FROM "{s}".operations o LEFT JOIN "{x}".runs r ON r.operation_id = o.id
        WHERE o.ordering_key IS NOT NULL
        GROUP BY o.ordering_key, o.id, o.operation_type
        ORDER BY o.ordering_key, o.id
        """
    )
    by_key: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        by_key[row["ordering_key"]].append(row)
    return by_key


def assert_one_at_a_time_in_id_order(key: str, ops: list[asyncpg.Record]) -> None:
    for row in ops:
        assert row["runs"] >= 1, (key, dict(row))
        assert row["unfinished"] == 0, (key, dict(row))
    starts = [row["started"] for row in ops]
    assert starts == sorted(starts), f"{key}: handlers started out of publish order: {ops}"
    for earlier, later in itertools.pairwise(ops):
        assert later["started"] >= earlier["ended"], (
            f"{key}: operation {later['id']} started at {later['started']} before "
            f"{earlier['id']} ended at {earlier['ended']}"
        )


async def settled(conn: asyncpg.Connection, s: str) -> None:
    leased = await conn.fetch(
        f"SELECT id FROM \"{s}\".operations WHERE lease_owner IS NOT NULL OR state = 'claimed'"
    )
    assert leased == []
    verification = await verify_chains(conn, s)
    assert verification.ok, str(verification.problem)


# -- tests --------------------------------------------------------------------------------------


async def test_four_processes_run_each_key_one_at_a_time_in_publish_order(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    steps_schema: str,
) -> None:
    s, x = db_settings.schema_name, steps_schema
    per_key, free = max(10, fault_scale() // 100), fault_scale() // 25
    procs = await workers.start(conn, 4, n_workers=4, batch_size=8)
    # Round-robin over the keys, so each claimed batch spans many keys; every fourth key has a
    # three-step operation in the middle; unkeyed ones in between.
    every = max(1, per_key * KEYS // max(1, free))  # keyed operations per unkeyed one
    items: list[dict[str, Any]] = []
    for n in range(per_key):
        for key in range(KEYS):
            multi = key % 4 == 0 and n == per_key // 2
            items.append(keyed(key, n, "steps.pay" if multi else "steps.ordered"))
            if len(items) % every == 0:
                items.append(unkeyed(len(items)))
    ids = await publish_in_order(sm, items)
    await until_succeeded(conn, s, ids, 60 + len(ids) * 0.1, workers)

    states = await conn.fetch(f'SELECT state, count(*) FROM "{s}".operations GROUP BY 1')
    assert {r["state"]: r["count"] for r in states} == {"succeeded": len(ids)}
    # Each operation ran once: one attempt per step, nothing lost, retried or refused.
    trails = await conn.fetch(
        "SELECT o.id, o.operation_type, array_agg(a.trigger ORDER BY a.seq) AS triggers, "
        "(SELECT count(*) FROM "
        f'"{x}".runs r WHERE r.operation_id = o.id) AS runs '
        f'FROM "{s}".operations o JOIN "{s}".audit_log a ON a.operation_id = o.id GROUP BY o.id'
    )
    for row in trails:
        expected, handler_runs = EXPECTED[row["operation_type"]]
        assert (tuple(row["triggers"]), row["runs"]) == (expected, handler_runs), dict(row)
    multi_step = sum(1 for row in trails if row["operation_type"] == "steps.pay")
    assert multi_step == KEYS // 4

    timelines = await key_timelines(conn, s, x)
    assert sorted(timelines) == [f"k{key:02}" for key in range(KEYS)]
    for key, ops in timelines.items():
        assert len(ops) == per_key
        assert_one_at_a_time_in_id_order(key, ops)
    # The keys' operations really were spread over the processes (each key hops between them).
    pids = {pid for ops in timelines.values() for row in ops for pid in row["pids"]}
    assert pids <= {p.pid for p in procs}
    assert len(pids) > 1
    hops = sum(
        1
        for ops in timelines.values()
        for earlier, later in itertools.pairwise(ops)
        if earlier["pids"] != later["pids"]
    )
    print(f"{len(ids)} operations, {len(pids)} processes, {hops} hand-overs between processes")
    await settled(conn, s)
    assert [await workers.stop(p) for p in procs] == [0, 0, 0, 0]


async def test_dead_operation_holds_its_successors_until_replayed_then_they_run_in_order(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    steps_schema: str,
) -> None:
    s, x = db_settings.schema_name, steps_schema
    keys, per_key, poisoned = 6, 8, 2
    # The switch lives outside the payload (which is immutable): while the tag is listed the
    # handler raises DoNotRetry.
    await conn.execute(f'INSERT INTO "{x}".fail_switch VALUES ($1)', f"k{poisoned:02}-1")
    procs = await workers.start(conn, 4, n_workers=4, batch_size=8)
    items = [
        # the held key has a three-step operation among its successors
        keyed(key, n, "steps.pay" if (key, n) == (poisoned, 4) else "steps.ordered")
        for n in range(per_key)
        for key in range(keys)
    ]
    ids = await publish_in_order(sm, items)
    by_tag = {item["payload"]["tag"]: op_id for item, op_id in zip(items, ids, strict=True)}
    held_key = [by_tag[f"k{poisoned:02}-{n}"] for n in range(per_key)]
    first, dead, successors = held_key[0], held_key[1], held_key[2:]
    others = [op_id for op_id in ids if op_id not in held_key]

    await until_succeeded(conn, s, [*others, first], 60, workers)
    await wait_for(lambda: count_in(conn, s, [dead], ["dead"]), "the poisoned one to die", 30)
    # Everything else is done; the dead one's successors have not even been claimed, and stay
    # so while the workers keep polling (several poll intervals).
    for _ in range(3):
        pending = await conn.fetch(
            f'SELECT id, state, attempts FROM "{s}".operations WHERE id = ANY($1::bigint[]) '
            "ORDER BY id",
            successors,
        )
        assert [tuple(r) for r in pending] == [(op_id, "pending", 0) for op_id in successors]
        ran = await conn.fetchval(
            f'SELECT count(*) FROM "{x}".runs WHERE operation_id = ANY($1::bigint[])', successors
        )
        assert ran == 0
        await asyncio.sleep(0.5)

    await conn.execute(f'DELETE FROM "{x}".fail_switch')
    async with Admin(db_settings) as admin:
        [result] = await admin.replay([dead], actor="fault-operator", reason="fixed upstream")
    assert (result.ok, result.state_before, result.state) == (True, "dead", "pending"), result
    await until_succeeded(conn, s, ids, 60, workers)

    dead_trail = await conn.fetch(
        f'SELECT trigger, from_state, to_state, actor FROM "{s}".audit_log '
        "WHERE operation_id = $1 ORDER BY seq",
        dead,
    )
    assert [tuple(r)[:3] for r in dead_trail] == [
        ("publish", None, "pending"),
        ("claim", "pending", "claimed"),
        ("give_up", "claimed", "dead"),
        ("replay", "dead", "pending"),
        ("claim", "pending", "claimed"),
        ("succeed", "claimed", "succeeded"),
    ]
    assert dead_trail[3]["actor"] == "fault-operator"
    outcomes = await conn.fetch(
        f'SELECT outcome FROM "{x}".runs WHERE operation_id = $1 ORDER BY id', dead
    )
    assert [r["outcome"] for r in outcomes] == ["do_not_retry", "succeed"]

    timelines = await key_timelines(conn, s, x)
    for key, ops in timelines.items():
        assert [row["id"] for row in ops] == sorted(row["id"] for row in ops)
        assert_one_at_a_time_in_id_order(key, ops)
    # The held key's successors all ran after the replayed attempt ended.
    replayed_end = await conn.fetchval(
        f'SELECT max(ended_at) FROM "{x}".runs WHERE operation_id = $1', dead
    )
    held = {row["id"]: row for row in timelines[f"k{poisoned:02}"]}
    assert all(held[op_id]["started"] >= replayed_end for op_id in successors)
    await settled(conn, s)
    assert [await workers.stop(p) for p in procs] == [0, 0, 0, 0]
