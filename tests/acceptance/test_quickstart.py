"""The seed README's Quickstart, run as a user would: a separate Python process executing the
code block as written, against the test server."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pgoutbox.settings import parse_dsn

# Copied exactly from the Quickstart of the seed README (spec/seed-README.md).
QUICKSTART = """\
import asyncio
from datetime import datetime, timedelta, timezone

from pgoutbox import (
    WorkflowRouter,
    WorkflowSystem,
    Settings,
    DatabaseSessionManager,
    publish_operation,
)

router = WorkflowRouter()


@router.on("demo.hello", transactional=False)
async def handle_demo(ctx, payload):
    # payload is the persisted operation payload
    # ctx.session is None unless transactional=True is required
    print("got:", payload)


async def main() -> None:
    settings = Settings(
        database={
            "host": "localhost",
            "port": 5432,
            "user": "postgres",
            "password": "postgres",
            "database": "postgres",
            "application_name": "pgoutbox",
            "schema": "pgoutbox",
        },
        workflow_system={
            "channel": "workflow",
            "n_workers": 5,
        },
    )

    system = WorkflowSystem(router=router, settings=settings)
    await system.start()

    # Record intent from your application code
    sm = DatabaseSessionManager(settings.database)
    async with sm.session() as session:
        await publish_operation(
            session,
            operation_type="demo.hello",
            payload={"msg": "hi"},
            channel=settings.workflow_system.channel,
        )
        # IMPORTANT: publish_operation does NOT commit
        await session.commit()

    # Delayed execution
    async with sm.session() as session:
        await publish_operation(
            session,
            operation_type="demo.hello",
            payload={"msg": "later"},
            channel=settings.workflow_system.channel,
            run_at=datetime.now(timezone.utc) + timedelta(seconds=10),
        )
        await session.commit()

    # ... your app runs ...

    await system.stop()
    await sm.close()


asyncio.run(main())
"""

README = Path(__file__).resolve().parents[2] / "README.md"
SEED_README = Path(__file__).resolve().parents[3] / "shared" / "spec" / "seed-README.md"

# Run as written, the Quickstart stops the worker right after publishing, so whether "hi" ran is
# a race and "later" is not due yet. The README shows the one line to put in place of
# `# ... your app runs ...` to watch both run; the test takes that line from the README.
APP_RUNS = "    # ... your app runs ...\n"


def _readme_app_runs_line() -> str:
    after = README.read_text().split("in place of\n`# ... your app runs ...`:", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def quickstart_for(database_dsn: str, schema: str, *, app_runs: bool = True) -> str:
    """The Quickstart pointed at the test server and a schema of its own, then checks.

    With ``app_runs`` the app runs as the README shows, by the line it puts in place of
    ``# ... your app runs ...``, so both operations run before ``stop()``; without it the
    Quickstart is verbatim (only the connection values differ) and the checks are left to the
    caller.
    """
    fields = parse_dsn(database_dsn)
    script = QUICKSTART
    replacements = {
        '"host": "localhost",': f'"host": {fields["host"]!r},',
        '"port": 5432,': f'"port": {fields.get("port", 5432)!r},',
        '"user": "postgres",': f'"user": {fields.get("user", "postgres")!r},',
        '"database": "postgres",': f'"database": {fields["database"]!r},',
        '"schema": "pgoutbox",': f'"schema": {schema!r},',
    }
    if app_runs:
        replacements[APP_RUNS] = _readme_app_runs_line()
    if fields.get("password"):
        replacements['"password": "postgres",'] = f'"password": {fields["password"]!r},'
    for old, new in replacements.items():
        assert script.count(old) == 1, f"the Quickstart no longer contains {old!r}"
        script = script.replace(old, new)
    if not app_runs:
        return script
    connect = {key: fields[key] for key in ("host", "port", "user", "password") if key in fields}
    return script + CHECKS.format(connect=connect, database=fields["database"], schema=schema)


CHECKS = """
# -- appended by tests/acceptance/test_quickstart.py ---------------------------------------------
import json

import asyncpg


