"""Helpers shared by the fault suite: the CLI as a subprocess, login roles."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from pgoutbox.db import WORKER_KEY_SETTING
from pgoutbox.settings import DatabaseSettings

ROLE_PASSWORD = "pgoutbox-fault-suite"  # ignored under trust auth, used under md5/scram


def pgoutbox_command(*args: str) -> list[str]:
    """argv running the ``pgoutbox`` console script of this interpreter."""
    return [sys.executable, "-c", "from pgoutbox.cli import main; main()", *args]


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def spawn_holding_stop_signals(args: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start a ``pgoutbox worker`` process with SIGTERM and SIGINT blocked from its first
    instruction (the child inherits the forking thread's signal mask, across ``exec``). A stop
    signal sent before the worker can handle it -- during interpreter start-up or the import of
    pgoutbox -- waits, pending, until the worker unblocks them with its handler in place,
    instead of killing it: a test may stop the worker at any moment after this returns and
    expect an orderly exit (docs/workers.md, "Stopping")."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(args, **popen)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


async def run_cli(*args: str, seconds: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
    return await asyncio.to_thread(
        subprocess.run,
        pgoutbox_command(*args),
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds,
        check=False,
    )


def dsn_of(settings: DatabaseSettings) -> str:
    user = settings.user + (f":{settings.password}" if settings.password else "")
    return f"postgresql://{user}@/{settings.database}?host={settings.host}&port={settings.port}"


@dataclass(frozen=True)
class Roles:
    """Login roles of one test, and how to connect as each."""

    publisher: str
    worker: str
    auditor: str
    outsider: str  # granted nothing
    operator: str
    base: DatabaseSettings

    def settings(self, role: str) -> DatabaseSettings:
        """The test schema's settings, connecting as ``role``."""
        return DatabaseSettings(
            host=self.base.host,
            port=self.base.port,
            database=self.base.database,
            user=role,
            password=ROLE_PASSWORD,
            schema=self.base.schema_name,
        )

    @property
    def s(self) -> str:
        """The test schema, quoted for SQL."""
        return f'"{self.base.schema_name}"'

    async def connect(self, role: str, worker_key: str | None = None) -> asyncpg.Connection:
        """A connection as ``role``; with ``worker_key``, one a worker process would make."""
        kwargs = self.settings(role).connect_kwargs()
        if worker_key is not None:
            kwargs["server_settings"][WORKER_KEY_SETTING] = worker_key
        return await asyncpg.connect(**kwargs)


# -- supervised worker processes ---------------------------------------------------------------

FAULTS_DIR = Path(__file__).resolve().parent


def fault_scale(default: int = 1000) -> int:
    """Operations in the long fault tests: PGOUTBOX_FAULT_SCALE (full size: 10000)."""
    return int(os.environ.get("PGOUTBOX_FAULT_SCALE", default))


def fault_seed() -> int:
    """PGOUTBOX_FAULT_SEED to replay a run, else a fresh random seed."""
    given = os.environ.get("PGOUTBOX_FAULT_SEED")
    return int(given) if given else random.SystemRandom().randrange(2**32)


@dataclass
class Supervisor:
    """Keeps ``size`` worker processes (``pgoutbox worker fault_app:system``) running: a process
    that dies is counted (by how it died) and replaced, as a process manager would."""

    settings: DatabaseSettings
    channel: str
    effects_schema: str
    log_dir: Path
    size: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)
    app: str = "fault_app:system"  # module:attribute in tests/faults
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    exits: Counter[int] = field(default_factory=Counter)
    started: int = 0

    def environment(self) -> dict[str, str]:
        db = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
        env.update(
            {
                "FAULT_PARENT_PID": str(os.getpid()),
                "FAULT_EFFECTS_SCHEMA": self.effects_schema,
                "PGOUTBOX_DATABASE__DSN": dsn_of(db),
                "PGOUTBOX_DATABASE__SCHEMA": db.schema_name,
                "PGOUTBOX_DATABASE__POOL_SIZE": "4",
                "PGOUTBOX_WORKFLOW_SYSTEM__CHANNEL": self.channel,
                "PGOUTBOX_WORKFLOW_SYSTEM__LEASE_SECONDS": "2",
                "PGOUTBOX_WORKFLOW_SYSTEM__POLL_INTERVAL_SECONDS": "0.5",
                "PGOUTBOX_WORKFLOW_SYSTEM__SHUTDOWN_TIMEOUT_SECONDS": "5",
                "PGOUTBOX_WORKFLOW_SYSTEM__N_WORKERS": "4",
                "PGOUTBOX_WORKFLOW_SYSTEM__BATCH_SIZE": "4",
                "PGOUTBOX_WORKFLOW_SYSTEM__AUTO_MIGRATE": "false",
                **self.extra_env,
            }
        )
        return env

    def spawn(self) -> None:
        log = (self.log_dir / f"worker-{self.started}.log").open("wb")
        with log:
            # stop() may SIGTERM a process spawned a moment before, still starting up.
            proc = spawn_holding_stop_signals(
                pgoutbox_command("worker", self.app),
                cwd=FAULTS_DIR,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.started += 1
        self.running.append(proc)

    def start(self) -> None:
        for _ in range(self.size):
            self.spawn()

    def replace_dead(self) -> int:
        """Reap processes that ended and start replacements; return how many."""
        dead = [p for p in self.running if p.poll() is not None]
        for proc in dead:
            self.exits[proc.returncode] += 1
            self.running.remove(proc)
            self.spawn()
        return len(dead)

    async def stop(self) -> list[int]:
        """SIGTERM everything (a graceful stop, whether a process is running or still starting)
        and return the exit codes."""
        for proc in self.running:
            proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 30) for p in self.running]
        self.running = []
        return codes

    def kill_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        self.running = []

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')[-tail:]}"
            for path in sorted(self.log_dir.glob("worker-*.log"))
        )
