"""Anchored audit: what a signed checkpoint and a verification against it cost, by log size.

    python benchmarks/bench_anchor.py [--rows 1000000] [--rows 10000000]
    python benchmarks/bench_anchor.py --publish-cost [--n 20000] [--rounds 3]
    python benchmarks/bench_anchor.py --migrate-rows 1000000

For each size, a fresh schema is filled with finished operations of three audit rows each
(``bench_history.fill``: publish, claim, succeed, every hash the schema's own), then timed:

- ``pgoutbox audit checkpoint``'s work (:func:`pgoutbox.anchor.take_checkpoint`): one snapshot,
  every chain head, the Merkle tree, the heads file, the signature;
- ``pgoutbox audit verify --checkpoint`` (:func:`pgoutbox.anchor.verify_against_checkpoint`):
  every row's hash recomputed, the semantic rules, the heads merged and the root recomputed;
- plain ``pgoutbox audit verify`` (:func:`pgoutbox.audit.verify_audit`), for comparison.

Each is also measured for the peak resident memory it adds to the process (Linux: the
high-water mark is reset before each phase through /proc/self/clear_refs): constant memory
means this stays flat as the log grows.

``--publish-cost`` measures what revision 0013's hash of the intent in seq 1 costs publishing:
one schema at 0012_running_controls and one at head, in the same run, alternating rounds (A B A
B), ``n`` operations published in batches and ``n / 10`` one per transaction; the ratio is
head / 0012 throughput.

``--migrate-rows N [--migrate-from REVISION]`` fills a schema at REVISION (default
0013_anchored_audit) with N audit rows and times its upgrade in place to head: from 0013, the
copy of audit_log into its monthly partitions (0014_partitioned_audit); from 0012, also 0013's
nullable column and three functions (no rewrite).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from _common import bench_database, bench_dsn
from bench_drain import publish
from bench_history import fill

from pgoutbox import DatabaseSessionManager, anchor, migrations, publish_operation
from pgoutbox.audit import verify_audit

CHANNEL = "bench_anchor"


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


async def _measure(action: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    """Seconds taken and peak memory added (MiB) by ``action``."""
    _reset_peak()
    before = _rss_mib("VmRSS")
    start = time.perf_counter()
    result = await action()
    elapsed = time.perf_counter() - start
    return elapsed, _rss_mib("VmHWM") - before, result


async def one_size(rows: int) -> dict[str, float]:
    operations = -(-rows // 3)
    async with bench_database() as db:
        schema = db.schema_name
        filled = await fill(bench_dsn(), schema, operations, CHANNEL)
        key = anchor.load_private_key(anchor.generate_key()[0])
        conn = await asyncpg.connect(bench_dsn())
        try:
            with tempfile.TemporaryDirectory() as tmp:
                heads = Path(tmp) / "cp.heads.gz"
                cp_s, cp_mib, document = await _measure(
                    lambda: anchor.take_checkpoint(conn, schema, key, heads, record=False)
                )
                heads_mib = heads.stat().st_size / 2**20
                v_s, v_mib, result = await _measure(
                    lambda: anchor.verify_against_checkpoint(
                        conn, schema, document, anchor.read_heads(heads)
                    )
                )
                assert result.ok, result.failures()[:3]
                assert result.rows == operations * 3
            p_s, p_mib, plain = await _measure(lambda: verify_audit(conn, schema))
            assert plain.ok
        finally:
            await conn.close()
    return {
        "rows": operations * 3,
        "operations": operations,
        "fill_s": filled,
        "checkpoint_s": cp_s,
        "checkpoint_mib": cp_mib,
        "heads_file_mib": heads_mib,
        "verify_checkpoint_s": v_s,
        "verify_checkpoint_mib": v_mib,
        "verify_plain_s": p_s,
        "verify_plain_mib": p_mib,
    }


async def _one_by_one(db: Any, n: int) -> None:
    sm = DatabaseSessionManager(db)
    try:
        for i in range(n):
            async with sm.session() as session:
                await publish_operation(session, "bench.noop", {"i": i}, CHANNEL)
                await session.commit()
    finally:
        await sm.close()


async def publish_cost(n: int, rounds: int) -> None:
    async with bench_database() as head, bench_database() as before:
        # bench_database migrated both to head: take one back to the revision before this one.
        conn = await asyncpg.connect(bench_dsn())
        await conn.execute(f'DROP SCHEMA "{before.schema_name}" CASCADE')
        await conn.close()
        await migrations.upgrade(before, "0012_running_controls")
        results: dict[str, dict[str, list[float]]] = {
            "0012": {"batch": [], "single": []},
            "head": {"batch": [], "single": []},
        }
        for _ in range(rounds):
            for name, db in (("0012", before), ("head", head)):
                start = time.perf_counter()
                await publish(db, n, CHANNEL)
                results[name]["batch"].append(n / (time.perf_counter() - start))
                start = time.perf_counter()
                await _one_by_one(db, n // 10)
                results[name]["single"].append(n / 10 / (time.perf_counter() - start))
    for kind in ("batch", "single"):
        old = sorted(results["0012"][kind])[rounds // 2]
        new = sorted(results["head"][kind])[rounds // 2]
        print(
            f"publish ({kind:6}): 0012 {old:>8,.0f} ops/s  head {new:>8,.0f} ops/s  "
            f"ratio {new / old:.2f}"
        )


async def migrate_cost(rows: int, from_revision: str) -> None:
    async with bench_database() as db:
        conn = await asyncpg.connect(bench_dsn())
        await conn.execute(f'DROP SCHEMA "{db.schema_name}" CASCADE')
        await conn.close()
        await migrations.upgrade(db, from_revision)
        operations = -(-rows // 3)
        await fill(bench_dsn(), db.schema_name, operations, CHANNEL)
        start = time.perf_counter()
        await migrations.upgrade(db)
        elapsed = time.perf_counter() - start
    print(
        f"upgrade {from_revision} -> {migrations.head_revision()} of {operations * 3:,} audit "
        f"rows in place: {elapsed:.2f} s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, action="append", help="audit rows (repeatable)")
    parser.add_argument("--publish-cost", action="store_true")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--migrate-rows", type=int)
    parser.add_argument("--migrate-from", default="0013_anchored_audit")
    args = parser.parse_args()
    if args.migrate_rows:
        await migrate_cost(args.migrate_rows, args.migrate_from)
        return
    if args.publish_cost:
        await publish_cost(args.n, args.rounds)
        return
    for rows in args.rows or [1_000_000]:
        r = await one_size(rows)
        print(
            f"{r['rows']:>11,} rows ({r['operations']:,} operations, filled in "
            f"{r['fill_s']:.0f} s)\n"
            f"  checkpoint            {r['checkpoint_s']:7.1f} s  "
            f"{r['rows'] / r['checkpoint_s']:>9,.0f} rows/s  peak +{r['checkpoint_mib']:.0f} MiB"
            f"  (heads file {r['heads_file_mib']:.1f} MiB)\n"
            f"  verify --checkpoint   {r['verify_checkpoint_s']:7.1f} s  "
            f"{r['rows'] / r['verify_checkpoint_s']:>9,.0f} rows/s  "
            f"peak +{r['verify_checkpoint_mib']:.0f} MiB\n"
            f"  verify (chains only)  {r['verify_plain_s']:7.1f} s  "
            f"{r['rows'] / r['verify_plain_s']:>9,.0f} rows/s  "
            f"peak +{r['verify_plain_mib']:.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
