"""Custom lifecycles against a real PostgreSQL, run by an in-process WorkflowSystem: multi-step
workflows (each step's trigger, attempts and idempotency key), retries in place, give-up and
compensation, transactional steps, parking states moved on by ``fire`` or by a timeout, replay
from the step that died, ordering keys, and the registration of lifecycles in the database.

Every test reads the outcome back from the database: states, the audit rows (trigger, from, to,
actor, attempt) and how often each handler ran."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from itertools import pairwise
from typing import Any

import asyncpg
import pytest
from opkit import audit, operation, publish, wait_for_state, worker_settings
from sqlalchemy import text

from pgoutbox import (
    DatabaseSessionManager,
    DoNotRetry,
    FireRefused,
    HandlerContext,
    Lifecycle,
    RetryPolicy,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    fire,
    publish_operation,
    verify,
)
from pgoutbox.admin import Admin, OperationFilter
from pgoutbox.registry import LifecycleChangeRefused, LifecycleNotRegistered, register
from pgoutbox.sql import queries
from pgoutbox.worker.services import Rescuer

NO_WAIT = RetryPolicy(base_seconds=0, max_seconds=0, jitter=0)
# A failed attempt waits for the whole test instead of being retried.
NOT_SOON = RetryPolicy(base_seconds=3600, max_seconds=3600, jitter=0)

# claimed -> reserved -> charged -> succeeded: three working states, three steps.
FULFILMENT = Lifecycle.define(
    "fulfilment",
    states=["reserved", "charged"],
    transitions=[
        {"trigger": "reserve", "source": "claimed", "dest": "reserved"},
        {"trigger": "charge", "source": "reserved", "dest": "charged"},
        {"trigger": "ship", "source": "charged", "dest": "succeeded"},
    ],
)

# A step that gives up is compensated instead of dying.
COMPENSATED = Lifecycle.define(
    "compensated",
    states=["charged", "compensating"],
    transitions=[
        {"trigger": "charge", "source": "claimed", "dest": "charged"},
        {"trigger": "notify", "source": "charged", "dest": "succeeded"},
        {"trigger": "give_up", "source": "charged", "dest": "compensating"},
        {"trigger": "refund", "source": "compensating", "dest": "cancelled"},
    ],
)

# The first step chooses between two exits.
BRANCHING = Lifecycle.define(
    "branching",
    states=["held"],
    parking=["held"],
    transitions=[
        {"trigger": "ship", "source": "claimed", "dest": "succeeded"},
        {"trigger": "hold", "source": "claimed", "dest": "held"},
        {"trigger": "resume", "source": "held", "dest": "succeeded"},
    ],
)

# The first step parks the operation until someone approves or denies it.
APPROVAL = Lifecycle.define(
    "approval",
    states=["waiting", "approved"],
    parking=["waiting"],
    transitions=[
        {"trigger": "park", "source": "claimed", "dest": "waiting"},
        {"trigger": "approve", "source": "waiting", "dest": "approved"},
        {"trigger": "deny", "source": "waiting", "dest": "cancelled"},
        {"trigger": "pay", "source": "approved", "dest": "succeeded"},
    ],
)

# Parked for half a second at most: then dead, or on to a working state.
EXPIRING = Lifecycle.define(
    "expiring",
    states=["waiting"],
    parking=["waiting"],
    timeouts={"waiting": ("expire", 0.5)},
    transitions=[
        {"trigger": "park", "source": "claimed", "dest": "waiting"},
        {"trigger": "approve", "source": "waiting", "dest": "succeeded"},
        {"trigger": "expire", "source": "waiting", "dest": "dead"},
    ],
)
REMINDING = Lifecycle.define(
    "reminding",
    states=["waiting", "reminding"],
    parking=["waiting"],
    timeouts={"waiting": ("remind", 0.5)},
    transitions=[
        {"trigger": "park", "source": "claimed", "dest": "waiting"},
        {"trigger": "approve", "source": "waiting", "dest": "succeeded"},
        {"trigger": "remind", "source": "waiting", "dest": "reminding"},
        {"trigger": "reminded", "source": "reminding", "dest": "succeeded"},
    ],
)

# Two steps: an operation rests in `started` between them.
STAGED = Lifecycle.define(
    "staged",
    states=["started"],
    transitions=[
        {"trigger": "start", "source": "claimed", "dest": "started"},
        {"trigger": "finish", "source": "started", "dest": "succeeded"},
    ],
)


# -- helpers -----------------------------------------------------------------------------------

Row = tuple[str, str | None, str, str, int]  # trigger, from, to, actor, attempt


async def trail(conn: asyncpg.Connection, schema: str, op_id: int) -> list[Row]:
    """The operation's audit rows as (trigger, from_state, to_state, actor, attempt)."""
    return [
        (r["trigger"], r["from_state"], r["to_state"], r["actor"], r["attempt"])
        for r in await audit(conn, schema, op_id)
    ]


async def audit_rows(conn: asyncpg.Connection, schema: str, op_id: int) -> int:
    count: int = await conn.fetchval(
        f'SELECT count(*) FROM "{schema}".audit_log WHERE operation_id = $1', op_id
    )
    return count


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> None:
    """Poll the async predicate ``check`` until it holds, for at most ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


async def wait_for(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 10)


@pytest.fixture
def schema(settings: Settings) -> str:
    return settings.database.schema_name


@pytest.fixture
async def publisher(conn: asyncpg.Connection) -> str:
    """The database role publishing in these tests (the actor of every ``publish`` row)."""
    user: str = await conn.fetchval("SELECT current_user")
    return user


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[Admin]:
    async with Admin(settings.database) as opened:
        yield opened


@pytest.fixture
async def app(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The application's own schema with a table its handlers and callers write to."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    await conn.execute(
        f"CREATE SCHEMA {name}; "
        f"CREATE TABLE {name}.writes (op_id bigint NOT NULL, what text NOT NULL, "
        "PRIMARY KEY (op_id, what))"
    )
    yield name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")


def approval_router(calls: Counter[str], **pay_options: Any) -> WorkflowRouter:
    """``doc.approval``: parks in ``waiting``; ``approved`` pays. Counts each step's runs."""
    router = WorkflowRouter(prefix="doc")

    @router.on("approval", lifecycle=APPROVAL)
    async def ask(ctx: HandlerContext, payload: Any) -> str:
        calls["claimed"] += 1
        return "park"

    @router.on("approval", step="approved", **pay_options)
    async def pay(ctx: HandlerContext, payload: Any) -> str:
        calls["approved"] += 1
        return "pay"

    return router


# -- multi-step workflows ----------------------------------------------------------------------


