"""Multi-step workflows under ``kill -9``: a crash resumes at the last recorded state.

Worker processes run ``pgoutbox worker steps_app:router`` (three steps: claimed --charge-->
charged --send_receipt--> receipted --archive--> succeeded). Each step's side effect is a row
committed through the app's own connection before the step's transition, as an irreversible
external call is. The payload makes one step hang on its first attempt, so the test knows
exactly where the worker is when it kills it:

- between steps: step 1's transition committed, step 2 entered but nothing done outside;
- after step 1's side effect, before its transition, with ``on_lost="dead"`` and ``"retry"``;
- after step 2's side effect with ``on_lost="dead"``, then replayed by an operator.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from steps_app import Worker, Workers, create_tables, router, wait_for

from pgoutbox import Admin, DatabaseSessionManager, publish_operation
from pgoutbox.audit import verify_chains
from pgoutbox.registry import register
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

CHANNEL = "fault_steps"
LEASE_SECONDS = 2.0
RESCUE_WITHIN = 30.0  # lease expiry + a rescue round + a claim, on a loaded 2-core machine


@pytest.fixture
async def steps_schema(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> AsyncIterator[str]:
    """The schema of steps_app's side_effects and runs tables."""
    schema = f"{db_settings.schema_name}_steps"
    await create_tables(conn, schema)
    yield schema
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def workers(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, steps_schema: str, tmp_path: Path
) -> AsyncIterator[Workers]:
    """steps_app worker processes; its lifecycle registered first (as the schema owner, as
    ``pgoutbox lifecycle register`` would). Killed and reaped at teardown."""
    s = db_settings.schema_name
    await register(conn, queries(s), s, router.handlers())
    started = Workers(db_settings, steps_schema, CHANNEL, tmp_path)
    try:
        yield started
    finally:
        await started.close()
        print(started.logs())


# -- helpers ------------------------------------------------------------------------------------


async def publish(
    sm: DatabaseSessionManager, operation_type: str, payload: Any, key: str | None = None
) -> int:
    async with sm.session() as session:
        op_id = await publish_operation(
            session, operation_type, payload, CHANNEL, idempotency_key=key
        )
        await session.commit()
    return op_id


async def operation(conn: asyncpg.Connection, s: str, op_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT state, attempts, step_attempts, lease_owner, lease_expires_at, idempotency_key "
        f'FROM "{s}".operations WHERE id = $1',
        op_id,
    )
    assert row is not None
    return row


async def trail(conn: asyncpg.Connection, s: str, op_id: int) -> list[tuple[Any, ...]]:
    """(trigger, from_state, to_state, attempt, actor) of every audit row after the publish."""
    rows = await conn.fetch(
        "SELECT trigger, from_state, to_state, attempt, actor, detail "
        f'FROM "{s}".audit_log WHERE operation_id = $1 ORDER BY seq',
        op_id,
    )
    assert (rows[0]["trigger"], rows[0]["from_state"], rows[0]["to_state"]) == (
        "publish",
        None,
        "pending",
    )
    return [tuple(row)[:5] for row in rows[1:]]


async def lose_detail(conn: asyncpg.Connection, s: str, op_id: int) -> str:
    detail: str = await conn.fetchval(
        f"SELECT detail FROM \"{s}\".audit_log WHERE operation_id = $1 AND trigger = 'lose'",
        op_id,
    )
    return detail


async def side_effects(conn: asyncpg.Connection, x: str, op_id: int) -> list[tuple[Any, ...]]:
    """(idempotency_key, step, attempt, pid) of every side effect, in the order they happened."""
    rows = await conn.fetch(
        f'SELECT idempotency_key, step, attempt, pid FROM "{x}".side_effects '
        "WHERE operation_id = $1 ORDER BY at",
        op_id,
    )
    return [tuple(row) for row in rows]


async def runs(conn: asyncpg.Connection, x: str, op_id: int) -> list[tuple[Any, ...]]:
    """(step, attempt, pid) of every time a step handler was entered, in order."""
    rows = await conn.fetch(
        f'SELECT step, attempt, pid FROM "{x}".runs WHERE operation_id = $1 ORDER BY id', op_id
    )
    return [tuple(row) for row in rows]


async def state_is(conn: asyncpg.Connection, s: str, op_id: int, state: str) -> bool:
    return (await operation(conn, s, op_id))["state"] == state


async def settled(conn: asyncpg.Connection, s: str) -> None:
    """Nothing leased, every chain verifies."""
    leased = await conn.fetch(
        f'SELECT id, state, lease_owner FROM "{s}".operations '
        "WHERE lease_owner IS NOT NULL OR lease_expires_at IS NOT NULL OR state = 'claimed'"
    )
    assert leased == []
    verification = await verify_chains(conn, s)
    assert verification.ok, str(verification.problem)


