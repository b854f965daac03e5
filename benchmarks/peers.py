"""The peers pgoutbox is compared with, each driven through its own public API at the settings
its documentation recommends: install its schema, publish N no-op jobs, drain them with one
worker.

- PgQueuer (asyncpg): ``Queries.install()``; jobs enqueued with ``Queries.enqueue`` in lists
  of PUBLISH_BATCH; one ``QueueManager`` over an ``AsyncpgDriver`` (one asyncpg connection, as
  its quick start and its own benchmark tool use), ``qm.run(batch_size=B)``, a no-op async
  entrypoint. Its completion record is the move of the job from ``pgqueuer`` to
  ``pgqueuer_log`` (status ``successful``), batched by its JobStatusLogBuffer.
- Procrastinate (psycopg 3): ``App(connector=PsycopgConnector(...))``,
  ``schema_manager.apply_schema_async()``; jobs deferred with ``Task.batch_defer_async``;
  ``run_worker_async(concurrency=C, wait=False)`` with a no-op async task. It fetches and
  finishes one job per statement (it has no batch setting).

The clock runs from the call that starts the worker until every handler has run and the
database records every job as done -- the same rule as for pgoutbox.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    import procrastinate

PUBLISH_BATCH = 1000
ENTRYPOINT = "bench_noop"


# -- PgQueuer ------------------------------------------------------------------------------


async def pgqueuer_install(dsn: str) -> None:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def pgqueuer_publish(dsn: str, n: int) -> None:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        for offset in range(0, n, PUBLISH_BATCH):
            size = min(PUBLISH_BATCH, n - offset)
            await queries.enqueue(
                [ENTRYPOINT] * size,
                [json.dumps({"i": i}).encode() for i in range(offset, offset + size)],
                [0] * size,
            )
    finally:
        await conn.close()


async def pgqueuer_drain(dsn: str, n: int, batch_size: int) -> float:
    """Seconds one QueueManager takes to run and log ``n`` enqueued jobs."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    worker_conn = await asyncpg.connect(dsn)
    probe = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(worker_conn))
    qm = QueueManager(queries)
    names = queries.qbe.settings
    done = asyncio.Event()
    count = 0

    @qm.entrypoint(ENTRYPOINT)
    async def noop(job: Job) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    try:
        start = time.perf_counter()
        worker = asyncio.create_task(qm.run(batch_size=batch_size))
        await _first(done.wait(), worker)
        # Done when every job has left the queue table for the log (flushed by its buffer).
        leftover = f"SELECT EXISTS (SELECT 1 FROM {names.queue_table})"
        while await probe.fetchval(leftover):  # noqa: ASYNC110 - polling the database
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start
        qm.shutdown.set()
        await worker
        logged = await probe.fetchval(
            f"SELECT count(*) FROM {names.queue_table_log} WHERE status = 'successful'"
        )
    finally:
        await probe.close()
        await worker_conn.close()
    if logged < n:
        raise RuntimeError(f"PgQueuer logged {logged} of {n} jobs as successful")
    return elapsed


# -- Procrastinate -------------------------------------------------------------------------


def _procrastinate_app(dsn: str) -> procrastinate.App:
    # The connector's default pool (psycopg_pool's: 4 connections). A pool of 12 (one per
    # sub-worker, plus the listener and a fetch) measured no faster here.
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))


async def procrastinate_install(dsn: str) -> None:
    app = _procrastinate_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def procrastinate_publish(dsn: str, n: int) -> None:
    app = _procrastinate_app(dsn)

    @app.task(name=ENTRYPOINT)
    async def noop(i: int) -> None:
        pass

    async with app.open_async():
        for offset in range(0, n, PUBLISH_BATCH):
            await noop.batch_defer_async(
                *({"i": i} for i in range(offset, min(offset + PUBLISH_BATCH, n)))
            )


async def procrastinate_drain(dsn: str, n: int, concurrency: int) -> float:
    """Seconds one Procrastinate worker takes to run and finish ``n`` deferred jobs."""
    app = _procrastinate_app(dsn)
    done = asyncio.Event()
    count = 0

    @app.task(name=ENTRYPOINT)
    async def noop(i: int) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    probe = await asyncpg.connect(dsn)
    try:
        async with app.open_async():
            start = time.perf_counter()
            worker = asyncio.create_task(
                app.run_worker_async(
                    concurrency=concurrency, wait=False, install_signal_handlers=False
                )
            )
            await _first(done.wait(), worker)
            while await probe.fetchval(  # noqa: ASYNC110 - polling the database
                "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"
            ):
                await asyncio.sleep(0.002)
            elapsed = time.perf_counter() - start
            await worker
        succeeded = await probe.fetchval(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
        )
    finally:
        await probe.close()
    if succeeded < n:
        raise RuntimeError(f"Procrastinate finished {succeeded} of {n} jobs as succeeded")
    return elapsed


async def _first(waiting: object, worker: asyncio.Task[None]) -> None:
    """Wait for ``waiting``; if the worker ends first (it crashed), raise its error."""
    waiter = asyncio.ensure_future(waiting)  # type: ignore[arg-type]
    await asyncio.wait({waiter, worker}, return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        worker.result()  # raises what the worker raised
        raise RuntimeError("the worker stopped before every job ran")
