"""Background services (DESIGN §4.5, §4.7): the rescuer, the heartbeat and the listener, driven
through ``run_once()`` rather than by waiting for their tickers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from opkit import audit, operation, publish, wait_for_state, worker_settings

from pgoutbox import (
    DatabaseSessionManager,
    HandlerContext,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
)
from pgoutbox.db import create_pool
from pgoutbox.sql import Query, queries
from pgoutbox.worker.dispatcher import NOTHING_RECORDED
from pgoutbox.worker.services import Heartbeat, Listener, ListenerResult, Rescuer, RescueResult

CRASHED = "crashed-worker"
RESCUER = "rescuer-under-test"


# -- helpers -----------------------------------------------------------------------------------


async def eventually(check: Any, what: str, within: float = 10) -> None:
    """Poll the async predicate ``check`` until it holds, for at most ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


def default_lifecycle_only(types: list[str]) -> dict[str, Any]:
    """The claim's arguments saying every one of ``types`` runs the default lifecycle (and
    that the statement records nothing)."""
    return {"lifecycles": ["default"] * len(types), **NOTHING_RECORDED}


# The record-success arguments of one operation whose (default-lifecycle) step succeeded.
SUCCEEDED_ONE = {
    "to_states": ["succeeded"],
    "triggers": ["succeed"],
    "new_steps": [False],
    "wait_seconds": [None],
}


async def claim(
    conn: asyncpg.Connection, q: dict[str, Query], settings: Settings, types: list[str]
) -> list[asyncpg.Record]:
    """Claim with the worker's own statement as a worker that then crashes: its lease is
    already over."""
    return await q["operations_record_and_claim"].fetch(
        conn,
        channel=settings.workflow_system.channel,
        operation_types=types,
        **default_lifecycle_only(types),
        batch_size=100,
        worker_id=CRASHED,
        lease_seconds=-1,
    )


@pytest.fixture
def schema(settings: Settings) -> str:
    return settings.database.schema_name


@pytest.fixture
def q(schema: str) -> dict[str, Query]:
    return queries(schema)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings.database, max_size=4)
    yield pool
    await pool.close()


def rescuer_for(
    router: WorkflowRouter, pool: asyncpg.Pool, q: dict[str, Query], settings: Settings
) -> Rescuer:
    """A rescuer that is never started: each round is one explicit ``run_once()``."""
    return Rescuer(
        pool, q, RESCUER, settings.workflow_system.channel, router.handlers(), interval=3600
    )


async def _noop(ctx: HandlerContext, payload: Any) -> None:
    return None


def policy_router() -> WorkflowRouter:
    router = WorkflowRouter()
    router.on("job.retry")(_noop)
    router.on("job.dead", on_lost="dead")(_noop)
    router.on("job.last", max_attempts=1)(_noop)
    return router


# -- rescuer -----------------------------------------------------------------------------------


async def test_the_rescuer_fails_an_expired_lease_for_retry_and_audits_why(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    q: dict[str, Query],
    schema: str,
) -> None:
    op_id = await publish(sm, settings, "job.retry")
    [claimed] = await claim(conn, q, settings, ["job.retry"])
    rescuer = rescuer_for(policy_router(), pool, q, settings)

    assert await rescuer.run_once() == RescueResult(retried=1, dead=0)

    row = await operation(conn, schema, op_id)
    assert (row["state"], row["attempts"], row["lease_owner"], row["lease_expires_at"]) == (
        "failed",
        1,
        None,
        None,
    )
    assert row["version"] == claimed["version"] + 1
    assert row["last_error"] == f"lease expired: worker {CRASHED} was lost"
    # Retried at once: due now (database time).
    assert row["run_at"] <= await conn.fetchval("SELECT now()")
    last = (await audit(conn, schema, op_id))[-1]
    assert (last["from_state"], last["to_state"], last["trigger"], last["actor"]) == (
        "claimed",
        "failed",
        "lose",
        RESCUER,
    )
    assert last["detail"].startswith(f"lease of {CRASHED} expired at ")
    assert "on_lost=dead" not in last["detail"]
    # Nothing left to do on the next round.
    assert await rescuer.run_once() == RescueResult(retried=0, dead=0)