async def test_a_three_step_lifecycle_runs_each_step_once_with_its_own_idempotency_key(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    publisher: str,
) -> None:
    seen: list[tuple[int, str, int, str]] = []  # operation, step, attempt, idempotency key
    router = WorkflowRouter(prefix="shop")

    @router.on("order", lifecycle=FULFILMENT)
    async def reserve(ctx: HandlerContext, payload: Any) -> str:
        seen.append((ctx.operation_id, ctx.step, ctx.attempt, ctx.idempotency_key))
        return "reserve"

    @router.on("order", step="reserved")
    async def charge(ctx: HandlerContext, payload: Any) -> str:
        seen.append((ctx.operation_id, ctx.step, ctx.attempt, ctx.idempotency_key))
        return "charge"

    @router.on("order", step="charged")
    async def ship(ctx: HandlerContext, payload: Any) -> str:
        seen.append((ctx.operation_id, ctx.step, ctx.attempt, ctx.idempotency_key))
        return "ship"

    async with WorkflowSystem(router=router, settings=settings) as system:
        keyed = await publish(sm, settings, "shop.order", {"n": 1}, idempotency_key="order-7")
        unkeyed = await publish(sm, settings, "shop.order", {"n": 2})
        row = await wait_for_state(conn, schema, keyed, "succeeded")
        await wait_for_state(conn, schema, unkeyed, "succeeded")
        worker = system.worker_id

    assert sorted(seen) == sorted(
        [
            (keyed, "claimed", 1, "order-7:claimed"),
            (keyed, "reserved", 1, "order-7:reserved"),
            (keyed, "charged", 1, "order-7:charged"),
            (unkeyed, "claimed", 1, f"pgoutbox-{schema}-{unkeyed}:claimed"),
            (unkeyed, "reserved", 1, f"pgoutbox-{schema}-{unkeyed}:reserved"),
            (unkeyed, "charged", 1, f"pgoutbox-{schema}-{unkeyed}:charged"),
        ]
    )
    # Each operation's steps ran in lifecycle order.
    assert [s for op, s, *_ in seen if op == keyed] == ["claimed", "reserved", "charged"]
    for op_id in (keyed, unkeyed):
        assert await trail(conn, schema, op_id) == [
            ("publish", None, "pending", publisher, 0),
            ("claim", "pending", "claimed", worker, 1),
            ("reserve", "claimed", "reserved", worker, 1),
            ("claim", "reserved", "reserved", worker, 2),
            ("charge", "reserved", "charged", worker, 2),
            ("claim", "charged", "charged", worker, 3),
            ("ship", "charged", "succeeded", worker, 3),
        ]
    assert (row["lifecycle"], row["attempts"], row["step_attempts"], row["last_error"]) == (
        "fulfilment",
        3,
        1,
        None,
    )
    assert (row["lease_owner"], row["lease_expires_at"]) == (None, None)
    assert (await verify(settings.database)).ok


async def test_a_failing_later_step_retries_in_place_with_backoff_and_earlier_steps_never_rerun(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    database_dsn: str,
    schema: str,
    publisher: str,
) -> None:
    backoff = RetryPolicy(base_seconds=0.3, max_seconds=0.3, jitter=0)
    calls: Counter[str] = Counter()
    reserve_attempts: list[tuple[int, int, str]] = []  # ctx.attempt, max_attempts, key
    seen_row: dict[int, tuple[datetime, str | None, str]] = {}  # attempt -> run_at, error, state
    reader = await asyncpg.connect(database_dsn)
    router = WorkflowRouter(prefix="shop")

    @router.on("order", lifecycle=FULFILMENT)
    async def first(ctx: HandlerContext, payload: Any) -> str:
        calls["claimed"] += 1
        return "reserve"

    @router.on("order", step="reserved", max_attempts=3, retry=backoff)
    async def reserve(ctx: HandlerContext, payload: Any) -> str:
        calls["reserved"] += 1
        reserve_attempts.append((ctx.attempt, ctx.max_attempts, ctx.idempotency_key))
        row = await reader.fetchrow(
            f'SELECT run_at, last_error, state FROM "{schema}".operations WHERE id = $1',
            ctx.operation_id,
        )
        seen_row[ctx.attempt] = (row["run_at"], row["last_error"], row["state"])
        if ctx.attempt < 3:
            raise RuntimeError(f"stock service down (attempt {ctx.attempt})")
        return "charge"

    @router.on("order", step="charged")
    async def ship(ctx: HandlerContext, payload: Any) -> str:
        calls["charged"] += 1
        assert ctx.attempt == 1  # a new step counts its attempts afresh
        return "ship"

    try:
        async with WorkflowSystem(router=router, settings=settings) as system:
            op_id = await publish(sm, settings, "shop.order", idempotency_key="order-9")
            row = await wait_for_state(conn, schema, op_id, "succeeded")
            worker = system.worker_id
    finally:
        await reader.close()

    assert calls == {"claimed": 1, "reserved": 3, "charged": 1}
    assert reserve_attempts == [(n, 3, "order-9:reserved") for n in (1, 2, 3)]
    rows = await audit(conn, schema, op_id)
    assert [
        (r["trigger"], r["from_state"], r["to_state"], r["actor"], r["attempt"]) for r in rows
    ] == [
        ("publish", None, "pending", publisher, 0),
        ("claim", "pending", "claimed", worker, 1),
        ("reserve", "claimed", "reserved", worker, 1),
        ("claim", "reserved", "reserved", worker, 2),
        ("fail", "reserved", "reserved", worker, 2),
        ("claim", "reserved", "reserved", worker, 3),
        ("fail", "reserved", "reserved", worker, 3),
        ("claim", "reserved", "reserved", worker, 4),
        ("charge", "reserved", "charged", worker, 4),
        ("claim", "charged", "charged", worker, 5),
        ("ship", "charged", "succeeded", worker, 5),
    ]
    fails = [r for r in rows if r["trigger"] == "fail"]
    for n, fail_row in enumerate(fails, start=1):
        assert f"RuntimeError: stock service down (attempt {n})" in fail_row["detail"]
        # The retry rested in its own state with the error and a run_at pushed out by the
        # backoff (database time: from the failing transaction's start, just before its row).
        run_at, last_error, state = seen_row[n + 1]
        assert (state, last_error) == (
            "reserved",
            f"RuntimeError: stock service down (attempt {n})",
        )
        wait = (run_at - fail_row["recorded_at"]).total_seconds()
        assert 0.2 < wait <= 0.3, wait
        next_claim = rows[rows.index(fail_row) + 1]
        assert next_claim["trigger"] == "claim"
        assert next_claim["recorded_at"] >= run_at, "a retry ran before it was due"
    assert (row["attempts"], row["step_attempts"]) == (5, 1)


