"""The worker's statements run on generic plans, and each generic plan finds its rows by index.

The worker's pool plans each statement once per connection (``plan_cache_mode =
force_generic_plan``, pgoutbox.db.HOT_PATH_SETTINGS): a generic plan knows neither the LIMIT of
a claim nor how many ids a recording passes, so a statement that is right only for some
parameter values or some statistics would be wrong on every run. Here every statement the
worker runs is planned generically over freshly ANALYZEd tables of two shapes, a backlog (all
pending) and a history (mostly finished), and its plan must not scan ``operations`` or
``audit_log`` whole; a statement given ids must look them up through the primary key (not
compare each with every lease of the worker).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

import pgoutbox.worker
from pgoutbox import migrations
from pgoutbox.db import HOT_PATH_SETTINGS, create_pool
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

WORKER = "plan-test-worker"
TOTAL = 10_000  # operations in the table: enough for a whole-table scan to cost what it would
LEASED = 100  # held by WORKER when the plans are made

# Statements the worker runs with a list of ids of operations it holds.
BY_ID = {
    "operations_record_and_claim",
    "operations_record_success",
    "operations_record_failure",
    "operations_record_rejected",
    "operations_extend_leases",
    "operations_release",
}
# When the next operation becomes due: the earliest run_at of every claimable operation of the
# channel, which no index holds in run_at order (operations_claimable orders by priority
# first). It runs only when a claim found less than it asked for, at most once per wake-up or
# poll interval, and scans what it must whatever the plan.
WHOLE_BACKLOG = {"operations_next_run_at"}


def worker_statements() -> list[str]:
    """Every named query the worker's modules run (on its pool)."""
    source = "".join(p.read_text() for p in Path(pgoutbox.worker.__file__).parent.glob("*.py"))
    return sorted(set(re.findall(r"q\[\"(\w+)\"\]", source)))


async def claim_and_record(conn: asyncpg.Connection, schema: str, claim: int, record: list) -> list:
    """Record ``record`` (claimed rows) as succeeded and claim up to ``claim`` more: the rows
    claimed."""
    n = len(record)
    rows = await queries(schema)["operations_record_and_claim"].fetch(
        conn,
        ids=[r["id"] for r in record],
        versions=[r["version"] for r in record],
        to_states=["succeeded"] * n,
        triggers=["succeed"] * n,
        new_steps=[False] * n,
        wait_seconds=[None] * n,
        channel="c",
        operation_types=["plan.test"],
        lifecycles=["default"],
        batch_size=claim,
        worker_id=WORKER,
        lease_seconds=60.0,
    )
    return [r for r in rows if not r["recorded"]]


@pytest.fixture(scope="module", params=["backlog", "history"])
async def shaped(
    request: pytest.FixtureRequest, database_dsn: str
) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A connection (planning generically) and a schema of its own holding TOTAL operations,
    LEASED of them held by WORKER: the rest pending (backlog), or all but a few hundred
    succeeded (history); statistics gathered. Built once per shape for the whole module."""
    settings = DatabaseSettings(dsn=database_dsn, schema=f"plans_{uuid.uuid4().hex[:10]}")
    await migrations.upgrade(settings)
    schema = settings.schema_name
    conn = await asyncpg.connect(**settings.connect_kwargs())
    try:
        await conn.execute(
            f'INSERT INTO "{schema}".operations (operation_type, channel, payload) '
            "SELECT 'plan.test', 'c', '{}' FROM generate_series(1, $1)",
            TOTAL,
        )
        finished = TOTAL - 3 * LEASED if request.param == "history" else 0
        rows: list[asyncpg.Record] = []
        while finished > 0:
            rows = await claim_and_record(conn, schema, min(finished, 2000), rows)
            finished -= len(rows)
        held = await claim_and_record(conn, schema, LEASED, rows)
        assert len(held) == LEASED
        await conn.execute(f'ANALYZE "{schema}".operations, "{schema}".audit_log')
        await conn.execute(f"SET plan_cache_mode = {HOT_PATH_SETTINGS['plan_cache_mode']}")
        yield conn, schema
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def test_the_pool_plans_each_statement_once(db_settings: DatabaseSettings) -> None:
    pool = await create_pool(db_settings)
    try:
        assert await pool.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    finally:
        await pool.close()


def test_the_list_of_worker_statements_is_found() -> None:
    found = set(worker_statements())
    assert found >= BY_ID | WHOLE_BACKLOG | {"operations_rescue_expired"}, found


@pytest.mark.parametrize("name", worker_statements())
async def test_generic_plan_finds_rows_by_index(
    shaped: tuple[asyncpg.Connection, str], name: str
) -> None:
    conn, schema = shaped
    q = queries(schema)[name]
    async with conn.transaction():
        await conn.execute(f"PREPARE stmt AS {q.asyncpg_sql}")
        try:
            # A generic plan is the same whatever the values: NULLs stand for every parameter.
            values = f"({', '.join(['NULL'] * len(q.params))})" if q.params else ""
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE stmt{values}"))
        finally:
            await conn.execute("DEALLOCATE stmt")
    if name not in WHOLE_BACKLOG:
        assert "Seq Scan on operations" not in plan, plan
        # audit_log's partitions of the months ahead are empty, and reading nothing by
        # sequence is what the planner should do there; a month holding rows is read by index.
        for partition in re.findall(r"Seq Scan on (audit_log\w*)", plan):
            assert partition != "audit_log", plan
            rows = await conn.fetchval(f'SELECT count(*) FROM "{schema}".{partition}')
            assert rows == 0, plan
    if name in BY_ID:
        assert "Index Scan using operations_pkey on operations" in plan, plan
