"""`pgoutbox demo` from a clean environment: no PGOUTBOX_* settings, no test DSN, so it starts
its own embedded PostgreSQL, as on a machine with nothing but Python."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"


async def test_demo_runs_to_completion_in_under_a_minute_and_verifies_the_audit_log() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PGOUTBOX_")}
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(PGOUTBOX),
        "demo",
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
    elapsed = time.monotonic() - started

    out = stdout.decode()
    assert process.returncode == 0, out + stderr.decode()
    assert elapsed < 60
    assert "Starting an embedded PostgreSQL" in out
    for state in ("succeeded", "dead"):
        assert state in out
    assert "give_up" in out  # the failing operation's audit trail
    assert "audit verify: OK" in out
