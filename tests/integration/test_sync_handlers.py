"""Plain ``def`` handlers run in the worker's thread pool without blocking its event loop; a
transactional one gets a synchronous guarded Session whose writes commit with the success
transition, or not at all (DESIGN §4.3-4.4, docs/sync.md)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from opkit import audit, operation, publish, wait_for_state, worker_settings
from sqlalchemy import text
from sqlalchemy.orm import Session

from pgoutbox import (
    DatabaseSessionManager,
    DoNotRetry,
    HandlerContext,
    RetryPolicy,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    publish_operation,
)
from pgoutbox.context import SyncGuardedSession

NOT_SOON = RetryPolicy(base_seconds=3600, max_seconds=3600, jitter=0)


@pytest.fixture
def schema(settings: Settings) -> str:
    return settings.database.schema_name


@pytest.fixture
async def app(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The application's own schema: ``orders``, and ``children`` whose foreign key to
    ``parents`` is checked only at commit."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    await conn.execute(f"""
        CREATE SCHEMA {name};
        CREATE TABLE {name}.orders (id int PRIMARY KEY);
        CREATE TABLE {name}.parents (id int PRIMARY KEY);
        CREATE TABLE {name}.children (
            id int PRIMARY KEY,
            parent_id int NOT NULL REFERENCES {name}.parents (id) DEFERRABLE INITIALLY DEFERRED
        );
    """)
    yield name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")


async def test_blocking_def_handlers_run_side_by_side_in_threads_while_the_loop_runs(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    # Both handlers must be inside the barrier at once: with one thread, or run on the event
    # loop, the first would wait for the second for ever (10 s, then BrokenBarrierError).
    both_running = threading.Barrier(2, timeout=10)
    threads: list[str] = []
    router = WorkflowRouter()

    @router.on("report.render")
    def render(ctx: HandlerContext, payload: Any) -> None:
        threads.append(threading.current_thread().name)
        both_running.wait()

    settings = worker_settings(settings, n_workers=2)
    async with WorkflowSystem(router=router, settings=settings):
        ids = [await publish(sm, settings, "report.render", {"n": n}) for n in range(2)]
        for op_id in ids:  # polled from the event loop, which stays free meanwhile
            await wait_for_state(conn, schema, op_id, "succeeded")

    assert len(threads) == 2
    assert all(name.startswith("pgoutbox-handler") for name in threads)


@pytest.mark.parametrize(
    ("error", "state", "trigger"),
    [
        pytest.param(ValueError("smtp down"), "failed", "fail", id="retryable"),
        pytest.param(DoNotRetry("bad address"), "dead", "give_up", id="do-not-retry"),
    ],
)
async def test_a_def_handler_that_raises_records_its_error(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    error: Exception,
    state: str,
    trigger: str,
) -> None:
    router = WorkflowRouter()

    @router.on("email.send", retry=NOT_SOON)
    def send(ctx: HandlerContext, payload: Any) -> None:
        raise error

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "email.send", {})
        row = await wait_for_state(conn, schema, op_id, state)

    assert row["last_error"] == f"{type(error).__name__}: {error}"
    assert [r["trigger"] for r in await audit(conn, schema, op_id)] == [
        "publish",
        "claim",
        trigger,
    ]


async def test_a_def_handler_returning_a_coroutine_fails_saying_to_declare_it_async(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    async def real(ctx: HandlerContext, payload: Any) -> None:
        return None

    router = WorkflowRouter()
    router.on("email.send", max_attempts=1)(lambda ctx, payload: real(ctx, payload))

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "email.send", {})
        row = await wait_for_state(conn, schema, op_id, "dead")

    assert row["last_error"].startswith(
        "SyncHandlerError: the handler of 'email.send' returned coroutine, an awaitable: "
        "declare it `async def`"
    )


async def test_a_transactional_def_handlers_write_commits_with_the_success(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str, app: str
) -> None:
    seen: dict[str, Any] = {}
    router = WorkflowRouter()

    @router.on("order.create", transactional=True)
    def create(ctx: HandlerContext, payload: Any) -> None:
        assert isinstance(ctx.session, SyncGuardedSession)
        seen["unsafe"] = ctx.session.unsafe
        ctx.session.execute(text(f"INSERT INTO {app}.orders VALUES (:id)"), payload)

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "order.create", {"id": 7})
        await wait_for_state(conn, schema, op_id, "succeeded")

    assert isinstance(seen["unsafe"], Session)
    xid = await conn.fetchval(f"SELECT xmin::text FROM {app}.orders WHERE id = 7")
    trail = await audit(conn, schema, op_id)
    assert [(r["trigger"], r["actor"]) for r in trail[1:]] == [
        ("claim", system.worker_id),
        ("succeed", system.worker_id),
    ]
    assert xid == trail[-1]["xid"]  # the same transaction as the success's audit row


@pytest.mark.parametrize(
    "control", ["raise", "failing commit", "commit", "rollback", "close", "begin_nested"]
)
async def test_a_transactional_def_handler_that_fails_keeps_nothing(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
    control: str,
) -> None:
    router = WorkflowRouter()

    @router.on("order.create", transactional=True, max_attempts=1)
    def create(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        ctx.session.execute(text(f"INSERT INTO {app}.orders VALUES (1)"))
        if control == "raise":
            raise RuntimeError("out of stock")
        if control == "failing commit":
            # Accepted now, refused by the deferred foreign key when pgoutbox commits, after
            # the success transition was written in the same transaction.
            ctx.session.execute(text(f"INSERT INTO {app}.children VALUES (1, 404)"))
            return
        getattr(ctx.session, control)()

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "order.create", {})
        row = await wait_for_state(conn, schema, op_id, "dead")

    expected = {
        "raise": "RuntimeError: out of stock",
        "failing commit": "IntegrityError: (psycopg.errors.ForeignKeyViolation)",
    }.get(control, f"SessionControlError: ctx.session.{control}() is not allowed")
    assert row["last_error"].startswith(expected)
    assert await conn.fetchval(f"SELECT count(*) FROM {app}.orders") == 0
    assert await conn.fetchval(f"SELECT count(*) FROM {app}.children") == 0
    assert "succeed" not in [r["trigger"] for r in await audit(conn, schema, op_id)]


async def test_a_transactional_def_handler_that_lost_its_lease_keeps_nothing_and_is_rejected(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str, app: str
) -> None:
    wrote, go_on = threading.Event(), threading.Event()
    router = WorkflowRouter()

    @router.on("order.create", transactional=True)
    def create(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        ctx.session.execute(text(f"INSERT INTO {app}.orders VALUES (1)"))
        wrote.set()
        go_on.wait(30)

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "order.create", {})
        assert await asyncio.to_thread(wrote.wait, 10)
        # What the rescuer does to an expired lease, while the handler's transaction is open.
        await conn.execute(
            f"""UPDATE "{schema}".operations
                SET state = 'failed', transition = 'lose', transition_actor = 'other-worker',
                    transition_detail = 'lease expired', last_error = 'lease expired',
                    version = version + 1, lease_owner = NULL, lease_expires_at = NULL,
                    run_at = now() + interval '1 hour'
                WHERE id = $1 AND state = 'claimed'""",
            op_id,
        )
        go_on.set()
        deadline = asyncio.get_running_loop().time() + 10
        while "reject" not in [r["trigger"] for r in await audit(conn, schema, op_id)]:
            assert asyncio.get_running_loop().time() < deadline, "no reject audited"
            await asyncio.sleep(0.02)

    assert (await operation(conn, schema, op_id))["state"] == "failed"
    assert await conn.fetchval(f"SELECT count(*) FROM {app}.orders") == 0
    trail = await audit(conn, schema, op_id)
    assert (trail[-1]["trigger"], trail[-1]["actor"]) == ("reject", system.worker_id)


@pytest.mark.parametrize("kind", ["async def", "def"])
async def test_a_transactional_handler_publishes_a_follow_up_that_commits_with_its_success(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str, kind: str
) -> None:
    channel = settings.workflow_system.channel
    router = WorkflowRouter()

    if kind == "def":

        @router.on("order.pay", transactional=True)
        def pay(ctx: HandlerContext, payload: Any) -> None:
            publish_operation(ctx.session, "order.ship", payload, channel)

    else:

        @router.on("order.pay", transactional=True)
        async def pay_async(ctx: HandlerContext, payload: Any) -> None:
            await publish_operation(ctx.session, "order.ship", payload, channel)

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "order.pay", {"order": 5})
        await wait_for_state(conn, schema, op_id, "succeeded")

    follow_up = await conn.fetchrow(
        f'SELECT payload, state, xmin::text AS xid FROM "{schema}".operations '
        "WHERE operation_type = 'order.ship'"
    )
    assert follow_up is not None
    assert (follow_up["payload"], follow_up["state"]) == ('{"order": 5}', "pending")
    assert follow_up["xid"] == (await audit(conn, schema, op_id))[-1]["xid"]
