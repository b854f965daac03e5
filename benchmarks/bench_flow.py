"""What flow control costs, and whether a rate limit delivers its rate.

    python benchmarks/bench_flow.py unlimited --baseline DIR [--n 20000] [--rounds 5]
    python benchmarks/bench_flow.py instructions --baseline DIR [--n 20000]
    python benchmarks/bench_flow.py limited [--n 20000] [--rate 1000] [--workers 2]

unlimited: the drain of bench_drain.py (no limit declared) by this checkout and by another one
(DIR, e.g. ``git worktree add /tmp/base <commit before flow control>``), alternated round by
round, each in a fresh process and schema; prints both medians and their ratio.

instructions: the same drain's worker cost counted, not timed, for a machine too noisy for
ops/s ratios to show a few per cent: each checkout drains 1,000 and then 3,000 operations under
valgrind's callgrind (``apt install valgrind``), counting only the drain (start-up included);
the difference gives the instructions per operation, the rest the fixed cost, and the two give
the cost of an N-operation drain. Only the worker is counted: the database's statements per
operation are the same (docs/benchmarks.md).

limited: N no-op operations of a type limited to RATE starts per second (default burst), drained
by WORKERS worker processes; the achieved rate is measured on the database's clock from the
claims in the audit log: (N - 1) / (last claim - first claim).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from _common import bench_database, median

from pgoutbox import Settings, WorkflowRouter, WorkflowSystem
from pgoutbox.settings import DatabaseSettings

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
LIMITED_TYPE = "bench.limited"


def drain_once(checkout: Path, n: int) -> dict[str, tuple[float, float]]:
    """(ops/s, worker CPU us per op) per configuration of one bench_drain.py round run by
    ``checkout``'s code."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, str(checkout / "benchmarks" / "bench_drain.py"), "--n", str(n),
         "--rounds", "1", "--latency-samples", "1"],
        cwd=checkout / "benchmarks", env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = re.findall(
        r"^  (defaults|batch 10|batch 100)\s+([\d,]+) ops/s.*worker CPU (\d+) us", done.stdout, re.M
    )
    return {name: (float(rate.replace(",", "")), float(cpu)) for name, rate, cpu in found}


def unlimited(baseline: Path, n: int, rounds: int) -> None:
    rates: dict[str, dict[str, list[float]]] = {"baseline": {}, "this checkout": {}}
    cpus: dict[str, dict[str, list[float]]] = {"baseline": {}, "this checkout": {}}
    for round_ in range(rounds):
        # Alternate which checkout goes first, so a drift in the machine's load is shared.
        order = [("baseline", baseline), ("this checkout", CHECKOUT)][:: 1 if round_ % 2 else -1]
        for label, checkout in order:
            for name, (rate, cpu) in drain_once(checkout, n).items():
                rates[label].setdefault(name, []).append(rate)
                cpus[label].setdefault(name, []).append(cpu)
    print(f"drain of {n:,} no-op operations, no limit declared, median of {rounds} alternated")
    for name in rates["baseline"]:
        base, this = median(rates["baseline"][name]), median(rates["this checkout"][name])
        base_cpu, this_cpu = median(cpus["baseline"][name]), median(cpus["this checkout"][name])
        print(
            f"  {name:<10} baseline {base:>8,.0f} ops/s   this checkout {this:>8,.0f} ops/s   "
            f"ratio {this / base:.3f};   worker CPU {base_cpu:.0f} / {this_cpu:.0f} us per op, "
            f"ratio {this_cpu / base_cpu:.3f}"
        )


