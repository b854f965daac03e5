"""The web console's pages with a million operations: server time per page.

    python benchmarks/bench_web.py [--operations 1000000] [--requests 20]

``fill`` writes ``operations`` operations spread over the last 30 days, as workers would have
left them: of five types, 97 % succeeded (publish, claim, succeed), 2 % dead after a failed
attempt whose error and traceback are in the audit row (publish, claim, give_up), 1 % still
pending (publish); payloads of a few fields. Every audit row's hash is computed by the schema's
own ``audit_hash`` function, so every chain verifies. As in bench_history.py, the operations
table's triggers are off inside the filling transaction (the owner's right) and back to their
exact previous modes before it commits; then VACUUM ANALYZE, as autovacuum would have done.

Each page is requested by calling the console's ASGI application in this process (no HTTP
client or socket in the timing): the server's time, from the request to the last byte of the
response, database round trips included. Median and 95th percentile of ``requests`` requests
after three warm-up requests. The overview serves counts taken at most 5 s before (in the
background); "overview, counting on the request" is what the first request after start pays,
counting included.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import asyncpg
from _common import bench_database, bench_dsn, median, percentile

from pgoutbox.web import create_app

FILL_CHUNK = 100_000
WORKER = "bench-web:1:0000000000000000"
TRACEBACK = (
    "attempt 1 failed: ConnectionError: payment provider unreachable\n"
    "Traceback (most recent call last):\n"
    '  File "/srv/app/handlers.py", line 42, in charge_card\n'
    "    await provider.charge(payload['order'], payload['cents'])\n"
    "ConnectionError: payment provider unreachable"
)
SPREAD_SECONDS = 30 * 24 * 3600  # the operations were created over the last 30 days

_TRIGGER_MODES = {
    "A": "ENABLE ALWAYS TRIGGER",
    "O": "ENABLE TRIGGER",
    "R": "ENABLE REPLICA TRIGGER",
    "D": "DISABLE TRIGGER",
}


def _fill_sql(schema: str) -> str:
    s = f'"{schema}"'
    # $1 rows in this chunk, $2 the number of rows written before it, $3 all rows, $4 worker,
    # $5 the error, $6 the spread in seconds.
    return f"""
WITH ops AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('{s}.operations', 'id')) AS id,
           now() - make_interval(secs => ($3 - ($2 + g)) * $6::float8 / $3) AS at,
           (ARRAY['shop.charge_card', 'shop.refund', 'mail.send_receipt', 'ledger.post',
                  'crm.sync_contact'])[1 + g % 5] AS type,
           CASE WHEN g % 50 = 0 THEN 'dead' WHEN g % 100 = 1 THEN 'pending'
                ELSE 'succeeded' END AS state
    FROM generate_series(1, $1) g
), chain AS MATERIALIZED (
    SELECT id, at, type, state, h1, h2, h3
    FROM ops,
    LATERAL (SELECT {s}.audit_hash(NULL, id, 1, type, NULL, 'pending', 'publish', 0,
                                   current_user, NULL, at) AS h1) publish,
    LATERAL (SELECT CASE WHEN state <> 'pending' THEN
                 {s}.audit_hash(h1, id, 2, type, 'pending', 'claimed', 'claim', 1, $4, NULL,
                                at + interval '1 second') END AS h2) claim,
    LATERAL (SELECT CASE state
                 WHEN 'succeeded' THEN
                     {s}.audit_hash(h2, id, 3, type, 'claimed', 'succeeded', 'succeed', 1, $4,
                                    NULL, at + interval '2 seconds')
                 WHEN 'dead' THEN
                     {s}.audit_hash(h2, id, 3, type, 'claimed', 'dead', 'give_up', 1, $4, $5,
                                    at + interval '2 seconds') END AS h3) ended
), operations AS (
    INSERT INTO {s}.operations
        (id, operation_type, channel, payload, state, attempts, run_at, created_at, created_by,
         updated_at, last_error, version, audit_seq, audit_hash)
    OVERRIDING SYSTEM VALUE
    SELECT id, type, 'bench',
           jsonb_build_object('order', id, 'customer', 'c-' || (id % 5000), 'cents', id % 9973),
           state, CASE WHEN state = 'pending' THEN 0 ELSE 1 END, at, at, current_user,
           at + CASE WHEN state = 'pending' THEN interval '0' ELSE interval '2 seconds' END,
           CASE WHEN state = 'dead' THEN $5 END,
           CASE WHEN state = 'pending' THEN 0 ELSE 2 END,
           CASE WHEN state = 'pending' THEN 1 ELSE 3 END, coalesce(h3, h1)
    FROM chain
)
INSERT INTO {s}.audit_log
    (operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, detail,
     recorded_at, prev_hash, hash)