async def kill_and_replace(
    workers: Workers, conn: asyncpg.Connection, victim: Worker
) -> tuple[int, Worker]:
    code = await workers.kill(victim)
    [survivor] = await workers.start(conn)
    return code, survivor


async def stays(
    conn: asyncpg.Connection, s: str, x: str, op_id: int, state: str, seconds: float
) -> None:
    """``op_id`` stays in ``state`` with no new handler run for ``seconds``."""
    before = await runs(conn, x, op_id)
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        row = await operation(conn, s, op_id)
        assert (row["state"], row["lease_owner"]) == (state, None)
        assert await runs(conn, x, op_id) == before
        await asyncio.sleep(0.1)


# -- tests --------------------------------------------------------------------------------------


async def test_kill_9_between_steps_resumes_at_the_recorded_state_without_rerunning_step_1(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    steps_schema: str,
) -> None:
    s, x = db_settings.schema_name, steps_schema
    [a] = await workers.start(conn)
    key = f"order-{uuid.uuid4().hex[:8]}"
    op_id = await publish(sm, "steps.pay", {"hang": {"charged": "before_effect"}}, key)

    # Step 1 done outside and recorded; step 2 claimed in place by A and entered, nothing of it
    # done outside yet.
    async def step_2_hanging() -> bool:
        row = await operation(conn, s, op_id)
        return (row["state"], row["lease_owner"]) == ("charged", a.worker_id) and await runs(
            conn, x, op_id
        ) == [("claimed", 1, a.pid), ("charged", 1, a.pid)]

    await wait_for(step_2_hanging, "step 2 to hang on worker A", 30)
    assert await side_effects(conn, x, op_id) == [(f"{key}:claimed", "claimed", 1, a.pid)]

    code, b = await kill_and_replace(workers, conn, a)
    assert code == -signal.SIGKILL
    await wait_for(
        lambda: state_is(conn, s, op_id, "succeeded"), "the resumed steps", RESCUE_WITHIN
    )

    assert await trail(conn, s, op_id) == [
        ("claim", "pending", "claimed", 1, a.worker_id),
        ("charge", "claimed", "charged", 1, a.worker_id),
        ("claim", "charged", "charged", 2, a.worker_id),
        ("lose", "charged", "charged", 2, b.worker_id),  # B's rescuer: lease of A expired
        ("claim", "charged", "charged", 3, b.worker_id),
        ("send_receipt", "charged", "receipted", 3, b.worker_id),
        ("claim", "receipted", "receipted", 4, b.worker_id),
        ("archive", "receipted", "succeeded", 4, b.worker_id),
    ]
    assert a.worker_id in await lose_detail(conn, s, op_id)
    # Step 1 ran once, on A; step 2 entered twice (its second attempt on B); each step's side
    # effect happened once, under '<key>:<step>'.
    assert await runs(conn, x, op_id) == [
        ("claimed", 1, a.pid),
        ("charged", 1, a.pid),
        ("charged", 2, b.pid),
        ("receipted", 1, b.pid),
    ]
    assert await side_effects(conn, x, op_id) == [
        (f"{key}:claimed", "claimed", 1, a.pid),
        (f"{key}:charged", "charged", 2, b.pid),
        (f"{key}:receipted", "receipted", 1, b.pid),
    ]
    row = await operation(conn, s, op_id)
    assert (row["attempts"], row["idempotency_key"]) == (4, key)
    await settled(conn, s)
    assert await workers.stop(b) == 0
    # B unregistered on its graceful stop; A never could.
    assert (
        await conn.fetchval(f'SELECT count(*) FROM "{s}".workers WHERE id = $1', b.worker_id) == 0
    )


async def test_kill_9_after_step_1_side_effect_with_on_lost_dead_is_dead_and_not_rerun(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    steps_schema: str,
) -> None:
    s, x = db_settings.schema_name, steps_schema
    [a] = await workers.start(conn)
    # No idempotency key given: the step's key derives from the operation's default one.
    op_id = await publish(sm, "steps.pay_once", {"hang": {"claimed": "after_effect"}})
    key = f"pgoutbox-{s}-{op_id}:claimed"

    await wait_for(lambda: side_effects(conn, x, op_id), "step 1's side effect", 30)
    assert await side_effects(conn, x, op_id) == [(key, "claimed", 1, a.pid)]
    assert (await operation(conn, s, op_id))["state"] == "claimed"

    code, b = await kill_and_replace(workers, conn, a)
    assert code == -signal.SIGKILL
    await wait_for(lambda: state_is(conn, s, op_id, "dead"), "the rescue to dead", RESCUE_WITHIN)

    assert await trail(conn, s, op_id) == [
        ("claim", "pending", "claimed", 1, a.worker_id),
        ("lose", "claimed", "dead", 1, b.worker_id),
    ]
    detail = await lose_detail(conn, s, op_id)
    assert "on_lost=dead" in detail
    assert a.worker_id in detail
    # Two more lease periods with a live worker on the channel: never rerun.
    await stays(conn, s, x, op_id, "dead", 2 * LEASE_SECONDS)
    assert await runs(conn, x, op_id) == [("claimed", 1, a.pid)]
    assert await side_effects(conn, x, op_id) == [(key, "claimed", 1, a.pid)]
    assert (await operation(conn, s, op_id))["attempts"] == 1
    await settled(conn, s)


