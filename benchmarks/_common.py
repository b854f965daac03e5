"""Shared set-up for the benchmarks: the server to run against, scratch databases, the child
processes each measurement runs in, and small statistics helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from pgoutbox import migrations
from pgoutbox.settings import DatabaseSettings

HERE = Path(__file__).resolve().parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Every database the harness creates starts with this, so a crashed run's leftovers are easy
# to find (`run_all.py --drop-leftovers` removes them).
DATABASE_PREFIX = "pgoutbox_bench_"
PGOUTBOX_SCHEMA = "pgoutbox"


def bench_dsn() -> str:
    """The server the benchmarks run against: PGOUTBOX_BENCH_DSN, else the local server."""
    return os.environ.get("PGOUTBOX_BENCH_DSN", DEFAULT_DSN)


def dsn_for(database: str, dsn: str | None = None) -> str:
    """``dsn`` (default: :func:`bench_dsn`) pointing at ``database`` instead."""
    parts = urlsplit(dsn or bench_dsn())
    return urlunsplit(parts._replace(path=f"/{database}"))


def pgoutbox_settings(dsn: str) -> DatabaseSettings:
    """pgoutbox's settings for the benchmark schema in the database ``dsn`` names."""
    return DatabaseSettings(dsn=dsn, schema=PGOUTBOX_SCHEMA, application_name="pgoutbox-bench")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- scratch databases ---------------------------------------------------------------------


class Databases:
    """Creates and drops the harness's databases on the benchmark server.

    Each system gets a *template* database with its schema installed once; every timed run
    gets a fresh clone of it (``CREATE DATABASE ... TEMPLATE``), so no run sees another's rows.
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token or uuid.uuid4().hex[:8]
        self.created: list[str] = []

    def name(self, label: str) -> str:
        return f"{DATABASE_PREFIX}{self.token}_{label}"

    async def create(self, label: str, template: str | None = None) -> str:
        """Create database ``label`` (optionally cloned from ``template``); return its dsn."""
        name = self.name(label)
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {quote_ident(template)}"
        conn = await asyncpg.connect(bench_dsn())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        self.created.append(name)
        return dsn_for(name)

    async def drop(self, dsn_or_name: str) -> None:
        name = urlsplit(dsn_or_name).path.strip("/") if "://" in dsn_or_name else dsn_or_name
        conn = await asyncpg.connect(bench_dsn())
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()
        if name in self.created:
            self.created.remove(name)

    async def drop_all(self) -> None:
        """Drop every database this instance created (in reverse: clones before templates)."""
        for name in reversed(list(self.created)):
            await self.drop(name)

    async def drop_leftovers(self) -> list[str]:
        """Drop every ``pgoutbox_bench_*`` database on the server (a killed run's)."""
        conn = await asyncpg.connect(bench_dsn())
        try:
            names = await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", DATABASE_PREFIX
            )
        finally:
            await conn.close()
        for row in names:
            await self.drop(row["datname"])
        return [row["datname"] for row in names]

    @asynccontextmanager
    async def clone(self, template_label: str, label: str) -> AsyncIterator[str]:
        """A fresh copy of template ``template_label`` for one run, dropped afterwards."""
        dsn = await self.create(label, template=self.name(template_label))
        try:
            yield dsn
        finally:
            await self.drop(dsn)


async def settle(dsn: str) -> None:
    """Put a freshly loaded database in the same state for every system before a timed run:
    statistics gathered and dead rows gone (VACUUM ANALYZE), and the loaded data written out
    (CHECKPOINT), so no checkpoint caused by the set-up lands inside the measurement."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE")
        # Not a superuser (nor pg_checkpoint): the runs are only noisier.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


@asynccontextmanager
async def bench_database() -> AsyncIterator[DatabaseSettings]:
    """Settings for a fresh pgoutbox schema on PGOUTBOX_BENCH_DSN (else the local server),
    dropped afterwards. Used by the scripts when they run standalone."""
    settings = DatabaseSettings(dsn=bench_dsn(), schema=f"bench_{uuid.uuid4().hex[:8]}")
    await migrations.upgrade(settings)
    try:
        yield settings
    finally:
        conn = await asyncpg.connect(bench_dsn())
        await conn.execute(f'DROP SCHEMA "{settings.schema_name}" CASCADE')
        await conn.close()


# -- child processes -----------------------------------------------------------------------


class ChildFailed(RuntimeError):
    """A measurement's child process exited with an error."""


def run_child(kind: str, params: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one measurement in its own Python process (``_child.py``) and return the JSON it
    prints last. Its own process: no event loop, connection or memory shared with the harness
    or with the other systems."""
    command = [sys.executable, str(HERE / "_child.py"), kind, json.dumps(params)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ChildFailed(f"{kind} {params} exited with {done.returncode}:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ChildFailed(f"{kind} {params} printed no result:\n{done.stdout[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_loop(main: Callable[[], Any], loop: str = "asyncio") -> Any:
    """Run the coroutine function ``main`` on the ``asyncio`` or ``uvloop`` event loop."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


# -- statistics and the machine ------------------------------------------------------------


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (fraction 0.99 for p99)."""
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return float("nan")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


async def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    conn = await asyncpg.connect(bench_dsn())
    try:
        server = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores (nproc)",
        "ram": f"{_ram_gib():.1f} GiB",
        "postgresql": str(server),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "packages": ", ".join(
            f"{name} {_version(name)}"
            for name in ("pgoutbox", "asyncpg", "pgqueuer", "procrastinate", "psycopg")
        ),
        "load": "{:.2f} {:.2f} {:.2f}".format(*load),
    }


def run(main: Callable[[], object]) -> None:
    """Run an async benchmark entry point."""
    asyncio.run(main())  # type: ignore[arg-type]