def instructions_of(checkout: Path, n: int) -> int:
    """Instructions the worker executes for one drain of ``n`` operations by ``checkout``'s
    code (callgrind, counting only the drain)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             sys.executable, __file__, "_counted", str(checkout), str(n)],
            cwd=checkout / "benchmarks", env={**os.environ, "PYTHONPATH": str(checkout)},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        totals = re.search(r"^totals: (\d+)", out.read_text(), re.M)
        assert totals is not None, "callgrind wrote no totals"
        return int(totals.group(1))


async def counted(checkout: Path, n: int) -> None:
    """A drain of ``n`` operations (bench_drain's defaults) with callgrind counting only it."""
    sys.path.insert(0, str(checkout / "benchmarks"))
    import bench_drain

    def count(on: bool) -> None:
        subprocess.run(
            ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
            check=True, capture_output=True,
        )  # fmt: skip

    async with bench_database() as db:
        await bench_drain.publish(db, 200, "warm")  # imports and first-drain effects
        await bench_drain.drain(db, 200, {}, "warm")
        await bench_drain.publish(db, n, "counted")
        count(True)
        await bench_drain.drain(db, n, {}, "counted")
        count(False)


def instructions(baseline: Path, n: int) -> None:
    small, large = 1000, 3000
    cost = {}
    for label, checkout in (("baseline", baseline), ("this checkout", CHECKOUT)):
        a, b = instructions_of(checkout, small), instructions_of(checkout, large)
        per_op = (b - a) / (large - small)
        cost[label] = (per_op, a - per_op * small)
    (base_op, base_fixed), (this_op, this_fixed) = cost["baseline"], cost["this checkout"]
    print("worker instructions of a drain (callgrind; defaults), baseline / this checkout")
    print(
        f"  per operation   {base_op:>12,.0f} / {this_op:>12,.0f}   ratio {this_op / base_op:.3f}"
    )
    print(f"  fixed (start)   {base_fixed:>12,.0f} / {this_fixed:>12,.0f}")
    total_base, total_this = base_fixed + n * base_op, this_fixed + n * this_op
    print(f"  drain of {n:,}: ratio {total_this / total_base:.3f}")


async def worker(dsn: str, schema: str, rate: str, seconds: float) -> None:
    """A worker process of the limited drain: runs until ``seconds`` have passed."""
    router = WorkflowRouter()

    @router.on(LIMITED_TYPE, rate=rate)
    async def noop(ctx: object, payload: object) -> None:
        return None

    db = DatabaseSettings(dsn=dsn, schema=schema)
    settings = Settings(database=db, workflow_system={"channel": "limited"})
    async with WorkflowSystem(router=router, settings=settings):
        await asyncio.sleep(seconds)


async def limited(n: int, rate: int, workers: int) -> None:
    async with bench_database() as db:
        conn = await asyncpg.connect(**db.connect_kwargs())
        try:
            await conn.execute(
                f'INSERT INTO "{db.schema_name}".operations (operation_type, channel, payload) '
                "SELECT $1, 'limited', '{}' FROM generate_series(1, $2)",
                LIMITED_TYPE,
                n,
            )
            budget = n / rate * 1.5 + 30
            command = [sys.executable, __file__, "_worker", db.dsn or "", db.schema_name]
            procs = [
                await asyncio.create_subprocess_exec(*command, f"{rate}/s", str(budget), cwd=HERE)
                for _ in range(workers)
            ]
            deadline = time.monotonic() + budget
            while time.monotonic() < deadline:
                left = await conn.fetchval(
                    f'SELECT count(*) FROM "{db.schema_name}".operations '
                    "WHERE state <> 'succeeded'"
                )
                if not left:
                    break
                await asyncio.sleep(0.2)
            for proc in procs:
                proc.terminate()
            for proc in procs:
                await proc.wait()
            first, last, claims = await conn.fetchrow(
                "SELECT extract(epoch FROM min(recorded_at)), extract(epoch FROM max(recorded_at)),"
                " count(*)"
                f" FROM \"{db.schema_name}\".audit_log WHERE trigger = 'claim'"
            )
        finally:
            await conn.close()
    achieved = (claims - 1) / float(last - first)
    print(
        f"limited drain: {claims:,} operations limited to {rate}/s on {workers} worker processes:"
        f" {achieved:,.1f} starts/s ({achieved / rate:.1%} of the limit)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        dsn, schema, rate, seconds = sys.argv[2:6]
        asyncio.run(worker(dsn, schema, rate, float(seconds)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_counted":
        asyncio.run(counted(Path(sys.argv[2]), int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["unlimited", "instructions", "limited"])
    parser.add_argument("--baseline", type=Path, help="the checkout to compare with")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.mode in ("unlimited", "instructions"):
        if args.baseline is None:
            parser.error(f"{args.mode} needs --baseline DIR (a checkout of the commit to compare)")
        if args.mode == "unlimited":
            unlimited(args.baseline.resolve(), args.n, args.rounds)
        else:
            instructions(args.baseline.resolve(), args.n)
    else:
        asyncio.run(limited(args.n, args.rate, args.workers))


if __name__ == "__main__":
    main()
