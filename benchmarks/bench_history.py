"""History: what a table full of finished operations costs the drain.

    python benchmarks/bench_history.py [--history 1000000] [--n 20000] [--rounds 3]

``fill`` writes ``count`` succeeded operations as if each had been published, claimed and
recorded: the operation row at its final state and its three audit rows (publish, claim,
succeed), each hash computed by the schema's own ``audit_hash`` function, so every chain
verifies. To write a million in a minute rather than many, the operations table's triggers
are switched off inside the filling transaction (a superuser's or owner's right) and switched
back to exactly their previous mode before it commits; the rows they would have written are
written by the statement itself. Then VACUUM ANALYZE, as autovacuum would have done on a
system that got there one operation at a time.

Standalone, the empty and the filled schema are two schemas of one database and the drain
runs in this process; ``run_all.py`` uses a database per system and a process per drain.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg
from _common import bench_database, bench_dsn, median
from bench_drain import OPERATION_TYPE, drain, publish

FILL_CHUNK = 100_000
FILLER = "bench-history"
CHANNEL = "bench"

# tgenabled -> the ALTER TABLE clause that sets it back.
_TRIGGER_MODES = {
    "A": "ENABLE ALWAYS TRIGGER",
    "O": "ENABLE TRIGGER",
    "R": "ENABLE REPLICA TRIGGER",
    "D": "DISABLE TRIGGER",
}


def _fill_sql(schema: str) -> str:
    s = f'"{schema}"'
    return f"""
WITH ops AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('{s}.operations', 'id')) AS id, now() AS at
    FROM generate_series(1, $1)
), chain AS MATERIALIZED (
    SELECT id, at, h1, h2,
           {s}.audit_hash(h2, id, 3, $3, 'claimed', 'succeeded', 'succeed', 1, $4, NULL, at)
               AS h3
    FROM ops,
    LATERAL (SELECT {s}.audit_hash(NULL, id, 1, $3, NULL, 'pending', 'publish', 0,
                                   current_user, NULL, at) AS h1) publish,
    LATERAL (SELECT {s}.audit_hash(h1, id, 2, $3, 'pending', 'claimed', 'claim', 1, $4,
                                   NULL, at) AS h2) claim
), operations AS (
    INSERT INTO {s}.operations
        (id, operation_type, channel, payload, state, attempts, run_at, created_at, created_by,
         updated_at, version, audit_seq, audit_hash)
    OVERRIDING SYSTEM VALUE
    SELECT id, $3, $2, jsonb_build_object('i', id), 'succeeded', 1, at, at, current_user,
           at, 2, 3, h3
    FROM chain
)
INSERT INTO {s}.audit_log
    (operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, detail,
     recorded_at, prev_hash, hash)
SELECT id, 1, $3, NULL, 'pending', 'publish', 0, current_user, NULL, at, NULL, h1 FROM chain
UNION ALL
SELECT id, 2, $3, 'pending', 'claimed', 'claim', 1, $4, NULL, at, h1, h2 FROM chain
UNION ALL
SELECT id, 3, $3, 'claimed', 'succeeded', 'succeed', 1, $4, NULL, at, h2, h3 FROM chain
"""


async def _trigger_modes(conn: asyncpg.Connection, schema: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT tgname, tgenabled FROM pg_trigger "
        "WHERE tgrelid = $1::regclass AND NOT tgisinternal",
        f'"{schema}".operations',
    )
    # tgenabled is a "char": asyncpg returns it as bytes.
    return {row["tgname"]: bytes(row["tgenabled"]).decode() for row in rows}


async def fill(dsn: str, schema: str, count: int, channel: str) -> float:
    """Write ``count`` finished operations (and their audit chains); return the seconds taken,
    VACUUM ANALYZE included."""
    conn = await asyncpg.connect(dsn)
    try:
        before = await _trigger_modes(conn, schema)
        start = time.perf_counter()
        sql = _fill_sql(schema)
        for offset in range(0, count, FILL_CHUNK):
            async with conn.transaction():
                await conn.execute(f'ALTER TABLE "{schema}".operations DISABLE TRIGGER USER')
                await conn.execute(
                    sql, min(FILL_CHUNK, count - offset), channel, OPERATION_TYPE, FILLER
                )
                for name, mode in before.items():
                    await conn.execute(
                        f'ALTER TABLE "{schema}".operations {_TRIGGER_MODES[mode]} "{name}"'
                    )
        await conn.execute(f'VACUUM ANALYZE "{schema}".operations')
        await conn.execute(f'VACUUM ANALYZE "{schema}".audit_log')
        elapsed = time.perf_counter() - start
        after = await _trigger_modes(conn, schema)
    finally:
        await conn.close()
    if after != before:
        raise RuntimeError(f"trigger modes changed by the fill: {before} -> {after}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    empty: list[float] = []
    full: list[float] = []
    async with bench_database() as plain, bench_database() as history:
        seconds = await fill(bench_dsn(), history.schema_name, args.history, CHANNEL)
        print(f"filled {args.history:,} finished operations in {seconds:.1f} s")
        for _ in range(args.rounds):  # interleaved A B A B
            for db, results in ((plain, empty), (history, full)):
                await publish(db, args.n, CHANNEL)
                results.append(args.n / await drain(db, args.n, {}, CHANNEL))
    ratio = median(full) / median(empty)
    print(f"drain, empty table:     {median(empty):>10,.0f} ops/s")
    print(f"drain, {args.history:,} finished: {median(full):>10,.0f} ops/s  (ratio {ratio:.2f})")


if __name__ == "__main__":
    asyncio.run(main())