@pytest.mark.parametrize("give_up", ["exhausted", "do_not_retry"])
async def test_a_later_step_that_gives_up_goes_to_dead_without_rerunning_earlier_steps(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    give_up: str,
) -> None:
    calls: Counter[str] = Counter()
    router = WorkflowRouter(prefix="shop")

    @router.on("order", lifecycle=FULFILMENT)
    async def first(ctx: HandlerContext, payload: Any) -> str:
        calls["claimed"] += 1
        return "reserve"

    @router.on("order", step="reserved")
    async def reserve(ctx: HandlerContext, payload: Any) -> str:
        calls["reserved"] += 1
        return "charge"

    @router.on("order", step="charged", max_attempts=2, retry=NO_WAIT)
    async def ship(ctx: HandlerContext, payload: Any) -> str:
        calls["charged"] += 1
        if give_up == "do_not_retry":
            raise DoNotRetry("address rejected")
        raise RuntimeError(f"carrier down (attempt {ctx.attempt})")

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "shop.order")
        row = await wait_for_state(conn, schema, op_id, "dead")
        worker = system.worker_id

    rows = await trail(conn, schema, op_id)
    assert rows[:5] == [
        ("publish", None, "pending", rows[0][3], 0),
        ("claim", "pending", "claimed", worker, 1),
        ("reserve", "claimed", "reserved", worker, 1),
        ("claim", "reserved", "reserved", worker, 2),
        ("charge", "reserved", "charged", worker, 2),
    ]
    if give_up == "exhausted":
        assert calls == {"claimed": 1, "reserved": 1, "charged": 2}
        assert rows[5:] == [
            ("claim", "charged", "charged", worker, 3),
            ("fail", "charged", "charged", worker, 3),
            ("claim", "charged", "charged", worker, 4),
            ("give_up", "charged", "dead", worker, 4),
        ]
        assert row["last_error"] == "RuntimeError: carrier down (attempt 2)"
        assert (row["attempts"], row["step_attempts"]) == (4, 2)
    else:
        assert calls == {"claimed": 1, "reserved": 1, "charged": 1}
        assert rows[5:] == [
            ("claim", "charged", "charged", worker, 3),
            ("give_up", "charged", "dead", worker, 3),
        ]
        assert row["last_error"] == "DoNotRetry: address rejected"
        assert (row["attempts"], row["step_attempts"]) == (3, 1)


@pytest.mark.parametrize("give_up", ["exhausted", "do_not_retry"])
async def test_a_step_that_gives_up_runs_the_declared_compensation_with_fresh_attempts(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    give_up: str,
) -> None:
    calls: Counter[str] = Counter()
    compensation: list[tuple[int, int, str]] = []  # ctx.attempt, max_attempts, key
    router = WorkflowRouter(prefix="pay")

    @router.on("charge", lifecycle=COMPENSATED)
    async def charge(ctx: HandlerContext, payload: Any) -> str:
        calls["claimed"] += 1
        return "charge"

    @router.on("charge", step="charged", max_attempts=2, retry=NO_WAIT)
    async def notify(ctx: HandlerContext, payload: Any) -> str:
        calls["charged"] += 1
        if give_up == "do_not_retry":
            raise DoNotRetry("mailbox does not exist")
        raise RuntimeError("mail server down")

    @router.on("charge", step="compensating", max_attempts=3, retry=NO_WAIT)
    async def refund(ctx: HandlerContext, payload: Any) -> str:
        calls["compensating"] += 1
        compensation.append((ctx.attempt, ctx.max_attempts, ctx.idempotency_key))
        if ctx.attempt == 1:
            raise RuntimeError("refund API timed out")
        return "refund"

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "pay.charge", idempotency_key="charge-5")
        row = await wait_for_state(conn, schema, op_id, "cancelled")
        worker = system.worker_id

    charged = 2 if give_up == "exhausted" else 1
    assert calls == {"claimed": 1, "charged": charged, "compensating": 2}
    # The compensation counts its own attempts from 1, whatever the charged step used up.
    assert compensation == [(1, 3, "charge-5:compensating"), (2, 3, "charge-5:compensating")]
    charged_rows = [
        ("claim", "charged", "charged", worker, 2),
        ("fail", "charged", "charged", worker, 2),
        ("claim", "charged", "charged", worker, 3),
        ("give_up", "charged", "compensating", worker, 3),
    ]
    if give_up == "do_not_retry":
        charged_rows = [
            ("claim", "charged", "charged", worker, 2),
            ("give_up", "charged", "compensating", worker, 2),
        ]
    n = 2 + charged
    assert (await trail(conn, schema, op_id))[1:] == [
        ("claim", "pending", "claimed", worker, 1),
        ("charge", "claimed", "charged", worker, 1),
        *charged_rows,
        ("claim", "compensating", "compensating", worker, n),
        ("fail", "compensating", "compensating", worker, n),
        ("claim", "compensating", "compensating", worker, n + 1),
        ("refund", "compensating", "cancelled", worker, n + 1),
    ]
    assert (row["attempts"], row["step_attempts"]) == (n + 1, 2)


@pytest.mark.parametrize("returned", [None, "bogus", "give_up", "claim", 7])
async def test_a_step_returning_no_declared_trigger_fails_naming_the_allowed_ones(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    returned: Any,
) -> None:
    calls: list[int] = []
    router = WorkflowRouter(prefix="shop")

    @router.on("branch", lifecycle=BRANCHING, max_attempts=1)
    async def decide(ctx: HandlerContext, payload: Any) -> Any:
        calls.append(ctx.attempt)
        return returned

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "shop.branch")
        row = await wait_for_state(conn, schema, op_id, "dead")
        worker = system.worker_id

    message = (
        f"StepResultError: step 'claimed' of 'shop.branch' returned {returned!r}; it must "
        "return the trigger to fire next, one of: hold, ship"
    )
    assert calls == [1]
    assert row["last_error"] == message
    rows = await audit(conn, schema, op_id)
    assert [(r["trigger"], r["from_state"], r["to_state"], r["actor"]) for r in rows][1:] == [
        ("claim", "pending", "claimed", worker),
        ("give_up", "claimed", "dead", worker),
    ]
    assert message in rows[-1]["detail"]


async def test_a_later_step_returning_another_states_trigger_fails_in_place(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    attempts: list[int] = []
    router = WorkflowRouter(prefix="shop")

    @router.on("order", lifecycle=FULFILMENT)
    async def first(ctx: HandlerContext, payload: Any) -> str:
        return "reserve"

    @router.on("order", step="reserved", max_attempts=2, retry=NO_WAIT)
    async def reserve(ctx: HandlerContext, payload: Any) -> str:
        attempts.append(ctx.attempt)
        return "ship"  # declared, but from `charged`, not from here

    @router.on("order", step="charged")
    async def ship(ctx: HandlerContext, payload: Any) -> str:
        raise AssertionError("never reached")

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "shop.order")
        row = await wait_for_state(conn, schema, op_id, "dead")

    assert attempts == [1, 2]
    assert row["last_error"] == (
        "StepResultError: step 'reserved' of 'shop.order' returned 'ship'; it must return the "
        "trigger to fire next, one of: charge"
    )
    assert [(t, f, to) for t, f, to, _, _ in await trail(conn, schema, op_id)][3:] == [
        ("claim", "reserved", "reserved"),
        ("fail", "reserved", "reserved"),
        ("claim", "reserved", "reserved"),
        ("give_up", "reserved", "dead"),
    ]


# -- transactional steps -----------------------------------------------------------------------


