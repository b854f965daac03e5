"""The bare-SQL bound: pgoutbox's own protocol with no Python layer around it.

    python benchmarks/bench_bound.py [--n 20000] [--rounds 3] [--batch 10 100]

The statement pgoutbox runs (``pgoutbox.sql.queries``: ``operations_record_and_claim``, which
records the last batch's successes and claims the next batch), the same schema, triggers and
audit chain, the same batch size, driven by a bare asyncpg loop with no-op "handlers":

- sequential: one connection; each statement records the batch the one before claimed and
  claims the next. Each statement is its own (autocommit) transaction.
- two-lane: two connections, each running the sequential loop, side by side: the two
  recordings at once that pgoutbox's record loop allows (``RECORD_LANES``).

The bound for a batch size is the faster of the two: the ceiling pgoutbox's Python layer
(dispatcher, handler tasks, heartbeat, listener) is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg
from _common import bench_database, median
from bench_drain import OPERATION_TYPE, publish

from pgoutbox.db import hot_path_connect_kwargs, new_worker_key, worker_key_fingerprint
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

# A worker as the database knows one (revision 0010): its connections carry its key, its id ends
# with the key's fingerprint.
WORKER_KEY = new_worker_key()
WORKER_ID = f"bench-bound:{worker_key_fingerprint(WORKER_KEY)}"
LEASE_SECONDS = 30.0
VARIANTS = ("sequential", "two-lane")


async def cycle(
    conn: asyncpg.Connection, schema: str, channel: str, done: list, batch: int
) -> tuple[list, int]:
    """Record the claimed rows ``done`` as succeeded and claim up to ``batch`` more, in one
    statement: (the rows claimed, how many were recorded)."""
    q = queries(schema)["operations_record_and_claim"]
    rows = await q.fetch(
        conn,
        ids=[row["id"] for row in done],
        versions=[row["version"] for row in done],
        to_states=["succeeded"] * len(done),
        triggers=["succeed"] * len(done),
        new_steps=[False] * len(done),
        wait_seconds=[None] * len(done),
        channel=channel,
        operation_types=[OPERATION_TYPE],
        lifecycles=["default"],
        batch_size=batch,
        worker_id=WORKER_ID,
        lease_seconds=LEASE_SECONDS,
    )
    claimed = [row for row in rows if not row["recorded"]]
    return claimed, len(rows) - len(claimed)


async def sequential_drain(conn: asyncpg.Connection, schema: str, channel: str, batch: int) -> int:
    """Record-and-claim until nothing more is due; the operations recorded."""
    rows, recorded = await cycle(conn, schema, channel, [], batch)
    while rows:
        rows, done = await cycle(conn, schema, channel, rows, batch)
        recorded += done
    return recorded


async def sequential(db: DatabaseSettings, channel: str, batch: int) -> tuple[float, int]:
    """Claim a batch, record it, repeat until nothing is due: (seconds, operations)."""
    conn = await asyncpg.connect(**hot_path_connect_kwargs(db, WORKER_KEY))
    try:
        start = time.perf_counter()
        recorded = await sequential_drain(conn, db.schema_name, channel, batch)
        return time.perf_counter() - start, recorded
    finally:
        await conn.close()


async def two_lane(db: DatabaseSettings, channel: str, batch: int) -> tuple[float, int]:
    """Two connections, each recording its last batch and claiming its next, side by side."""
    conns = [await asyncpg.connect(**hot_path_connect_kwargs(db, WORKER_KEY)) for _ in range(2)]
    try:
        start = time.perf_counter()
        done = await asyncio.gather(
            *(sequential_drain(conn, db.schema_name, channel, batch) for conn in conns)
        )
        return time.perf_counter() - start, sum(done)
    finally:
        for conn in conns:
            await conn.close()


async def drain(db: DatabaseSettings, n: int, variant: str, batch: int, channel: str) -> float:
    """Seconds the bare protocol takes to claim and record the ``n`` operations published on
    ``channel``."""
    run = sequential if variant == "sequential" else two_lane
    elapsed, recorded = await run(db, channel, batch)
    if recorded != n:
        raise RuntimeError(f"bound {variant}: recorded {recorded} of {n} operations")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    async with bench_database() as db:
        for round_ in range(args.rounds):
            for batch in args.batch:
                for variant in VARIANTS:
                    channel = f"bound_{round_}_{batch}_{variant.replace('-', '_')}"
                    await publish(db, args.n, channel)
                    elapsed = await drain(db, args.n, variant, batch, channel)
                    results.setdefault((variant, batch), []).append(args.n / elapsed)
    print(f"bare-SQL bound, {args.n:,} operations, median of {args.rounds}")
    for (variant, batch), values in results.items():
        rounds = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {variant:<12} batch {batch:<5}{median(values):>10,.0f} ops/s   ({rounds})")


if __name__ == "__main__":
    asyncio.run(main())
