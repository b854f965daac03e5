"""Transactional handlers (DESIGN §4.4): the handler's writes and the success transition commit in
one transaction, or neither does; the handler cannot control that transaction."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from opkit import audit, operation, publish, wait_for_state
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pgoutbox import (
    DatabaseSessionManager,
    DoNotRetry,
    GuardedSession,
    HandlerContext,
    RetryPolicy,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
)

# A failed attempt stays `failed` for the whole test instead of being retried at once.
NOT_SOON = RetryPolicy(base_seconds=3600, max_seconds=3600, jitter=0)


# -- helpers -----------------------------------------------------------------------------------


async def wait_for_trigger(
    conn: asyncpg.Connection, schema: str, op_id: int, trigger: str, within: float = 10
) -> asyncpg.Record:
    """Poll the audit log until the operation has a row with ``trigger``."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        for row in await audit(conn, schema, op_id):
            if row["trigger"] == trigger:
                return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no {trigger!r} audit row for operation {op_id}")
        await asyncio.sleep(0.02)


@pytest.fixture
def schema(settings: Settings) -> str:
    return settings.database.schema_name


@pytest.fixture
async def app(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The application's own schema (apart from pgoutbox's): ``orders``, and ``children``
    whose foreign key to ``parents`` is checked only at commit."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    await conn.execute(f"""
        CREATE SCHEMA {name};
        CREATE TABLE {name}.orders (id integer PRIMARY KEY, note text NOT NULL);
        CREATE TABLE {name}.parents (id integer PRIMARY KEY);
        CREATE TABLE {name}.children (
            id integer PRIMARY KEY,
            parent_id integer NOT NULL
                REFERENCES {name}.parents (id) DEFERRABLE INITIALLY DEFERRED
        );
    """)
    yield name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")


# -- one transaction ---------------------------------------------------------------------------


async def test_the_handlers_write_and_the_success_commit_in_one_transaction(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
) -> None:
    router = WorkflowRouter()

    @router.on("order.create", transactional=True)
    async def create(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        await ctx.session.execute(
            text(f"INSERT INTO {app}.orders (id, note) VALUES (:id, :note)"), payload
        )

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "order.create", {"id": 7, "note": "hello"})
        await wait_for_state(conn, schema, op_id, "succeeded")

    order = await conn.fetchrow(f"SELECT note, xmin::text AS xid FROM {app}.orders WHERE id = 7")
    assert order is not None
    assert order["note"] == "hello"
    trail = await audit(conn, schema, op_id)
    assert [(r["trigger"], r["actor"]) for r in trail] == [
        ("publish", await conn.fetchval("SELECT current_user")),
        ("claim", system.worker_id),
        ("succeed", system.worker_id),
    ]
    # Written by the very same transaction as the success's audit row.
    assert order["xid"] == trail[-1]["xid"]


@pytest.mark.parametrize(
    ("error", "state", "trigger"),
    [
        pytest.param(ValueError("out of stock"), "failed", "fail", id="retryable"),
        pytest.param(DoNotRetry("order cancelled"), "dead", "give_up", id="do-not-retry"),
    ],
)
async def test_a_handler_that_raises_after_writing_keeps_neither_its_write_nor_a_success(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
    error: Exception,
    state: str,
    trigger: str,
) -> None:
    router = WorkflowRouter()

    @router.on("order.create", transactional=True, retry=NOT_SOON)
    async def create(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        await ctx.session.execute(text(f"INSERT INTO {app}.orders VALUES (1, 'written')"))
        raise error

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "order.create", {})
        row = await wait_for_state(conn, schema, op_id, state)

    assert row["last_error"] == f"{type(error).__name__}: {error}"
    assert await conn.fetchval(f"SELECT count(*) FROM {app}.orders") == 0
    assert [r["trigger"] for r in await audit(conn, schema, op_id)] == [
        "publish",
        "claim",
        trigger,
    ]


async def test_a_failing_commit_records_a_failure_and_keeps_nothing_of_the_handler(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
) -> None:
    handler_returned = asyncio.Event()
    router = WorkflowRouter()

    @router.on("child.create", transactional=True, retry=NOT_SOON)
    async def create(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        # Accepted now; the deferred foreign key refuses it only when the dispatcher commits,
        # after the success transition was written in the same transaction.
        await ctx.session.execute(text(f"INSERT INTO {app}.children VALUES (1, 404)"))
        handler_returned.set()

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "child.create", {})
        row = await wait_for_state(conn, schema, op_id, "failed")

    assert handler_returned.is_set()
    assert row["attempts"] == 1
    assert "ForeignKeyViolationError" in row["last_error"]
    assert await conn.fetchval(f"SELECT count(*) FROM {app}.children") == 0
    trail = await audit(conn, schema, op_id)
    assert [r["trigger"] for r in trail] == ["publish", "claim", "fail"]
    assert "violates foreign key constraint" in trail[-1]["detail"]
    assert trail[-1]["detail"].startswith("attempt 1 of 5: IntegrityError: ")


# -- the guarded session -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["commit", "rollback", "close", "begin", "begin_nested"])
async def test_transaction_control_from_a_handler_is_refused_and_the_operation_does_not_succeed(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
    method: str,
) -> None:
    router = WorkflowRouter()

    @router.on("order.create", transactional=True, max_attempts=1)
    async def create(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        await ctx.session.execute(text(f"INSERT INTO {app}.orders VALUES (1, 'written')"))
        result = getattr(ctx.session, method)()
        if inspect.isawaitable(result):
            await result

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "order.create", {})
        row = await wait_for_state(conn, schema, op_id, "dead")

    assert row["last_error"].startswith(
        f"SessionControlError: ctx.session.{method}() is not allowed: pgoutbox commits the "
        "handler's writes together with the operation's success"
    )
    assert "use ctx.session.unsafe only if you accept losing that guarantee" in row["last_error"]
    assert await conn.fetchval(f"SELECT count(*) FROM {app}.orders") == 0
    assert "succeed" not in [r["trigger"] for r in await audit(conn, schema, op_id)]


async def test_the_handler_session_is_guarded_and_unsafe_is_the_raw_async_session(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    seen: dict[str, Any] = {}
    router = WorkflowRouter()

    @router.on("inspect", transactional=True)
    async def inspect_session(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        seen["session"] = ctx.session
        seen["unsafe"] = ctx.session.unsafe
        seen["in_transaction"] = ctx.session.unsafe.in_transaction()
        # Everything else is passed through to the real session.
        seen["one"] = (await ctx.session.execute(text("SELECT 1"))).scalar_one()

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "inspect", {})
        await wait_for_state(conn, schema, op_id, "succeeded")

    assert isinstance(seen["session"], GuardedSession)
    assert isinstance(seen["unsafe"], AsyncSession)
    assert seen["in_transaction"] is True
    assert seen["one"] == 1


# -- fencing -----------------------------------------------------------------------------------


async def test_a_lease_lost_before_commit_rolls_back_the_handler_and_is_audited_as_rejected(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
) -> None:
    wrote, go_on = asyncio.Event(), asyncio.Event()
    router = WorkflowRouter()

    @router.on("order.create", transactional=True)
    async def create(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        await ctx.session.execute(text(f"INSERT INTO {app}.orders VALUES (1, 'zombie')"))
        wrote.set()
        await go_on.wait()

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "order.create", {})
        await asyncio.wait_for(wrote.wait(), 10)
        # What the rescuer does to an expired lease, from another connection, while the
        # handler's transaction is still open. run_at is pushed out so nobody retries it here.
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
        reject = await wait_for_trigger(conn, schema, op_id, "reject")

    row = await operation(conn, schema, op_id)
    assert (row["state"], row["last_error"]) == ("failed", "lease expired")
    assert await conn.fetchval(f"SELECT count(*) FROM {app}.orders") == 0
    trail = await audit(conn, schema, op_id)
    assert [(r["trigger"], r["from_state"], r["to_state"], r["actor"]) for r in trail] == [
        ("publish", None, "pending", await conn.fetchval("SELECT current_user")),
        ("claim", "pending", "claimed", system.worker_id),
        ("lose", "claimed", "failed", "other-worker"),
        ("reject", "failed", "failed", system.worker_id),
    ]
    assert reject["detail"] == (
        f"attempt 1 by {system.worker_id} refused: lease lost before its transaction "
        "committed; nothing of it was kept"
    )
