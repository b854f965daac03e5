"""Shared set-up for the benchmarks: a database to run against and a fresh schema."""

from __future__ import annotations

import asyncio
import os
import statistics
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg

from pgoutbox import migrations
from pgoutbox.settings import DatabaseSettings


@asynccontextmanager
async def bench_database() -> AsyncIterator[DatabaseSettings]:
    """Settings for a fresh pgoutbox schema on PGOUTBOX_BENCH_DSN (else the local server),
    dropped afterwards."""
    dsn = os.environ.get("PGOUTBOX_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    settings = DatabaseSettings(dsn=dsn, schema=f"bench_{uuid.uuid4().hex[:8]}")
    await migrations.upgrade(settings)
    try:
        yield settings
    finally:
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA "{settings.schema_name}" CASCADE')
        await conn.close()


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def run(main: Callable[[], object]) -> None:
    """Run an async benchmark entry point."""
    asyncio.run(main())  # type: ignore[arg-type]