async def test_a_transactional_steps_writes_commit_with_its_transition_or_roll_back_with_it(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
) -> None:
    # Only the later step is transactional: the first one writes nothing.
    calls: Counter[str] = Counter()
    router = WorkflowRouter(prefix="shop")

    async def write(ctx: HandlerContext, what: str) -> None:
        assert ctx.session is not None
        await ctx.session.execute(
            text(f"INSERT INTO {app}.writes (op_id, what) VALUES (:id, :what)"),
            {"id": ctx.operation_id, "what": what},
        )

    @router.on("stock", lifecycle=STAGED)
    async def start(ctx: HandlerContext, payload: Any) -> str:
        calls["claimed"] += 1
        assert ctx.session is None
        return "start"

    @router.on("stock", step="started", transactional=True, retry=NOT_SOON)
    async def finish(ctx: HandlerContext, payload: Any) -> str:
        calls["started"] += 1
        await write(ctx, "finish")
        if payload["fail"]:
            raise RuntimeError("ledger rejected the booking")
        return "finish"

    async with WorkflowSystem(router=router, settings=settings):
        good = await publish(sm, settings, "shop.stock", {"fail": False})
        bad = await publish(sm, settings, "shop.stock", {"fail": True})
        await wait_for_state(conn, schema, good, "succeeded")

        async def bad_failed_once() -> bool:
            return "fail" in [row[0] for row in await trail(conn, schema, bad)]

        await eventually(bad_failed_once, "the failing step recorded its failure")
        bad_row = await operation(conn, schema, bad)

    writes = [
        tuple(r) for r in await conn.fetch(f"SELECT op_id, what, xmin::text FROM {app}.writes")
    ]
    # The committed write is in the very transaction that recorded its step's transition.
    finished = (await audit(conn, schema, good))[-1]
    assert finished["trigger"] == "finish"
    assert writes == [(good, "finish", finished["xid"])]
    # The failed attempt's write was rolled back with it; its step waits to be retried.
    assert [t for t, *_ in await trail(conn, schema, bad)] == [
        "publish",
        "claim",
        "start",
        "claim",
        "fail",
    ]
    assert (bad_row["state"], bad_row["last_error"]) == (
        "started",
        "RuntimeError: ledger rejected the booking",
    )
    assert calls == {"claimed": 2, "started": 2}


# -- parking and fire --------------------------------------------------------------------------


async def test_a_parked_operation_runs_nothing_until_fire_commits_with_the_callers_transaction(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    app: str,
    publisher: str,
) -> None:
    calls: Counter[str] = Counter()
    async with WorkflowSystem(router=approval_router(calls), settings=settings) as system:
        op_id = await publish(sm, settings, "doc.approval", idempotency_key="doc-1")
        parked = await wait_for_state(conn, schema, op_id, "waiting")
        # Parked: not claimable, so no handler runs however often the worker looks.
        assert await system.dispatcher.claim(10) == []
        assert calls == {"claimed": 1}
        assert (parked["lease_owner"], parked["step_attempts"]) == (None, 0)
        before = await audit_rows(conn, schema, op_id)

        # Fired in the caller's transaction, after its own write: rolled back, nothing moved.
        async with sm.session() as session:
            await session.execute(
                text(f"INSERT INTO {app}.writes (op_id, what) VALUES (:id, 'approval')"),
                {"id": op_id},
            )
            fired = await fire(session, op_id, "approve", actor="alice", detail="ticket 1")
            assert (fired.from_state, fired.to_state) == ("waiting", "approved")
            # Not visible to anyone else before the caller commits.
            assert (await operation(conn, schema, op_id))["state"] == "waiting"
            await session.rollback()
        assert (await operation(conn, schema, op_id))["state"] == "waiting"
        assert await audit_rows(conn, schema, op_id) == before
        assert await conn.fetchval(f"SELECT count(*) FROM {app}.writes") == 0

        # Committed: the caller's write and the approval together; the next step then runs.
        async with sm.session() as session:
            await session.execute(
                text(f"INSERT INTO {app}.writes (op_id, what) VALUES (:id, 'approval')"),
                {"id": op_id},
            )
            fired = await fire(session, op_id, "approve", actor="alice", detail="ticket 2")
            await session.commit()
        await wait_for_state(conn, schema, op_id, "succeeded")
        worker = system.worker_id

    assert (fired.operation_id, fired.trigger, fired.actor) == (op_id, "approve", "alice")
    assert calls == {"claimed": 1, "approved": 1}
    rows = await audit(conn, schema, op_id)
    assert [
        (r["trigger"], r["from_state"], r["to_state"], r["actor"], r["attempt"]) for r in rows
    ] == [
        ("publish", None, "pending", publisher, 0),
        ("claim", "pending", "claimed", worker, 1),
        ("park", "claimed", "waiting", worker, 1),
        ("approve", "waiting", "approved", "alice", 1),
        ("claim", "approved", "approved", worker, 2),
        ("pay", "approved", "succeeded", worker, 2),
    ]
    assert rows[3]["detail"] == "ticket 2"
    # The caller's own write committed with it (fire runs in a savepoint of that transaction).
    assert await conn.fetchval(f"SELECT what FROM {app}.writes WHERE op_id = $1", op_id) == (
        "approval"
    )


async def test_admin_fire_moves_a_parked_operation_and_refusals_change_nothing(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    admin: Admin,
) -> None:
    calls: Counter[str] = Counter()
    async with WorkflowSystem(router=approval_router(calls), settings=settings):
        denied = await publish(sm, settings, "doc.approval")
        kept = await publish(sm, settings, "doc.approval")
        await wait_for_state(conn, schema, denied, "waiting")
        await wait_for_state(conn, schema, kept, "waiting")

    fired = await admin.fire(denied, "deny", actor="bob", detail="duplicate request")
    assert (fired.from_state, fired.to_state, fired.trigger, fired.actor) == (
        "waiting",
        "cancelled",
        "deny",
        "bob",
    )
    last = (await audit(conn, schema, denied))[-1]
    assert (last["trigger"], last["from_state"], last["to_state"], last["actor"]) == (
        "deny",
        "waiting",
        "cancelled",
        "bob",
    )
    assert last["detail"] == "duplicate request"

    # A trigger the state does not allow: refused with the allowed ones, nothing written.
    before = await audit_rows(conn, schema, kept)
    for trigger in ("pay", "succeed", "claim"):
        with pytest.raises(FireRefused) as refused:
            await admin.fire(kept, trigger, actor="bob")
        assert str(refused.value) == (
            f"cannot fire {trigger!r} at operation {kept} (doc.approval, lifecycle 'approval'): "
            "from 'waiting' its lifecycle allows the triggers: approve, deny"
        )
    async with sm.session() as session:
        await session.execute(text("SELECT 1"))
        with pytest.raises(FireRefused, match="allows the triggers: approve, deny"):
            await fire(session, kept, "pay", actor="bob")
        await session.commit()
    assert await audit_rows(conn, schema, kept) == before
    assert (await operation(conn, schema, kept))["state"] == "waiting"

    # An unknown operation, and one that is finished.
    with pytest.raises(FireRefused, match=r"^cannot fire 'approve': no operation 999999$"):
        await admin.fire(999999, "approve", actor="bob")
    before = await audit_rows(conn, schema, denied)
    with pytest.raises(FireRefused) as refused:
        await admin.fire(denied, "approve", actor="bob")
    assert str(refused.value) == (
        f"cannot fire 'approve' at operation {denied} (doc.approval, lifecycle 'approval'): it "
        "is cancelled, finished (pgoutbox ops replay runs it again)"
    )
    assert await audit_rows(conn, schema, denied) == before
    assert calls == {"claimed": 2}