SELECT id, 1, type, NULL, 'pending', 'publish', 0, current_user, NULL, at, NULL, h1 FROM chain
UNION ALL
SELECT id, 2, type, 'pending', 'claimed', 'claim', 1, $4, NULL, at + interval '1 second', h1, h2
FROM chain WHERE state <> 'pending'
UNION ALL
SELECT id, 3, type, 'claimed', state, CASE state WHEN 'dead' THEN 'give_up' ELSE 'succeed' END,
       1, $4, CASE state WHEN 'dead' THEN $5 END, at + interval '2 seconds', h2, h3
FROM chain WHERE state <> 'pending'
"""


async def fill(dsn: str, schema: str, count: int) -> float:
    """Write ``count`` operations and their audit chains; the seconds taken, VACUUM included."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT tgname, tgenabled FROM pg_trigger "
            "WHERE tgrelid = $1::regclass AND NOT tgisinternal",
            f'"{schema}".operations',
        )
        before = {row["tgname"]: bytes(row["tgenabled"]).decode() for row in rows}
        start = time.perf_counter()
        sql = _fill_sql(schema)
        for offset in range(0, count, FILL_CHUNK):
            async with conn.transaction():
                await conn.execute(f'ALTER TABLE "{schema}".operations DISABLE TRIGGER USER')
                await conn.execute(
                    sql,
                    min(FILL_CHUNK, count - offset),
                    offset,
                    count,
                    WORKER,
                    TRACEBACK,
                    SPREAD_SECONDS,
                )
                for name, mode in before.items():
                    await conn.execute(
                        f'ALTER TABLE "{schema}".operations {_TRIGGER_MODES[mode]} "{name}"'
                    )
        await conn.execute(f'VACUUM ANALYZE "{schema}".operations')
        await conn.execute(f'VACUUM ANALYZE "{schema}".audit_log')
        return time.perf_counter() - start
    finally:
        await conn.close()


async def request(app: Any, path: str) -> tuple[int, int, float]:
    """GET ``path`` from the ASGI ``app`` in-process: status, body bytes, seconds."""
    target, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": target,
        "raw_path": target.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }
    status = 0
    size = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            size += len(message.get("body", b""))

    start = time.perf_counter()
    await app(scope, receive, send)
    return status, size, time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--operations", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    async with bench_database() as db:
        seconds = await fill(bench_dsn(), db.schema_name, args.operations)
        print(f"filled {args.operations:,} operations in {seconds:.1f} s")
        conn = await asyncpg.connect(bench_dsn())
        try:
            s = f'"{db.schema_name}"'
            dead = await conn.fetchval(f"SELECT max(id) FROM {s}.operations WHERE state = 'dead'")
            middle = await conn.fetchval(f"SELECT (min(id) + max(id)) / 2 FROM {s}.operations")
            audit_rows = await conn.fetchval(f"SELECT count(*) FROM {s}.audit_log")
        finally:
            await conn.close()
        print(f"{audit_rows:,} audit rows")
        pages = {
            "overview  /": "/",
            "overview, counting on the request": "/",
            "list      /operations": "/operations",
            "list      deep page (keyset)": f"/operations?before={middle}",
            "list      state=dead": "/operations?state=dead",
            "list      type=shop.refund": "/operations?type=shop.refund",
            "list      payload search, no match": "/operations?q=no-such-text",
            "operation /operations/ID (dead)": f"/operations/{dead}",
        }
        app = create_app(db)
        console = app.state.console
        print(f"{'page':<38} {'median ms':>10} {'p95 ms':>8} {'KiB':>6}")
        try:
            for label, path in pages.items():
                times = []
                for i in range(3 + args.requests):
                    if label.startswith("overview, counting"):
                        console._overview = None  # as the first request finds it
                    status, size, took = await request(app, path)
                    if status != 200:
                        raise RuntimeError(f"{path}: HTTP {status}")
                    if i >= 3:
                        times.append(took * 1000)
                times.sort()
                print(
                    f"{label:<38} {median(times):>10.1f} {percentile(times, 0.95):>8.1f} "
                    f"{size / 1024:>6.0f}"
                )
        finally:
            await app.state.console.close()


if __name__ == "__main__":
    asyncio.run(main())
