"""Every pgoutbox benchmark, its peers and its targets, in one command.

    python benchmarks/run_all.py [--n 20000] [--rounds 3] [--history 1000000] [--quick]

Needs the ``bench`` extra (``pip install -e '.[dev,bench]'``) and a PostgreSQL where the user
may create databases (PGOUTBOX_BENCH_DSN, default postgresql://postgres@127.0.0.1:5432/postgres).
Every database it creates is named ``pgoutbox_bench_*`` and dropped at the end.

Each system gets a template database with its schema; every timed run gets a fresh clone, its
jobs published through the system's own API, VACUUM ANALYZE and CHECKPOINT, and then one worker
in a process of its own. Runs are interleaved (every case once per round, A B A B) and the
median of the rounds is reported. The table is printed, written into docs/benchmarks.md
between its results markers, and drawn in docs/benchmarks.png. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_drain
import bench_history
import peers
from _common import (
    PGOUTBOX_SCHEMA,
    Databases,
    machine,
    median,
    pgoutbox_settings,
    run_child,
    settle,
)

from pgoutbox import migrations

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKDOWN = DOCS / "benchmarks.md"
CHART = DOCS / "benchmarks.png"
BEGIN, END = "<!-- results -->", "<!-- /results -->"
CHANNEL = "bench"

# What a system's own command-line worker runs on: `pgq run` and `pgoutbox worker` pick uvloop
# when it is installed (a PgQueuer dependency; the `bench` extra installs pgoutbox[uvloop]);
# Procrastinate's CLI uses asyncio.run. The bound runs on pgoutbox's loop: it is its ceiling.
NATIVE_LOOP = {"pgoutbox": "uvloop", "bound": "uvloop", "pgqueuer": "uvloop"}


@dataclass
class Case:
    """One drain configuration, run once per round."""

    key: str
    system: str  # pgoutbox | bound | pgqueuer | procrastinate
    label: str  # how the table names it
    params: dict[str, Any]
    template: str  # which template database its clone comes from
    history: bool = False  # runs in the database holding the finished history
    loop: str = ""  # the event loop its worker ran on
    results: list[float] = field(default_factory=list)  # ops/s, one per round


def drain_cases() -> list[Case]:
    def pgoutbox(setting: str) -> Case:
        return Case(
            f"pgoutbox {setting}",
            "pgoutbox",
            f"pgoutbox, {setting}",
            bench_drain.CONFIGS[setting],
            "pgoutbox",
        )

    cases = [
        pgoutbox("defaults"),
        Case("history", "pgoutbox", "pgoutbox, defaults, with history", {}, "pgoutbox", True),
        pgoutbox("batch 10"),
        pgoutbox("batch 100"),
    ]
    for batch in (10, 100):
        cases.append(
            Case(
                f"pgqueuer batch {batch}",
                "pgqueuer",
                f"PgQueuer, batch {batch}",
                {"batch_size": batch},
                "pgqueuer",
            )
        )
    cases.append(
        Case(
            "procrastinate concurrency 10",
            "procrastinate",
            "Procrastinate, concurrency 10",
            {"concurrency": 10},
            "procrastinate",
        )
    )
    for batch in (10, 100):
        for variant in ("sequential", "two-lane"):
            cases.append(
                Case(
                    f"bound {variant} batch {batch}",
                    "bound",
                    f"bare SQL {variant}, batch {batch}",
                    {"variant": variant, "batch_size": batch},
                    "pgoutbox",
                )
            )
    return cases


# -- set-up --------------------------------------------------------------------------------


async def install_pgoutbox(dsn: str) -> None:
    await migrations.upgrade(pgoutbox_settings(dsn))


INSTALL: dict[str, Callable[[str], Any]] = {
    "pgoutbox": install_pgoutbox,
    "pgqueuer": peers.pgqueuer_install,
    "procrastinate": peers.procrastinate_install,
}


async def publish(case: Case, dsn: str, n: int) -> None:
    if case.system in ("pgoutbox", "bound"):
        await bench_drain.publish(pgoutbox_settings(dsn), n, CHANNEL)
    elif case.system == "pgqueuer":
        await peers.pgqueuer_publish(dsn, n)
    else:
        await peers.procrastinate_publish(dsn, n)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the runs ------------------------------------------------------------------------------


async def run_drains(
    dbs: Databases, cases: list[Case], args: argparse.Namespace, history_dsn: str
) -> None:
    for case in cases:
        case.loop = args.loop if args.loop != "native" else NATIVE_LOOP.get(case.system, "asyncio")
    # One untimed drain per system first: the first run after set-up pays for cold caches
    # (the server's and the OS's), which would otherwise land on whichever case comes first.
    warm_up = {case.system: case for case in reversed(cases) if not case.history}
    for case in warm_up.values():
        async with dbs.clone(case.template, f"warm_{case.system}") as dsn:
            await publish(case, dsn, min(args.n, 1000))
            await settle(dsn)
            await _drain(case, dsn, min(args.n, 1000))
    log(f"  warmed up: {', '.join(warm_up)}")
    for round_ in range(args.rounds):
        for i, case in enumerate(cases):
            if case.history:
                # One history database for every round: each round leaves N more finished.
                await publish(case, history_dsn, args.n)
                await settle(history_dsn)
                ops_per_s = await _drain(case, history_dsn, args.n)
            else:
                async with dbs.clone(case.template, f"r{round_}_{i}") as dsn:
                    await publish(case, dsn, args.n)
                    await settle(dsn)
                    ops_per_s = await _drain(case, dsn, args.n)
            case.results.append(ops_per_s)
            log(f"  round {round_ + 1}/{args.rounds}  {case.label:<40}{ops_per_s:>9,.0f} ops/s")


async def _drain(case: Case, dsn: str, n: int) -> float:
    """Run one drain in its own process; ops/s."""
    child = {
        "system": case.system,
        "dsn": dsn,
        "n": n,
        "params": case.params,
        "loop": case.loop,
        "channel": CHANNEL,
    }
    result = await asyncio.to_thread(run_child, "drain", child)
    return float(result["ops_per_s"])


async def run_others(dbs: Databases, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with dbs.clone("pgoutbox", "latency") as dsn:
        log("latency ...")
        out["latency"] = await asyncio.to_thread(
            run_child, "latency", {"dsn": dsn, "samples": args.latency_samples}
        )
    async with dbs.clone("pgoutbox", "publish") as dsn:
        log("publish ...")
        out["publish"] = await asyncio.to_thread(
            run_child,
            "publish",
            {
                "dsn": dsn,
                "n": args.publish_n,
                "batch": args.publish_batch,
                "rounds": args.rounds,
            },
        )
    async with dbs.clone("pgoutbox", "memory") as dsn:
        log(f"memory: publishing {args.memory_at[-1]:,} operations ...")
        await bench_drain.publish(pgoutbox_settings(dsn), args.memory_at[-1], "bench")
        await settle(dsn)
        log("memory: draining ...")
        out["memory"] = await asyncio.to_thread(
            run_child, "memory", {"dsn": dsn, "total": args.memory_at[-1], "at": args.memory_at}
        )
    return out


# -- the report ----------------------------------------------------------------------------


def _fmt_ops(values: list[float]) -> tuple[str, str]:
    return f"{median(values):,.0f} ops/s", " · ".join(f"{v:,.0f}" for v in values)


def _ratio(a: list[float], b: list[float]) -> float:
    return median(a) / median(b)


def report(
    cases: list[Case], others: dict[str, Any], args: argparse.Namespace, info: dict[str, str]
) -> tuple[str, list[tuple[str, bool]]]:
    by_key = {case.key: case for case in cases}
    lines = [
        f"Run: `{' '.join(['python benchmarks/run_all.py', *sys.argv[1:]])}`"
        + (" — **quick smoke run: reduced sizes, not representative**" if args.quick else ""),
        "",
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}, {info['ram']} RAM, load average at start {info['load']}",
        f"- PostgreSQL {info['postgresql']}, Python {info['python']}",
        f"- {info['packages']}",
        f"- N = {args.n:,} no-op operations per drain, {args.rounds} interleaved rounds, "
        f"history {args.history:,} finished operations (written in "
        f"{others['history_fill_seconds']:.0f} s), median of the rounds",
        "",
        "| measurement | system and setting | event loop | median | rounds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        med, rounds = _fmt_ops(case.results)
        what = "drain (history)" if case.history else "drain"
        lines.append(f"| {what} | {case.label} | {case.loop} | {med} | {rounds} |")
    pub = others["publish"]
    for key, label in (
        ("single", "`publish_operation` + commit, 1 per transaction"),
        ("batched", f"`publish_many`, {args.publish_batch} per transaction"),
    ):
        med, rounds = _fmt_ops(pub[key])
        lines.append(f"| publish | {label} | asyncio | {med} | {rounds} |")
    lat = others["latency"]
    lines.append(
        f"| latency | commit → handler start, p50 ({args.latency_samples} samples) | asyncio "
        f"| {lat['p50_ms']:.2f} ms | |"
    )
    lines.append(f"| latency | commit → handler start, p99 | asyncio | {lat['p99_ms']:.2f} ms | |")
    mem = others["memory"]
    for at in args.memory_at:
        lines.append(
            f"| memory | worker RSS after {at:,} operations | asyncio | {mem[str(at)]:.1f} MiB | |"
        )

    bound = {
        b: max(
            by_key[f"bound sequential batch {b}"].results,
            by_key[f"bound two-lane batch {b}"].results,
            key=median,
        )
        for b in (10, 100)
    }
    checks: list[tuple[str, str, bool]] = []
    for b in (10, 100):
        ratio = _ratio(by_key[f"pgoutbox batch {b}"].results, by_key[f"pgqueuer batch {b}"].results)
        checks.append(
            # Three decimals: 1.4995 printed as "1.50" next to FAIL reads as a contradiction.
            (f"drain ≥ 1.5 x PgQueuer, batch {b} (audit chain on)", f"{ratio:.3f} x", ratio >= 1.5)
        )
    for b in (10, 100):
        ratio = _ratio(by_key[f"pgoutbox batch {b}"].results, bound[b])
        checks.append((f"drain ≥ 0.5 x bare-SQL bound, batch {b}", f"{ratio:.2f} x", ratio >= 0.5))
    checks.append(("latency p50 ≤ 5 ms", f"{lat['p50_ms']:.2f} ms", lat["p50_ms"] <= 5))
    checks.append(("latency p99 ≤ 25 ms", f"{lat['p99_ms']:.2f} ms", lat["p99_ms"] <= 25))
    ratio = _ratio(by_key["history"].results, by_key["pgoutbox defaults"].results)
    checks.append(
        (
            f"{args.history:,} finished operations cost ≤ 10 % of drain throughput",
            f"{ratio:.2f} x the empty table (cost {1 - ratio:.1%})",
            1 - ratio <= 0.10,
        )
    )
    first, last = mem[str(args.memory_at[0])], mem[str(args.memory_at[-1])]
    grow = (last - first) / first
    checks.append(
        (
            f"worker RSS grows ≤ 10 % from {args.memory_at[0]:,} to {args.memory_at[-1]:,}",
            f"{grow:+.1%}",
            grow <= 0.10,
        )
    )
    lines += [
        "",
        "The bound for a batch size is the faster of its two bare-SQL variants. "
        "Ratios are of medians from this same run.",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {value} | {'PASS' if ok else 'FAIL'} |" for name, value, ok in checks]
    lines += ["", "![drain throughput per system and batch size](benchmarks.png)"]
    return "\n".join(lines), [(name, ok) for name, _, ok in checks]


def write_markdown(table: str) -> None:
    text = MARKDOWN.read_text() if MARKDOWN.exists() else "# Benchmarks\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    MARKDOWN.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


CHART_GROUPS = (
    (
        "batch 10",
        (
            "pgoutbox batch 10",
            "pgqueuer batch 10",
            "bound sequential batch 10",
            "bound two-lane batch 10",
        ),
    ),
    (
        "batch 100",
        (
            "pgoutbox batch 100",
            "pgqueuer batch 100",
            "bound sequential batch 100",
            "bound two-lane batch 100",
        ),
    ),
    (
        "defaults, history; Procrastinate",
        ("pgoutbox defaults", "history", "procrastinate concurrency 10"),
    ),
)
COLOURS = {
    "pgoutbox": "#1f77b4",
    "pgqueuer": "#ff7f0e",
    "procrastinate": "#2ca02c",
    "bound": "#7f7f7f",
}


def draw_chart(cases: list[Case], args: argparse.Namespace, info: dict[str, str]) -> None:
    """Horizontal bars of drain throughput (median, min-max whiskers), grouped by batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    by_key = {case.key: case for case in cases}
    rows: list[Case | str] = []  # top to bottom: a group's title, then its cases
    for title, keys in CHART_GROUPS:
        rows.append(title)
        rows += [by_key[key] for key in keys]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.6))
    ticks, labels = [], []
    for y, row in enumerate(reversed(rows)):  # barh counts from the bottom
        if isinstance(row, str):
            ax.text(0, y, row, fontweight="bold", va="center")
            continue
        mid = median(row.results)
        ax.barh(
            y,
            mid,
            xerr=[[mid - min(row.results)], [max(row.results) - mid]],
            color=COLOURS[row.system],
            capsize=3,
            hatch="//" if row.history else None,
        )
        ax.text(max(row.results), y, f"  {mid:,.0f}", va="center", fontsize=8)
        ticks.append(y)
        labels.append(f"{row.label} ({row.loop})")
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.2)
    ax.set_xlabel(f"ops/s draining {args.n:,} no-op operations, one worker (median; min-max)")
    title = "Drain throughput per system and batch size"
    if args.quick:
        title += " — quick smoke run, not representative"
    ax.set_title(f"{title}\n{info['cpu']}, PostgreSQL {info['postgresql']}", fontsize=10)
    ax.legend(
        handles=[
            Patch(color=colour, label=name)
            for name, colour in (
                ("pgoutbox", COLOURS["pgoutbox"]),
                ("PgQueuer", COLOURS["pgqueuer"]),
                ("Procrastinate", COLOURS["procrastinate"]),
                ("bare-SQL bound", COLOURS["bound"]),
            )
        ],
        loc="lower right",
        fontsize=8,
    )
    ax.margins(x=0.12)
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    plt.close(fig)