async def test_fire_is_refused_while_the_operation_runs_a_step(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    router = WorkflowRouter(prefix="doc")

    @router.on("approval", lifecycle=APPROVAL)
    async def ask(ctx: HandlerContext, payload: Any) -> str:
        started.set()
        await wait_for(release)
        return "park"

    @router.on("approval", step="approved")
    async def pay(ctx: HandlerContext, payload: Any) -> str:
        return "pay"

    async with Admin(settings.database) as admin, WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "doc.approval")
        await wait_for(started)
        before = await audit_rows(conn, schema, op_id)
        worker = (await operation(conn, schema, op_id))["lease_owner"]
        try:
            with pytest.raises(FireRefused) as refused:
                await admin.fire(op_id, "approve", actor="bob")
            # Counted while the step still runs: once released, its own result adds a row.
            after = await audit_rows(conn, schema, op_id)
        finally:
            release.set()
        assert str(refused.value) == (
            f"cannot fire 'approve' at operation {op_id} (doc.approval, lifecycle 'approval'): "
            f"it is running step 'claimed' on worker {worker}; fire when the step has finished"
        )
        assert after == before
        await wait_for_state(conn, schema, op_id, "waiting")


async def test_fire_is_refused_at_an_operation_outside_a_parking_state(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    admin: Admin,
) -> None:
    router = WorkflowRouter(prefix="shop")

    @router.on("order", lifecycle=FULFILMENT)
    async def first(ctx: HandlerContext, payload: Any) -> str:
        return "reserve"

    @router.on("order", step="reserved", retry=NOT_SOON)
    async def reserve(ctx: HandlerContext, payload: Any) -> str:
        raise RuntimeError("stock service down")

    @router.on("order", step="charged")
    async def ship(ctx: HandlerContext, payload: Any) -> str:
        return "ship"

    async with WorkflowSystem(router=router, settings=settings):
        resting = await publish(sm, settings, "shop.order")

        async def rests_after_a_failure() -> bool:
            return [t for t, *_ in await trail(conn, schema, resting)][-1] == "fail"

        await eventually(rests_after_a_failure, "the reserved step failed and waits to retry")
    async with WorkflowSystem(router=approval_router(Counter()), settings=settings):
        pass  # registers APPROVAL; nothing published yet
    pending = await publish(sm, settings, "doc.approval")

    cases = [
        # A step's own trigger, fired from outside, would record a step that never ran.
        (resting, "charge", "it is in 'reserved', which is not a parking state", "none in this"),
        (pending, "approve", "it is in 'pending', which is not a parking state", "waiting"),
    ]
    for op_id, trigger, reason, parking in cases:
        before = await audit_rows(conn, schema, op_id)
        state = (await operation(conn, schema, op_id))["state"]
        with pytest.raises(FireRefused) as refused:
            await admin.fire(op_id, trigger, actor="bob")
        assert reason in str(refused.value)
        assert f"fire applies to parking states: {parking}" in str(refused.value)
        assert await audit_rows(conn, schema, op_id) == before
        assert (await operation(conn, schema, op_id))["state"] == state


