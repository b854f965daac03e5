"""docs/flow-control.md's examples run: its Python builds routers, its outage story is what the
CLI prints and records."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import asyncpg
from clikit import run_pgoutbox

from pgoutbox import Limit, WorkflowRouter
from pgoutbox.settings import DatabaseSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "flow-control.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_the_python_examples_declare_what_they_say() -> None:
    declared, limits = blocks("python")
    namespace: dict[str, object] = {}
    exec(compile(declared, str(DOC), "exec"), namespace)
    router = namespace["router"]
    assert isinstance(router, WorkflowRouter)
    specs = router.handlers()
    assert [limit.name for limit in specs["charge"].limits] == ["per-merchant", "stripe"]
    assert [limit.name for limit in specs["refund"].limits] == ["stripe"]
    assert specs["send_email"].limits[0].concurrency == 5
    exec(compile(limits, str(DOC), "exec"), namespace)
    provider = namespace["provider"]
    assert isinstance(provider, Limit)
    assert (str(provider.rate), provider.burst) == ("50/s", 5)


async def test_the_outage_story_prints_and_records_what_the_page_shows(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    story = next(b for b in blocks("console") if "status page INC-42" in b)
    lines = story.splitlines()
    pause_command, printed = lines[0].removeprefix("$ "), lines[1]
    resume_command = lines[-1].removeprefix("$ ")
    dsn, schema = db_settings.dsn or "", db_settings.schema_name

    paused = await run_pgoutbox(*shlex.split(pause_command)[1:], dsn=dsn, schema=schema)
    assert (paused.returncode, paused.stdout.strip()) == (0, printed)
    stats = await run_pgoutbox("stats", dsn=dsn, schema=schema)
    assert "paused: type billing.charge_card since " in stats.stdout
    resumed = await run_pgoutbox(*shlex.split(resume_command)[1:], dsn=dsn, schema=schema)
    assert resumed.returncode == 0, resumed.stderr
    row = await conn.fetchrow(
        f'SELECT paused_by, pause_reason, resumed_by, resume_reason FROM "{schema}".flow_pauses'
    )
    assert tuple(row) == (
        "alice",
        "gateway outage, status page INC-42",
        "alice",
        "gateway recovered, INC-42",
    )