async def test_the_rescuer_wakes_the_dispatcher_for_retries_and_forgets_silent_workers(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    q: dict[str, Query],
    schema: str,
) -> None:
    await publish(sm, settings, "job.retry")
    await claim(conn, q, settings, ["job.retry"])
    woken: list[bool] = []
    await conn.execute(
        f"""INSERT INTO "{schema}".workers (id, hostname, pid, channel, operation_types,
                                            heartbeat_at)
            VALUES ('gone', 'h', 1, 'c', '{{job.retry}}', now() - interval '1 hour'),
                   ('alive', 'h', 2, 'c', '{{job.retry}}', now())"""
    )
    rescuer = Rescuer(
        pool,
        q,
        RESCUER,
        settings.workflow_system.channel,
        policy_router().handlers(),
        interval=3600,
        on_rescued=lambda: woken.append(True),
        stale_worker_seconds=600,
    )

    assert await rescuer.run_once() == RescueResult(retried=1, dead=0, workers_pruned=1)

    assert woken == [True]
    assert [r["id"] for r in await conn.fetch(f'SELECT id FROM "{schema}".workers')] == ["alive"]


async def test_the_rescuer_sends_an_on_lost_dead_operation_to_dead_with_the_reason(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    q: dict[str, Query],
    schema: str,
) -> None:
    op_id = await publish(sm, settings, "job.dead")
    await claim(conn, q, settings, ["job.dead"])

    assert await rescuer_for(policy_router(), pool, q, settings).run_once() == RescueResult(0, 1)

    row = await operation(conn, schema, op_id)
    assert (row["state"], row["last_error"]) == (
        "dead",
        f"lease expired: worker {CRASHED} was lost",
    )
    last = (await audit(conn, schema, op_id))[-1]
    assert (last["to_state"], last["trigger"], last["actor"]) == ("dead", "lose", RESCUER)
    assert last["detail"].endswith("; on_lost=dead: the handler may have run, not retried")


async def test_the_rescuer_sends_an_operation_with_no_attempts_left_to_dead(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    q: dict[str, Query],
    schema: str,
) -> None:
    handler_limit = await publish(sm, settings, "job.last")
    publish_limit = await publish(sm, settings, "job.retry", max_attempts=1)
    await claim(conn, q, settings, ["job.last", "job.retry"])

    assert await rescuer_for(policy_router(), pool, q, settings).run_once() == RescueResult(0, 2)
    for op_id in (handler_limit, publish_limit):
        assert (await operation(conn, schema, op_id))["state"] == "dead"


async def test_the_rescuer_leaves_live_leases_other_channels_and_unhandled_types_alone(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    q: dict[str, Query],
    schema: str,
) -> None:
    live = await publish(sm, settings, "job.retry")
    await q["operations_record_and_claim"].fetch(
        conn,
        channel=settings.workflow_system.channel,
        operation_types=["job.retry"],
        **default_lifecycle_only(["job.retry"]),
        batch_size=1,
        worker_id="alive-worker",
        lease_seconds=300,
    )
    unhandled = await publish(sm, settings, "job.unknown")
    await claim(conn, q, settings, ["job.unknown"])
    elsewhere = await publish(sm, settings, "job.retry", channel="another_channel")
    other = settings.model_copy(
        update={
            "workflow_system": settings.workflow_system.model_copy(
                update={"channel": "another_channel"}
            )
        }
    )
    await claim(conn, q, other, ["job.retry"])

    assert await rescuer_for(policy_router(), pool, q, settings).run_once() == RescueResult(0, 0)
    for op_id in (live, unhandled, elsewhere):
        assert (await operation(conn, schema, op_id))["state"] == "claimed"


