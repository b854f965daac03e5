"""Worker memory: the resident set size of one pgoutbox worker as it drains a long backlog.

    python benchmarks/bench_memory.py [--total 200000] [--at 50000 200000]

All operations are published first; one WorkflowSystem at its defaults then drains them and
the process's RSS (psutil) is read when the handler has run the 50,000th and the 200,000th
time. A worker that keeps nothing per finished operation stays flat between the two.

Standalone, this process publishes the operations before it drains them; ``run_all.py``
publishes from the harness and drains in a fresh process, whose heap holds only the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg
import psutil
from _common import bench_database
from bench_drain import OPERATION_TYPE, publish, wait_until_recorded

from pgoutbox import Settings, WorkflowRouter, WorkflowSystem
from pgoutbox.settings import DatabaseSettings

CHANNEL = "bench"


async def measure(db: DatabaseSettings, total: int, at: list[int]) -> dict[str, float]:
    """Drain ``total`` published operations; RSS in MiB when the handler ran ``at[i]`` times."""
    process = psutil.Process()
    checkpoints = set(at)
    rss: dict[str, float] = {"before start": process.memory_info().rss / 2**20}
    done = asyncio.Event()
    count = 0
    router = WorkflowRouter()

    @router.on(OPERATION_TYPE)
    async def noop(ctx: object, payload: object) -> None:
        nonlocal count
        count += 1
        if count in checkpoints:
            rss[str(count)] = process.memory_info().rss / 2**20
        if count == total:
            done.set()

    settings = Settings(database=db, workflow_system={"channel": CHANNEL})
    conn = await asyncpg.connect(**db.connect_kwargs())
    try:
        start = time.perf_counter()
        async with WorkflowSystem(router=router, settings=settings):
            await done.wait()
            await wait_until_recorded(conn, db.schema_name, CHANNEL)
            rss["seconds"] = time.perf_counter() - start
    finally:
        await conn.close()
    return rss


def growth(rss: dict[str, float], at: list[int]) -> float:
    """Relative RSS growth from the first checkpoint to the last."""
    first, last = rss[str(at[0])], rss[str(at[-1])]
    return (last - first) / first


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=int, default=200_000)
    parser.add_argument("--at", type=int, nargs="+", default=[50_000, 200_000])
    args = parser.parse_args()
    async with bench_database() as db:
        await publish(db, args.total, CHANNEL)
        rss = await measure(db, args.total, args.at)
    for key, value in rss.items():
        print(f"  {key:<14}{value:>10.1f}{' s' if key == 'seconds' else ' MiB'}")
    print(f"growth {args.at[0]:,} -> {args.at[-1]:,}: {growth(rss, args.at):+.1%}")


if __name__ == "__main__":
    asyncio.run(main())
