"""A worker app with a three-step custom lifecycle, run as real OS processes by the fault tests.

Run it as ``pgoutbox worker steps_app:router`` from this directory (the CLI looks ``APP`` up
from the current directory). Settings come from ``PGOUTBOX_...`` variables as in any deployment,
and:

- ``STEPS_SCHEMA``: the schema of the tables the handlers write to (:data:`TABLES`, created by
  the tests with :func:`create_tables`);
- ``STEPS_PARENT_PID``: exit at once when that process (the test run) is gone.

Lifecycle ``steps_pay`` has three working states, each run by one step::

    pending --claim--> claimed --charge--> charged --send_receipt--> receipted
            --archive--> succeeded

Handlers (prefix ``steps``):

- ``steps.pay``: the three steps, every one ``on_lost="retry"``;
- ``steps.pay_once``: the same steps, ``claimed`` and ``charged`` with ``on_lost="dead"``
  (their side effect must never be repeated blindly);
- ``steps.ordered``: one step (default lifecycle) for the ordering-key tests; it raises
  :class:`~pgoutbox.DoNotRetry` while its payload's ``tag`` is listed in ``fail_switch``.

Every handler first journals its start in ``runs`` (``clock_timestamp()``: the database's clock,
so runs of different processes compare without clock skew) and its end just before it returns.
A step's *side effect* is a row of ``side_effects`` keyed by ``ctx.idempotency_key``, inserted
through the app's own pool: committed at once, before the step's transition, as a real
irreversible external call would be. The payload may ask a step to hang on its first attempt:
``{"hang": {"charged": "before_effect"}}`` (entered, nothing done outside) or
``"after_effect"`` (done outside, transition not recorded), so a test can ``kill -9`` the
worker at exactly that point.

The second half of this module is for the tests: starting, finding and killing such processes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from pgoutbox import DoNotRetry, HandlerContext, Lifecycle, Settings, WorkflowRouter
from pgoutbox.settings import DatabaseSettings

SCHEMA_ENV = "STEPS_SCHEMA"
PARENT_ENV = "STEPS_PARENT_PID"
HANG_SECONDS = 3600.0  # "for ever": the test kills the process long before

LIFECYCLE = Lifecycle.define(
    "steps_pay",
    states=["charged", "receipted"],
    transitions=[
        {"trigger": "charge", "source": "claimed", "dest": "charged"},
        {"trigger": "send_receipt", "source": "charged", "dest": "receipted"},
        {"trigger": "archive", "source": "receipted", "dest": "succeeded"},
    ],
)
# The trigger each working state's step fires when it is done.
NEXT: dict[str, str] = {"claimed": "charge", "charged": "send_receipt", "receipted": "archive"}

TABLES = """
CREATE TABLE {s}.side_effects (
    idempotency_key text NOT NULL,
    step            text NOT NULL,
    operation_id    bigint NOT NULL,
    attempt         integer NOT NULL,
    pid             integer NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE {s}.runs (
    id              bigserial PRIMARY KEY,
    operation_id    bigint NOT NULL,
    step            text NOT NULL,
    attempt         integer NOT NULL,
    pid             integer NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at        timestamptz,
    outcome         text
);
CREATE TABLE {s}.fail_switch (tag text PRIMARY KEY);
"""


async def create_tables(conn: asyncpg.Connection, schema: str) -> None:
    """Create ``schema`` and the app's tables in it."""
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(TABLES.format(s=f'"{schema}"'))


# -- the app ------------------------------------------------------------------------------------


class External:
    """The app's own connections: "the outside world" the dispatcher cannot roll back. Opened
    lazily, in the worker's event loop, from the same ``PGOUTBOX_DATABASE__...`` settings."""

    def __init__(self) -> None:
        self._pool: asyncpg.Pool | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def schema(self) -> str:
        return '"' + os.environ[SCHEMA_ENV] + '"'

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    kwargs = Settings().database.connect_kwargs()
                    kwargs["server_settings"] = {"application_name": "steps_app_external"}
                    self._pool = await asyncpg.create_pool(min_size=1, max_size=4, **kwargs)
        return self._pool

    async def start_run(self, ctx: HandlerContext) -> int:
        pool = await self.pool()
        run_id: int = await pool.fetchval(
            f"INSERT INTO {self.schema}.runs (operation_id, step, attempt, pid) "
            "VALUES ($1, $2, $3, $4) RETURNING id",
            ctx.operation_id,
            ctx.step,
            ctx.attempt,
            os.getpid(),
        )
        return run_id

    async def end_run(self, run_id: int, outcome: str) -> None:
        pool = await self.pool()
        await pool.execute(
            f"UPDATE {self.schema}.runs SET ended_at = clock_timestamp(), outcome = $2 "
            "WHERE id = $1",
            run_id,
            outcome,
        )

    async def side_effect(self, ctx: HandlerContext) -> None:
        """The irreversible external call: a plain INSERT, autocommitted in its own
        connection."""
        pool = await self.pool()
        await pool.execute(
            f"INSERT INTO {self.schema}.side_effects "
            "(idempotency_key, step, operation_id, attempt, pid) VALUES ($1, $2, $3, $4, $5)",
            ctx.idempotency_key,
            ctx.step,
            ctx.operation_id,
            ctx.attempt,
            os.getpid(),
        )

    async def switched_to_fail(self, tag: str) -> bool:
        pool = await self.pool()
        return bool(
            await pool.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {self.schema}.fail_switch WHERE tag = $1)", tag
            )
        )


