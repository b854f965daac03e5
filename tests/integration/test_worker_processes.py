"""Worker processes as they run in production: separate OS processes, killed, frozen and resumed.

Each worker is ``python tests/worker_app.py``, configured through ``PGOUTBOX_...`` environment
variables like any deployment. Its handlers record every execution in an ``effects`` table
through their own connection (an external side effect the dispatcher cannot roll back), so the
tests can tell "the handler ran" apart from "the database recorded it".
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from pgoutbox import DatabaseSessionManager, Settings, publish_many, publish_operation
from pgoutbox.audit import verify_chains

T = TypeVar("T")

APP = Path(__file__).resolve().parents[1] / "worker_app.py"
PARENT_PID_ENV = "WORKER_APP_PARENT_PID"  # the app exits if the test run itself dies
LEASE_SECONDS = 2.0
POLL_INTERVAL_SECONDS = 0.5
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
# How long a rescue may take once a worker is gone: the lease runs out, the next rescuer round
# moves the operation on, the next claim round picks it up; generous for a loaded machine.
RESCUE_TIMEOUT = LEASE_SECONDS * 8


# -- worker processes ---------------------------------------------------------------------------


class WorkerProcess:
    """One ``worker_app.py`` process."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.worker_id = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process (if it is still there)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_ready(self) -> None:
        """Wait for the ``ready <worker id>`` line; fail with the worker's log otherwise."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(
                asyncio.to_thread(self.proc.stdout.readline), READY_TIMEOUT
            )
        except TimeoutError:
            raise AssertionError(
                f"worker {self.pid} not ready after {READY_TIMEOUT}s:\n{self.log()}"
            ) from None
        words = line.decode().split()
        if len(words) != 2 or words[0] != "ready":
            raise AssertionError(
                f"worker {self.pid} did not start (said {line!r}, exit code "
                f"{self.proc.poll()}):\n{self.log()}"
            )
        self.worker_id = words[1]

    async def wait_exit(self) -> int:
        """Wait for the process to end; return its exit code (negative: killed by a signal)."""
        try:
            return await asyncio.to_thread(self.proc.wait, EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still running {EXIT_TIMEOUT}s later:\n{self.log()}"
            ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Workers:
    """Starts worker processes for one test and makes sure none outlives it."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self._settings = settings
        self._log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def environment(self, **overrides: Any) -> dict[str, str]:
        """The process environment: the test's settings as ``PGOUTBOX_...`` variables."""
        db, ws = self._settings.database, self._settings.workflow_system
        assert db.dsn is not None
        workflow = {
            "channel": ws.channel,
            "lease_seconds": LEASE_SECONDS,
            "poll_interval_seconds": POLL_INTERVAL_SECONDS,
            "shutdown_timeout_seconds": 5,
            "n_workers": 4,
            "batch_size": 10,
            **overrides,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
        env.update(
            {
                PARENT_PID_ENV: str(os.getpid()),
                "PGOUTBOX_DATABASE__DSN": db.dsn,
                "PGOUTBOX_DATABASE__SCHEMA": db.schema_name,
                "PGOUTBOX_DATABASE__POOL_SIZE": "4",
                **{f"PGOUTBOX_WORKFLOW_SYSTEM__{k.upper()}": str(v) for k, v in workflow.items()},
            }
        )
        return env

    def spawn(self, **overrides: Any) -> WorkerProcess:
        """Start a worker process (not waiting for it to be ready)."""
        log_path = self._log_dir / f"worker-{len(self.started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(APP)],
                env=self.environment(**overrides),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        worker = WorkerProcess(proc, log_path)
        self.started.append(worker)
        return worker

    async def start(self, count: int = 1, **overrides: Any) -> list[WorkerProcess]:
        """Start ``count`` workers and wait until every one of them is claiming."""
        workers = [self.spawn(**overrides) for _ in range(count)]
        await asyncio.gather(*(worker.wait_ready() for worker in workers))
        return workers

    async def close(self) -> None:
        """Kill whatever is still running and reap every process."""
        for worker in self.started:
            worker.send(signal.SIGKILL)  # works on a SIGSTOPped process too
        stuck = []
        for worker in self.started:
            try:
                await asyncio.to_thread(worker.proc.wait, EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                stuck.append(worker.pid)
            finally:
                if worker.proc.stdout is not None:
                    worker.proc.stdout.close()
        assert not stuck, f"worker processes {stuck} survived SIGKILL"

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {w.pid} {w.worker_id} (exit {w.proc.returncode}) ---\n{w.log()}"
            for w in self.started
        )


@pytest.fixture
async def effects(settings: Settings, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The schema of the ``effects`` table the app's handlers write to."""
    schema = f"{settings.database.schema_name}_effects"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(
        f'CREATE TABLE "{schema}".effects (operation_id bigint NOT NULL, attempt int NOT NULL, '
        "worker_pid int NOT NULL, worker_id text NOT NULL, started_at timestamptz NOT NULL)"
    )
    yield schema
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def workers(settings: Settings, effects: str, tmp_path: Path) -> AsyncIterator[Workers]:
    """Worker processes for this test; killed and reaped at teardown (their logs are printed,
    which pytest shows when the test failed)."""
    started = Workers(settings, tmp_path)
    try:
        yield started
    finally:
        await started.close()
        print(started.logs())


# -- helpers ------------------------------------------------------------------------------------


async def wait_for(check: Callable[[], Awaitable[T]], what: str, within: float) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def publish(
    sm: DatabaseSessionManager, settings: Settings, op_type: str, payload: Any
) -> int:
    async with sm.session() as session:
        op_id = await publish_operation(
            session,
            operation_type=op_type,
            payload=payload,
            channel=settings.workflow_system.channel,
        )
        await session.commit()
    return op_id


async def operation(conn: asyncpg.Connection, schema: str, op_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT state, attempts, version, lease_owner, lease_expires_at, last_error "
        f'FROM "{schema}".operations WHERE id = $1',
        op_id,
    )
    assert row is not None
    return row


async def state_is(conn: asyncpg.Connection, schema: str, op_id: int, state: str) -> bool:
    return (await operation(conn, schema, op_id))["state"] == state


async def audit_trail(conn: asyncpg.Connection, schema: str, op_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT seq, from_state, to_state, trigger, attempt, actor, detail "
        f'FROM "{schema}".audit_log WHERE operation_id = $1 ORDER BY seq',
        op_id,
    )


def steps(trail: list[asyncpg.Record]) -> list[tuple[str, int, str]]:
    """(trigger, attempt, actor) of every audit row after the publish row."""
    assert trail[0]["trigger"] == "publish"
    return [(row["trigger"], row["attempt"], row["actor"]) for row in trail[1:]]


async def executions(conn: asyncpg.Connection, effects: str, op_id: int) -> list[tuple[int, int]]:
    """(attempt, worker pid) of every time a handler started for ``op_id``."""
    rows = await conn.fetch(
        f'SELECT attempt, worker_pid FROM "{effects}".effects WHERE operation_id = $1 '
        "ORDER BY started_at",
        op_id,
    )
    return [(row["attempt"], row["worker_pid"]) for row in rows]


async def nothing_claimed(conn: asyncpg.Connection, schema: str) -> None:
    leftover = await conn.fetch(
        f'SELECT id, state, lease_owner FROM "{schema}".operations '
        "WHERE state = 'claimed' OR lease_owner IS NOT NULL OR lease_expires_at IS NOT NULL"
    )
    assert leftover == []


async def chains_verify(conn: asyncpg.Connection, schema: str) -> None:
    verification = await verify_chains(conn, schema)
    assert verification.ok, str(verification.problem)


# -- tests --------------------------------------------------------------------------------------


async def test_four_worker_processes_drain_5000_operations_each_handled_exactly_once(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    effects: str,
) -> None:
    s = settings.database.schema_name
    total = 5000
    procs = await workers.start(4, n_workers=16, batch_size=50)
    async with sm.session() as session:
        ids = await publish_many(
            session,
            [
                {
                    "operation_type": "test.work",
                    "payload": {"n": n},
                    "channel": settings.workflow_system.channel,
                }
                for n in range(total)
            ],
        )
        await session.commit()
    assert len(set(ids)) == total

    async def all_finished() -> bool:
        return (
            await conn.fetchval(
                f"SELECT count(*) FROM \"{s}\".operations WHERE state = 'succeeded'"
            )
            == total
        )

    await wait_for(all_finished, f"{total} operations to succeed", within=120)

    states = await conn.fetch(f'SELECT state, count(*) FROM "{s}".operations GROUP BY state')
    assert {row["state"]: row["count"] for row in states} == {"succeeded": total}
    # An operation attempted twice means a handler ran twice: show how it came about.
    retried = await conn.fetch(
        "SELECT o.id, o.attempts, array_agg(a.trigger || ' by ' || a.actor ORDER BY a.seq) "
        f'AS trail FROM "{s}".operations o JOIN "{s}".audit_log a ON a.operation_id = o.id '
        "WHERE o.attempts <> 1 GROUP BY o.id ORDER BY o.id"
    )
    assert [dict(row) for row in retried] == []
    await nothing_claimed(conn, s)

    # Exactly one execution per operation, by the worker the audit says claimed and finished it.
    ran = await conn.fetch(f'SELECT operation_id, attempt, worker_id FROM "{effects}".effects')
    assert len(ran) == total
    assert sorted(row["operation_id"] for row in ran) == sorted(ids)
    assert {row["attempt"] for row in ran} == {1}
    assert {row["worker_id"] for row in ran} <= {p.worker_id for p in procs}

    trails = await conn.fetch(
        "SELECT operation_id, array_agg(trigger ORDER BY seq) AS triggers, "
        "array_agg(attempt ORDER BY seq) AS attempts, "
        "array_agg(actor ORDER BY seq) FILTER (WHERE seq > 1) AS actors "
        f'FROM "{s}".audit_log GROUP BY operation_id'
    )
    assert Counter(tuple(row["triggers"]) for row in trails) == {
        ("publish", "claim", "succeed"): total
    }
    assert Counter(tuple(row["attempts"]) for row in trails) == {(0, 1, 1): total}
    handled_by = {row["operation_id"]: row["worker_id"] for row in ran}
    for row in trails:
        claimer, finisher = row["actors"]
        assert claimer == finisher == handled_by[row["operation_id"]], row
    await chains_verify(conn, s)

    for proc in procs:
        proc.send(signal.SIGTERM)
    assert [await proc.wait_exit() for proc in procs] == [0, 0, 0, 0]
    assert await conn.fetch(f'SELECT id FROM "{s}".workers') == []


async def test_worker_killed_mid_handler_is_rescued_and_retried_by_another_process(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    effects: str,
) -> None:
    s = settings.database.schema_name
    [victim] = await workers.start()
    op_id = await publish(sm, settings, "test.work", {"sleep": {"1": 30}})
    await wait_for(lambda: executions(conn, effects, op_id), "the handler to start", 10)
    [survivor] = await workers.start()

    victim.send(signal.SIGKILL)
    assert await victim.wait_exit() == -signal.SIGKILL
    await wait_for(
        lambda: state_is(conn, s, op_id, "succeeded"), "the rescued retry", RESCUE_TIMEOUT
    )

    row = await operation(conn, s, op_id)
    assert row["attempts"] == 2
    trail = await audit_trail(conn, s, op_id)
    assert steps(trail) == [
        ("claim", 1, victim.worker_id),
        ("lose", 1, survivor.worker_id),
        ("claim", 2, survivor.worker_id),
        ("succeed", 2, survivor.worker_id),
    ]
    lose = trail[2]
    assert (lose["from_state"], lose["to_state"]) == ("claimed", "failed")
    assert victim.worker_id in lose["detail"]
    assert await executions(conn, effects, op_id) == [(1, victim.pid), (2, survivor.pid)]
    await nothing_claimed(conn, s)
    await chains_verify(conn, s)


async def test_zombie_worker_resumed_after_its_lease_was_lost_cannot_overwrite_the_retry(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    effects: str,
) -> None:
    s = settings.database.schema_name
    [zombie] = await workers.start()
    op_id = await publish(sm, settings, "test.work", {"sleep": {"1": 1.0}})
    await wait_for(lambda: executions(conn, effects, op_id), "the handler to start", 10)
    zombie.send(signal.SIGSTOP)  # frozen mid-handler: no heartbeat, no result
    frozen = await operation(conn, s, op_id)
    assert (frozen["state"], frozen["lease_owner"]) == ("claimed", zombie.worker_id)

    [survivor] = await workers.start()
    await wait_for(
        lambda: state_is(conn, s, op_id, "succeeded"), "the retry to succeed", RESCUE_TIMEOUT
    )
    before = await operation(conn, s, op_id)
    trail_before = await audit_trail(conn, s, op_id)
    assert steps(trail_before) == [
        ("claim", 1, zombie.worker_id),
        ("lose", 1, survivor.worker_id),
        ("claim", 2, survivor.worker_id),
        ("succeed", 2, survivor.worker_id),
    ]

    zombie.send(signal.SIGCONT)  # its handler returns success for attempt 1, too late

    async def rejection() -> asyncpg.Record | None:
        trail = await audit_trail(conn, s, op_id)
        return next((row for row in trail if row["trigger"] == "reject"), None)

    reject = await wait_for(rejection, "the zombie's late result to be refused", 15)
    assert reject["actor"] == zombie.worker_id
    assert (reject["from_state"], reject["to_state"]) == ("succeeded", "succeeded")
    assert "attempt 1" in reject["detail"]

    # Stop both workers: whatever the zombie still had to do is done once it has exited.
    zombie.send(signal.SIGTERM)
    survivor.send(signal.SIGTERM)
    assert await zombie.wait_exit() == 0
    assert await survivor.wait_exit() == 0

    after = await operation(conn, s, op_id)
    assert (after["state"], after["version"], after["attempts"]) == (
        "succeeded",
        before["version"],
        2,
    )
    trail_after = await audit_trail(conn, s, op_id)
    assert [dict(row) for row in trail_after] == [
        *(dict(row) for row in trail_before),
        dict(reject),
    ]
    assert await executions(conn, effects, op_id) == [(1, zombie.pid), (2, survivor.pid)]
    await nothing_claimed(conn, s)
    await chains_verify(conn, s)


async def test_on_lost_dead_operation_is_dead_after_its_worker_is_killed_and_never_rerun(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    workers: Workers,
    effects: str,
) -> None:
    s = settings.database.schema_name
    [victim] = await workers.start()
    op_id = await publish(sm, settings, "test.once", {"sleep": {"1": 30}})
    await wait_for(lambda: executions(conn, effects, op_id), "the handler to start", 10)
    [survivor] = await workers.start()

    victim.send(signal.SIGKILL)
    assert await victim.wait_exit() == -signal.SIGKILL
    await wait_for(lambda: state_is(conn, s, op_id, "dead"), "the rescue to dead", RESCUE_TIMEOUT)

    trail = await audit_trail(conn, s, op_id)
    assert steps(trail) == [("claim", 1, victim.worker_id), ("lose", 1, survivor.worker_id)]
    lose = trail[2]
    assert (lose["from_state"], lose["to_state"]) == ("claimed", "dead")
    assert "on_lost=dead" in lose["detail"]
    assert victim.worker_id in lose["detail"]

    # Two more lease periods with a live worker on the channel: still no second attempt.
    loop = asyncio.get_running_loop()
    until = loop.time() + 2 * LEASE_SECONDS
    while loop.time() < until:
        row = await operation(conn, s, op_id)
        assert (row["state"], row["attempts"]) == ("dead", 1)
        assert await executions(conn, effects, op_id) == [(1, victim.pid)]
        await asyncio.sleep(0.1)
    assert await audit_trail(conn, s, op_id) == trail
    assert survivor.proc.poll() is None
    await nothing_claimed(conn, s)
    await chains_verify(conn, s)