async def test_a_rescue_racing_a_success_skips_the_locked_row_and_never_undoes_the_success(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    q: dict[str, Query],
    schema: str,
) -> None:
    op_id = await publish(sm, settings, "job.retry")
    [claimed] = await claim(conn, q, settings, ["job.retry"])
    rescuer = rescuer_for(policy_router(), pool, q, settings)
    record_success = q["operations_record_success"]

    # The worker records its success (late: its lease is already over) but has not committed.
    transaction = conn.transaction()
    await transaction.start()
    try:
        recorded = await conn.fetch(
            record_success.asyncpg_sql,
            *record_success.args(
                ids=[op_id], versions=[claimed["version"]], worker_id=CRASHED, **SUCCEEDED_ONE
            ),
        )
        assert [r["id"] for r in recorded] == [op_id]
        # Meanwhile the rescuer sees an expired lease on a row it cannot lock: it skips it.
        assert await asyncio.wait_for(rescuer.run_once(), 10) == RescueResult(0, 0)
    finally:
        await transaction.commit()

    assert await rescuer.run_once() == RescueResult(0, 0)
    assert (await operation(conn, schema, op_id))["state"] == "succeeded"
    assert [r["trigger"] for r in await audit(conn, schema, op_id)] == [
        "publish",
        "claim",
        "succeed",
    ]


async def test_a_success_arriving_after_the_rescue_matches_nothing(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    database_dsn: str,
    pool: asyncpg.Pool,
    q: dict[str, Query],
    schema: str,
) -> None:
    op_id = await publish(sm, settings, "job.retry")
    [claimed] = await claim(conn, q, settings, ["job.retry"])
    record_success = q["operations_record_success"]
    success_args = record_success.args(
        ids=[op_id], versions=[claimed["version"]], worker_id=CRASHED, **SUCCEEDED_ONE
    )
    rescue = q["operations_rescue_expired"]
    router = policy_router()
    worker = await asyncpg.connect(database_dsn)
    try:
        # The rescue holds the row (uncommitted) when the worker's success arrives: the
        # success waits for the lock, then re-checks its fence against the rescued row.
        transaction = conn.transaction()
        await transaction.start()
        rescued = await conn.fetch(
            rescue.asyncpg_sql,
            *rescue.args(
                operation_types=list(router.handlers()),
                steps=["claimed"] * len(router.handlers()),
                on_lost_dead=[s.on_lost == "dead" for s in router.handlers().values()],
                max_attempts=[s.max_attempts for s in router.handlers().values()],
                channel=settings.workflow_system.channel,
                limit=10,
                worker_id=RESCUER,
            ),
        )
        assert [(r["id"], r["state"]) for r in rescued] == [(op_id, "failed")]
        late = asyncio.create_task(worker.fetch(record_success.asyncpg_sql, *success_args))
        worker_pid = worker.get_server_pid()

        async def success_is_waiting_for_the_lock() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    worker_pid,
                )
            )

        try:
            await eventually(success_is_waiting_for_the_lock, "the late success waits")
        finally:
            await transaction.commit()
        assert await asyncio.wait_for(late, 10) == []
        # And again, now that nothing is in the way.
        assert await worker.fetch(record_success.asyncpg_sql, *success_args) == []
    finally:
        await worker.close()

    row = await operation(conn, schema, op_id)
    assert (row["state"], row["version"]) == ("failed", claimed["version"] + 1)
    assert [r["trigger"] for r in await audit(conn, schema, op_id)] == [
        "publish",
        "claim",
        "lose",
    ]


# -- heartbeat ---------------------------------------------------------------------------------


