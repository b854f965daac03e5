"""A plain ``def`` handler runs in a thread, and a thread cannot be interrupted: an operator's
cancel or the worker stopping while it runs must not record a cancel or a release while it may
still act outside. The worker waits for it and records what it did; ``timeout=`` is refused."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import asyncpg
import pytest
from opkit import publish, wait_for_state

from pgoutbox import (
    Admin,
    DatabaseSessionManager,
    HandlerContext,
    RouterError,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
)


def test_a_timeout_on_a_def_handler_is_refused_at_registration() -> None:
    router = WorkflowRouter()
    with pytest.raises(RouterError, match="timeout= needs an `async def` handler"):

        @router.on("report.render", timeout=5)
        def render(ctx: HandlerContext, payload: Any) -> None:
            return None

    assert router.handlers() == {}


async def test_an_operators_cancel_of_a_running_def_handler_leaves_its_real_outcome(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    schema = settings.database.schema_name
    started, release = threading.Event(), threading.Event()
    finished: list[int] = []
    router = WorkflowRouter()

    @router.on("report.render")
    def render(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        release.wait(30)
        finished.append(ctx.operation_id)

    async with WorkflowSystem(router=router, settings=settings), Admin(settings.database) as admin:
        op_id = await publish(sm, settings, "report.render", {})
        assert await asyncio.to_thread(started.wait, 30)
        cancelling = asyncio.create_task(
            admin.cancel([op_id], actor="alice", reason="too slow", wait_seconds=30)
        )
        # The request reaches the worker, which cannot stop the thread: the handler goes on.
        await asyncio.sleep(1.0)
        assert not cancelling.done()
        release.set()
        [result] = await cancelling
        row = await wait_for_state(conn, schema, op_id, "succeeded")
    assert finished == [op_id]  # it ran to its end, once
    assert not result.ok
    assert "finished first" in result.message
    assert row["state"] == "succeeded"
    triggers = [
        r["trigger"]
        for r in await conn.fetch(
            f'SELECT trigger FROM "{schema}".audit_log WHERE operation_id = $1 ORDER BY seq',
            op_id,
        )
    ]
    assert triggers == ["publish", "claim", "succeed"]


async def test_a_worker_stopping_while_a_def_handler_runs_records_what_it_did(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    schema = settings.database.schema_name
    started, release = threading.Event(), threading.Event()
    router = WorkflowRouter()

    @router.on("report.render")
    def render(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        release.wait(30)

    short_grace = settings.model_copy(
        update={
            "workflow_system": settings.workflow_system.model_copy(
                update={"shutdown_timeout_seconds": 0.2}
            )
        }
    )
    system = WorkflowSystem(router=router, settings=short_grace)
    await system.start()
    op_id = await publish(sm, settings, "report.render", {})
    assert await asyncio.to_thread(started.wait, 30)
    stopping = asyncio.create_task(system.stop())
    await asyncio.sleep(1.0)  # well past the grace period: the thread still runs
    release.set()
    await asyncio.wait_for(stopping, 30)
    row = await wait_for_state(conn, schema, op_id, "succeeded")
    assert row["state"] == "succeeded"  # not released to run again: it ran
