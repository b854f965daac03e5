"""Flow control against a real PostgreSQL: the limited claim, overrides, pauses.

Several "workers" here are flow gates on connections of their own, claiming at the same time
(``asyncio.gather``: their statements interleave in the server as separate workers' would).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgoutbox import Admin, FlowControlError, Limit, WorkflowRouter
from pgoutbox.flow_admin import SCOPES
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries
from pgoutbox.worker.flow_gate import FlowGate

LEASE = 60.0


async def handler(ctx: Any, payload: Any) -> None:
    return None


def gate_for(schema: str, operation_type: str, limit: Limit) -> FlowGate:
    router = WorkflowRouter()
    router.on(operation_type, limit=limit)(handler)
    return FlowGate(queries(schema), schema, "flow", router.handlers(), 0.5)


async def publish_raw(
    conn: asyncpg.Connection, schema: str, operation_type: str, payloads: list[dict[str, Any]]
) -> list[int]:
    rows = await conn.fetch(
        f'INSERT INTO "{schema}".operations (operation_type, channel, payload) '
        "SELECT $1, 'flow', p::jsonb FROM unnest($2::text[]) AS p RETURNING id",
        operation_type,
        [json.dumps(p) for p in payloads],
    )
    return [r["id"] for r in rows]


async def claim(gate: FlowGate, conn: asyncpg.Connection, worker: str, want: int) -> list[Any]:
    rows, _ = await gate.claim(
        conn,
        want=want,
        worker_id=worker,
        lease_seconds=LEASE,
        lifecycles={t: "default" for t in gate.limited_types},
        step_pairs=[],
    )
    return rows


async def finish(conn: asyncpg.Connection, schema: str, rows: list[Any], worker: str) -> None:
    await queries(schema)["operations_record_success"].fetch(
        conn,
        ids=[r["id"] for r in rows],
        versions=[r["version"] for r in rows],
        to_states=["succeeded"] * len(rows),
        triggers=["succeed"] * len(rows),
        new_steps=[False] * len(rows),
        wait_seconds=[None] * len(rows),
        worker_id=worker,
    )


async def leased_per_partition(conn: asyncpg.Connection, schema: str, t: str) -> dict[str, int]:
    rows = await conn.fetch(
        f"SELECT payload->>'m' AS m, count(*) AS n FROM \"{schema}\".operations "
        "WHERE operation_type = $1 AND lease_owner IS NOT NULL GROUP BY 1",
        t,
    )
    return {r["m"]: r["n"] for r in rows}


@pytest.fixture(scope="module")
async def flow_schema(database_dsn: str) -> Any:
    """One migrated schema for the module; each example uses operation types of its own."""
    from pgoutbox import migrations

    settings = DatabaseSettings(dsn=database_dsn, schema=f"flow_{uuid.uuid4().hex[:10]}")
    await migrations.upgrade(settings)
    conns = [await asyncpg.connect(**settings.connect_kwargs()) for _ in range(4)]
    yield settings.schema_name, conns
    for c in conns:
        await c.close()
    admin = await asyncpg.connect(**settings.connect_kwargs())
    await admin.execute(f'DROP SCHEMA "{settings.schema_name}" CASCADE')
    await admin.close()


_examples = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    concurrency=st.integers(1, 3),
    rounds=st.lists(
        st.tuples(
            st.lists(st.integers(1, 4), min_size=1, max_size=3),  # wants of the claiming workers
            st.integers(0, 3),  # how many held operations finish afterwards
        ),
        min_size=1,
        max_size=8,
    ),
)
async def test_no_interleaving_of_claims_from_several_workers_exceeds_a_limit(
    flow_schema: tuple[str, list[asyncpg.Connection]],
    concurrency: int,
    rounds: list[tuple[list[int], int]],
) -> None:
    schema, conns = flow_schema
    n = next(_examples)
    operation_type = f"flow.t{n}"
    limit = Limit(f"flow.l{n}", concurrency=concurrency, partition_by="payload.m")
    await publish_raw(conns[0], schema, operation_type, [{"m": "ab"[i % 2]} for i in range(30)])
    gates = [gate_for(schema, operation_type, limit) for _ in conns[:3]]
    held: list[tuple[int, Any]] = []  # (worker number, row)
    for wants, finishing in rounds:
        claimed = await asyncio.gather(
            *(claim(gates[w], conns[w], f"w{w}", want) for w, want in enumerate(wants))
        )
        for w, rows in enumerate(claimed):
            held += [(w, row) for row in rows]
        per_partition = await leased_per_partition(conns[3], schema, operation_type)
        assert all(k <= concurrency for k in per_partition.values()), per_partition
        for w, row in held[:finishing]:
            await finish(conns[3], schema, [row], f"w{w}")
        held = held[finishing:]
    # Whatever was claimed, each partition reached its limit when enough was asked for.
    if sum(sum(w) for w, _ in rounds) >= 2 * concurrency and not any(f for _, f in rounds):
        assert sorted((await leased_per_partition(conns[3], schema, operation_type)).values()) == [
            concurrency,
            concurrency,
        ]


async def test_an_operator_override_applies_at_the_next_refresh(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    schema = db_settings.schema_name
    gate = gate_for(schema, "flow.x", Limit("flow.x", concurrency=3))
    await gate.refresh(conn)  # declares the limit
    await publish_raw(conn, schema, "flow.x", [{}] * 10)
    async with Admin(db_settings) as admin:
        [info] = await admin.limits()
        assert (info.name, info.concurrency, info.overridden_by) == ("flow.x", 3, None)
        await admin.override_limit("flow.x", concurrency=1, actor="alice", reason="INC-7")
        [info] = await admin.limits()
        assert (info.concurrency, info.overridden_by, info.override_reason) == (1, "alice", "INC-7")
        await gate.refresh(conn)
        assert len(await claim(gate, conn, "w", 5)) == 1
        await admin.override_limit("flow.x", actor="alice", reason="back to normal")
        await gate.refresh(conn)
        assert len(await claim(gate, conn, "w", 5)) == 2  # 3 as declared, 1 held
        with pytest.raises(FlowControlError, match="no limit named 'nope'; declared limits: "):
            await admin.override_limit("nope", concurrency=1, actor="a", reason="r")
        with pytest.raises(FlowControlError, match="invalid concurrency 0"):
            await admin.override_limit("flow.x", concurrency=0, actor="a", reason="r")
    overrides = await conn.fetch(
        f'SELECT concurrency, actor, db_role FROM "{schema}".flow_overrides ORDER BY id'
    )
    assert [tuple(r) for r in overrides] == [(1, "alice", "postgres"), (None, "alice", "postgres")]


async def test_paused_types_and_partitions_are_left_out_of_the_claim(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    schema = db_settings.schema_name
    merchant = Limit("flow.m", concurrency=10, partition_by="payload.m")
    gate = gate_for(schema, "flow.y", merchant)
    await publish_raw(conn, schema, "flow.y", [{"m": m} for m in "aabb"])
    async with Admin(db_settings) as admin:
        await admin.pause("limit", "flow.m", partition="a", actor="alice", reason="review")
        await gate.refresh(conn)
        rows = await claim(gate, conn, "w", 10)
        assert sorted(json.loads(r["payload"])["m"] for r in rows) == ["b", "b"]
        await admin.pause("type", "flow.y", actor="alice", reason="outage")
        await gate.refresh(conn)
        assert gate.paused_types == ["flow.y"]
        assert gate.limited_types == []
        with pytest.raises(FlowControlError, match="is paused already by alice"):
            await admin.pause("type", "flow.y", actor="bob", reason="again")
        await admin.resume("type", "flow.y", actor="bob", reason="fixed")
        await admin.resume("limit", "flow.m", partition="a", actor="bob", reason="ok")
        with pytest.raises(FlowControlError, match="is not paused; nothing changed"):
            await admin.resume("type", "flow.y", actor="bob", reason="again")
        assert await admin.pauses() == []
        await gate.refresh(conn)
        assert len(await claim(gate, conn, "w", 10)) == 2


async def test_stats_and_the_web_console_show_what_is_paused(db_settings: DatabaseSettings) -> None:
    from pgoutbox.web.data import ConsoleData

    async with Admin(db_settings) as admin:
        await admin.pause("channel", "billing", actor="alice", reason="migration")
        await admin.pause("limit", "stripe", partition="acct_1", actor="alice", reason="review")
        assert [p.what for p in (await admin.stats()).pauses] == [
            "channel billing",
            "limit stripe partition acct_1",
        ]
        overview = await ConsoleData(admin).overview()
        assert overview.paused_types == ["channel billing", "limit stripe partition acct_1"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"scope": "queue", "target": "x"}, "invalid scope 'queue': one of channel, type, limit"),
        ({"scope": "type", "target": ""}, "invalid type name ''"),
        ({"scope": "type", "target": "x", "partition": "p"}, "only be paused under a limit"),
        ({"scope": "type", "target": "x", "actor": " "}, "invalid actor ' '"),
        ({"scope": "type", "target": "x", "reason": "a\x00b"}, "invalid reason"),
    ],
)
async def test_a_bad_pause_is_refused_and_nothing_is_written(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, call: dict[str, Any], message: str
) -> None:
    args = {"actor": "alice", "reason": "why", **call}
    async with Admin(db_settings) as admin:
        with pytest.raises(FlowControlError, match=message):
            await admin.pause(**args)
    assert await conn.fetchval(f'SELECT count(*) FROM "{db_settings.schema_name}".flow_pauses') == 0
    assert set(SCOPES) == {"channel", "type", "limit"}


async def test_a_limit_holds_across_every_step_of_a_custom_lifecycle(
    settings: Any, conn: asyncpg.Connection
) -> None:
    """One at a time, whichever step: each step's handler records the instants it runs
    between; no two intervals overlap although both steps have work due."""
    from pgoutbox import DatabaseSessionManager, Lifecycle, WorkflowSystem, publish_many

    two_steps = Lifecycle.define(
        "two_steps",
        states=["charged"],
        transitions=[
            {"trigger": "charge", "source": "claimed", "dest": "charged"},
            {"trigger": "ship", "source": "charged", "dest": "succeeded"},
        ],
    )
    spans: list[tuple[float, float]] = []
    router = WorkflowRouter()

    async def step(trigger: str) -> str:
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.05)
        spans.append((started, asyncio.get_running_loop().time()))
        return trigger

    @router.on("order", lifecycle=two_steps, concurrency=1)
    async def charge(ctx: Any, payload: Any) -> str:
        return await step("charge")

    @router.on("order", step="charged")
    async def ship(ctx: Any, payload: Any) -> str:
        return await step("ship")

    schema = settings.database.schema_name
    sm = DatabaseSessionManager(settings.database)
    try:
        async with WorkflowSystem(router=router, settings=settings):
            async with sm.session() as session:
                ids = await publish_many(
                    session,
                    [
                        {
                            "operation_type": "order",
                            "payload": {},
                            "channel": settings.workflow_system.channel,
                        }
                        for _ in range(6)
                    ],
                )
                await session.commit()
            for _ in range(300):
                done = await conn.fetchval(
                    f'SELECT count(*) FROM "{schema}".operations WHERE id = ANY($1) '
                    "AND state = 'succeeded'",
                    list(ids),
                )
                if done == 6:
                    break
                await asyncio.sleep(0.1)
    finally:
        await sm.close()
    assert done == 6
    assert len(spans) == 12
    ordered = sorted(spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered)), ordered