async def test_the_heartbeat_extends_held_leases_and_reports_those_no_longer_held(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    router = WorkflowRouter()

    @router.on("held")
    async def held(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        await release.wait()

    async with WorkflowSystem(router=router, settings=settings) as system:
        heartbeat = system.services["heartbeat"]
        assert isinstance(heartbeat, Heartbeat)
        op_id = await publish(sm, settings, "held")
        await asyncio.wait_for(started.wait(), 10)
        before = await operation(conn, schema, op_id)
        alive_before = await conn.fetchval(
            f'SELECT heartbeat_at FROM "{schema}".workers WHERE id = $1', system.worker_id
        )

        result = await heartbeat.run_once()

        assert (result.extended, result.not_extended) == (1, ())
        after = await operation(conn, schema, op_id)
        assert after["lease_expires_at"] > before["lease_expires_at"]
        assert (after["state"], after["version"]) == ("claimed", before["version"])
        alive_after = await conn.fetchval(
            f'SELECT heartbeat_at FROM "{schema}".workers WHERE id = $1', system.worker_id
        )
        assert alive_after > alive_before

        # Someone else moves the operation on (a newer version): the heartbeat notices.
        await conn.execute(
            f"""UPDATE "{schema}".operations
                SET state = 'dead', transition = 'lose', transition_actor = 'operator',
                    version = version + 1, lease_owner = NULL, lease_expires_at = NULL
                WHERE id = $1""",
            op_id,
        )
        lost = await heartbeat.run_once()
        assert (lost.extended, lost.not_extended) == (0, (op_id,))
        assert (await operation(conn, schema, op_id))["lease_expires_at"] is None

        release.set()

        async def rejected() -> bool:
            return "reject" in [r["trigger"] for r in await audit(conn, schema, op_id)]

        await eventually(rejected, "the late success is audited as rejected")
    # The late success changed nothing.
    assert (await operation(conn, schema, op_id))["state"] == "dead"


# -- listener ----------------------------------------------------------------------------------


async def test_operations_run_promptly_after_the_listener_connection_is_killed(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()
    router.on("ping")(_noop)
    # A 30 s poll: only LISTEN (or catching up after a reconnect) can run these within 5 s.
    slow_poll = worker_settings(settings, poll_interval_seconds=30)
    async with WorkflowSystem(router=router, settings=slow_poll) as system:
        listener = system.services["listener"]
        assert isinstance(listener, Listener)

        first = await publish(sm, settings, "ping")
        await wait_for_state(conn, schema, first, "succeeded", within=5)

        old_pid = listener.backend_pid
        assert old_pid is not None
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)

        async def reconnected() -> bool:
            return listener.backend_pid not in (None, old_pid)

        await eventually(reconnected, "the listener reconnected by itself")

        second = await publish(sm, settings, "ping")
        await wait_for_state(conn, schema, second, "succeeded", within=5)


async def test_listener_run_once_reconnects_a_dropped_connection_and_keeps_notifying(
    settings: Settings, conn: asyncpg.Connection, database_dsn: str
) -> None:
    channel = settings.workflow_system.channel
    notified = asyncio.Event()
    listener = Listener(settings.database, channel, notified.set, interval=3600)
    try:
        assert await listener.run_once() == ListenerResult(connected=True, reconnected=True)
        assert await listener.run_once() == ListenerResult(connected=True, reconnected=False)
        notified.clear()  # connecting calls on_notify once, to catch up on what it missed
        await conn.execute("SELECT pg_notify($1, '1')", channel)
        await asyncio.wait_for(notified.wait(), 10)

        old_pid = listener.backend_pid
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)

        async def gone() -> bool:
            return not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", old_pid
            )

        await eventually(gone, f"backend {old_pid} exited")

        notified.clear()
        assert await listener.run_once() == ListenerResult(connected=True, reconnected=True)
        assert listener.backend_pid not in (None, old_pid)
        assert notified.is_set(), "a reconnect must wake the dispatcher (notifications were lost)"

        notified.clear()
        await conn.execute("SELECT pg_notify($1, '2')", channel)
        await asyncio.wait_for(notified.wait(), 10)
    finally:
        await listener.stop()
    assert listener.backend_pid is None


async def test_a_listener_stopped_while_it_subscribes_leaves_no_connection_behind(
    settings: Settings, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A WorkflowSystem stopped right after start() can cancel the listener between connecting
    # and LISTEN. The client-side wait below widens that window (the server is real).
    real_add_listener = asyncpg.Connection.add_listener

    async def slow_add_listener(self: asyncpg.Connection, *args: Any) -> None:
        await asyncio.sleep(0.3)
        await real_add_listener(self, *args)

    monkeypatch.setattr(asyncpg.Connection, "add_listener", slow_add_listener)
    name = f"pgoutbox-listener-{uuid.uuid4().hex[:8]}"
    database = settings.database.model_copy(update={"application_name": name})
    listener = Listener(database, settings.workflow_system.channel, lambda: None, interval=3600)

    async def open_connections() -> int:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
        )
        return count

    async def connected() -> bool:
        return await open_connections() == 1

    round_ = asyncio.create_task(listener.run_once())
    await eventually(connected, "the listener's connection is open")
    round_.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await round_
    await listener.stop()

    async def none_left() -> bool:
        return await open_connections() == 0

    await eventually(none_left, f"the connection of {name} closed")
