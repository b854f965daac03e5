"""Drain throughput and publish-to-start latency of one pgoutbox worker.

    python benchmarks/bench_drain.py [--n 20000] [--rounds 3] [--latency-samples 200]

drain: N no-op operations are published first; the clock runs from WorkflowSystem.start() until
every one is recorded succeeded. latency: on an idle worker (LISTEN on), the time from the
commit of publish_operation to the handler's first line. Each drain also reports the CPU time
this process spent on it per operation (the worker's own cost; PostgreSQL's is
bench_server_cpu.py's).

Standalone, everything runs in this one process; ``run_all.py`` runs each drain in its own
process through these same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import asyncpg
from _common import bench_database, median, percentile

from pgoutbox import (
    DatabaseSessionManager,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    publish_many,
    publish_operation,
)
from pgoutbox.settings import DatabaseSettings

OPERATION_TYPE = "bench.noop"
PUBLISH_BATCH = 1000

CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "batch 10": {"batch_size": 10, "n_workers": 10},
    "batch 100": {"batch_size": 100, "n_workers": 100},
}


async def publish(db: DatabaseSettings, n: int, channel: str) -> None:
    """Publish ``n`` no-op operations on ``channel``, PUBLISH_BATCH per transaction."""
    sm = DatabaseSessionManager(db)
    try:
        for offset in range(0, n, PUBLISH_BATCH):
            async with sm.session() as session:
                await publish_many(
                    session,
                    [
                        {"operation_type": OPERATION_TYPE, "payload": {"i": i}, "channel": channel}
                        for i in range(offset, min(offset + PUBLISH_BATCH, n))
                    ],
                )
                await session.commit()
    finally:
        await sm.close()


async def wait_until_recorded(conn: asyncpg.Connection, schema: str, channel: str) -> None:
    """Return once no operation of ``channel`` is pending, failed or claimed any more.

    Both probes are answered from the partial indexes over unfinished rows (operations_claimable,
    and operations_leased: a claimed operation always holds a lease), so the check costs the
    same with a million finished operations in the table as with none. (Asking for state
    'claimed' instead, which no index covers, scanned the whole table on every poll: about a
    quarter of a second per poll with a million finished operations, all of it inside the
    history drain's clock.)
    """
    sql = (
        f'SELECT EXISTS (SELECT 1 FROM "{schema}".operations '
        "                WHERE state IN ('pending', 'failed') AND channel = $1) "
        f'    OR EXISTS (SELECT 1 FROM "{schema}".operations '
        "                WHERE lease_owner IS NOT NULL AND channel = $1)"
    )
    while await conn.fetchval(sql, channel):  # noqa: ASYNC110 - polling the database
        await asyncio.sleep(0.002)


async def drain(db: DatabaseSettings, n: int, config: dict[str, Any], channel: str) -> float:
    """Seconds one WorkflowSystem takes to run and record ``n`` published operations."""
    done = asyncio.Event()
    count = 0
    router = WorkflowRouter()

    @router.on(OPERATION_TYPE)
    async def noop(ctx: object, payload: object) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    settings = Settings(database=db, workflow_system={"channel": channel, **config})
    system = WorkflowSystem(router=router, settings=settings)
    conn = await asyncpg.connect(**db.connect_kwargs())
    try:
        start = time.perf_counter()
        await system.start()
        await done.wait()
        await wait_until_recorded(conn, db.schema_name, channel)
        elapsed = time.perf_counter() - start
        await system.stop()
        succeeded = await conn.fetchval(
            f'SELECT count(*) FROM "{db.schema_name}".operations '
            "WHERE channel = $1 AND state = 'succeeded'",
            channel,
        )
    finally:
        await conn.close()
    if succeeded < n:
        raise RuntimeError(f"only {succeeded} of {n} operations succeeded on {channel!r}")
    return elapsed


async def latency(db: DatabaseSettings, samples: int) -> tuple[float, float]:
    """p50 and p99, in ms, from the commit of a publish to the start of its handler."""
    started: asyncio.Queue[float] = asyncio.Queue()
    router = WorkflowRouter()

    @router.on("bench.ping")
    async def ping(ctx: object, payload: object) -> None:
        started.put_nowait(time.perf_counter())

    settings = Settings(database=db, workflow_system={"channel": "latency"})
    sm = DatabaseSessionManager(db)
    delays = []
    async with WorkflowSystem(router=router, settings=settings):
        for _ in range(samples + 10):
            async with sm.session() as session:
                await publish_operation(
                    session, operation_type="bench.ping", payload={}, channel="latency"
                )
                await session.commit()
                committed = time.perf_counter()
            delays.append(await started.get() - committed)
            await asyncio.sleep(0.02)  # idle between operations
    await sm.close()
    delays = sorted(delays[10:])  # the first few warm up connections and statements
    return percentile(delays, 0.50) * 1000, percentile(delays, 0.99) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}  # worker CPU, us per op
    async with bench_database() as db:
        for round_ in range(args.rounds):  # interleaved: every config once per round
            for i, (name, config) in enumerate(CONFIGS.items()):
                channel = f"drain_{round_}_{i}"
                await publish(db, args.n, channel)
                before = time.process_time()
                results[name].append(args.n / await drain(db, args.n, config, channel))
                cpu[name].append((time.process_time() - before) / args.n * 1e6)
        p50, p99 = await latency(db, args.latency_samples)
    print(f"drain of {args.n:,} no-op operations, one worker, median of {args.rounds}")
    for name, values in results.items():
        rounds = ", ".join(f"{v:,.0f}" for v in values)
        print(
            f"  {name:<36}{median(values):>10,.0f} ops/s   ({rounds});   "
            f"worker CPU {median(cpu[name]):.0f} us per operation"
        )
    print(
        f"latency commit -> handler start: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
        f"({args.latency_samples} samples, idle worker, LISTEN on)"
    )


if __name__ == "__main__":
    asyncio.run(main())
