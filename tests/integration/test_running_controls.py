"""Running controls in one process: a handler's Snooze gives its attempt back and waits in
database time, a timeout fails the attempt and retries it, and an operator's cancel stops a
running handler (or loses to its real outcome). States and audit rows read back from the
database; processes on other hosts are tests/faults/test_running_controls_processes.py."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from opkit import audit, operation, publish, wait_for_state, worker_settings
from sqlalchemy import text

from pgoutbox import (
    DatabaseSessionManager,
    HandlerContext,
    Lifecycle,
    RetryPolicy,
    RouterError,
    Settings,
    Snooze,
    WorkflowRouter,
    WorkflowSystem,
    verify,
)
from pgoutbox.admin import Admin
from pgoutbox.worker.services import Rescuer

NO_WAIT = RetryPolicy(base_seconds=0, max_seconds=0, jitter=0)


@pytest.fixture
def schema(settings: Settings) -> str:
    return settings.database.schema_name


async def wait_until(condition: Any, within: float = 20) -> None:
    """Poll an async condition with a generous deadline (the machine is shared)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def due_again_at(detail: str) -> datetime:
    """The time a snooze's audit detail says the operation is due again."""
    found = re.search(r"due again at (.+)$", detail)
    assert found is not None, detail
    return datetime.fromisoformat(found.group(1))


# -- snooze ------------------------------------------------------------------------------------


