"""The bare-SQL bound: pgoutbox's own protocol with no Python layer around it.

    python benchmarks/bench_bound.py [--n 20000] [--rounds 3] [--batch 10 100]

The same statements pgoutbox runs (``pgoutbox.sql.queries``: ``operations_claim_batch``, then
``operations_record_success`` with the claimed ids and versions), the same schema, triggers and
audit chain, the same batch size, driven by a bare asyncpg loop with no-op "handlers":

- sequential: one connection; claim a batch, record it, repeat. Each statement is its own
  (autocommit) transaction.
- pipelined: one connection claims while another records, with up to two batches in flight,
  so a claim and a record overlap the way pgoutbox's claim and record loops can.

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

from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

WORKER_ID = "bench-bound"
LEASE_SECONDS = 30.0
VARIANTS = ("sequential", "pipelined")


async def _claim(conn: asyncpg.Connection, schema: str, channel: str, batch: int) -> list:
    q = queries(schema)["operations_claim_batch"]
    return await q.fetch(
        conn,
        channel=channel,
        operation_types=[OPERATION_TYPE],
        lifecycles=["default"],
        batch_size=batch,
        worker_id=WORKER_ID,
        lease_seconds=LEASE_SECONDS,
    )


async def _record(conn: asyncpg.Connection, schema: str, rows: list) -> int:
    q = queries(schema)["operations_record_success"]
    done = await q.fetch(
        conn,
        ids=[row["id"] for row in rows],
        versions=[row["version"] for row in rows],
        to_states=["succeeded"] * len(rows),
        triggers=["succeed"] * len(rows),
        new_steps=[False] * len(rows),
        wait_seconds=[None] * len(rows),
        worker_id=WORKER_ID,
    )
    return len(done)


async def sequential(db: DatabaseSettings, channel: str, batch: int) -> tuple[float, int]:
    """Claim a batch, record it, repeat until nothing is due: (seconds, operations)."""
    conn = await asyncpg.connect(**db.connect_kwargs())
    try:
        recorded = 0
        start = time.perf_counter()
        while rows := await _claim(conn, db.schema_name, channel, batch):
            recorded += await _record(conn, db.schema_name, rows)
        return time.perf_counter() - start, recorded
    finally:
        await conn.close()


async def pipelined(db: DatabaseSettings, channel: str, batch: int) -> tuple[float, int]:
    """Claim on one connection while recording on another, up to two batches in flight."""
    claim_conn = await asyncpg.connect(**db.connect_kwargs())
    record_conn = await asyncpg.connect(**db.connect_kwargs())
    claimed: asyncio.Queue[list | None] = asyncio.Queue()
    room = asyncio.Semaphore(2)  # batches in flight: claimed and not yet recorded
    recorded = 0

    async def claim_loop() -> None:
        while True:
            await room.acquire()
            rows = await _claim(claim_conn, db.schema_name, channel, batch)
            if not rows:
                room.release()
                claimed.put_nowait(None)
                return
            claimed.put_nowait(rows)

    async def record_loop() -> None:
        nonlocal recorded
        finished = False
        while not finished:
            batches = [await claimed.get()]
            while not claimed.empty():  # everything that piled up, in one statement
                batches.append(claimed.get_nowait())
            finished = batches[-1] is None
            rows = [row for rows in batches if rows is not None for row in rows]
            if rows:
                recorded += await _record(record_conn, db.schema_name, rows)
            for rows in batches:
                if rows is not None:
                    room.release()

    try:
        start = time.perf_counter()
        await asyncio.gather(claim_loop(), record_loop())
        return time.perf_counter() - start, recorded
    finally:
        await claim_conn.close()
        await record_conn.close()


async def drain(db: DatabaseSettings, n: int, variant: str, batch: int, channel: str) -> float:
    """Seconds the bare protocol takes to claim and record the ``n`` operations published on
    ``channel``."""
    run = sequential if variant == "sequential" else pipelined
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
                    channel = f"bound_{round_}_{batch}_{variant}"
                    await publish(db, args.n, channel)
                    elapsed = await drain(db, args.n, variant, batch, channel)
                    results.setdefault((variant, batch), []).append(args.n / elapsed)
    print(f"bare-SQL bound, {args.n:,} operations, median of {args.rounds}")
    for (variant, batch), values in results.items():
        rounds = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {variant:<12} batch {batch:<5}{median(values):>10,.0f} ops/s   ({rounds})")


if __name__ == "__main__":
    asyncio.run(main())
