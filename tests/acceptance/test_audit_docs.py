"""docs/audit.md's anchored audit examples, run: every ``$ pgoutbox audit ...`` line of its
console blocks is run by the installed console script in a scratch directory, on a schema
holding the history the text describes, and its output must be the documented one once
numbers, hashes and times are set aside."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from clikit import PGOUTBOX

import pgoutbox_proof as proof
from pgoutbox.settings import DatabaseSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"
SECTION = "## Anchored audit"
# A token holding a digit, made of hex digits (ids, counts, hashes, parts of times), with the
# ellipsis of a shortened hash.
_VARIABLE = re.compile(r"[0-9a-f]*[0-9][0-9a-f]*…?")


def _normal(text: str) -> list[str]:
    return [_VARIABLE.sub("N", line.rstrip()) for line in text.strip().splitlines()]


def _blocks() -> list[list[tuple[str, str]]]:
    """Each console block of the section: (command, documented output) pairs."""
    section = DOC.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = []
    for body in re.findall(r"```console\n(.*?)```", section, re.S):
        pairs: list[tuple[str, list[str]]] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                pairs.append((line[2:], []))
            else:
                pairs[-1][1].append(line)
        blocks.append([(command, "\n".join(out)) for command, out in pairs])
    return blocks


def _run(command: str, cwd: Path, dsn: str, schema: str) -> subprocess.CompletedProcess[str]:
    args = command.split()
    assert args[0] == "pgoutbox"
    if args[1:3] == ["audit", "as-of"]:  # the documented instant is the doc's; use now
        args[3] = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0).isoformat()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
    env.update(PGOUTBOX_DATABASE__DSN=dsn, PGOUTBOX_DATABASE__SCHEMA=schema)
    return subprocess.run(
        [str(PGOUTBOX), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


async def _history(conn: asyncpg.Connection, s: str) -> None:
    """Four operations, nine audit rows: charges claimed, succeeded and pending; a refund
    that succeeded. Operation 2 is the succeeded charge."""
    for operation_type, steps in [
        ("charge", ["claim"]),
        ("charge", ["claim", "succeed"]),
        ("charge", []),
        ("refund", ["claim", "succeed"]),
    ]:
        op = await conn.fetchval(
            f'INSERT INTO "{s}".operations (operation_type, channel, payload) '
            "VALUES ($1, 'workflow', '{}') RETURNING id",
            operation_type,
        )
        for step in steps:
            to_state = {"claim": "claimed", "succeed": "succeeded"}[step]
            extra = ", attempts = attempts + 1, step_attempts = step_attempts + 1"
            await conn.execute(
                f'UPDATE "{s}".operations SET state = $2, transition = $3, '
                f"transition_actor = 'worker-1'{extra if step == 'claim' else ''} WHERE id = $1",
                op,
                to_state,
                step,
            )


async def _rewrite_success_as_failure(conn: asyncpg.Connection, s: str, op: int) -> None:
    """What the text's hostile owner does to operation 2, hashes and head recomputed."""
    async with conn.transaction():
        for table in ("audit_log", "operations"):
            await conn.execute(f'ALTER TABLE "{s}".{table} DISABLE TRIGGER ALL')
        rows = [
            dict(r)
            for r in await conn.fetch(
                f'SELECT * FROM "{s}".audit_log WHERE operation_id = $1 ORDER BY seq', op
            )
        ]
        last = rows[-1]
        last.update(trigger="give_up", to_state="dead", detail="card declined")
        last["hash"] = proof.row_hash(last["prev_hash"], last)
        await conn.execute(
            f'UPDATE "{s}".audit_log SET trigger = $3, to_state = $4, detail = $5, hash = $6 '
            "WHERE operation_id = $1 AND seq = $2",
            op,
            last["seq"],
            last["trigger"],
            last["to_state"],
            last["detail"],
            last["hash"],
        )
        await conn.execute(
            f"UPDATE \"{s}\".operations SET state = 'dead', audit_hash = $2 WHERE id = $1",
            op,
            last["hash"],
        )
        for table in ("audit_log", "operations"):  # back as the migrations left them
            for (name,) in await conn.fetch(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
                f'"{s}".{table}',
            ):
                await conn.execute(f'ALTER TABLE "{s}".{table} ENABLE ALWAYS TRIGGER "{name}"')


async def test_the_anchored_audit_examples_run_as_documented(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    walkthrough, tampered = _blocks()
    await _history(conn, s)

    for command, documented in walkthrough:
        done = _run(command, tmp_path, database_dsn, s)
        assert done.returncode == 0, (command, done.stderr)
        assert _normal(done.stdout) == _normal(documented), command

    await _rewrite_success_as_failure(conn, s, 2)
    plain = _run("pgoutbox audit verify", tmp_path, database_dsn, s)
    assert plain.returncode == 0, plain.stderr  # the rewrite is consistent: only the anchor sees
    [(command, documented)] = tampered
    done = _run(command, tmp_path, database_dsn, s)
    assert done.returncode == 1
    assert _normal(done.stderr) == _normal(documented)
