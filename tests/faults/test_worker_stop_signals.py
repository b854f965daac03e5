"""``pgoutbox worker`` stopped by SIGTERM or SIGINT while it starts up: a process manager may stop
it at any moment, and it must still end in order -- exit 0, no traceback, nothing left claimed,
what it claimed handed back in an audited ``release``, its registration removed.

The workers are real processes (``pgoutbox worker stop_app:...``, see stop_app.py). The moment
the signal arrives is chosen without timing: sent by the app to itself while the CLI imports
it, or from inside ``start()`` once it holds an operation; or sent by the test right after
spawning a worker whose stop signals are blocked until it handles them
(faultkit.spawn_holding_stop_signals), so that it cannot be lost to interpreter start-up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from dataclasses import dataclass

import asyncpg
import pytest
from faultkit import FAULTS_DIR, dsn_of, pgoutbox_command, spawn_holding_stop_signals

from pgoutbox import DatabaseSessionManager, publish_operation
from pgoutbox.settings import DatabaseSettings

EXIT_WITHIN = 60.0  # seconds a worker may take from spawn to exit, on a loaded machine
NOT_STARTED = "before the worker started: not starting it"
STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT]


@dataclass
class Exited:
    code: int
    stderr: str


@dataclass
class World:
    db: DatabaseSettings
    conn: asyncpg.Connection
    sm: DatabaseSessionManager
    channel: str

    def environment(self, **extra: str) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
        return {
            **inherited,
            "PGOUTBOX_DATABASE__DSN": dsn_of(self.db),
            "PGOUTBOX_DATABASE__SCHEMA": self.db.schema_name,
            "PGOUTBOX_WORKFLOW_SYSTEM__CHANNEL": self.channel,
            "PGOUTBOX_WORKFLOW_SYSTEM__AUTO_MIGRATE": "false",
            "PGOUTBOX_WORKFLOW_SYSTEM__POLL_INTERVAL_SECONDS": "0.2",
            # the held handler is cancelled and handed back this soon after the stop begins
            "PGOUTBOX_WORKFLOW_SYSTEM__SHUTDOWN_TIMEOUT_SECONDS": "0.5",
            **extra,
        }

    def spawn(self, app: str, **env: str) -> subprocess.Popen[bytes]:
        return spawn_holding_stop_signals(
            pgoutbox_command("worker", app),
            cwd=FAULTS_DIR,
            env=self.environment(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def publish(self) -> int:
        async with self.sm.session() as session:
            op_id = await publish_operation(session, "stop.hold", {}, channel=self.channel)
            await session.commit()
        return op_id

    async def operation(self, op_id: int) -> asyncpg.Record:
        row = await self.conn.fetchrow(
            f'SELECT state, attempts, lease_owner FROM "{self.db.schema_name}".operations '
            "WHERE id = $1",
            op_id,
        )
        assert row is not None
        return row

    async def trail(self, op_id: int) -> list[str]:
        """The operation's audited transitions after its publication."""
        rows = await self.conn.fetch(
            f'SELECT trigger FROM "{self.db.schema_name}".audit_log WHERE operation_id = $1 '
            "ORDER BY seq",
            op_id,
        )
        return [r["trigger"] for r in rows][1:]

    async def registered_workers(self) -> int:
        n: int = await self.conn.fetchval(f'SELECT count(*) FROM "{self.db.schema_name}".workers')
        return n


async def exited(proc: subprocess.Popen[bytes]) -> Exited:
    try:
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = await asyncio.to_thread(proc.communicate)
        raise AssertionError(f"still running after {EXIT_WITHIN}s:\n{stderr.decode()}") from None
    return Exited(proc.returncode, stderr.decode(errors="replace"))


def assert_orderly(exit: Exited) -> None:
    assert exit.code == 0, exit.stderr
    assert "Traceback" not in exit.stderr, exit.stderr
    assert "Aborted" not in exit.stderr, exit.stderr  # click's answer to a KeyboardInterrupt


@pytest.fixture
def world(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, sm: DatabaseSessionManager
) -> World:
    return World(db_settings, conn, sm, f"fault_stop_{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
async def test_a_worker_signalled_as_soon_as_it_is_spawned_exits_0_holding_nothing(
    world: World, sig: signal.Signals
) -> None:
    op_id = await world.publish()
    workers = [world.spawn("stop_app:router") for _ in range(3)]
    for proc in workers:
        proc.send_signal(sig)  # long before any of them can have loaded pgoutbox

    for proc in workers:
        assert_orderly(await exited(proc))
    row = await world.operation(op_id)
    assert (row["state"], row["lease_owner"]) == ("pending", None)
    # Whenever the signal was taken, whatever was claimed was handed back.
    trail = await world.trail(op_id)
    assert trail.count("claim") == trail.count("release"), trail
    assert await world.registered_workers() == 0


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
async def test_a_worker_signalled_while_it_loads_its_app_exits_0_without_starting(
    world: World, sig: signal.Signals
) -> None:
    op_id = await world.publish()

    exit = await exited(
        world.spawn("stop_app:router", STOP_APP_SIGNAL=sig.name, STOP_APP_SIGNAL_AT="import")
    )

    assert_orderly(exit)
    assert f"{sig.name} {NOT_STARTED}" in exit.stderr
    assert "running" not in exit.stderr
    row = await world.operation(op_id)
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("pending", 0, None)
    assert await world.trail(op_id) == []
    assert await world.registered_workers() == 0


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
async def test_a_worker_signalled_during_start_hands_back_what_it_claimed_and_exits_0(
    world: World, sig: signal.Signals
) -> None:
    op_id = await world.publish()

    exit = await exited(world.spawn("stop_app:system", STOP_APP_SIGNAL=sig.name))

    assert_orderly(exit)
    assert "running; SIGTERM or Ctrl-C stops it" in exit.stderr
    row = await world.operation(op_id)
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("pending", 1, None)
    assert await world.trail(op_id) == ["claim", "release"]
    assert await world.registered_workers() == 0
