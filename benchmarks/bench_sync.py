"""Synchronous paths: publishing from a sync SQLAlchemy Session, a psycopg 3 connection and
Django's atomic(), next to the async path and to a bare INSERT on the same driver; and a drain
of plain ``def`` handlers (thread pool) next to ``async def`` ones.

python benchmarks/bench_sync.py [--n 2000] [--batch 100] [--rounds 3] [--drain 3000]

"Bare insert" is the same row written by hand (``INSERT ... VALUES``, same table, same
triggers), without pgoutbox's validation, idempotency handling and wake-up: what the publishing
layer itself costs on that driver.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
from _common import bench_database, median
from bench_drain import publish as publish_for_drain
from bench_drain import wait_until_recorded

import pgoutbox.sync
from pgoutbox import (
    DatabaseSessionManager,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    publish_many,
    publish_operation,
)
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sync import SyncSessionManager

CHANNEL = "bench"


def _items(offset: int, n: int) -> list[dict[str, Any]]:
    return [
        {"operation_type": "bench.noop", "payload": {"i": i}, "channel": CHANNEL}
        for i in range(offset, offset + n)
    ]


def _bare_sql(db: DatabaseSettings, placeholder: Callable[[int], str]) -> str:
    return (
        f'INSERT INTO "{db.schema_name}".operations (operation_type, channel, payload) '
        f"VALUES ({placeholder(1)}, {placeholder(2)}, CAST({placeholder(3)} AS jsonb))"
    )


# -- one operation per transaction -------------------------------------------------------------


async def async_single(sm: DatabaseSessionManager, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        async with sm.session() as session:
            await publish_operation(session, "bench.noop", {"i": i}, CHANNEL)
            await session.commit()
    return n / (time.perf_counter() - start)


async def asyncpg_bare_single(db: DatabaseSettings, n: int) -> float:
    conn = await asyncpg.connect(**db.connect_kwargs())
    sql = _bare_sql(db, lambda k: f"${k}")
    try:
        start = time.perf_counter()
        for i in range(n):
            async with conn.transaction():
                await conn.execute(sql, "bench.noop", CHANNEL, json.dumps({"i": i}))
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


def session_single(sm: SyncSessionManager, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        with sm.session() as session:
            publish_operation(session, "bench.noop", {"i": i}, CHANNEL)
            session.commit()
    return n / (time.perf_counter() - start)


def psycopg_single(conn: psycopg.Connection[Any], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        publish_operation(conn, "bench.noop", {"i": i}, CHANNEL)
        conn.commit()
    return n / (time.perf_counter() - start)


def psycopg_bare_single(conn: psycopg.Connection[Any], db: DatabaseSettings, n: int) -> float:
    sql = _bare_sql(db, lambda k: "%s")
    start = time.perf_counter()
    for i in range(n):
        conn.execute(sql, ("bench.noop", CHANNEL, json.dumps({"i": i})))
        conn.commit()
    return n / (time.perf_counter() - start)


def django_single(n: int) -> float:
    from django.db import connection, transaction

    start = time.perf_counter()
    for i in range(n):
        with transaction.atomic():
            publish_operation(connection, "bench.noop", {"i": i}, CHANNEL)
    return n / (time.perf_counter() - start)


# -- batches -----------------------------------------------------------------------------------


async def async_batched(sm: DatabaseSessionManager, n: int, batch: int) -> float:
    start = time.perf_counter()
    for offset in range(0, n, batch):
        async with sm.session() as session:
            await publish_many(session, _items(offset, batch))
            await session.commit()
    return n / (time.perf_counter() - start)


async def asyncpg_bare_batched(db: DatabaseSettings, n: int, batch: int) -> float:
    conn = await asyncpg.connect(**db.connect_kwargs())
    sql = _bare_sql(db, lambda k: f"${k}")
    try:
        start = time.perf_counter()
        for offset in range(0, n, batch):
            async with conn.transaction():
                await conn.executemany(
                    sql,
                    [
                        ("bench.noop", CHANNEL, json.dumps({"i": i}))
                        for i in range(offset, offset + batch)
                    ],
                )
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


def session_batched(sm: SyncSessionManager, n: int, batch: int) -> float:
    start = time.perf_counter()
    for offset in range(0, n, batch):
        with sm.session() as session:
            publish_many(session, _items(offset, batch))
            session.commit()
    return n / (time.perf_counter() - start)


def psycopg_batched(conn: psycopg.Connection[Any], n: int, batch: int) -> float:
    start = time.perf_counter()
    for offset in range(0, n, batch):
        publish_many(conn, _items(offset, batch))
        conn.commit()
    return n / (time.perf_counter() - start)


def psycopg_bare_batched(
    conn: psycopg.Connection[Any], db: DatabaseSettings, n: int, batch: int
) -> float:
    sql = _bare_sql(db, lambda k: "%s")
    start = time.perf_counter()
    for offset in range(0, n, batch):
        with conn.cursor() as cursor:
            cursor.executemany(
                sql,
                [
                    ("bench.noop", CHANNEL, json.dumps({"i": i}))
                    for i in range(offset, offset + batch)
                ],
            )
        conn.commit()
    return n / (time.perf_counter() - start)


# -- drain -------------------------------------------------------------------------------------


async def drain(db: DatabaseSettings, n: int, kind: str, channel: str) -> float:
    """Seconds one worker (batch 10, 10 handlers) takes to run and record ``n`` no-ops with
    ``async def`` or plain ``def`` handlers."""
    await publish_for_drain(db, n, channel)
    router = WorkflowRouter()
    if kind == "async":

        @router.on("bench.noop")
        async def noop(ctx: object, payload: object) -> None:
            return None

    else:

        @router.on("bench.noop")
        def sync_noop(ctx: object, payload: object) -> None:
            return None

    settings = Settings(
        database=db, workflow_system={"channel": channel, "batch_size": 10, "n_workers": 10}
    )
    conn = await asyncpg.connect(**db.connect_kwargs())
    try:
        start = time.perf_counter()
        async with WorkflowSystem(router=router, settings=settings):
            await wait_until_recorded(conn, db.schema_name, channel)
            elapsed = time.perf_counter() - start
    finally:
        await conn.close()
    return elapsed


def _configure_django(db: DatabaseSettings) -> None:
    import django
    from django.conf import settings

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # measured from inside asyncio.run
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": db.database,
                "USER": db.user,
                "PASSWORD": db.password,
                "HOST": db.host,
                "PORT": str(db.port),
            }
        },
        INSTALLED_APPS=["pgoutbox.contrib.django"],
        PGOUTBOX={"SCHEMA": db.schema_name},
        USE_TZ=True,
    )
    django.setup()


def _row(label: str, values: list[float]) -> str:
    return f"{label:<50}{median(values):>12,.0f}   " + ", ".join(f"{x:,.0f}" for x in values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="operations, one per transaction")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--drain", type=int, default=3000, help="operations per drain")
    args = parser.parse_args()
    n, batch = args.n, args.batch
    singles: dict[str, list[float]] = {}
    batches: dict[str, list[float]] = {}
    drains: dict[str, list[float]] = {"async def": [], "def (thread pool)": []}
    async with bench_database() as db:
        _configure_django(db)
        asm, ssm = DatabaseSessionManager(db), SyncSessionManager(db)
        pg = pgoutbox.sync.connect(db)
        try:
            # Warm-up: connections, prepared statements.
            await async_single(asm, 100)
            session_single(ssm, 100)
            psycopg_single(pg, 100)
            django_single(100)
            for _ in range(args.rounds):  # interleaved: every path once per round
                for label, run in [
                    ("async: AsyncSession (asyncpg)", lambda: async_single(asm, n)),
                    ("async: bare INSERT (asyncpg)", lambda: asyncpg_bare_single(db, n)),
                ]:
                    singles.setdefault(label, []).append(await run())
                for label, sync_run in [
                    ("sync: Session (psycopg)", lambda: session_single(ssm, n)),
                    ("sync: psycopg connection", lambda: psycopg_single(pg, n)),
                    ("sync: Django atomic() (psycopg)", lambda: django_single(n)),
                    ("sync: bare INSERT (psycopg)", lambda: psycopg_bare_single(pg, db, n)),
                ]:
                    singles.setdefault(label, []).append(sync_run())
                for label, run in [
                    ("async: publish_many (asyncpg)", lambda: async_batched(asm, n * 4, batch)),
                    (
                        "async: bare executemany (asyncpg)",
                        lambda: asyncpg_bare_batched(db, n * 4, batch),
                    ),
                ]:
                    batches.setdefault(label, []).append(await run())
                for label, sync_run in [
                    ("sync: publish_many on a Session", lambda: session_batched(ssm, n * 4, batch)),
                    ("sync: publish_many on psycopg", lambda: psycopg_batched(pg, n * 4, batch)),
                    (
                        "sync: bare executemany (psycopg)",
                        lambda: psycopg_bare_batched(pg, db, n * 4, batch),
                    ),
                ]:
                    batches.setdefault(label, []).append(sync_run())
                for kind, label in [("async", "async def"), ("sync", "def (thread pool)")]:
                    channel = f"drain_{kind}_{len(drains[label])}"
                    seconds = await drain(db, args.drain, kind, channel)
                    drains[label].append(args.drain / seconds)
        finally:
            from django.db import connections

            connections.close_all()
            pg.close()
            ssm.close()
            await asm.close()
    print(f"{'publish, one operation per transaction':<50}{'median ops/s':>12}   rounds")
    for label, values in singles.items():
        print(_row(label, values))
    print(f"\n{f'publish, {batch} operations per transaction':<50}{'median ops/s':>12}   rounds")
    for label, values in batches.items():
        print(_row(label, values))
    print(f"\n{'drain of no-op handlers (batch 10, 10 workers)':<50}{'median ops/s':>12}   rounds")
    for label, values in drains.items():
        print(_row(label, values))


if __name__ == "__main__":
    asyncio.run(main())
