"""The installed `pgoutbox` console script, run as a user runs it: a subprocess configured by
environment variables, the caller's PGOUTBOX_* variables left out."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_command(*argv: str, dsn: str, schema: str, **env_extra: str) -> Completed:
    """Run ``argv`` with PGOUTBOX_DATABASE__DSN/__SCHEMA set; output decoded without newline
    translation, so a raw CR in it reaches the assertions."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PGOUTBOX_")}
    env.update(PGOUTBOX_DATABASE__DSN=dsn, PGOUTBOX_DATABASE__SCHEMA=schema, **env_extra)
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


async def run_pgoutbox(*args: str, dsn: str, schema: str, **env_extra: str) -> Completed:
    """``pgoutbox ARGS...`` against ``schema`` of the server at ``dsn``."""
    return await run_command(str(PGOUTBOX), *args, dsn=dsn, schema=schema, **env_extra)
