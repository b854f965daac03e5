"""Timeouts, snoozes and cancelling running work across 4 worker processes on one database.

Each test runs four real ``pgoutbox worker running_app:system`` processes; an operator's cancel
comes from the ``pgoutbox`` CLI in yet another process. What the handlers did is read from
their ``events`` table (written through their own connections), what was recorded from the
operations and the audit log, and every time is the database's.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from faultkit import Supervisor, dsn_of, run_cli

from pgoutbox import DatabaseSessionManager, publish_many
from pgoutbox.audit import verify_chains
from pgoutbox.settings import DatabaseSettings

T = TypeVar("T")
DEADLINE = 120.0  # generous: four processes on a loaded two-core machine
CHANNEL = "running"


@pytest.fixture
async def events(db_settings: DatabaseSettings, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The schema of the ``events`` table running_app.py's handlers write to."""
    schema = f"{db_settings.schema_name}_effects"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(
        f'CREATE TABLE "{schema}".events (id bigserial PRIMARY KEY, operation_id bigint, '
        "attempt int, worker_pid int, event text, at timestamptz DEFAULT clock_timestamp())"
    )
    yield schema
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def workers(
    db_settings: DatabaseSettings, events: str, tmp_path: Path
) -> AsyncIterator[Supervisor]:
    """Four running_app worker processes, stopped (SIGTERM) at the end; their logs are printed,
    which pytest shows when the test failed."""
    supervisor = Supervisor(
        db_settings,
        CHANNEL,
        events,
        tmp_path,
        size=4,
        app="running_app:system",
        # A heartbeat far apart: a cancel reaches the holder by notification, not by it.
        extra_env={"PGOUTBOX_WORKFLOW_SYSTEM__LEASE_SECONDS": "30"},
    )
    supervisor.start()
    try:
        yield supervisor
    finally:
        codes = await supervisor.stop()
        print(supervisor.logs())
        assert codes == [0, 0, 0, 0]


async def wait_for(check: Callable[[], Awaitable[T]], what: str, within: float = DEADLINE) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.1)


async def publish(
    sm: DatabaseSessionManager, operation_type: str, payloads: list[Any]
) -> list[int]:
    async with sm.session() as session:
        ids = await publish_many(
            session,
            [
                {"operation_type": operation_type, "payload": p, "channel": CHANNEL}
                for p in payloads
            ],
        )
        await session.commit()
    return [int(i) for i in ids]


async def states(conn: asyncpg.Connection, s: str, ids: list[int]) -> dict[int, str]:
    rows = await conn.fetch(
        f'SELECT id, state FROM "{s}".operations WHERE id = ANY($1::bigint[])', ids
    )
    return {r["id"]: r["state"] for r in rows}


async def settled(conn: asyncpg.Connection, s: str, ids: list[int], wanted: set[str]) -> bool:
    return set((await states(conn, s, ids)).values()) <= wanted


async def trail(conn: asyncpg.Connection, s: str, op_id: int) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f'SELECT * FROM "{s}".audit_log WHERE operation_id = $1 ORDER BY seq', op_id
        )
    )


async def handler_events(
    conn: asyncpg.Connection, schema: str, op_id: int
) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        f'SELECT attempt, event FROM "{schema}".events WHERE operation_id = $1 ORDER BY id', op_id
    )
    return [(r["attempt"], r["event"]) for r in rows]


def cli_args(db: DatabaseSettings, *args: str) -> list[str]:
    return ["--dsn", dsn_of(db), "--schema", db.schema_name, *args]


@pytest.fixture
def s(db_settings: DatabaseSettings) -> str:
    return db_settings.schema_name


# -- timeouts ------------------------------------------------------------------------------------


async def test_a_handler_that_hangs_past_its_timeout_is_failed_and_retried(
    workers: Supervisor, sm: DatabaseSessionManager, conn: asyncpg.Connection, events: str, s: str
) -> None:
    [op] = await publish(sm, "run.hang", [{}])

    await wait_for(lambda: settled(conn, s, [op], {"succeeded"}), "the retry to succeed")

    rows = await trail(conn, s, op)
    assert [r["trigger"] for r in rows] == ["publish", "claim", "fail", "claim", "succeed"]
    assert "HandlerTimedOut: timed out after 1 s" in rows[2]["detail"]
    # It was cancelled, not left running: its CancelledError arrived (and it cleaned up).
    assert await handler_events(conn, events, op) == [
        (1, "started"),
        (1, "cancelled"),
        (2, "started"),
    ]
    # The failure came at least the timeout after the claim (database time).
    assert rows[2]["recorded_at"] - rows[1]["recorded_at"] >= timedelta(seconds=1)


# -- snoozes -------------------------------------------------------------------------------------


def due_again_at(detail: str) -> datetime:
    found = re.search(r"due again at (.+)$", detail)
    assert found is not None, detail
    return datetime.fromisoformat(found.group(1))


