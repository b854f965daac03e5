"""One measurement in its own process: ``python _child.py KIND '{json params}'``.

``run_all.py`` starts one of these per timed run, so each system's worker has a process, an
event loop and a heap of its own. The result is printed as one line of JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from _common import pgoutbox_settings, run_loop


async def drain(p: dict[str, Any]) -> dict[str, Any]:
    system, dsn, n, params = p["system"], p["dsn"], p["n"], p["params"]
    if system == "pgoutbox":
        import bench_drain

        seconds = await bench_drain.drain(pgoutbox_settings(dsn), n, params, p["channel"])
    elif system == "bound":
        import bench_bound

        seconds = await bench_bound.drain(
            pgoutbox_settings(dsn), n, params["variant"], params["batch_size"], p["channel"]
        )
    elif system == "pgqueuer":
        import peers

        seconds = await peers.pgqueuer_drain(dsn, n, params["batch_size"])
    elif system == "procrastinate":
        import peers

        seconds = await peers.procrastinate_drain(dsn, n, params["concurrency"])
    else:
        raise ValueError(f"unknown system {system!r}")
    return {"seconds": seconds, "ops_per_s": n / seconds}


async def latency(p: dict[str, Any]) -> dict[str, Any]:
    import bench_drain

    p50, p99 = await bench_drain.latency(pgoutbox_settings(p["dsn"]), p["samples"])
    return {"p50_ms": p50, "p99_ms": p99}


async def publish(p: dict[str, Any]) -> dict[str, Any]:
    import bench_publish

    singles, batches = await bench_publish.measure(
        pgoutbox_settings(p["dsn"]), p["n"], p["batch"], p["rounds"]
    )
    return {"single": singles, "batched": batches}


async def memory(p: dict[str, Any]) -> dict[str, Any]:
    import bench_memory

    return await bench_memory.measure(pgoutbox_settings(p["dsn"]), p["total"], p["at"])


KINDS = {"drain": drain, "latency": latency, "publish": publish, "memory": memory}


def main() -> None:
    kind, params = sys.argv[1], json.loads(sys.argv[2])
    result = run_loop(lambda: KINDS[kind](params), params.get("loop", "asyncio"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
