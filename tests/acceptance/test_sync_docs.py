"""docs/sync.md's code, run as written (its blocks in order, in one namespace, on a fresh
database), then a worker on the page's router; and docs/django.md's code, each block found in
the example project it quotes."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgoutbox import Settings, WorkflowSystem, migrations
from pgoutbox.settings import DatabaseSettings, parse_dsn

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((REPO / "docs" / page).read_text())


@pytest.fixture
async def fresh_dsn(server_dsn: str) -> AsyncIterator[str]:
    name = f"sync_docs_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        fields = DatabaseSettings(**{**parse_dsn(server_dsn), "database": name})
        user = fields.user + (f":{fields.password}" if fields.password else "")
        yield f"postgresql://{user}@/{name}?host={fields.host}&port={fields.port}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_sync_page_publishes_as_it_says_and_its_def_handlers_run(fresh_dsn: str) -> None:
    conn = await asyncpg.connect(fresh_dsn)
    await conn.execute("CREATE TABLE sync_docs_orders (id int PRIMARY KEY, charged bool)")
    await migrations.upgrade(DatabaseSettings(dsn=fresh_dsn))
    sent: list[Any] = []
    namespace: dict[str, Any] = {
        "DSN": fresh_dsn,
        "smtp_send": lambda payload, idempotency_key: sent.append((payload, idempotency_key)),
    }
    blocks = python_blocks("sync.md")
    assert len(blocks) == 3
    try:
        for block in blocks:
            exec(compile(block, "docs/sync.md", "exec"), namespace)
        namespace["sessions"].close()

        published = await conn.fetch(
            "SELECT id, operation_type, payload->>'order' AS o FROM pgoutbox.operations ORDER BY id"
        )
        assert [(r["operation_type"], r["o"]) for r in published] == [
            ("billing.charge", "42"),
            ("billing.charge", "43"),
            ("email.receipt", "43"),
        ]
        assert published[0]["id"] == namespace["op_id"]
        assert [r["id"] for r in published[1:]] == namespace["ids"]

        settings = Settings(database={"dsn": fresh_dsn}, workflow_system={"channel": "workflow"})
        async with WorkflowSystem(router=namespace["router"], settings=settings):
            deadline = asyncio.get_running_loop().time() + 30
            query = "SELECT count(*) FROM pgoutbox.operations WHERE state <> 'succeeded'"
            while await conn.fetchval(query):
                assert asyncio.get_running_loop().time() < deadline, "not handled"
                await asyncio.sleep(0.05)
        charged = await conn.fetch("SELECT id, charged FROM sync_docs_orders ORDER BY id")
        assert [tuple(r) for r in charged] == [(42, True), (43, True)]
        assert [payload["order"] for payload, _ in sent] == [43]
    finally:
        await conn.close()


def test_django_page_quotes_the_example_project_verbatim() -> None:
    sources = "\n".join(
        path.read_text()
        for root in ("examples/django_shop", "tests/django_project")
        for path in (REPO / root).rglob("*.py")
    )
    blocks = python_blocks("django.md")
    assert blocks
    for block in blocks:
        # A block quotes a file of the project (indented as there; "..." marks a cut).
        lines = [line for line in block.splitlines() if line.strip() and line.strip() != "..."]
        for line in lines:
            assert line.strip() in sources, f"docs/django.md: {line!r} is not in the example"