async def test_snoozes_spend_no_attempt_resume_when_due_and_are_bounded(
    workers: Supervisor, sm: DatabaseSessionManager, conn: asyncpg.Connection, s: str
) -> None:
    # One attempt allowed: only snoozes that spend none let three runs happen. The second
    # operation snoozes more often than its max_snoozes (3) allows.
    ok, bounded = await publish(
        sm, "run.snooze", [{"runs": 3, "seconds": 1}, {"runs": 10, "seconds": 0}]
    )

    await wait_for(lambda: settled(conn, s, [ok], {"succeeded"}), "the snoozed operation")
    await wait_for(lambda: settled(conn, s, [bounded], {"dead"}), "the bound")

    row = await conn.fetchrow(f'SELECT * FROM "{s}".operations WHERE id = $1', ok)
    assert (row["attempts"], row["step_attempts"], row["snoozes"]) == (3, 1, 2)
    rows = await trail(conn, s, ok)
    assert [r["trigger"] for r in rows] == [
        "publish",
        *("claim", "snooze") * 2,
        "claim",
        "succeed",
    ]
    for claim, snoozed, next_claim in ((rows[1], rows[2], rows[3]), (rows[3], rows[4], rows[5])):
        assert snoozed["attempt"] == claim["attempt"]
        due = due_again_at(snoozed["detail"])
        assert due >= claim["recorded_at"] + timedelta(seconds=1)
        assert next_claim["recorded_at"] >= due
    row = await conn.fetchrow(f'SELECT * FROM "{s}".operations WHERE id = $1', bounded)
    assert row["snoozes"] == 3
    assert row["last_error"].startswith("SnoozeLimitReached: snoozed 3 times, the most allowed")
    assert [r["trigger"] for r in await trail(conn, s, bounded)][-2:] == ["claim", "give_up"]


# -- cancelling running work ---------------------------------------------------------------------


async def test_the_cli_cancels_operations_running_in_worker_processes(
    workers: Supervisor,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    db_settings: DatabaseSettings,
    events: str,
    s: str,
) -> None:
    # More than one process runs at once (4 handlers each): some are queued behind the others
    # in the process that claimed them, and are cancelled before they run.
    ids = await publish(sm, "run.long", [{} for _ in range(6)])

    async def claimed_and_started() -> bool:
        n = await conn.fetchval(
            f'SELECT count(DISTINCT operation_id) FROM "{events}".events WHERE event = $1',
            "started",
        )
        return n >= 4 and await settled(conn, s, ids, {"claimed"})

    await wait_for(claimed_and_started, "every operation claimed, handlers running")
    result = await run_cli(
        *cli_args(db_settings, "ops", "cancel", *map(str, ids)),
        "--actor", "alice", "--reason", "INC-42", "--wait", "60s",
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"operation {op}: claimed -> cancelled (cancel, by alice: the worker stopped its "
        "running handler)"
        for op in ids
    ]
    for op in ids:
        rows = await trail(conn, s, op)
        assert [r["trigger"] for r in rows] == ["publish", "claim", "abort"]
        abort = rows[-1]
        assert (abort["actor"], abort["from_state"], abort["to_state"]) == (
            "alice",
            "claimed",
            "cancelled",
        )
        # The holder recorded it: its claim's worker id, in the detail; not retried.
        assert "INC-42" in abort["detail"]
        assert rows[1]["actor"] in abort["detail"]
        ran = await handler_events(conn, events, op)
        if ran:
            # A handler whose cancel arrived while it was still writing "started" (its first
            # await: a queued one that began just then) ends there, without its clean-up.
            assert ran in ([(1, "started"), (1, "cancelled")], [(1, "started")]), ran
            assert "stopped: " in abort["detail"]
            assert "cancelled the running handler (CancelledError)" in abort["detail"]
        else:
            assert "cancelled it before its handler ran" in abort["detail"]
    assert (await verify_chains(conn, s)).ok


async def test_a_cancel_racing_the_handler_has_exactly_one_outcome(
    workers: Supervisor,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    db_settings: DatabaseSettings,
    events: str,
    s: str,
) -> None:
    # Handlers ending between 0.5 s and 3 s after they start; the cancels arrive meanwhile.
    ids = await publish(sm, "run.long", [{"sleep": 0.5 + 0.1 * i} for i in range(26)])

    async def all_started() -> bool:
        n = await conn.fetchval(
            f'SELECT count(DISTINCT operation_id) FROM "{events}".events WHERE event = $1',
            "started",
        )
        return bool(n >= 8)

    await wait_for(all_started, "handlers to start")
    result = await run_cli(
        *cli_args(db_settings, "ops", "cancel", *map(str, ids)),
        "--actor", "alice", "--wait", "60s", "--json",
    )  # fmt: skip
    answers = {r["operation_id"]: r for r in json.loads(result.stdout)}
    await wait_for(lambda: settled(conn, s, ids, {"succeeded", "cancelled"}), "every outcome")

    final = await states(conn, s, ids)
    for op in ids:
        rows = await trail(conn, s, op)
        outcomes = [r["trigger"] for r in rows if r["trigger"] not in ("publish", "claim")]
        ran = await handler_events(conn, events, op)
        if final[op] == "cancelled":
            # Stopped while running, or before it ran (a pending one is cancelled directly).
            assert outcomes in (["abort"], ["cancel"]), (op, outcomes)
            assert answers[op]["ok"], answers[op]
            assert (1, "finished") not in ran
        else:
            assert final[op] == "succeeded"
            assert outcomes == ["succeed"], (op, outcomes)
            assert not answers[op]["ok"]
            # Finished while the request was on its way, or before it was made.
            message = answers[op]["message"]
            assert "finished first (succeed -> succeeded)" in message or (
                "it is succeeded" in message
            ), message
            assert (1, "finished") in ran
            assert (1, "cancelled") not in ran
    assert result.returncode == (0 if all(a["ok"] for a in answers.values()) else 1)
    assert (await verify_chains(conn, s)).ok
