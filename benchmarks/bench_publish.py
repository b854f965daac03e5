"""Publish throughput: one publish_operation + commit per operation, and publish_many batches.

python benchmarks/bench_publish.py [--n 5000] [--batch 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import bench_database, median

from pgoutbox import DatabaseSessionManager, publish_many, publish_operation
from pgoutbox.settings import DatabaseSettings


async def single(sm: DatabaseSessionManager, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        async with sm.session() as session:
            await publish_operation(
                session, operation_type="bench.noop", payload={"i": i}, channel="bench"
            )
            await session.commit()
    return n / (time.perf_counter() - start)


async def batched(sm: DatabaseSessionManager, n: int, batch: int) -> float:
    start = time.perf_counter()
    for offset in range(0, n, batch):
        async with sm.session() as session:
            await publish_many(
                session,
                [
                    {"operation_type": "bench.noop", "payload": {"i": i}, "channel": "bench"}
                    for i in range(offset, min(offset + batch, n))
                ],
            )
            await session.commit()
    return n / (time.perf_counter() - start)


async def measure(
    settings: DatabaseSettings, n: int, batch: int, rounds: int
) -> tuple[list[float], list[float]]:
    """ops/s of each round: one operation per transaction, then ``publish_many`` batches
    (4 x n operations), interleaved A B A B."""
    sm = DatabaseSessionManager(settings)
    try:
        await single(sm, 200)  # warm-up: connections, prepared statements
        singles, batches = [], []
        for _ in range(rounds):  # interleaved A B A B
            singles.append(await single(sm, n))
            batches.append(await batched(sm, n * 4, batch))
    finally:
        await sm.close()
    return singles, batches


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    async with bench_database() as settings:
        singles, batches = await measure(settings, args.n, args.batch, args.rounds)
    print(f"{'publish mode':<40}{'median ops/s':>14}   rounds")
    print(
        f"{'publish_operation + commit (1 per tx)':<40}{median(singles):>14,.0f}   "
        + ", ".join(f"{x:,.0f}" for x in singles)
    )
    print(
        f"{f'publish_many, {args.batch} per tx':<40}{median(batches):>14,.0f}   "
        + ", ".join(f"{x:,.0f}" for x in batches)
    )


if __name__ == "__main__":
    asyncio.run(main())
