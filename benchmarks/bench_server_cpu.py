"""Server CPU per operation of pgoutbox's protocol, with and without the audit triggers.

    python benchmarks/bench_server_cpu.py [--n 20000] [--rounds 3] [--batch 10 100]

Wall-clock drains on a shared 2-core machine vary by 15-30 % from run to run; the CPU time the
PostgreSQL backend spends on the same work varies far less. This drives the bare protocol (the
bound's sequential variant: ``operations_record_and_claim`` recording one batch and claiming
the next, on one connection set up as the worker's pool sets up its own) over tables whose
statistics were just gathered (VACUUM ANALYZE, as before every timed drain and as autovacuum
does), and reads that backend's user + system CPU time from
``/proc/<pid>/stat`` (Linux, a server on the same machine). It runs twice per batch size: as
shipped, and with the user triggers of ``operations`` disabled -- no audit row, no hash chain,
no lifecycle check -- which is what the audit costs per operation. The second case needs a
superuser (``ALTER TABLE ... DISABLE TRIGGER USER`` on the benchmark's own throwaway schema).
"""

from __future__ import annotations

import argparse
import asyncio
import os

import asyncpg
from _common import bench_database, median
from bench_bound import WORKER_KEY, sequential_drain
from bench_drain import publish

from pgoutbox.db import hot_path_connect_kwargs

_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 of /proc/<pid>/stat (utime, stime), counted after the command name.
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    async with bench_database() as db:
        schema = db.schema_name
        conn = await asyncpg.connect(**hot_path_connect_kwargs(db, WORKER_KEY))
        try:
            for audited in (True, False):
                if not audited:
                    await conn.execute(f'ALTER TABLE "{schema}".operations DISABLE TRIGGER USER')
                for batch in args.batch:
                    per_op = []
                    for round_ in range(args.rounds):
                        channel = f"cpu_{int(audited)}_{batch}_{round_}"
                        await publish(db, args.n, channel)
                        await conn.execute("VACUUM ANALYZE")
                        await conn.execute("CHECKPOINT")
                        before = _cpu_seconds(conn.get_server_pid())
                        recorded = await sequential_drain(conn, schema, channel, batch)
                        spent = _cpu_seconds(conn.get_server_pid()) - before
                        assert recorded == args.n, (recorded, args.n)
                        per_op.append(spent / args.n * 1e6)
                    rounds = ", ".join(f"{v:.0f}" for v in per_op)
                    label = "as shipped" if audited else "audit triggers off"
                    print(
                        f"  {label:<20} batch {batch:<4} {median(per_op):>6.0f} us of server CPU "
                        f"per operation (claim + record)   ({rounds})"
                    )
        finally:
            await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
