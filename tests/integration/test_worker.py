"""The worker runs what was published and records every attempt (DESIGN §4: claim, run, record,
wake-up, stop): states, audit rows and the retry schedule, all read back from the database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from opkit import audit, operation, publish, wait_for_state, worker_settings

from pgoutbox import (
    DatabaseSessionManager,
    DoNotRetry,
    HandlerContext,
    RetryPolicy,
    SchemaNotReady,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    migrations,
    publish_many,
    publish_operation,
    verify,
)

NO_WAIT = RetryPolicy(base_seconds=0, max_seconds=0, jitter=0)


# -- helpers -----------------------------------------------------------------------------------


def schema_of(settings: Settings) -> str:
    return settings.database.schema_name


async def triggers(conn: asyncpg.Connection, schema: str, op_id: int) -> list[str]:
    return [row["trigger"] for row in await audit(conn, schema, op_id)]


async def wait_for(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 10)


@pytest.fixture
def schema(settings: Settings) -> str:
    return schema_of(settings)


# -- running and recording ---------------------------------------------------------------------


async def test_a_handled_operation_succeeds_with_publish_claim_succeed_audit_by_the_worker(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    received: list[Any] = []
    router = WorkflowRouter()

    @router.on("demo.hello")
    async def hello(ctx: HandlerContext, payload: Any) -> None:
        received.append(payload)

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "demo.hello", {"msg": "hi", "n": [1, 2]})
        row = await wait_for_state(conn, schema, op_id, "succeeded")
        worker_id = system.worker_id

    assert received == [{"msg": "hi", "n": [1, 2]}]
    assert (row["attempts"], row["last_error"], row["lease_owner"], row["lease_expires_at"]) == (
        1,
        None,
        None,
        None,
    )
    trail = [
        (r["seq"], r["from_state"], r["to_state"], r["trigger"], r["attempt"], r["actor"])
        for r in await audit(conn, schema, op_id)
    ]
    publisher = await conn.fetchval("SELECT current_user")
    assert trail == [
        (1, None, "pending", "publish", 0, publisher),
        (2, "pending", "claimed", "claim", 1, worker_id),
        (3, "claimed", "succeeded", "succeed", 1, worker_id),
    ]
    assert (await verify(settings.database)).ok


async def test_the_handler_context_describes_each_attempt_with_a_stable_idempotency_key(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    seen: list[HandlerContext] = []
    router = WorkflowRouter(prefix="billing")

    @router.on("charge", max_attempts=4, retry=NO_WAIT)
    async def charge(ctx: HandlerContext, payload: Any) -> None:
        seen.append(ctx)
        if ctx.attempt == 1:
            raise RuntimeError("provider timed out")

    keyed = await publish(sm, settings, "billing.charge", {"k": 1}, idempotency_key="order-42")
    unkeyed = await publish(sm, settings, "billing.charge", {"k": 2})
    async with WorkflowSystem(router=router, settings=settings) as system:
        await wait_for_state(conn, schema, keyed, "succeeded")
        await wait_for_state(conn, schema, unkeyed, "succeeded")

    by_op: dict[int, list[HandlerContext]] = {}
    for ctx in seen:
        by_op.setdefault(ctx.operation_id, []).append(ctx)
    assert sorted(by_op) == sorted([keyed, unkeyed])
    expected_keys = {keyed: "order-42", unkeyed: f"pgoutbox-{schema}-{unkeyed}"}
    for op_id, attempts in by_op.items():
        assert [c.attempt for c in attempts] == [1, 2]
        assert {c.idempotency_key for c in attempts} == {expected_keys[op_id]}
        for ctx in attempts:
            assert ctx.operation_type == "billing.charge"
            assert ctx.max_attempts == 4
            assert ctx.session is None  # not transactional
            assert ctx.worker_id == system.worker_id
            assert ctx.logger.extra == {"operation_id": op_id, "operation_type": "billing.charge"}


# -- retries -----------------------------------------------------------------------------------


async def test_failed_attempts_are_retried_on_a_doubling_capped_schedule_in_database_time(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    database_dsn: str,
    schema: str,
) -> None:
    # base 0.2 s doubling, capped at 0.5 s: waits of 0.2, 0.4, then 0.5 (not 0.8).
    policy = RetryPolicy(base_seconds=0.2, max_seconds=0.5, jitter=0)
    scheduled: dict[int, datetime] = {}  # attempt -> the run_at it was claimed under
    reader = await asyncpg.connect(database_dsn)
    router = WorkflowRouter()

    @router.on("flaky", max_attempts=4, retry=policy)
    async def flaky(ctx: HandlerContext, payload: Any) -> None:
        scheduled[ctx.attempt] = await reader.fetchval(
            f'SELECT run_at FROM "{schema}".operations WHERE id = $1', ctx.operation_id
        )
        raise ConnectionError(f"attempt {ctx.attempt} failed")

    try:
        op_id = await publish(sm, settings, "flaky", {})
        async with WorkflowSystem(router=router, settings=settings):
            row = await wait_for_state(conn, schema, op_id, "dead")
    finally:
        await reader.close()

    trail = await audit(conn, schema, op_id)
    assert [r["trigger"] for r in trail] == [
        "publish",
        *["claim", "fail"] * 3,
        "claim",
        "give_up",
    ]
    failed_at = [r["recorded_at"] for r in trail if r["trigger"] == "fail"]
    claimed_at = [r["recorded_at"] for r in trail if r["trigger"] == "claim"]
    # The run_at an attempt was claimed under was set by the previous failure: its distance from
    # that failure's audit time (both database clock) is the backoff, less the moments between
    # the recording transaction's start (now()) and its audit row (clock_timestamp()).
    waits = [(scheduled[n + 2] - failed_at[n]).total_seconds() for n in range(3)]
    for wait, expected in zip(waits, [0.2, 0.4, 0.5], strict=True):
        assert expected - 0.1 < wait <= expected, waits
    for n in range(3):
        assert claimed_at[n + 1] >= scheduled[n + 2], "an attempt ran before it was due"
    # The final give_up keeps the last schedule rather than inventing a new one.
    assert row["run_at"] == scheduled[4]
    assert (row["attempts"], row["last_error"]) == (4, "ConnectionError: attempt 4 failed")


async def test_an_operation_is_dead_after_max_attempts_with_the_error_and_traceback_in_audit(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    calls: list[int] = []
    router = WorkflowRouter()

    @router.on("boom", max_attempts=3, retry=NO_WAIT)
    async def boom(ctx: HandlerContext, payload: Any) -> None:
        calls.append(ctx.attempt)
        raise ValueError(f"boom {ctx.attempt}")

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "boom", {})
        row = await wait_for_state(conn, schema, op_id, "dead")

    assert calls == [1, 2, 3]
    assert (row["attempts"], row["last_error"]) == (3, "ValueError: boom 3")
    trail = await audit(conn, schema, op_id)
    assert [(r["trigger"], r["to_state"], r["attempt"]) for r in trail] == [
        ("publish", "pending", 0),
        ("claim", "claimed", 1),
        ("fail", "failed", 1),
        ("claim", "claimed", 2),
        ("fail", "failed", 2),
        ("claim", "claimed", 3),
        ("give_up", "dead", 3),
    ]
    give_up = trail[-1]
    assert give_up["actor"] == system.worker_id
    assert give_up["detail"].startswith("attempt 3 of 3: ValueError: boom 3\nTraceback")
    assert 'raise ValueError(f"boom {ctx.attempt}")' in give_up["detail"]
    assert trail[2]["detail"].startswith("attempt 1 of 3: ValueError: boom 1\n")


async def test_max_attempts_given_at_publish_overrides_the_handlers(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("boom", max_attempts=5, retry=NO_WAIT)
    async def boom(ctx: HandlerContext, payload: Any) -> None:
        raise ValueError("no")

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "boom", {}, max_attempts=2)
        row = await wait_for_state(conn, schema, op_id, "dead")
    assert row["attempts"] == 2
    assert (await audit(conn, schema, op_id))[-1]["detail"].startswith("attempt 2 of 2: ")


async def test_do_not_retry_sends_the_operation_straight_to_dead_on_the_first_attempt(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("charge", max_attempts=5, retry=NO_WAIT)
    async def charge(ctx: HandlerContext, payload: Any) -> None:
        raise DoNotRetry("card declined")

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "charge", {})
        row = await wait_for_state(conn, schema, op_id, "dead")

    assert (row["attempts"], row["last_error"]) == (1, "DoNotRetry: card declined")
    trail = await audit(conn, schema, op_id)
    assert [r["trigger"] for r in trail] == ["publish", "claim", "give_up"]
    assert trail[-1]["detail"].startswith(
        "attempt 1 not retried (DoNotRetry): DoNotRetry: card declined\nTraceback"
    )


async def test_a_cancelled_error_leaking_from_a_handler_fails_the_attempt_and_the_worker_goes_on(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("leaky", max_attempts=1)
    async def leaky(ctx: HandlerContext, payload: Any) -> None:
        # A handler awaiting a task that someone else cancelled sees CancelledError although
        # nobody cancelled the handler itself.
        inner = asyncio.create_task(asyncio.sleep(60))
        await asyncio.sleep(0)
        inner.cancel()
        await inner

    @router.on("fine")
    async def fine(ctx: HandlerContext, payload: Any) -> None:
        return None

    async with WorkflowSystem(router=router, settings=worker_settings(settings, n_workers=1)):
        leaky_id = await publish(sm, settings, "leaky", {})
        row = await wait_for_state(conn, schema, leaky_id, "dead")
        fine_id = await publish(sm, settings, "fine", {})
        await wait_for_state(conn, schema, fine_id, "succeeded")
    assert row["last_error"] == "CancelledError: "
    assert await triggers(conn, schema, leaky_id) == ["publish", "claim", "give_up"]


async def test_an_operation_retried_over_a_thousand_times_still_gets_a_capped_backoff(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    unaudited: Callable[..., Awaitable[None]],
) -> None:
    router = WorkflowRouter()

    @router.on("stubborn", retry=RetryPolicy(base_seconds=1, max_seconds=300, jitter=0))
    async def stubborn(ctx: HandlerContext, payload: Any) -> None:
        raise ValueError(f"attempt {ctx.attempt}")

    op_id = await publish(sm, settings, "stubborn", {}, max_attempts=100_000)
    # As if it had failed 1100 times already (attempts is a counter, not a state change).
    await unaudited(
        schema,
        f'UPDATE "{schema}".operations SET attempts = 1100, step_attempts = 1100 WHERE id = $1',
        op_id,
    )
    async with WorkflowSystem(router=router, settings=settings):
        row = await wait_for_state(conn, schema, op_id, "failed")
    assert (row["attempts"], row["last_error"]) == (1101, "ValueError: attempt 1101")
    # run_at is now() (the recording statement's start) + 300 s, updated_at the trigger's
    # clock_timestamp() a moment later: on a loaded machine that moment is not bounded, so the
    # lower bound only shows that the cap, not 2^1100 s, was applied.
    assert 240 < (row["run_at"] - row["updated_at"]).total_seconds() <= 300


async def test_an_error_message_postgresql_cannot_store_is_recorded_escaped(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("binary", max_attempts=1)
    async def binary(ctx: HandlerContext, payload: Any) -> None:
        raise ValueError("bad byte \x00 in reply from \udcff")

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "binary", {})
        row = await wait_for_state(conn, schema, op_id, "dead")
    # PostgreSQL text holds neither NUL nor a lone surrogate: they are spelled out rather than
    # failing the recording (which would leave the operation to the rescuer as "lost").
    assert row["last_error"] == "ValueError: bad byte \\x00 in reply from \\udcff"
    detail = (await audit(conn, schema, op_id))[-1]["detail"]
    assert detail.endswith("ValueError: bad byte \\x00 in reply from \\udcff\n")


def _recurse(depth: int) -> None:
    if depth == 0:
        raise ValueError("innermost")
    _recurse(depth - 1)


async def test_a_long_error_detail_is_cut_to_error_max_chars_keeping_both_ends(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("deep", max_attempts=1)
    async def deep(ctx: HandlerContext, payload: Any) -> None:
        _recurse(40)

    @router.on("long", max_attempts=1)
    async def long(ctx: HandlerContext, payload: Any) -> None:
        raise ValueError("START" + "x" * 5000 + "END")

    system_settings = worker_settings(settings, error_max_chars=300)
    async with WorkflowSystem(router=router, settings=system_settings):
        deep_id = await publish(sm, settings, "deep", {})
        long_id = await publish(sm, settings, "long", {})
        await wait_for_state(conn, schema, deep_id, "dead")
        long_row = await wait_for_state(conn, schema, long_id, "dead")

    detail = (await audit(conn, schema, deep_id))[-1]["detail"]
    assert len(detail) == 300
    # The outermost part (headline, start of the traceback) and the innermost frame survive.
    assert detail.startswith("attempt 1 of 1: ValueError: innermost\nTraceback (most recent")
    assert detail.endswith('raise ValueError("innermost")\nValueError: innermost\n')
    assert "characters truncated] ..." in detail

    long_detail = (await audit(conn, schema, long_id))[-1]["detail"]
    assert len(long_detail) == 300
    assert long_detail.startswith("attempt 1 of 1: ValueError: STARTxxx")
    assert long_detail.endswith("xxxEND\n")
    # last_error is the one-line summary, capped on its own.
    assert long_row["last_error"].startswith("ValueError: STARTxxx")
    assert len(long_row["last_error"]) == 1000


# -- what gets claimed, and when ---------------------------------------------------------------


async def test_only_handled_types_on_the_workers_channel_are_claimed(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("demo.hello")
    async def hello(ctx: HandlerContext, payload: Any) -> None:
        return None

    other_type = await publish(sm, settings, "demo.unhandled", {})
    other_channel = await publish(sm, settings, "demo.hello", {}, channel="someone_else")
    handled = await publish(sm, settings, "demo.hello", {})
    async with WorkflowSystem(router=router, settings=settings):
        # All three were due when the worker's claims ran: whatever it left, it left on purpose.
        await wait_for_state(conn, schema, handled, "succeeded")

    for op_id in (other_type, other_channel):
        row = await operation(conn, schema, op_id)
        assert (row["state"], row["attempts"]) == ("pending", 0)
        assert await triggers(conn, schema, op_id) == ["publish"]


async def test_a_batch_of_successes_is_recorded_by_the_statement_that_claims_the_next_batch(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("job")
    async def job(ctx: HandlerContext, payload: Any) -> None:
        return None

    async with sm.session() as session:
        channel = settings.workflow_system.channel
        ids = await publish_many(
            session,
            [{"operation_type": "job", "payload": i, "channel": channel} for i in range(40)],
        )
        await session.commit()
    small = worker_settings(settings, batch_size=5, n_workers=5)
    async with WorkflowSystem(router=router, settings=small):
        for op_id in ids:
            await wait_for_state(conn, schema, op_id, "succeeded")

    # The audit rows a transaction wrote share its xmin: one transaction per statement.
    transactions = await conn.fetch(
        f"SELECT array_agg(DISTINCT trigger ORDER BY trigger) AS triggers, count(*) AS rows "
        f'FROM "{schema}".audit_log WHERE operation_id = ANY($1) AND trigger <> $2 '
        "GROUP BY xmin::text",
        ids,
        "publish",
    )
    both = [t for t in transactions if list(t["triggers"]) == ["claim", "succeed"]]
    assert both, [dict(t) for t in transactions]
    # Each of them recorded at most a batch and claimed at most a batch.
    assert all(t["rows"] <= 10 for t in both)
    assert sum(t["rows"] for t in transactions) == 2 * len(ids)
    # Fewer statements than a claim and a recording per batch would have taken.
    assert len(transactions) < 2 * len(ids) / 5


async def test_higher_priority_runs_first_then_oldest_first(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    order: list[str] = []
    router = WorkflowRouter()

    @router.on("job")
    async def job(ctx: HandlerContext, payload: Any) -> None:
        order.append(payload)

    names = [("low", 0), ("high-1", 10), ("mid", 5), ("high-2", 10), ("negative", -3)]
    ids = [await publish(sm, settings, "job", name, priority=prio) for name, prio in names]
    # One worker, one batch: the order within the claimed batch is the order of execution.
    async with WorkflowSystem(router=router, settings=worker_settings(settings, n_workers=1)):
        for op_id in ids:
            await wait_for_state(conn, schema, op_id, "succeeded")
    assert order == ["high-1", "high-2", "mid", "low", "negative"]


async def test_a_delayed_operation_runs_when_due_without_a_notification_or_poll(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("later")
    async def later(ctx: HandlerContext, payload: Any) -> None:
        return None

    # No LISTEN and a 30 s poll: only the wake-up at the next run_at can run it within 10 s.
    quiet = worker_settings(settings, listen=False, poll_interval_seconds=30)
    due = await conn.fetchval("SELECT now() + interval '1.5 seconds'")
    op_id = await publish(sm, settings, "later", {}, run_at=due)
    async with WorkflowSystem(router=router, settings=quiet):
        await wait_for_state(conn, schema, op_id, "succeeded", within=10)

    trail = await audit(conn, schema, op_id)
    assert [r["trigger"] for r in trail] == ["publish", "claim", "succeed"]
    assert trail[1]["recorded_at"] >= due, "the operation was claimed before its run_at"


# -- stopping ----------------------------------------------------------------------------------


async def test_stop_lets_a_running_handler_finish_and_records_its_success(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    router = WorkflowRouter()

    @router.on("slow")
    async def slow(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.set()

    system = WorkflowSystem(router=router, settings=settings)
    await system.start()
    try:
        op_id = await publish(sm, settings, "slow", {})
        await wait_for(started)
    finally:
        await system.stop()

    assert finished.is_set()
    row = await operation(conn, schema, op_id)
    assert (row["state"], row["attempts"]) == ("succeeded", 1)
    assert await triggers(conn, schema, op_id) == ["publish", "claim", "succeed"]


async def test_stop_cancels_handlers_slower_than_the_timeout_and_releases_them_audited(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    started: dict[str, asyncio.Event] = {"retry": asyncio.Event(), "dead": asyncio.Event()}
    cancelled: list[str] = []
    router = WorkflowRouter()

    async def stuck(ctx: HandlerContext, payload: Any) -> None:
        started[payload].set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(payload)
            raise

    router.on("stuck.retry")(stuck)
    router.on("stuck.dead", on_lost="dead")(stuck)

    system = WorkflowSystem(
        router=router, settings=worker_settings(settings, shutdown_timeout_seconds=0.5)
    )
    await system.start()
    try:
        retry_id = await publish(sm, settings, "stuck.retry", "retry")
        dead_id = await publish(sm, settings, "stuck.dead", "dead")
        await wait_for(started["retry"])
        await wait_for(started["dead"])
    finally:
        await system.stop()

    assert sorted(cancelled) == ["dead", "retry"]
    released = await operation(conn, schema, retry_id)
    assert (released["state"], released["attempts"], released["lease_owner"]) == (
        "pending",
        1,
        None,
    )
    last = (await audit(conn, schema, retry_id))[-1]
    assert (last["from_state"], last["to_state"], last["trigger"], last["actor"]) == (
        "claimed",
        "pending",
        "release",
        system.worker_id,
    )
    assert last["detail"] == "worker stopped before the handler finished"

    lost = await operation(conn, schema, dead_id)
    assert (lost["state"], lost["last_error"]) == (
        "dead",
        "worker stopped mid-handler (on_lost=dead)",
    )
    last = (await audit(conn, schema, dead_id))[-1]
    assert (last["from_state"], last["to_state"], last["trigger"]) == ("claimed", "dead", "lose")


async def test_stop_hands_back_claimed_operations_that_never_started_even_if_on_lost_is_dead(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    started = asyncio.Event()
    runs: list[int] = []
    router = WorkflowRouter()

    @router.on("irreversible", on_lost="dead")
    async def irreversible(ctx: HandlerContext, payload: Any) -> None:
        runs.append(ctx.operation_id)
        started.set()
        await asyncio.sleep(60)

    async with sm.session() as session:  # one commit: both are claimed in one batch
        first = await publish_operation(
            session, "irreversible", 1, settings.workflow_system.channel
        )
        second = await publish_operation(
            session, "irreversible", 2, settings.workflow_system.channel
        )
        await session.commit()
    one_worker = worker_settings(settings, n_workers=1, shutdown_timeout_seconds=0.5)
    system = WorkflowSystem(router=router, settings=one_worker)
    await system.start()
    try:
        await wait_for(started)
        await wait_for_state(conn, schema, second, "claimed")
    finally:
        await system.stop()

    assert len(runs) == 1
    ran, waited = (first, second) if runs == [first] else (second, first)
    assert (await operation(conn, schema, ran))["state"] == "dead"
    row = await operation(conn, schema, waited)
    # Its handler never ran, so nothing irreversible can have happened: it goes back to pending.
    assert (row["state"], row["last_error"]) == ("pending", None)
    assert await triggers(conn, schema, waited) == ["publish", "claim", "release"]


async def test_stop_during_a_recording_that_claims_hands_back_what_it_claimed_unstarted(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    # The statement recording the first operation's success also claims the second one; stop()
    # comes while that statement runs (held for a second by a test trigger). stop() waits for
    # it, so the second operation is handed back as never started -- not run during shutdown,
    # and not sent to dead as if its handler had been interrupted (on_lost="dead").
    started = asyncio.Event()
    go = asyncio.Event()
    runs: list[int] = []
    router = WorkflowRouter()

    @router.on("irreversible", on_lost="dead")
    async def irreversible(ctx: HandlerContext, payload: Any) -> None:
        runs.append(ctx.operation_id)
        started.set()
        await go.wait()

    single = worker_settings(
        settings, n_workers=1, batch_size=1, listen=False, poll_interval_seconds=30.0
    )
    first = await publish(sm, settings, "irreversible", 1)
    system = WorkflowSystem(router=router, settings=single)
    await system.start()
    try:
        await wait_for(started)
        # The claim loop has found nothing more and sleeps for the poll interval by now.
        await asyncio.sleep(0.5)
        second = await publish(sm, settings, "irreversible", 2)
        await conn.execute(f"""
            CREATE FUNCTION "{schema}".slow_success() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;
            CREATE TRIGGER a_slow_success BEFORE UPDATE ON "{schema}".operations
                FOR EACH ROW WHEN (NEW.transition = 'succeed')
                EXECUTE FUNCTION "{schema}".slow_success();
        """)  # fmt: skip
        go.set()
        # Stop once the recording (with its claim of the second operation) is under way.
        await asyncio.sleep(0.3)
        assert (await operation(conn, schema, second))["state"] == "pending"  # not committed yet
    finally:
        await system.stop()

    assert runs == [first]
    assert (await operation(conn, schema, first))["state"] == "succeeded"
    row = await operation(conn, schema, second)
    assert (row["state"], row["last_error"], row["lease_owner"]) == ("pending", None, None)
    assert await triggers(conn, schema, second) == ["publish", "claim", "release"]


# -- recording ---------------------------------------------------------------------------------


async def _success_and_failure_recorded_in_one_batch(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    database_dsn: str,
    interfere: Any,
) -> tuple[int, int, str]:
    """Run a succeeding and a failing handler whose outcomes are recorded in one batch, while
    another transaction holds the failing operation's row: the worker's recording waits for it.
    ``interfere(blocker, worker_pid, ok_id)`` acts at that moment; then the row is let go."""
    schema = schema_of(settings)
    go = asyncio.Event()
    started = {"ok": asyncio.Event(), "bad": asyncio.Event()}
    router = WorkflowRouter()

    @router.on("ok")
    async def ok(ctx: HandlerContext, payload: Any) -> None:
        started["ok"].set()
        await go.wait()

    @router.on("bad", retry=RetryPolicy(base_seconds=3600, max_seconds=3600))
    async def bad(ctx: HandlerContext, payload: Any) -> None:
        started["bad"].set()
        await go.wait()
        raise ValueError("bad")

    blocker = await asyncpg.connect(database_dsn)
    try:
        async with WorkflowSystem(router=router, settings=settings) as system:
            ok_id = await publish(sm, settings, "ok", {})
            bad_id = await publish(sm, settings, "bad", {})
            await wait_for(started["ok"])
            await wait_for(started["bad"])
            blocking = blocker.transaction()
            await blocking.start()
            await blocker.execute(
                f'SELECT 1 FROM "{schema}".operations WHERE id = $1 FOR UPDATE', bad_id
            )
            # Both handlers finish in the same event-loop turn, before the record loop runs.
            go.set()
            waiting: int | None = None
            deadline = asyncio.get_running_loop().time() + 10
            while waiting is None:
                assert asyncio.get_running_loop().time() < deadline, "recording never blocked"
                await asyncio.sleep(0.01)
                waiting = await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%give_up%'"
                )
            await interfere(blocker, waiting, ok_id)
            await blocking.commit()
            await wait_for_state(conn, schema, ok_id, "succeeded")
            await wait_for_state(conn, schema, bad_id, "failed")
            return ok_id, bad_id, system.worker_id
    finally:
        await blocker.close()


async def test_a_connection_lost_while_recording_is_retried_without_a_false_rejection(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    database_dsn: str,
    schema: str,
) -> None:
    async def kill_recording_connection(
        blocker: asyncpg.Connection, worker_pid: int, ok_id: int
    ) -> None:
        assert await blocker.fetchval("SELECT pg_terminate_backend($1)", worker_pid)

    ok_id, bad_id, _ = await _success_and_failure_recorded_in_one_batch(
        settings, sm, conn, database_dsn, kill_recording_connection
    )
    # The batch is one transaction: the retry records both outcomes once, and the success is
    # not later "refused" as if its lease had been lost.
    assert await triggers(conn, schema, ok_id) == ["publish", "claim", "succeed"]
    assert await triggers(conn, schema, bad_id) == ["publish", "claim", "fail"]


async def test_a_deadlock_while_recording_is_retried_rather_than_left_to_the_rescuer(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    database_dsn: str,
    schema: str,
) -> None:
    async def deadlock(blocker: asyncpg.Connection, worker_pid: int, ok_id: int) -> None:
        # The worker holds ok's row and waits for bad's; we hold bad's and now ask for ok's.
        # Our long deadlock_timeout makes the worker's backend the one that detects it.
        await blocker.execute("SET LOCAL deadlock_timeout = '30s'")
        await blocker.execute(
            f'SELECT 1 FROM "{schema}".operations WHERE id = $1 FOR UPDATE', ok_id
        )

    ok_id, bad_id, _ = await _success_and_failure_recorded_in_one_batch(
        settings, sm, conn, database_dsn, deadlock
    )
    assert await triggers(conn, schema, ok_id) == ["publish", "claim", "succeed"]
    assert await triggers(conn, schema, bad_id) == ["publish", "claim", "fail"]


# -- schema readiness --------------------------------------------------------------------------


@pytest.fixture
async def fresh_schema(settings: Settings, conn: asyncpg.Connection) -> AsyncIterator[Settings]:
    """``settings`` pointing at a schema that does not exist yet; dropped afterwards."""
    name = f"fresh_{uuid.uuid4().hex[:10]}"
    database = settings.database.model_copy(update={"schema_name": name})
    yield settings.model_copy(update={"database": database})
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def test_without_auto_migrate_an_unmigrated_schema_is_refused_naming_the_command(
    fresh_schema: Settings, conn: asyncpg.Connection
) -> None:
    router = WorkflowRouter()
    router.on("x")(_noop)
    system = WorkflowSystem(
        router=router, settings=worker_settings(fresh_schema, auto_migrate=False)
    )
    name = fresh_schema.database.schema_name
    with pytest.raises(SchemaNotReady, match=rf"schema '{name}' is at revision none") as info:
        await system.start()
    assert "run `pgoutbox db upgrade`" in str(info.value)
    assert migrations.head_revision() in str(info.value)
    # Nothing was created behind the user's back.
    assert await conn.fetchval("SELECT to_regnamespace($1)", name) is None


async def test_with_auto_migrate_a_fresh_schema_is_created_at_head(
    fresh_schema: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    router = WorkflowRouter()
    router.on("x")(_noop)
    name = fresh_schema.database.schema_name
    fresh_sm = DatabaseSessionManager(fresh_schema.database)
    try:
        async with WorkflowSystem(router=router, settings=fresh_schema):
            assert await migrations.current(fresh_schema.database) == migrations.head_revision()
            op_id = await publish(fresh_sm, fresh_schema, "x", {})
            await wait_for_state(conn, name, op_id, "succeeded")
    finally:
        await fresh_sm.close()


async def _noop(ctx: HandlerContext, payload: Any) -> None:
    return None


async def test_one_outcome_the_database_refuses_does_not_hold_back_the_rest_of_its_batch(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    schema = schema_of(settings)
    router = WorkflowRouter()
    handled: list[int] = []
    release, all_started = asyncio.Event(), asyncio.Event()

    @router.on("batch.job")
    async def job(ctx: HandlerContext, payload: Any) -> None:
        handled.append(ctx.operation_id)
        if len(handled) == 5:
            all_started.set()
        await release.wait()  # finish together, so the outcomes are recorded as one batch

    async with sm.session() as session:
        ids = await publish_many(
            session,
            [
                {
                    "operation_type": "batch.job",
                    "payload": {"i": i},
                    "channel": settings.workflow_system.channel,
                }
                for i in range(5)
            ],
        )
        await session.commit()
    poisoned = ids[2]
    # A constraint of the user's own that refuses one operation's success (not a connection
    # problem): the rest of the batch must still be recorded.
    await conn.execute(
        f"""CREATE FUNCTION "{schema}".refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
            CREATE TRIGGER z_refuse_one BEFORE UPDATE ON "{schema}".operations FOR EACH ROW
            WHEN (OLD.id = {poisoned} AND NEW.state = 'succeeded')
            EXECUTE FUNCTION "{schema}".refuse_one();"""
    )
    async with WorkflowSystem(router=router, settings=settings):
        await asyncio.wait_for(all_started.wait(), 10)
        release.set()
        for op_id in ids:
            if op_id != poisoned:
                await wait_for_state(conn, schema, op_id, "succeeded")
        row = await operation(conn, schema, poisoned)
        # Left claimed with its lease: the rescuer moves it on when the lease expires.
        assert (row["state"], row["lease_expires_at"] is not None) == ("claimed", True)
    assert sorted(handled) == sorted(ids)
