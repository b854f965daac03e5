"""docs/flow-control.md's sections on snoozes, timeouts and cancelling running work: their Python
declares and does what the page says, and the cancel story prints what it shows."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from clikit import run_pgoutbox

from pgoutbox import (
    DatabaseSessionManager,
    HandlerContext,
    Settings,
    Snooze,
    WorkflowRouter,
    WorkflowSystem,
    publish_operation,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "flow-control.md"


def py_blocks() -> list[str]:
    """The examples of these sections (fenced ``py``; the page's others are ``python``)."""
    return re.findall(r"```py\n(.*?)```", DOC.read_text(), re.S)


class Response:
    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code, self.headers = status_code, headers

    def raise_for_status(self) -> None:
        pass


class Gateway:
    """A provider that rate-limits every call and never settles."""

    async def charge(self, payload: Any, idempotency_key: str) -> Response:
        return Response(429, {"Retry-After": "30"})

    async def settled(self, charge_id: str) -> bool:
        return False


async def test_the_snooze_and_timeout_examples_declare_and_do_what_the_page_says() -> None:
    snoozing, timeout = py_blocks()
    namespace: dict[str, Any] = {"gateway": Gateway()}
    exec(compile(snoozing, str(DOC), "exec"), namespace)
    exec(compile(timeout, str(DOC), "exec"), namespace)
    specs = namespace["router"].handlers()

    charge = specs["billing.charge_card"]
    assert (charge.max_attempts, charge.max_snoozes) == (3, 20)
    assert specs["billing.refund"].timeout_seconds == 30
    ctx: Any = type("Ctx", (), {"idempotency_key": "k"})()
    with pytest.raises(Snooze) as snoozed:
        await charge.fn(ctx, {})
    assert (snoozed.value.seconds, snoozed.value.reason) == (30, "gateway 429")
    returned = await specs["billing.poll_settlement"].fn(ctx, {"charge_id": "ch_1"})
    assert isinstance(returned, Snooze)
    assert returned.seconds == 300


async def test_the_cancel_story_prints_what_the_page_shows(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    story = next(
        b for b in re.findall(r"```console\n(.*?)```", DOC.read_text(), re.S) if "INC-77" in b
    )
    command, printed = story.splitlines()[:2]
    router = WorkflowRouter()
    started = asyncio.Event()

    @router.on("billing.ship")
    async def ship(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        await asyncio.sleep(3600)

    db = settings.database
    async with WorkflowSystem(router=router, settings=settings):
        async with sm.session() as session:
            op_id = await publish_operation(
                session, "billing.ship", {}, channel=settings.workflow_system.channel
            )
            await session.commit()
        await asyncio.wait_for(started.wait(), 30)
        args = shlex.split(command.removeprefix("$ ").replace("8812", str(op_id)))[1:]
        result = await run_pgoutbox(*args, dsn=db.dsn or "", schema=db.schema_name)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == printed.replace("8812", str(op_id))
    last = await conn.fetchrow(
        f'SELECT trigger, actor FROM "{db.schema_name}".audit_log WHERE operation_id = $1 '
        "ORDER BY seq DESC LIMIT 1",
        op_id,
    )
    assert tuple(last.values()) == ("abort", "alice")