async def test_kill_9_after_step_1_side_effect_with_on_lost_retry_reruns_it_under_the_same_key(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    steps_schema: str,
) -> None:
    s, x = db_settings.schema_name, steps_schema
    [a] = await workers.start(conn)
    key = f"order-{uuid.uuid4().hex[:8]}"
    op_id = await publish(sm, "steps.pay", {"hang": {"claimed": "after_effect"}}, key)

    await wait_for(lambda: side_effects(conn, x, op_id), "step 1's side effect", 30)
    code, b = await kill_and_replace(workers, conn, a)
    assert code == -signal.SIGKILL
    await wait_for(lambda: state_is(conn, s, op_id, "succeeded"), "the rerun", RESCUE_WITHIN)

    assert await trail(conn, s, op_id) == [
        ("claim", "pending", "claimed", 1, a.worker_id),
        ("lose", "claimed", "failed", 1, b.worker_id),
        ("claim", "failed", "claimed", 2, b.worker_id),
        ("charge", "claimed", "charged", 2, b.worker_id),
        ("claim", "charged", "charged", 3, b.worker_id),
        ("send_receipt", "charged", "receipted", 3, b.worker_id),
        ("claim", "receipted", "receipted", 4, b.worker_id),
        ("archive", "receipted", "succeeded", 4, b.worker_id),
    ]
    # The interrupted step ran again with the SAME key (a provider deduplicates it); the later
    # steps ran once each.
    assert await side_effects(conn, x, op_id) == [
        (f"{key}:claimed", "claimed", 1, a.pid),
        (f"{key}:claimed", "claimed", 2, b.pid),
        (f"{key}:charged", "charged", 1, b.pid),
        (f"{key}:receipted", "receipted", 1, b.pid),
    ]
    await settled(conn, s)


async def test_kill_9_after_step_2_side_effect_on_lost_dead_then_replay_resumes_at_step_2(
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    steps_schema: str,
) -> None:
    s, x = db_settings.schema_name, steps_schema
    [a] = await workers.start(conn)
    key = f"order-{uuid.uuid4().hex[:8]}"
    op_id = await publish(sm, "steps.pay_once", {"hang": {"charged": "after_effect"}}, key)

    async def step_2_done_outside() -> bool:
        return [e[1] for e in await side_effects(conn, x, op_id)] == ["claimed", "charged"]

    await wait_for(step_2_done_outside, "step 2's side effect", 30)
    code, b = await kill_and_replace(workers, conn, a)
    assert code == -signal.SIGKILL
    await wait_for(lambda: state_is(conn, s, op_id, "dead"), "the rescue to dead", RESCUE_WITHIN)
    await stays(conn, s, x, op_id, "dead", LEASE_SECONDS)

    async with Admin(db_settings) as admin:
        [result] = await admin.replay([op_id], actor="fault-operator", reason="provider checked")
    assert (result.ok, result.state_before, result.state) == (True, "dead", "charged"), result
    await wait_for(lambda: state_is(conn, s, op_id, "succeeded"), "the replay", RESCUE_WITHIN)

    assert await trail(conn, s, op_id) == [
        ("claim", "pending", "claimed", 1, a.worker_id),
        ("charge", "claimed", "charged", 1, a.worker_id),
        ("claim", "charged", "charged", 2, a.worker_id),
        ("lose", "charged", "dead", 2, b.worker_id),
        ("replay", "dead", "charged", 2, "fault-operator"),
        ("claim", "charged", "charged", 3, b.worker_id),
        ("send_receipt", "charged", "receipted", 3, b.worker_id),
        ("claim", "receipted", "receipted", 4, b.worker_id),
        ("archive", "receipted", "succeeded", 4, b.worker_id),
    ]
    # Replay resumed at step 2, never before: step 1 ran once; step 2 ran again under its own
    # unchanged key.
    assert await runs(conn, x, op_id) == [
        ("claimed", 1, a.pid),
        ("charged", 1, a.pid),
        ("charged", 2, b.pid),
        ("receipted", 1, b.pid),
    ]
    assert await side_effects(conn, x, op_id) == [
        (f"{key}:claimed", "claimed", 1, a.pid),
        (f"{key}:charged", "charged", 1, a.pid),
        (f"{key}:charged", "charged", 2, b.pid),
        (f"{key}:receipted", "receipted", 1, b.pid),
    ]
    await settled(conn, s)