# -- entry point ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--n", type=int, help="operations per drain (20000; quick 2000)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3; quick 2)")
    parser.add_argument("--history", type=int, help="finished operations (1000000; quick 20000)")
    parser.add_argument("--memory-at", type=int, nargs="+", help="RSS checkpoints (50000 200000)")
    parser.add_argument("--latency-samples", type=int, help="latency samples (500; quick 100)")
    parser.add_argument("--publish-n", type=int, help="single publishes per round (5000)")
    parser.add_argument("--publish-batch", type=int, default=500, help="publish_many batch")
    parser.add_argument(
        "--loop",
        choices=["native", "asyncio", "uvloop"],
        default="native",
        help="event loop of the workers: each system's own CLI choice (native), or one for all",
    )
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument(
        "--drop-leftovers",
        action="store_true",
        help="drop every pgoutbox_bench_* database (left by a killed run) and exit",
    )
    parser.add_argument("--json", type=Path, help="also write every raw number here")
    args = parser.parse_args()
    full = {
        "n": 20_000,
        "rounds": 3,
        "history": 1_000_000,
        "memory_at": [50_000, 200_000],
        "latency_samples": 500,
        "publish_n": 5000,
    }
    quick = {
        "n": 2000,
        "rounds": 2,
        "history": 20_000,
        "memory_at": [5000, 20_000],
        "latency_samples": 100,
        "publish_n": 300,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


async def main() -> None:
    args = parse_args()
    dbs = Databases()
    if args.drop_leftovers:
        dropped = await dbs.drop_leftovers()
        print(f"dropped {len(dropped)} database(s): {', '.join(dropped) or '-'}")
        return
    started = time.perf_counter()
    info = await machine()
    cases = drain_cases()
    try:
        log(f"set-up: template databases {dbs.name('*')}")
        for system, install in INSTALL.items():
            await install(await dbs.create(system))
        history_dsn = await dbs.create("history", template=dbs.name("pgoutbox"))
        log(f"history: writing {args.history:,} finished operations ...")
        fill_seconds = await bench_history.fill(history_dsn, PGOUTBOX_SCHEMA, args.history, CHANNEL)
        log(f"history: written in {fill_seconds:.1f} s")
        log(f"drain: {len(cases)} cases x {args.rounds} rounds, N = {args.n:,}")
        await run_drains(dbs, cases, args, history_dsn)
        others = await run_others(dbs, args)
        others["history_fill_seconds"] = fill_seconds
    finally:
        await dbs.drop_all()
    table, checks = report(cases, others, args, info)
    print(table)
    print(
        f"\n{sum(ok for _, ok in checks)}/{len(checks)} targets met; "
        f"took {time.perf_counter() - started:.0f} s"
    )
    if not args.no_docs:
        write_markdown(table)
        draw_chart(cases, args, info)
        print(f"written: {MARKDOWN.relative_to(DOCS.parent)}, {CHART.relative_to(DOCS.parent)}")
    if args.json:
        raw = {
            "machine": info,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "drain": {
                case.key: {"ops_per_s": case.results, "loop": case.loop, **case.params}
                for case in cases
            },
            **others,
        }
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
