"""`pgoutbox demo` from a clean environment: no PGOUTBOX_* settings, no test DSN, so it starts
its own embedded PostgreSQL, as on a machine with nothing but Python -- or, with --dsn, on the
test server."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path

import asyncpg

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"


async def _demo(*args: str) -> tuple[int, str, str]:
    """Run `pgoutbox demo ARGS` with no PGOUTBOX_* settings: exit code, stdout, stderr."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PGOUTBOX_")}
    process = await asyncio.create_subprocess_exec(
        str(PGOUTBOX),
        "demo",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_demo_runs_to_completion_in_under_a_minute_and_verifies_the_audit_log() -> None:
    started = time.monotonic()
    returncode, out, err = await _demo()
    elapsed = time.monotonic() - started

    assert returncode == 0, out + err
    assert elapsed < 60
    assert "Starting an embedded PostgreSQL" in out
    # The server's address as psql and --dsn take it: a Unix socket directory, no TCP port.
    server = re.search(r"^  (embedded|binaries): (postgresql://\S+)$", out, re.MULTILINE)
    assert server is not None, out
    assert re.fullmatch(r"postgresql://postgres@/postgres\?host=/[^&]+", server.group(2))
    for state in ("succeeded", "dead"):
        assert state in out
    assert "give_up" in out  # the failing operation's audit trail
    assert "audit verify: OK" in out


async def test_demo_runs_on_the_server_given_with_dsn_after_the_command_and_drops_its_schema(
    database_dsn: str, conn: asyncpg.Connection
) -> None:
    returncode, out, err = await _demo("--dsn", database_dsn)

    assert (returncode, err) == (0, ""), out + err
    assert "Starting an embedded PostgreSQL" not in out
    assert "audit verify: OK - 13 rows of 3 operations, every hash chain holds" in out
    # The failing attempts' details, shortened to their column at a word, with an ellipsis.
    trail = [line for line in out.splitlines() if " fail " in line or " give_up " in line]
    assert len(trail) == 3, out
    for n, line in enumerate(trail, start=1):
        assert f"│ attempt {n} of 3: ConnectionError: payment provider… │" in line, line
    used = re.search(r"Migrating schema (pgoutbox_demo_[0-9a-f]{6}) ", out)
    assert used is not None, out
    assert await conn.fetchval("SELECT to_regnamespace($1)", used.group(1)) is None
