"""``pgoutbox demo``: a worker, three operations and their audit trail, on an embedded database.

It shows the whole promise in under a minute: an operation that succeeds, one that fails,
retries with backoff and ends ``dead`` with its error recorded, and one delayed with ``run_at``
-- then one operation's audit trail and the verification of every hash chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pgoutbox.admin import Admin
from pgoutbox.audit import verify
from pgoutbox.cli_errors import visible
from pgoutbox.cli_ops import STATE_STYLE, shorten
from pgoutbox.context import HandlerContext
from pgoutbox.db import DatabaseSessionManager
from pgoutbox.lifecycle import FINISHED_STATES
from pgoutbox.publish import publish_operation
from pgoutbox.router import RetryPolicy, WorkflowRouter
from pgoutbox.settings import DatabaseSettings, Settings, WorkflowSystemSettings
from pgoutbox.worker import WorkflowSystem


def demo_router() -> WorkflowRouter:
    """Three handlers: one that works, one that always fails, one that is merely late."""
    router = WorkflowRouter(prefix="demo")

    @router.on("send_welcome_email")
    async def send_welcome_email(ctx: HandlerContext, payload: dict[str, Any]) -> None:
        await asyncio.sleep(0.3)  # the external call
        ctx.logger.info("sent welcome email to %s", payload["to"])

    @router.on("charge_card", max_attempts=3, retry=RetryPolicy(base_seconds=1, jitter=0))
    async def charge_card(ctx: HandlerContext, payload: dict[str, Any]) -> None:
        await asyncio.sleep(0.2)
        raise ConnectionError(f"payment provider unreachable (attempt {ctx.attempt})")

    @router.on("send_reminder")
    async def send_reminder(ctx: HandlerContext, payload: dict[str, Any]) -> None:
        await asyncio.sleep(0.1)

    return router


@contextlib.contextmanager
def _database(dsn: str | None, console: Console) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from pgoutbox.embedded import start_embedded

    console.print("[bold]Starting an embedded PostgreSQL[/] (no --dsn given)...")
    with start_embedded() as server:
        console.print(f"  {server.backend}: {server.dsn}")
        yield server.dsn


async def run_demo(
    dsn: str | None,
    console: Console | None = None,
    then: Callable[[DatabaseSettings], Awaitable[None]] | None = None,
) -> bool:
    """Run the demo; True when every audit chain verified. ``then`` runs after it, before the
    demo's schema is dropped (``demo --web`` serves the console on it there)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: don't squeeze tables into 80 columns
            console = Console(width=160)
    with _database(dsn, console) as url:
        db = DatabaseSettings(dsn=url, schema_name=f"pgoutbox_demo_{uuid.uuid4().hex[:6]}")
        try:
            verified = await _demo(db, console)
            if then is not None:
                await then(db)
            return verified
        finally:
            conn = await asyncpg.connect(**db.connect_kwargs())
            await conn.execute(f'DROP SCHEMA IF EXISTS "{db.schema_name}" CASCADE')
            await conn.close()


async def _demo(db: DatabaseSettings, console: Console) -> bool:
    settings = Settings(
        database=db,
        workflow_system=WorkflowSystemSettings(
            channel="demo", n_workers=4, poll_interval_seconds=0.5
        ),
    )
    console.print(f"[bold]Migrating[/] schema {db.schema_name} and starting a worker...")
    sm = DatabaseSessionManager(db)
    async with WorkflowSystem(router=demo_router(), settings=settings) as system:
        async with sm.session() as session:
            ids = [
                await publish_operation(
                    session, "demo.send_welcome_email", {"to": "ada@example.com"}, "demo"
                ),
                await publish_operation(
                    session, "demo.charge_card", {"order": 42, "cents": 1999}, "demo"
                ),
                await publish_operation(
                    session,
                    "demo.send_reminder",
                    {"to": "ada@example.com"},
                    "demo",
                    run_at=datetime.now(UTC) + timedelta(seconds=3),
                ),
            ]
            await session.commit()
        console.print(f"Published operations {ids} (the reminder is due in 3 s).\n")
        async with Admin(db) as admin:
            await _watch(admin, console)
            console.print(f"\n[bold]Audit trail of operation {ids[1]}[/] (demo.charge_card):")
            console.print(await _trail(admin, ids[1]))
        console.print(f"worker {system.worker_id} stopping...")
    await sm.close()
    result = await verify(db)
    if result.ok:
        console.print(
            f"[green]audit verify: OK[/] - {result.rows} rows of "
            f"{result.operations} operations, every hash chain holds"
        )
    else:
        console.print(f"[red]audit verify FAILED: {'; '.join(result.failures())}[/]")
    return result.ok


async def _watch(admin: Admin, console: Console) -> None:
    deadline = time.monotonic() + 40
    with Live(console=console, refresh_per_second=10) as live:
        while time.monotonic() < deadline:
            operations = sorted(await admin.list_operations(), key=lambda op: op.id)
            table = Table(title="operations (live)")
            for column in ("id", "type", "state", "attempts", "last error"):
                table.add_column(column)
            for op in operations:
                # Cells from the database as Text: taken literally (an error may look like
                # markup) and with control characters escaped, as in `pgoutbox ops list`.
                table.add_row(
                    str(op.id),
                    Text(visible(op.operation_type)),
                    Text(visible(op.state), style=STATE_STYLE.get(op.state, "")),
                    str(op.attempts),
                    Text(shorten(op.last_error or "", 60)),
                )
            live.update(table)
            if all(op.state in FINISHED_STATES for op in operations):
                return
            await asyncio.sleep(0.1)


async def _trail(admin: Admin, operation_id: int) -> Table:
    table = Table()
    for column in ("seq", "recorded_at", "transition", "from -> to", "attempt"):
        table.add_column(column)
    # A worker id (hostname:pid:key fingerprint) is folded onto a second line rather than take
    # the width of the detail.
    table.add_column("actor", overflow="fold", max_width=20)
    table.add_column("detail")
    for row in (await admin.get_operation(operation_id)).audit:
        table.add_row(
            str(row.seq),
            row.recorded_at.strftime("%H:%M:%S.%f")[:-3],
            Text(visible(row.trigger)),
            Text(visible(f"{row.from_state or '-'} -> {row.to_state}")),
            str(row.attempt),
            Text(visible(row.actor)),
            Text(shorten(row.detail or "", 50)),
        )
    return table