async def test_a_snooze_gives_the_attempt_back_and_waits_until_the_time_it_named(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()
    runs: list[int] = []

    @router.on("pay.charge", max_attempts=1)
    async def charge(ctx: HandlerContext, payload: Any) -> None:
        runs.append(ctx.attempt)
        if len(runs) < 3:
            raise Snooze(0.5, reason="provider said 429")

    async with WorkflowSystem(router=router, settings=worker_settings(settings)):
        op_id = await publish(sm, settings, "pay.charge")
        row = await wait_for_state(conn, schema, op_id, "succeeded", within=30)

    # max_attempts=1, and yet three runs: the snoozes spent no attempt of the step.
    assert runs == [1, 1, 1]
    assert (row["attempts"], row["step_attempts"], row["snoozes"]) == (3, 1, 2)
    trail = await audit(conn, schema, op_id)
    assert [(r["trigger"], r["from_state"], r["to_state"], r["attempt"]) for r in trail] == [
        ("publish", None, "pending", 0),
        ("claim", "pending", "claimed", 1),
        ("snooze", "claimed", "pending", 1),
        ("claim", "pending", "claimed", 2),
        ("snooze", "claimed", "pending", 2),
        ("claim", "pending", "claimed", 3),
        ("succeed", "claimed", "succeeded", 3),
    ]
    assert "snoozed for 0.5 s: provider said 429 (snooze 1 of at most 100)" in trail[2]["detail"]
    # Database time: each claim after a snooze is no earlier than the time the snooze named
    # (the snooze statement's now() + 0.5 s), which is no earlier than half a second after
    # the attempt's claim.
    for claim, snoozed, claimed in ((trail[1], trail[2], trail[3]), (trail[3], trail[4], trail[5])):
        due = due_again_at(snoozed["detail"])
        assert due >= claim["recorded_at"] + timedelta(seconds=0.5)
        assert claimed["recorded_at"] >= due
    assert (await verify(settings.database)).ok


async def test_a_returned_snooze_is_a_snooze_and_the_bound_makes_it_a_failed_attempt(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("pay.poll", max_snoozes=2, max_attempts=2, retry=NO_WAIT)
    async def poll(ctx: HandlerContext, payload: Any) -> Snooze:
        return Snooze(timedelta(0))

    async with WorkflowSystem(router=router, settings=worker_settings(settings)):
        op_id = await publish(sm, settings, "pay.poll")
        row = await wait_for_state(conn, schema, op_id, "dead", within=30)

    trail = [r["trigger"] for r in await audit(conn, schema, op_id)]
    # Two snoozes, then every snooze is a failed attempt: two attempts, then dead.
    assert trail == [
        "publish",
        *("claim", "snooze") * 2,
        "claim",
        "fail",
        "claim",
        "give_up",
    ]
    assert (row["snoozes"], row["step_attempts"]) == (2, 2)
    assert row["last_error"].startswith("SnoozeLimitReached: snoozed 2 times, the most allowed")


async def test_a_later_step_snoozes_in_its_own_state(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    two_steps = Lifecycle.define(
        "snoozing_two_steps",
        states=["charged"],
        transitions=[
            {"trigger": "charge", "source": "claimed", "dest": "charged"},
            {"trigger": "send_receipt", "source": "charged", "dest": "succeeded"},
        ],
    )
    router = WorkflowRouter()
    receipts: list[int] = []

    @router.on("pay.two", lifecycle=two_steps)
    async def charge(ctx: HandlerContext, payload: Any) -> str:
        return "charge"

    @router.on("pay.two", step="charged")
    async def receipt(ctx: HandlerContext, payload: Any) -> str:
        receipts.append(ctx.attempt)
        if len(receipts) == 1:
            raise Snooze(0)
        return "send_receipt"

    async with WorkflowSystem(router=router, settings=worker_settings(settings)):
        op_id = await publish(sm, settings, "pay.two")
        await wait_for_state(conn, schema, op_id, "succeeded", within=30)

    trail = [
        (r["trigger"], r["from_state"], r["to_state"]) for r in await audit(conn, schema, op_id)
    ]
    assert ("snooze", "charged", "charged") in trail
    assert receipts == [1, 1]


def test_snooze_and_timeout_options_are_validated_at_registration() -> None:
    router = WorkflowRouter()
    for bad in (0, -1, True, "30", timedelta(days=2)):
        with pytest.raises(RouterError, match=r"invalid timeout"):
            router.on("x", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(RouterError, match=r"invalid max_snoozes -1"):
        router.on("x", max_snoozes=-1)
    with pytest.raises(ValueError, match=r"invalid Snooze\(-1\)"):
        Snooze(-1)


# -- timeouts ----------------------------------------------------------------------------------


async def test_a_handler_past_its_timeout_is_cancelled_failed_and_retried(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()
    cleaned_up: list[int] = []

    @router.on("slow.call", timeout=0.5, retry=NO_WAIT, max_attempts=3)
    async def slow(ctx: HandlerContext, payload: Any) -> None:
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cleaned_up.append(ctx.attempt)
                raise

    async with WorkflowSystem(router=router, settings=worker_settings(settings)):
        op_id = await publish(sm, settings, "slow.call")
        await wait_for_state(conn, schema, op_id, "succeeded", within=30)

    trail = await audit(conn, schema, op_id)
    assert [r["trigger"] for r in trail] == ["publish", "claim", "fail", "claim", "succeed"]
    assert "HandlerTimedOut: timed out after 0.5 s" in trail[2]["detail"]
    assert cleaned_up == [1]


async def test_the_timeout_setting_applies_to_handlers_without_their_own(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()

    @router.on("slow.any", max_attempts=1)
    async def slow(ctx: HandlerContext, payload: Any) -> None:
        await asyncio.sleep(3600)

    ws = worker_settings(settings, handler_timeout_seconds=0.5)
    async with WorkflowSystem(router=router, settings=ws):
        op_id = await publish(sm, settings, "slow.any")
        row = await wait_for_state(conn, schema, op_id, "dead", within=30)
    assert row["last_error"] == "HandlerTimedOut: timed out after 0.5 s"


# -- cancelling running work -------------------------------------------------------------------


async def test_an_operator_cancels_a_running_handler_and_the_audit_names_them(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()
    started = asyncio.Event()
    saw_cancel: list[bool] = []

    @router.on("long.job")
    async def job(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw_cancel.append(True)
            raise

    # A long heartbeat: the notification, not the heartbeat, brings the request.
    ws = worker_settings(settings, lease_seconds=120)
    async with WorkflowSystem(router=router, settings=ws) as system:
        op_id = await publish(sm, settings, "long.job")
        await asyncio.wait_for(started.wait(), 20)
        async with Admin(settings.database) as admin:
            (result,) = await admin.cancel(
                [op_id], actor="alice", reason="ticket 7", wait_seconds=30
            )
        worker_id = system.worker_id

    assert result.ok, result.message
    assert result.state == "cancelled"
    assert saw_cancel == [True]
    trail = await audit(conn, schema, op_id)
    last = trail[-1]
    assert (last["trigger"], last["from_state"], last["to_state"], last["actor"]) == (
        "abort",
        "claimed",
        "cancelled",
        "alice",
    )
    assert "cancel requested by alice" in last["detail"]
    assert "ticket 7" in last["detail"]
    assert worker_id in last["detail"]
    row = await operation(conn, schema, op_id)
    assert (row["cancel_requested_by"], row["cancel_request_reason"]) == ("alice", "ticket 7")
    assert (await verify(settings.database)).ok


async def test_a_handler_that_finishes_first_keeps_its_outcome_and_the_cancel_is_refused(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()
    started = asyncio.Event()

    @router.on("stubborn.job")
    async def job(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return  # swallows the cancel: it finished, and that is what is recorded

    plain_started = asyncio.Event()

    @router.on("plain.job")
    async def plain(ctx: HandlerContext, payload: Any) -> None:
        plain_started.set()
        await asyncio.sleep(3600)

    # One work loop: the cancel it swallowed must not linger in it and hit the next operation.
    async with WorkflowSystem(router=router, settings=worker_settings(settings, n_workers=1)):
        op_id = await publish(sm, settings, "stubborn.job")
        await asyncio.wait_for(started.wait(), 20)
        async with Admin(settings.database) as admin:
            (result,) = await admin.cancel([op_id], actor="bob", wait_seconds=30)
        second = await publish(sm, settings, "plain.job")
        await asyncio.wait_for(plain_started.wait(), 20)
        async with Admin(settings.database) as admin:
            (second_result,) = await admin.cancel([second], actor="bob", wait_seconds=30)

    assert second_result.ok, second_result.message
    assert not result.ok
    assert "finished first (succeed -> succeeded)" in result.message
    assert (await operation(conn, schema, op_id))["state"] == "succeeded"


async def test_a_cancel_nobody_answers_stands_and_the_rescuer_honours_it(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    router = WorkflowRouter()
    started = asyncio.Event()

    @router.on("orphan.job", on_lost="retry")
    async def job(ctx: HandlerContext, payload: Any) -> None:
        started.set()
        await asyncio.sleep(3600)

    ws = worker_settings(settings, lease_seconds=2, listen=False)
    system = WorkflowSystem(router=router, settings=ws)
    await system.start()
    op_id = await publish(sm, settings, "orphan.job")
    await asyncio.wait_for(started.wait(), 20)
    # The worker stops heartbeating (as if its host froze): nobody answers.
    await system.services["heartbeat"].stop()
    try:
        async with Admin(settings.database) as admin:
            (result,) = await admin.cancel([op_id], actor="carol", wait_seconds=0)
        assert not result.ok
        assert "the request stands" in result.message
        # Once the lease has expired, a rescuer cancels it instead of retrying it.
        rescuer = system.services["rescuer"]
        assert isinstance(rescuer, Rescuer)

        async def rescued() -> bool:
            # This round, or the rescuer's own loop, may be the one that finds it.
            await rescuer.run_once()
            return bool((await operation(conn, schema, op_id))["state"] == "cancelled")

        await wait_until(rescued)
    finally:
        await system.stop()
    row = await operation(conn, schema, op_id)
    assert row["state"] == "cancelled"
    last = (await audit(conn, schema, op_id))[-1]
    assert (last["trigger"], last["actor"]) == ("abort", "carol")
    assert "honoured by" in last["detail"]


async def test_a_transactional_handler_past_its_timeout_rolls_back_its_writes(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str
) -> None:
    table = f'"{schema}".timeout_writes'
    await conn.execute(f"CREATE TABLE {table} (attempt int)")
    router = WorkflowRouter()

    @router.on("tx.slow", transactional=True, timeout=0.5, retry=NO_WAIT, max_attempts=2)
    async def slow(ctx: HandlerContext, payload: Any) -> None:
        assert ctx.session is not None
        await ctx.session.execute(text(f"INSERT INTO {table} VALUES (:n)"), {"n": ctx.attempt})
        if ctx.attempt == 1:
            await asyncio.sleep(3600)

    async with WorkflowSystem(router=router, settings=worker_settings(settings)):
        op_id = await publish(sm, settings, "tx.slow")
        await wait_for_state(conn, schema, op_id, "succeeded", within=30)

    # The first attempt's write went with its transaction; the second's committed with it.
    assert [r["attempt"] for r in await conn.fetch(f"SELECT attempt FROM {table}")] == [2]
    trail = await audit(conn, schema, op_id)
    assert [r["trigger"] for r in trail] == ["publish", "claim", "fail", "claim", "succeed"]
    assert "timed out after 0.5 s" in trail[2]["detail"]