def build_router(external: External) -> WorkflowRouter:
    """The app's handlers, writing through ``external``."""
    router = WorkflowRouter(prefix="steps")

    async def step(ctx: HandlerContext, payload: Any) -> str:
        run_id = await external.start_run(ctx)
        hang = (payload.get("hang") or {}).get(ctx.step) if ctx.attempt == 1 else None
        if hang == "before_effect":
            await asyncio.sleep(HANG_SECONDS)
        await external.side_effect(ctx)
        if hang == "after_effect":
            await asyncio.sleep(HANG_SECONDS)
        await asyncio.sleep(random.uniform(0, float(payload.get("max_sleep", 0))))
        await external.end_run(run_id, NEXT[ctx.step])
        return NEXT[ctx.step]

    for operation_type, once in (("pay", False), ("pay_once", True)):
        on_lost = "dead" if once else "retry"
        router.on(operation_type, lifecycle=LIFECYCLE, on_lost=on_lost)(step)
        router.on(operation_type, step="charged", on_lost=on_lost)(step)
        router.on(operation_type, step="receipted")(step)

    @router.on("ordered")
    async def ordered(ctx: HandlerContext, payload: Any) -> None:
        run_id = await external.start_run(ctx)
        if await external.switched_to_fail(str(payload.get("tag"))):
            await external.end_run(run_id, "do_not_retry")
            raise DoNotRetry(f"{payload.get('tag')} is switched to fail")
        await asyncio.sleep(random.uniform(0, float(payload.get("max_sleep", 0))))
        await external.end_run(run_id, "succeed")

    return router


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(3)


if os.environ.get(PARENT_ENV):  # a worker process of the tests: never outlive the test run
    threading.Thread(
        target=_exit_when_orphaned, args=(int(os.environ[PARENT_ENV]),), daemon=True
    ).start()

router = build_router(External())


# -- for the tests: worker processes of this app ------------------------------------------------

FAULTS_DIR = Path(__file__).resolve().parent
CLI = [sys.executable, "-c", "from pgoutbox.cli import main; main()"]  # `pgoutbox ...`
T = TypeVar("T")


@dataclass
class Worker:
    """One ``pgoutbox worker steps_app:router`` process."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Workers:
    """Starts worker processes of this app for one test; none outlives it."""

    db: DatabaseSettings
    steps_schema: str
    channel: str
    log_dir: Path
    started: list[Worker] = field(default_factory=list)

    def environment(self, **overrides: Any) -> dict[str, str]:
        workflow: dict[str, Any] = {
            "channel": self.channel,
            "lease_seconds": 2,
            "rescue_interval_seconds": 0.25,
            "poll_interval_seconds": 0.5,
            "shutdown_timeout_seconds": 5,
            "n_workers": 2,
            "batch_size": 4,
            "auto_migrate": "false",  # the test registered the lifecycle
            **overrides,
        }
        assert self.db.dsn is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
        env.update(
            {
                PARENT_ENV: str(os.getpid()),
                SCHEMA_ENV: self.steps_schema,
                "PGOUTBOX_DATABASE__DSN": self.db.dsn,
                "PGOUTBOX_DATABASE__SCHEMA": self.db.schema_name,
                "PGOUTBOX_DATABASE__POOL_SIZE": "4",
                **{f"PGOUTBOX_WORKFLOW_SYSTEM__{k.upper()}": str(v) for k, v in workflow.items()},
            }
        )
        return env

    def spawn(self, **overrides: Any) -> Worker:
        log_path = self.log_dir / f"steps-worker-{len(self.started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*CLI, "worker", "steps_app:router"],
                cwd=FAULTS_DIR,
                env=self.environment(**overrides),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(proc, log_path)
        self.started.append(worker)
        return worker

    async def start(
        self, conn: asyncpg.Connection, count: int = 1, **overrides: Any
    ) -> list[Worker]:
        """Start ``count`` workers; return once each has registered (its id is known)."""
        workers = [self.spawn(**overrides) for _ in range(count)]
        for worker in workers:

            async def registered(worker: Worker = worker) -> str | None:
                if worker.proc.poll() is not None:
                    raise AssertionError(f"worker {worker.pid} exited:\n{worker.log()}")
                found: str | None = await conn.fetchval(
                    f'SELECT id FROM "{self.db.schema_name}".workers WHERE pid = $1', worker.pid
                )
                return found

            worker.worker_id = await wait_for(registered, f"worker {worker.pid} to start", 30)
        return workers

    async def kill(self, worker: Worker) -> int:
        """``kill -9`` the worker; return its exit code."""
        worker.proc.send_signal(signal.SIGKILL)
        return await asyncio.to_thread(worker.proc.wait, 15)

    async def stop(self, worker: Worker) -> int:
        """SIGTERM (a graceful stop); return the exit code."""
        worker.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(worker.proc.wait, 30)

    async def close(self) -> None:
        for worker in self.started:
            if worker.proc.poll() is None:
                worker.proc.kill()
        for worker in self.started:
            await asyncio.to_thread(worker.proc.wait, 15)

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {w.pid} {w.worker_id} (exit {w.proc.returncode}) ---\n{w.log()[-4000:]}"
            for w in self.started
        )


async def wait_for(check: Callable[[], Awaitable[T]], what: str, within: float) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)