async def test_a_parking_timeout_fires_its_trigger_through_the_rescuer(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    calls: Counter[str] = Counter()
    reminded: list[tuple[int, str]] = []
    router = WorkflowRouter(prefix="doc")

    @router.on("expiring", lifecycle=EXPIRING)
    async def park(ctx: HandlerContext, payload: Any) -> str:
        calls["expiring"] += 1
        return "park"

    @router.on("reminding", lifecycle=REMINDING)
    async def park_too(ctx: HandlerContext, payload: Any) -> str:
        calls["reminding"] += 1
        return "park"

    @router.on("reminding", step="reminding")
    async def remind(ctx: HandlerContext, payload: Any) -> str:
        calls["reminder"] += 1
        reminded.append((ctx.attempt, ctx.idempotency_key))
        return "reminded"

    # The rescuer's own loop runs once at start and then not again: this test drives it.
    quiet = worker_settings(settings, rescue_interval_seconds=3600)
    async with WorkflowSystem(router=router, settings=quiet) as system:
        expiring = await publish(sm, settings, "doc.expiring")
        reminding = await publish(sm, settings, "doc.reminding", idempotency_key="doc-r")
        for op_id in (expiring, reminding):
            row = await wait_for_state(conn, schema, op_id, "waiting")
            # The deadline is set on entry, in database time.
            wait = (row["run_at"] - row["updated_at"]).total_seconds()
            assert 0.3 < wait <= 0.5, wait
        deadline = max(
            [(await operation(conn, schema, op_id))["run_at"] for op_id in (expiring, reminding)]
        )

        async def due() -> bool:
            return bool(await conn.fetchval("SELECT now() >= $1", deadline))

        await eventually(due, "both parked operations are past their deadline")
        rescuer = system.services["rescuer"]
        assert isinstance(rescuer, Rescuer)
        result = await rescuer.run_once()
        assert result.timed_out == 2
        assert (await rescuer.run_once()).timed_out == 0
        await wait_for_state(conn, schema, reminding, "succeeded")
        worker = system.worker_id

    assert (await operation(conn, schema, expiring))["state"] == "dead"
    assert calls == {"expiring": 1, "reminding": 1, "reminder": 1}
    assert reminded == [(1, "doc-r:reminding")]
    expired = (await audit(conn, schema, expiring))[-1]
    assert (
        expired["trigger"],
        expired["from_state"],
        expired["to_state"],
        expired["actor"],
        expired["attempt"],
    ) == ("expire", "waiting", "dead", worker, 1)
    assert expired["detail"].startswith("timed out: parked in waiting since ")
    assert (await trail(conn, schema, reminding))[2:] == [
        ("park", "claimed", "waiting", worker, 1),
        ("remind", "waiting", "reminding", worker, 1),
        ("claim", "reminding", "reminding", worker, 2),
        ("reminded", "reminding", "succeeded", worker, 2),
    ]


# -- replay ------------------------------------------------------------------------------------


async def test_replaying_an_operation_that_died_in_a_later_step_resumes_in_that_step(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    admin: Admin,
) -> None:
    calls: Counter[str] = Counter()
    charged: list[tuple[int, int, str]] = []
    broken = True
    router = WorkflowRouter(prefix="shop")

    @router.on("order", lifecycle=FULFILMENT)
    async def first(ctx: HandlerContext, payload: Any) -> str:
        calls["claimed"] += 1
        return "reserve"

    @router.on("order", step="reserved")
    async def reserve(ctx: HandlerContext, payload: Any) -> str:
        calls["reserved"] += 1
        return "charge"

    @router.on("order", step="charged", max_attempts=2, retry=NO_WAIT)
    async def ship(ctx: HandlerContext, payload: Any) -> str:
        calls["charged"] += 1
        charged.append((ctx.attempt, ctx.max_attempts, ctx.idempotency_key))
        if broken:
            raise RuntimeError("carrier down")
        return "ship"

    async with WorkflowSystem(router=router, settings=settings) as system:
        op_id = await publish(sm, settings, "shop.order", idempotency_key="order-3")
        dead = await wait_for_state(conn, schema, op_id, "dead")
        assert (dead["attempts"], dead["step_attempts"]) == (4, 2)
        broken = False
        [result] = await admin.replay(
            [op_id], actor="ops", reason="carrier is back", extra_attempts=2
        )
        assert (result.ok, result.state_before, result.state) == (True, "dead", "charged")
        row = await wait_for_state(conn, schema, op_id, "succeeded")
        worker = system.worker_id

    assert calls == {"claimed": 1, "reserved": 1, "charged": 3}
    # The step's attempts go on counting; max_attempts = its attempts so far + 2.
    assert charged == [
        (1, 2, "order-3:charged"),
        (2, 2, "order-3:charged"),
        (3, 4, "order-3:charged"),
    ]
    assert row["max_attempts"] == 4
    rows = await audit(conn, schema, op_id)
    assert [(r["trigger"], r["from_state"], r["to_state"], r["actor"], r["attempt"]) for r in rows][
        -4:
    ] == [
        ("give_up", "charged", "dead", worker, 4),
        ("replay", "dead", "charged", "ops", 4),
        ("claim", "charged", "charged", worker, 5),
        ("ship", "charged", "succeeded", worker, 5),
    ]
    assert rows[-3]["detail"] == "carrier is back"


# -- ordering keys -----------------------------------------------------------------------------


async def test_operations_sharing_an_ordering_key_run_one_at_a_time_in_publish_order(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    loop = asyncio.get_running_loop()
    spans: dict[int, list[float]] = {}  # operation -> [start, end]
    unkeyed_ran = asyncio.Event()
    running: set[int] = set()
    overlaps: list[tuple[int, set[int]]] = []
    router = WorkflowRouter(prefix="seq")

    def begin(op_id: int) -> None:
        if running:
            overlaps.append((op_id, set(running)))
        running.add(op_id)
        spans[op_id] = [loop.time()]

    def end(op_id: int) -> None:
        running.discard(op_id)
        spans[op_id].append(loop.time())

    @router.on("staged", lifecycle=STAGED)
    async def start(ctx: HandlerContext, payload: Any) -> str:
        begin(ctx.operation_id)
        if payload["first"]:
            # The unkeyed operation is not held back by the key: it runs meanwhile.
            await wait_for(unkeyed_ran)
        await asyncio.sleep(0.05)
        return "start"

    @router.on("staged", step="started")
    async def finish(ctx: HandlerContext, payload: Any) -> str:
        await asyncio.sleep(0.05)
        end(ctx.operation_id)
        return "finish"

    @router.on("plain")
    async def plain(ctx: HandlerContext, payload: Any) -> None:
        if payload.get("keyed"):
            begin(ctx.operation_id)
            await asyncio.sleep(0.05)
            end(ctx.operation_id)
        else:
            unkeyed_ran.set()

    channel = settings.workflow_system.channel
    async with WorkflowSystem(router=router, settings=settings):
        # Published after the start registered the lifecycle, all in one transaction: the
        # worker sees all four at once.
        async with sm.session() as session:
            keyed = [
                await publish_operation(
                    session, operation_type, payload, channel, ordering_key="customer-1"
                )
                for operation_type, payload in [
                    ("seq.staged", {"first": True}),
                    ("seq.plain", {"keyed": True}),  # keys order operations whatever their type
                    ("seq.staged", {"first": False}),
                ]
            ]
            unkeyed = await publish_operation(session, "seq.plain", {}, channel)
            await session.commit()
        for op_id in [*keyed, unkeyed]:
            await wait_for_state(conn, schema, op_id, "succeeded")

    assert overlaps == []
    assert sorted(spans, key=lambda op_id: spans[op_id][0]) == keyed
    for before, after in pairwise(keyed):
        assert spans[before][1] <= spans[after][0]
    # In the database too: each starts only after the one before it has succeeded.
    for before, after in pairwise(keyed):
        done = (await audit(conn, schema, before))[-1]
        first_claim = next(r for r in await audit(conn, schema, after) if r["trigger"] == "claim")
        assert done["to_state"] == "succeeded"
        assert first_claim["recorded_at"] > done["recorded_at"]


@pytest.mark.parametrize("release", ["replay", "cancel"])
async def test_a_dead_operation_holds_back_its_keys_successors_until_replayed_or_cancelled(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    admin: Admin,
    release: str,
) -> None:
    ran: list[int] = []
    broken = True
    router = WorkflowRouter(prefix="seq")

    @router.on("step", max_attempts=1)
    async def step(ctx: HandlerContext, payload: Any) -> None:
        ran.append(ctx.operation_id)
        if payload.get("fail") and broken:
            raise RuntimeError("downstream rejected it")

    channel = settings.workflow_system.channel
    async with sm.session() as session:
        first, second, third = [
            await publish_operation(session, "seq.step", payload, channel, ordering_key="acct-9")
            for payload in ({"fail": True}, {}, {})
        ]
        await session.commit()

    async with WorkflowSystem(router=router, settings=settings):
        await wait_for_state(conn, schema, first, "dead")
        # Published after the first one died: it runs, while the key's successors (due
        # earlier, so looked at first by every claim) are held back.
        other = await publish(sm, settings, "seq.step")
        await wait_for_state(conn, schema, other, "succeeded")
        for op_id in (second, third):
            row = await operation(conn, schema, op_id)
            assert (row["state"], row["attempts"]) == ("pending", 0)
        assert ran == [first, other]

        broken = False
        if release == "replay":
            [result] = await admin.replay([first], actor="ops", reason="fixed downstream")
            assert (result.ok, result.state) == (True, "pending")
            await wait_for_state(conn, schema, first, "succeeded")
        else:
            [result] = await admin.cancel([first], actor="ops", reason="not pursued")
            assert (result.ok, result.state_before, result.state) == (True, "dead", "cancelled")
        for op_id in (second, third):
            await wait_for_state(conn, schema, op_id, "succeeded")

    if release == "replay":
        assert ran == [first, other, first, second, third]
        released_by = (await audit(conn, schema, first))[-1]
        assert released_by["trigger"] == "succeed"
    else:
        assert ran == [first, other, second, third]
        released_by = (await audit(conn, schema, first))[-1]
        assert (released_by["trigger"], released_by["from_state"], released_by["actor"]) == (
            "cancel",
            "dead",
            "ops",
        )
    second_rows = await audit(conn, schema, second)
    third_rows = await audit(conn, schema, third)
    # Each successor started only once the one before it had finished.
    assert second_rows[1]["trigger"] == "claim"
    assert second_rows[1]["recorded_at"] > released_by["recorded_at"]
    assert (second_rows[-1]["trigger"], third_rows[1]["trigger"]) == ("succeed", "claim")
    assert third_rows[1]["recorded_at"] > second_rows[-1]["recorded_at"]


async def test_publishers_of_one_ordering_key_take_turns_until_the_first_transaction_ends(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    channel = settings.workflow_system.channel

    async def waiting_for_a_key() -> int:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return count

    async def publish_keyed(n: int) -> int:
        async with sm.session() as session:
            op_id = await publish_operation(
                session, "seq.step", {"n": n}, channel, ordering_key="acct-1"
            )
            await session.commit()
        return int(op_id)

    async with sm.session() as first:
        first_id = await publish_operation(
            first, "seq.step", {"n": 1}, channel, ordering_key="acct-1"
        )
        second = asyncio.create_task(publish_keyed(2))

        async def second_waits() -> bool:
            return await waiting_for_a_key() == 1

        await eventually(second_waits, "the second publisher of the key waits for its turn")
        assert not second.done()
        # Other keys, and no key, do not wait.
        async with sm.session() as other:
            await publish_operation(other, "seq.step", {"n": 3}, channel, ordering_key="acct-2")
            await publish_operation(other, "seq.step", {"n": 4}, channel)
            await other.commit()
        assert not second.done()
        await first.commit()
    second_id = await asyncio.wait_for(second, 10)

    assert first_id < second_id
    assert await waiting_for_a_key() == 0
    keyed = await conn.fetch(
        f'SELECT id FROM "{schema}".operations WHERE ordering_key = $1 ORDER BY id', "acct-1"
    )
    assert [r["id"] for r in keyed] == [first_id, second_id]


# -- registration ------------------------------------------------------------------------------


async def lifecycle_rows(conn: asyncpg.Connection, schema: str, name: str) -> dict[str, Any]:
    """What the database holds for lifecycle ``name``: versions, transitions, types."""
    return {
        "versions": [
            (r["version"], r["digest"])
            for r in await conn.fetch(
                f'SELECT version, digest FROM "{schema}".lifecycles WHERE name = $1 '
                "ORDER BY version",
                name,
            )
        ],
        "transitions": sorted(
            (name, r["from_state"], r["trigger"], r["to_state"])
            for r in await conn.fetch(
                f"SELECT from_state, trigger, to_state "
                f'FROM "{schema}".lifecycle_transitions WHERE lifecycle = $1',
                name,
            )
        ),
        "types": sorted(
            tuple(r)
            for r in await conn.fetch(
                f'SELECT operation_type, lifecycle FROM "{schema}".lifecycle_types '
                "WHERE lifecycle = $1",
                name,
            )
        ),
    }


def _approval_v2() -> Lifecycle:
    """APPROVAL with one more parking state."""
    return Lifecycle.define(
        "approval",
        states=["waiting", "escalated", "approved"],
        parking=["waiting", "escalated"],
        transitions=[
            {"trigger": "park", "source": "claimed", "dest": "waiting"},
            {"trigger": "approve", "source": ["waiting", "escalated"], "dest": "approved"},
            {"trigger": "escalate", "source": "waiting", "dest": "escalated"},
            {"trigger": "deny", "source": ["waiting", "escalated"], "dest": "cancelled"},
            {"trigger": "pay", "source": "approved", "dest": "succeeded"},
        ],
    )


def router_for(lifecycle: Lifecycle) -> WorkflowRouter:
    """``doc.approval`` under ``lifecycle`` (every working state answered), and ``doc.plain``."""
    router = WorkflowRouter(prefix="doc")

    async def first(ctx: HandlerContext, payload: Any) -> str:
        return "park"

    async def later(ctx: HandlerContext, payload: Any) -> str:
        return next(iter(sorted(lifecycle.exits(ctx.step))))

    router.on("approval", lifecycle=lifecycle)(first)
    for state in sorted(lifecycle.step_states):
        router.on("approval", step=state)(later)

    @router.on("plain")
    async def plain(ctx: HandlerContext, payload: Any) -> None:
        return None

    return router


async def test_starting_a_system_registers_its_lifecycles_and_types(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    publisher: str,
) -> None:
    assert await lifecycle_rows(conn, schema, "approval") == {
        "versions": [],
        "transitions": [],
        "types": [],
    }
    async with WorkflowSystem(router=router_for(APPROVAL), settings=settings):
        pass

    assert await lifecycle_rows(conn, schema, "approval") == {
        "versions": [(1, APPROVAL.digest)],
        "transitions": APPROVAL.rows(),
        "types": [("doc.approval", "approval")],
    }
    stored = await conn.fetchrow(
        f'SELECT definition::text, registered_by FROM "{schema}".lifecycles'
    )
    assert Lifecycle.from_definition(json.loads(stored["definition"])) == APPROVAL
    assert stored["registered_by"] == publisher
    # The default-lifecycle type is not listed: it runs the default.
    assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".lifecycle_types') == 1

    # The lifecycle is the type's, whatever the INSERT says.
    insert = (
        f'INSERT INTO "{schema}".operations (operation_type, channel, payload, lifecycle) '
        "VALUES ($1, 'c', '{}', $2) RETURNING id, lifecycle"
    )
    assert (await conn.fetchrow(insert, "doc.approval", "default"))["lifecycle"] == "approval"
    assert (await conn.fetchrow(insert, "doc.plain", "approval"))["lifecycle"] == "default"
    published = await publish(sm, settings, "doc.approval", channel="c")
    assert (await operation(conn, schema, published))["lifecycle"] == "approval"


async def test_a_changed_lifecycle_registers_a_new_version_that_the_database_enforces(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    admin: Admin,
) -> None:
    v2 = _approval_v2()
    async with WorkflowSystem(router=router_for(APPROVAL), settings=settings):
        op_id = await publish(sm, settings, "doc.approval")
        await wait_for_state(conn, schema, op_id, "waiting")
    with pytest.raises(FireRefused, match="allows the triggers: approve, deny"):
        await admin.fire(op_id, "escalate", actor="bob")

    for _ in range(2):  # the second start finds it registered and changes nothing
        async with WorkflowSystem(router=router_for(v2), settings=settings):
            pass
        assert await lifecycle_rows(conn, schema, "approval") == {
            "versions": [(1, APPROVAL.digest), (2, v2.digest)],
            "transitions": v2.rows(),
            "types": [("doc.approval", "approval")],
        }

    # The operation parked under version 1 moves on by version 2's triggers.
    fired = await admin.fire(op_id, "escalate", actor="bob")
    assert (fired.from_state, fired.to_state) == ("waiting", "escalated")


async def test_a_change_removing_a_state_where_an_operation_sits_is_refused_at_start(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
) -> None:
    without_waiting = Lifecycle.define(
        "approval",
        states=["approved"],
        transitions=[
            {"trigger": "approve_now", "source": "claimed", "dest": "approved"},
            {"trigger": "pay", "source": "approved", "dest": "succeeded"},
        ],
    )
    async with WorkflowSystem(router=router_for(APPROVAL), settings=settings):
        op_id = await publish(sm, settings, "doc.approval")
        await wait_for_state(conn, schema, op_id, "waiting")
    registered = await lifecycle_rows(conn, schema, "approval")

    router = WorkflowRouter(prefix="doc")

    @router.on("approval", lifecycle=without_waiting)
    async def first(ctx: HandlerContext, payload: Any) -> str:
        return "approve_now"

    @router.on("approval", step="approved")
    async def pay(ctx: HandlerContext, payload: Any) -> str:
        return "pay"

    system = WorkflowSystem(router=router, settings=settings)
    with pytest.raises(LifecycleChangeRefused) as refused:
        await system.start()
    assert f"{op_id} (waiting)" in str(refused.value)
    assert "removes states waiting" in str(refused.value)
    assert await lifecycle_rows(conn, schema, "approval") == registered
    assert (await operation(conn, schema, op_id))["state"] == "waiting"
    assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".workers') == 0


async def test_moving_a_type_with_unfinished_operations_to_another_lifecycle_is_refused(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
) -> None:
    async with WorkflowSystem(router=router_for(APPROVAL), settings=settings):
        op_id = await publish(sm, settings, "doc.approval")
        await wait_for_state(conn, schema, op_id, "waiting")
    router = WorkflowRouter(prefix="doc")

    @router.on("approval")  # back to the default lifecycle
    async def approval(ctx: HandlerContext, payload: Any) -> None:
        return None

    with pytest.raises(LifecycleChangeRefused) as refused:
        await WorkflowSystem(router=router, settings=settings).start()
    assert f"{op_id} (approval: waiting)" in str(refused.value)
    assert (await lifecycle_rows(conn, schema, "approval"))["types"] == [
        ("doc.approval", "approval")
    ]


async def test_without_auto_migrate_an_unregistered_lifecycle_refuses_to_start(
    settings: Settings, conn: asyncpg.Connection, schema: str
) -> None:
    strict = worker_settings(settings, auto_migrate=False)
    router = router_for(APPROVAL)

    with pytest.raises(LifecycleNotRegistered) as refused:
        await WorkflowSystem(router=router, settings=strict).start()
    assert "`pgoutbox lifecycle register APP`" in str(refused.value)
    assert "lifecycle 'approval'" in str(refused.value)
    assert "type 'doc.approval' -> lifecycle 'approval'" in str(refused.value)
    assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".lifecycles') == 0

    # Registered by the schema owner, the same system starts.
    done = await register(conn, queries(schema), schema, router.handlers())
    assert (done.versions, done.types) == ({"approval": 1}, {"doc.approval": "approval"})
    async with WorkflowSystem(router=router, settings=strict) as system:
        assert system.worker_id


async def test_the_database_refuses_a_transition_the_custom_lifecycle_does_not_allow(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    async with WorkflowSystem(router=router_for(APPROVAL), settings=settings):
        parked = await publish(sm, settings, "doc.approval")
        await wait_for_state(conn, schema, parked, "waiting")
    pending = await publish(sm, settings, "doc.approval")  # no worker runs it now

    async def change(op_id: int, to_state: str, trigger: str, lease: bool = False) -> None:
        await conn.execute(
            f'UPDATE "{schema}".operations SET state = $2, transition = $3, '
            "transition_actor = 'intruder', "
            "lease_owner = CASE WHEN $4 THEN 'intruder' END, "
            "lease_expires_at = CASE WHEN $4 THEN now() + interval '1 minute' END "
            "WHERE id = $1",
            op_id,
            to_state,
            trigger,
            lease,
        )

    refused = [
        (parked, "succeeded", "approve"),  # approve leads to approved, not succeeded
        (parked, "claimed", "claim"),  # a parked operation is never claimed
        (parked, "succeeded", "succeed"),
        (pending, "waiting", "park"),  # park leaves claimed only
    ]
    for op_id, to_state, trigger in refused:
        before = await audit_rows(conn, schema, op_id)
        state = (await operation(conn, schema, op_id))["state"]
        with pytest.raises(asyncpg.CheckViolationError) as error:
            await change(op_id, to_state, trigger)
        assert f'transition "{trigger}" from {state} to {to_state} is not allowed by lifecycle' in (
            str(error.value)
        )
        assert '"approval"' in str(error.value)
        assert await audit_rows(conn, schema, op_id) == before

    # The default lifecycle's `succeed` is not this lifecycle's: a claimed step must name one.
    await change(pending, "claimed", "claim", lease=True)
    with pytest.raises(asyncpg.CheckViolationError, match='"succeed" from claimed to succeeded'):
        await change(pending, "succeeded", "succeed")
    await change(pending, "waiting", "park")
    assert [t for t, *_ in await trail(conn, schema, pending)] == ["publish", "claim", "park"]
    assert (await verify(settings.database)).ok


async def test_fire_as_the_first_statement_of_a_session_still_waits_for_the_callers_commit(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    calls: Counter[str] = Counter()
    async with WorkflowSystem(router=approval_router(calls), settings=settings):
        op_id = await publish(sm, settings, "doc.approval")
        await wait_for_state(conn, schema, op_id, "waiting")
        before = await audit_rows(conn, schema, op_id)
        # SQLAlchemy begins the database transaction lazily: fire must not run outside it.
        async with sm.session() as session:
            await fire(session, op_id, "approve", actor="alice")
            assert (await operation(conn, schema, op_id))["state"] == "waiting"
            await session.rollback()
        assert (await operation(conn, schema, op_id))["state"] == "waiting"
        assert await audit_rows(conn, schema, op_id) == before
    assert calls == {"claimed": 1}


async def test_a_replays_extra_attempts_belong_to_the_replayed_step_not_to_later_ones(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    admin: Admin,
) -> None:
    calls: Counter[str] = Counter()
    broken = True
    router = WorkflowRouter(prefix="shop")

    @router.on("order", lifecycle=FULFILMENT)
    async def first(ctx: HandlerContext, payload: Any) -> str:
        return "reserve"

    @router.on("order", step="reserved", max_attempts=3, retry=NO_WAIT)
    async def reserve(ctx: HandlerContext, payload: Any) -> str:
        calls["reserved"] += 1
        if broken:
            raise RuntimeError("stock service down")
        return "charge"

    @router.on("order", step="charged", max_attempts=1)  # never retried
    async def charge(ctx: HandlerContext, payload: Any) -> str:
        calls["charged"] += 1
        raise RuntimeError("card declined")

    async with WorkflowSystem(router=router, settings=settings):
        op_id = await publish(sm, settings, "shop.order")
        await wait_for_state(conn, schema, op_id, "dead")
        broken = False
        [result] = await admin.replay([op_id], actor="ops", extra_attempts=1)
        assert (result.ok, result.state) == (True, "reserved")
        assert (await operation(conn, schema, op_id))["max_attempts"] == 4
        row = await wait_for_state(conn, schema, op_id, "dead")

    # The replayed step got its one more attempt; the next step ran under its own limit, once.
    assert calls == {"reserved": 4, "charged": 1}
    assert (row["step_attempts"], row["max_attempts"]) == (1, None)
    last = (await audit(conn, schema, op_id))[-1]
    assert (last["trigger"], last["from_state"], last["to_state"]) == ("give_up", "charged", "dead")
    assert last["detail"].startswith("attempt 1 of step charged of 1: RuntimeError: card declined")


async def test_a_later_step_nobody_runs_is_stale_but_a_parked_operation_is_not(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    calls: Counter[str] = Counter()
    async with WorkflowSystem(router=approval_router(calls), settings=settings):
        parked = await publish(sm, settings, "doc.approval")
        stuck = await publish(sm, settings, "doc.approval")
        await wait_for_state(conn, schema, parked, "waiting")
        await wait_for_state(conn, schema, stuck, "waiting")
    # The worker is gone. One operation is approved: its next step now waits for a worker.
    async with Admin(settings.database) as admin:
        await admin.fire(stuck, "approve", actor="alice")
        listed = await admin.list_operations(OperationFilter(stale=True))
    assert [(op.id, op.state, op.stale_reason) for op in listed] == [
        (stuck, "approved", "unhandled")
    ]