async def check() -> None:
    conn = await asyncpg.connect(database={database!r}, **{connect!r})
    try:
        rows = await conn.fetch(
            'SELECT payload, state, extract(epoch FROM run_at - created_at) AS delay '
            'FROM "{schema}".operations ORDER BY id'
        )
    finally:
        await conn.close()
    ops = [(json.loads(r["payload"]), r["state"], float(r["delay"])) for r in rows]
    assert [(payload, state) for payload, state, _ in ops] == [
        ({{"msg": "hi"}}, "succeeded"),
        ({{"msg": "later"}}, "succeeded"),
    ], ops
    assert 9 < ops[1][2] < 11, f"'later' should be due about 10 s after it was published: {{ops}}"
    print("quickstart checks passed")


asyncio.run(check())
"""


def _quickstart_block(readme: Path) -> str:
    block = readme.read_text().split("## Quickstart", 1)[1].split("```python\n", 1)[1]
    return block.split("```", 1)[0]


def test_the_quickstart_tested_here_is_the_readmes_word_for_word() -> None:
    assert _quickstart_block(README) == QUICKSTART


def test_the_readmes_quickstart_is_the_seed_readmes_when_the_seed_is_beside_the_repo() -> None:
    # The seed lives outside the repository (../shared); where it is present, the README's
    # Quickstart must be its exact copy. Where it is not, the README is the contract.
    seed = _quickstart_block(SEED_README) if SEED_README.exists() else QUICKSTART
    assert seed == _quickstart_block(README)


@pytest.fixture
async def quickstart_schema(database_dsn: str) -> AsyncIterator[str]:
    """A schema name no one uses yet; dropped afterwards with whatever the Quickstart made."""
    schema = f"quickstart_{uuid.uuid4().hex[:10]}"
    yield schema
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def test_the_readme_quickstart_prints_both_operations_when_the_app_runs_as_shown(
    database_dsn: str, quickstart_schema: str, tmp_path: Path
) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_for(database_dsn, quickstart_schema))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGOUTBOX_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    output = stdout.decode() + stderr.decode()
    assert process.returncode == 0, output
    printed = [line for line in stdout.decode().splitlines() if line.startswith("got:")]
    assert printed == ["got: {'msg': 'hi'}", "got: {'msg': 'later'}"], output
    assert "quickstart checks passed" in stdout.decode()

    conn = await asyncpg.connect(database_dsn)
    try:
        trail = await conn.fetch(
            f'SELECT operation_id, trigger FROM "{quickstart_schema}".audit_log '
            "ORDER BY operation_id, seq"
        )
    finally:
        await conn.close()
    hi, later = sorted({row["operation_id"] for row in trail})
    assert [r["trigger"] for r in trail if r["operation_id"] == hi] == [
        "publish",
        "claim",
        "succeed",
    ]
    assert [r["trigger"] for r in trail if r["operation_id"] == later] == [
        "publish",
        "claim",
        "succeed",
    ]


async def test_the_verbatim_quickstart_exits_cleanly_and_the_database_tells_the_truth(
    database_dsn: str, quickstart_schema: str, tmp_path: Path
) -> None:
    # Verbatim: stop() comes right after publishing, so "hi" may or may not have run. Whatever
    # happened, the database must say so exactly: run and succeeded (and printed), or never
    # claimed, or claimed and handed back by the graceful stop -- never left claimed or lost.
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_for(database_dsn, quickstart_schema, app_runs=False))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGOUTBOX_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stdout.decode() + stderr.decode()

    conn = await asyncpg.connect(database_dsn)
    try:
        ops = await conn.fetch(
            f'SELECT id, payload, state FROM "{quickstart_schema}".operations ORDER BY id'
        )
        trails = {
            op["id"]: [
                r["trigger"]
                for r in await conn.fetch(
                    f'SELECT trigger FROM "{quickstart_schema}".audit_log '
                    "WHERE operation_id = $1 ORDER BY seq",
                    op["id"],
                )
            ]
            for op in ops
        }
    finally:
        await conn.close()
    (hi, hi_state), (later, later_state) = [(op["id"], op["state"]) for op in ops]
    assert later_state == "pending"
    assert trails[later] == ["publish"]
    ran = "got: {'msg': 'hi'}" in stdout.decode().splitlines()
    expected = {
        "succeeded": ["publish", "claim", "succeed"],
        "pending": ["publish"] if trails[hi] == ["publish"] else ["publish", "claim", "release"],
    }
    assert hi_state in expected, trails
    assert trails[hi] == expected[hi_state]
    assert ran == (hi_state == "succeeded"), (stdout.decode(), trails)
