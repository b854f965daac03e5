"""pgoutbox.admin, the Python API behind the operator commands, against a real PostgreSQL.

Operations are put into each state the way the system does it: published, then moved by
UPDATEs that name their transition, through the audit trigger.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from pgoutbox import DatabaseSessionManager, RetryPolicy, Settings, WorkflowRouter, WorkflowSystem
from pgoutbox import publish_operation as publish
from pgoutbox.admin import (
    Admin,
    AuditRecord,
    OperationFilter,
    OperationNotFound,
    as_json,
)
from pgoutbox.audit import verify_chains
from pgoutbox.context import HandlerContext
from pgoutbox.settings import DatabaseSettings

# trigger -> the state it leads to, for driving operations through the audit trigger.
TO_STATE = {
    "claim": "claimed",
    "succeed": "succeeded",
    "fail": "failed",
    "give_up": "dead",
    "lose": "dead",
    "release": "pending",
    "cancel": "cancelled",
}


@pytest.fixture
async def admin(db_settings: DatabaseSettings) -> AsyncIterator[Admin]:
    async with Admin(db_settings) as opened:
        yield opened


class World:
    """Publishes operations and drives them through transitions, as workers would."""

    def __init__(self, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str) -> None:
        self.sm, self.conn, self.s = sm, conn, f'"{schema}"'

    async def publish(
        self, operation_type: str = "billing.charge", channel: str = "c", **kwargs: Any
    ) -> int:
        async with self.sm.session() as session:
            op_id = await publish(session, operation_type, {"n": 1}, channel, **kwargs)
            await session.commit()
        return int(op_id)

    async def drive(self, op_id: int, *triggers: str, worker: str = "worker-1") -> None:
        for trigger in triggers:
            failure = trigger in ("fail", "give_up", "lose")
            detail = f"attempt failed: ValueError: boom {trigger}" if failure else None
            await self.conn.execute(
                f"UPDATE {self.s}.operations SET state = $2, transition = $3, "
                "transition_actor = $4, transition_detail = $5, "
                "attempts = attempts + CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END, "
                "step_attempts = step_attempts + CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END, "
                "lease_owner = CASE WHEN $3 = 'claim' THEN $4 END, "
                "lease_expires_at = CASE WHEN $3 = 'claim' THEN now() + interval '30 seconds' END, "
                "last_error = coalesce($5, last_error), version = version + 1 WHERE id = $1",
                op_id,
                TO_STATE[trigger],
                trigger,
                worker,
                detail,
            )

    async def make(self, *triggers: str, **kwargs: Any) -> int:
        op_id = await self.publish(**kwargs)
        await self.drive(op_id, *triggers)
        return op_id

    async def row(self, op_id: int) -> asyncpg.Record:
        return await self.conn.fetchrow(f"SELECT * FROM {self.s}.operations WHERE id = $1", op_id)

    async def audit(self, op_id: int) -> list[asyncpg.Record]:
        return await self.conn.fetch(
            f"SELECT * FROM {self.s}.audit_log WHERE operation_id = $1 ORDER BY seq", op_id
        )

    async def register_worker(
        self, worker_id: str, types: list[str], channel: str = "c", age: float = 0
    ) -> None:
        await self.conn.execute(
            f"INSERT INTO {self.s}.workers (id, hostname, pid, channel, operation_types, "
            "heartbeat_at) VALUES ($1, 'host', 1, $2, $3, now() - make_interval(secs => $4))",
            worker_id,
            channel,
            types,
            age,
        )


@pytest.fixture
def world(
    sm: DatabaseSessionManager, conn: asyncpg.Connection, db_settings: DatabaseSettings
) -> World:
    return World(sm, conn, db_settings.schema_name)


# -- listing -----------------------------------------------------------------------------


async def test_list_filters_by_state_type_pattern_channel_and_returns_newest_first(
    admin: Admin, world: World
) -> None:
    charge = await world.make("claim", "fail")
    email = await world.make(operation_type="email.send_welcome")
    other_channel = await world.make(operation_type="email.send_welcome", channel="other")
    refund = await world.make("claim", "succeed", operation_type="billing.refund")

    everything = await admin.list_operations()
    assert [op.id for op in everything] == [refund, other_channel, email, charge]

    failed = await admin.list_operations(OperationFilter(states=("failed",)))
    assert [(op.id, op.state, op.attempts) for op in failed] == [(charge, "failed", 1)]
    assert failed[0].last_error == "attempt failed: ValueError: boom fail"

    billing = await admin.list_operations(OperationFilter(operation_types=("billing.*",)))
    assert {op.id for op in billing} == {charge, refund}
    # "_" is a literal underscore, not LIKE's any-character.
    assert await admin.list_operations(OperationFilter(operation_types=("email_send*",))) == []

    on_other = await admin.list_operations(OperationFilter(channels=("other",)))
    assert [op.id for op in on_other] == [other_channel]

    assert [op.id for op in await admin.list_operations(OperationFilter(limit=2))] == [
        refund,
        other_channel,
    ]


async def test_list_since_and_until_bound_creation_time_in_database_time(
    admin: Admin, world: World
) -> None:
    first = await world.make()
    created = (await world.row(first))["created_at"]
    second = await world.make()

    assert await admin.list_operations(OperationFilter(since=timedelta(0))) == []
    recent = await admin.list_operations(OperationFilter(since=timedelta(hours=1)))
    assert {op.id for op in recent} == {first, second}
    before_second = await admin.list_operations(
        OperationFilter(since=created, until=(await world.row(second))["created_at"])
    )
    assert [op.id for op in before_second] == [first]


async def test_stale_lists_unhandled_overdue_and_unrescued_operations_with_their_reason(
    admin: Admin, world: World, unaudited: Callable[..., Awaitable[None]]
) -> None:
    await world.register_worker("live-worker", ["billing.charge"])
    await world.register_worker("dead-worker", ["email.send"], age=600)
    handled_fresh = await world.make()
    handled_overdue = await world.make()
    unhandled = await world.make(operation_type="email.send")  # only a dead worker has it
    wrong_channel = await world.make(channel="elsewhere")
    claimed_lost = await world.make("claim")
    claimed_held = await world.make("claim")
    s = world.s
    await unaudited(
        s,
        f"UPDATE {s}.operations SET run_at = now() - interval '10 minutes' WHERE id = $1",
        handled_overdue,
    )
    await world.conn.execute(
        f"UPDATE {s}.operations SET lease_expires_at = now() - interval '10 minutes' WHERE id = $1",
        claimed_lost,
    )

    stale = await admin.list_operations(OperationFilter(stale=True))

    assert {op.id: op.stale_reason for op in stale} == {
        handled_overdue: "overdue",
        unhandled: "unhandled",
        wrong_channel: "unhandled",
        claimed_lost: "lease_expired",
    }
    everything = {op.id: op.stale_reason for op in await admin.list_operations()}
    assert everything[handled_fresh] is None
    assert everything[claimed_held] is None


async def test_the_live_window_decides_which_workers_count(
    db_settings: DatabaseSettings, world: World
) -> None:
    await world.register_worker("slow-heartbeat", ["billing.charge"], age=60)
    op_id = await world.make()

    async with Admin(db_settings) as strict:
        assert [op.id for op in await strict.list_operations(OperationFilter(stale=True))] == [
            op_id
        ]
    async with Admin(db_settings, live_within=timedelta(minutes=2)) as lenient:
        assert await lenient.list_operations(OperationFilter(stale=True)) == []


# -- one operation -------------------------------------------------------------------------


async def test_get_operation_derives_each_attempt_from_the_audit_trail(
    admin: Admin, world: World
) -> None:
    op_id = await world.publish()
    await world.drive(op_id, "claim", "fail", worker="worker-a")
    await world.drive(op_id, "claim", worker="worker-b")
    # A late result of a lost attempt is audited but changes nothing: not an attempt's end.
    await world.conn.execute(
        f"UPDATE {world.s}.operations SET transition = 'reject', transition_actor = 'zombie', "
        "transition_detail = 'late' WHERE id = $1",
        op_id,
    )
    await world.drive(op_id, "succeed", worker="worker-b")
    await world.drive(await world.publish(), "claim")  # another operation, not in this trail

    detail = await admin.get_operation(op_id)

    audit = await world.audit(op_id)
    assert detail.operation is not None
    assert (detail.operation.state, detail.operation.attempts) == ("succeeded", 2)
    assert detail.payload == {"n": 1}
    assert [(r.seq, r.trigger, r.actor) for r in detail.audit] == [
        (r["seq"], r["trigger"], r["actor"]) for r in audit
    ]
    assert [r.hash for r in detail.audit] == [r["hash"].hex() for r in audit]
    first, second = detail.attempts
    by_seq = {r["seq"]: r for r in audit}
    assert (first.number, first.worker, first.outcome, first.state_after) == (
        1,
        "worker-a",
        "fail",
        "failed",
    )
    assert first.error == "attempt failed: ValueError: boom fail"
    assert (first.started_at, first.ended_at) == (
        by_seq[2]["recorded_at"],
        by_seq[3]["recorded_at"],
    )
    assert (
        first.duration_seconds
        == (by_seq[3]["recorded_at"] - by_seq[2]["recorded_at"]).total_seconds()
    )
    assert (second.number, second.worker, second.outcome, second.error) == (
        2,
        "worker-b",
        "succeed",
        None,
    )
    assert second.ended_at == by_seq[6]["recorded_at"]  # seq 5 is the reject


async def test_an_attempt_in_progress_is_running(admin: Admin, world: World) -> None:
    op_id = await world.make("claim")

    (attempt,) = (await admin.get_operation(op_id)).attempts

    assert (attempt.outcome, attempt.state_after, attempt.ended_at) == ("running", "claimed", None)
    assert attempt.duration_seconds is None


async def test_get_operation_of_an_unknown_id_raises_not_found(admin: Admin) -> None:
    with pytest.raises(OperationNotFound, match="no operation 4242"):
        await admin.get_operation(4242)


# -- actions -------------------------------------------------------------------------------


async def test_retry_runs_a_failed_operation_now_audited_with_actor_and_reason(
    admin: Admin, world: World, unaudited: Callable[..., Awaitable[None]]
) -> None:
    op_id = await world.make("claim", "fail")
    await unaudited(
        world.s,
        f"UPDATE {world.s}.operations SET run_at = now() + interval '1 hour' WHERE id = $1",
        op_id,
    )
    before = await world.row(op_id)

    (result,) = await admin.retry([op_id], actor="alice", reason="provider is back, INC-7")

    assert result.ok
    assert (result.state_before, result.state) == ("failed", "pending")
    assert result.message == f"operation {op_id}: failed -> pending (retry, by alice)"
    after = await world.row(op_id)
    assert after["state"] == "pending"
    assert after["run_at"] <= await world.conn.fetchval("SELECT now()")
    assert after["version"] == before["version"] + 1
    assert after["attempts"] == 1
    last = (await world.audit(op_id))[-1]
    assert (last["trigger"], last["from_state"], last["to_state"]) == ("retry", "failed", "pending")
    assert (last["actor"], last["detail"]) == ("alice", "provider is back, INC-7")


@pytest.mark.parametrize(
    ("action", "triggers", "state", "allowed_from"),
    [
        ("retry", ("claim", "succeed"), "succeeded", "failed"),
        ("retry", (), "pending", "failed"),
        # (A claimed one is asked to stop instead: test_running_controls.py.)
        ("cancel", ("claim", "succeed"), "succeeded", "dead or failed or pending"),
        ("replay", ("claim", "fail"), "failed", "cancelled or dead"),
    ],
)
async def test_an_action_the_lifecycle_refuses_changes_nothing_and_says_what_is_allowed(
    admin: Admin,
    world: World,
    action: str,
    triggers: tuple[str, ...],
    state: str,
    allowed_from: str,
) -> None:
    op_id = await world.make(*triggers)
    audit_before = await world.audit(op_id)

    (result,) = await getattr(admin, action)([op_id], actor="alice")

    assert not result.ok
    assert (result.state_before, result.state) == (state, state)
    assert result.message.startswith(
        f"cannot {action} operation {op_id}: it is {state}; {action} applies only to "
        f"{allowed_from} operations (from {state}, lifecycle 'default' allows: "
    )
    assert (await world.row(op_id))["state"] == state
    assert await world.audit(op_id) == audit_before


async def test_the_database_itself_refuses_an_admin_transition_it_does_not_allow(
    world: World,
) -> None:
    # What the admin API relies on: the refusal is the trigger's, not a Python pre-check.
    op_id = await world.make("claim", "succeed")
    with pytest.raises(asyncpg.CheckViolationError, match=r'transition "retry" from succeeded'):
        await world.conn.execute(
            f"UPDATE {world.s}.operations SET state = 'pending', transition = 'retry' "
            "WHERE id = $1",
            op_id,
        )


async def test_each_id_is_acted_on_independently(admin: Admin, world: World) -> None:
    pending = await world.make()
    claimed = await world.make("claim")
    failed = await world.make("claim", "fail")

    results = await admin.cancel([pending, claimed, 999_999, failed], actor="bob")

    assert [(r.operation_id, r.ok, r.state) for r in results] == [
        (pending, True, "cancelled"),
        (claimed, False, "claimed"),
        (999_999, False, None),
        (failed, True, "cancelled"),
    ]
    assert results[2].message == "cannot cancel operation 999999: no such operation"
    assert (await world.audit(failed))[-1]["actor"] == "bob"


async def test_replay_keeps_counting_attempts_and_grants_one_more_unless_told(
    admin: Admin, world: World
) -> None:
    dead = await world.make("claim", "fail", "claim", "give_up", max_attempts=2)
    cancelled = await world.make("cancel")
    more = await world.make("claim", "give_up")

    results = await admin.replay([dead, cancelled], actor="carol", reason="card updated")
    (with_more,) = await admin.replay([more], actor="carol", extra_attempts=3)

    assert all(r.ok for r in [*results, with_more])
    dead_row, cancelled_row, more_row = [await world.row(i) for i in (dead, cancelled, more)]
    assert (dead_row["state"], dead_row["attempts"], dead_row["max_attempts"]) == ("pending", 2, 3)
    assert (cancelled_row["attempts"], cancelled_row["max_attempts"]) == (0, 1)
    assert (more_row["attempts"], more_row["max_attempts"]) == (1, 4)
    last = (await world.audit(dead))[-1]
    assert (last["trigger"], last["from_state"], last["attempt"], last["actor"]) == (
        "replay",
        "dead",
        2,
        "carol",
    )
    assert last["detail"] == "card updated"


async def test_actions_need_an_actor(admin: Admin, world: World) -> None:
    op_id = await world.make()
    with pytest.raises(ValueError, match="invalid actor"):
        await admin.cancel([op_id], actor="  ")
    with pytest.raises(ValueError, match="extra_attempts"):
        await admin.replay([op_id], actor="a", extra_attempts=0)


async def test_replayed_and_retried_operations_run_on_a_real_worker(
    settings: Settings, world: World, admin: Admin
) -> None:
    channel = settings.workflow_system.channel
    router = WorkflowRouter()
    runs: list[tuple[str, int]] = []
    broken = {"flaky.call": True, "slow.retry": True}

    async def handle(ctx: HandlerContext, payload: Any) -> None:
        runs.append((ctx.operation_type, ctx.attempt))
        if broken[ctx.operation_type]:
            raise ConnectionError("provider down")

    router.on("flaky.call", max_attempts=1)(handle)
    router.on("slow.retry", retry=RetryPolicy(base_seconds=3600, max_seconds=3600, jitter=0))(
        handle
    )
    dead = await world.publish("flaky.call", channel)
    waiting = await world.publish("slow.retry", channel)

    async with WorkflowSystem(router=router, settings=settings):
        await _wait_for(world, dead, "dead")
        await _wait_for(world, waiting, "failed")  # next attempt in an hour
        broken.update({"flaky.call": False, "slow.retry": False})
        assert all(r.ok for r in await admin.replay([dead], actor="ops"))
        assert all(r.ok for r in await admin.retry([waiting], actor="ops"))
        await _wait_for(world, dead, "succeeded")
        await _wait_for(world, waiting, "succeeded")

    assert sorted(runs) == [
        ("flaky.call", 1),
        ("flaky.call", 2),
        ("slow.retry", 1),
        ("slow.retry", 2),
    ]
    assert [a.outcome for a in (await admin.get_operation(dead)).attempts] == ["give_up", "succeed"]
    async with admin.pool.acquire() as conn:
        assert (await verify_chains(conn, world.s.strip('"'))).ok


async def _wait_for(world: World, op_id: int, state: str) -> None:
    async with asyncio.timeout(15):
        while (await world.row(op_id))["state"] != state:  # noqa: ASYNC110 (polling the DB)
            await asyncio.sleep(0.05)


# -- report, stats, workers ----------------------------------------------------------------


async def test_report_is_the_audit_log_of_the_window_row_by_row(admin: Admin, world: World) -> None:
    early = await world.make("claim", "fail")
    start = await world.conn.fetchval("SELECT clock_timestamp()")
    await world.drive(early, "claim", "succeed")
    email = await world.make("claim", operation_type="email.send")
    end = await world.conn.fetchval("SELECT clock_timestamp()")
    await world.drive(email, "succeed")

    records = [r async for r in admin.report(start, end)]

    expected = await world.conn.fetch(
        f"SELECT * FROM {world.s}.audit_log WHERE recorded_at >= $1 AND recorded_at < $2 "
        "ORDER BY recorded_at, operation_id, seq",
        start,
        end,
    )
    assert len(records) == len(expected) == 4
    for record, row in zip(records, expected, strict=True):
        columns = {k: v for k, v in dict(row).items() if k != "intent_hash"}  # not reported
        assert record == AuditRecord(
            **{
                **columns,
                "hash": row["hash"].hex(),
                "prev_hash": row["prev_hash"].hex() if row["prev_hash"] else None,
            }
        )
    only_email = [r async for r in admin.report(start, end, ["email.*"])]
    assert [(r.operation_id, r.trigger) for r in only_email] == [
        (email, "publish"),
        (email, "claim"),
    ]


async def test_stats_count_per_type_and_state_with_oldest_pending_and_failure_rate(
    admin: Admin, world: World, unaudited: Callable[..., Awaitable[None]]
) -> None:
    oldest = await world.make()
    await unaudited(
        world.s,
        f"UPDATE {world.s}.operations SET run_at = now() - interval '2 minutes' WHERE id = $1",
        oldest,
    )
    await world.make()
    await world.make("claim", "fail", "claim", "succeed")
    await world.make("claim", "give_up", operation_type="email.send")
    await world.make(operation_type="email.send", run_at=datetime.now(UTC) + timedelta(hours=1))

    stats = await admin.stats()

    by_type = {t.operation_type: t for t in stats.by_type}
    assert by_type["billing.charge"].counts == {"pending": 2, "succeeded": 1}
    assert by_type["email.send"].counts == {"dead": 1, "pending": 1}
    assert stats.total.counts == {"pending": 3, "succeeded": 1, "dead": 1}
    assert stats.total.total == 5
    assert stats.oldest_pending_id == oldest
    assert 120 <= (stats.total.oldest_pending_seconds or 0) < 180
    assert by_type["email.send"].oldest_pending_seconds is None  # its pending one is not due
    charge = by_type["billing.charge"]
    assert (charge.finished_attempts, charge.failed_attempts, charge.failure_rate) == (2, 1, 0.5)
    assert (stats.total.finished_attempts, stats.total.failed_attempts) == (3, 2)
    assert stats.since == stats.generated_at - timedelta(hours=24)


async def test_workers_are_listed_with_liveness_and_what_they_hold(
    admin: Admin, world: World
) -> None:
    await world.register_worker("worker-1", ["billing.charge", "billing.refund"])
    await world.register_worker("gone", ["billing.charge"], age=120)
    held = [await world.make("claim"), await world.make("claim")]
    await world.make("claim", "succeed")

    found = {w.id: w for w in await admin.workers()}

    assert set(found) == {"worker-1", "gone"}
    assert found["worker-1"].live
    assert found["worker-1"].held == held
    assert found["worker-1"].operation_types == ["billing.charge", "billing.refund"]
    assert not found["gone"].live
    assert found["gone"].heartbeat_age_seconds >= 120
    assert found["gone"].held == []


# -- purge ---------------------------------------------------------------------------------


async def test_purge_deletes_finished_operations_in_batches_and_records_itself(
    admin: Admin, world: World
) -> None:
    succeeded = [await world.make("claim", "succeed") for _ in range(5)]
    cancelled = await world.make("cancel")
    dead = await world.make("claim", "give_up")
    unfinished = [await world.make(), await world.make("claim"), await world.make("claim", "fail")]
    cutoff = await world.conn.fetchval("SELECT clock_timestamp()")
    late = await world.make("claim", "succeed")  # finished after the cutoff
    audit_rows = await world.conn.fetchval(f"SELECT count(*) FROM {world.s}.audit_log")

    preview = await admin.purge_preview(cutoff)
    assert (preview.counts, preview.total) == ({"succeeded": 5, "cancelled": 1}, 6)
    result = await admin.purge(cutoff, actor="retention", batch_size=2)

    assert (result.deleted, result.counts, result.batches) == (
        6,
        {"succeeded": 5, "cancelled": 1},
        3,
    )
    left = {r["id"] for r in await world.conn.fetch(f"SELECT id FROM {world.s}.operations")}
    assert left == {dead, late, *unfinished}
    assert not left & {*succeeded, cancelled}
    record = await world.conn.fetchrow(f"SELECT * FROM {world.s}.purges")
    assert dict(record) == {
        "id": result.purge_id,
        "actor": "retention",
        "finished_before": cutoff,
        "include_dead": False,
        "batch_size": 2,
        "deleted": 6,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "chained": True,
    }
    # The audit log keeps every row, and each deleted operation's chain ends with its purge;
    # the chains still verify.
    assert await world.conn.fetchval(f"SELECT count(*) FROM {world.s}.audit_log") == (
        audit_rows + 6
    )
    last_rows = await world.conn.fetch(
        f"SELECT DISTINCT ON (operation_id) operation_id, trigger, from_state, to_state, actor, "
        f"detail FROM {world.s}.audit_log WHERE operation_id = ANY($1::bigint[]) "
        "ORDER BY operation_id, seq DESC",
        [*succeeded, cancelled],
    )
    assert {(r["trigger"], r["actor"], r["detail"]) for r in last_rows} == {
        ("purge", "retention", f"purge {result.purge_id}")
    }
    assert all(r["from_state"] == r["to_state"] for r in last_rows)
    assert (await admin.verify()).ok
    purged = await admin.get_operation(succeeded[0])
    assert purged.operation is None
    assert purged.payload is None
    assert [r.trigger for r in purged.audit] == ["publish", "claim", "succeed", "purge"]

    with_dead = await admin.purge(cutoff, actor="retention", include_dead=True)
    assert (with_dead.deleted, with_dead.counts) == (1, {"dead": 1})
    assert await world.row(dead) is None


async def test_purge_with_nothing_to_delete_is_still_recorded(admin: Admin, world: World) -> None:
    await world.make()
    result = await admin.purge(timedelta(days=30), actor="cron")
    assert (result.deleted, result.batches) == (0, 0)
    assert await world.conn.fetchval(f"SELECT deleted FROM {world.s}.purges") == 0


# -- plumbing ------------------------------------------------------------------------------


async def test_verify_reports_progress(admin: Admin, world: World) -> None:
    await world.make("claim", "succeed")
    seen: list[int] = []

    result = await admin.verify(progress=seen.append)

    assert result.ok
    assert seen[-1] == result.rows == await admin.audit_row_count() == 3


async def test_results_serialise_to_json_with_iso_timestamps(admin: Admin, world: World) -> None:
    op_id = await world.make("claim", "fail")

    data = json.loads(json.dumps(as_json(await admin.get_operation(op_id))))

    assert set(data) == {"operation_id", "operation", "payload", "attempts", "audit"}
    assert datetime.fromisoformat(data["operation"]["created_at"]).tzinfo is not None
    assert data["attempts"][0]["outcome"] == "fail"


async def test_naive_datetimes_are_refused(admin: Admin) -> None:
    with pytest.raises(ValueError, match="no timezone"):
        await admin.list_operations(OperationFilter(since=datetime(2026, 1, 1)))


async def test_times_no_datetime_can_hold_are_refused_with_a_value_error(
    admin: Admin, world: World
) -> None:
    op_id = await world.make("cancel")
    # Counted back from now past the year 1, forward past 9999, and a valid datetime whose UTC
    # instant is past 9999: an OverflowError from the arithmetic or asyncpg's encoding before.
    for when in (
        timedelta(days=999_999_999),
        timedelta(days=-3_000_000),
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
    ):
        with pytest.raises(ValueError, match="is out of range"):
            await admin.resolve(when)
        with pytest.raises(ValueError, match="is out of range"):
            await admin.purge(when, actor="retention-job")
    # Nothing was purged, and no purge recorded: the time is resolved before anything is written.
    assert await world.conn.fetchval(f"SELECT count(*) FROM {world.s}.purges") == 0
    assert (await world.row(op_id))["state"] == "cancelled"


async def test_using_a_closed_admin_says_how_to_open_it(db_settings: DatabaseSettings) -> None:
    with pytest.raises(RuntimeError, match="async with Admin"):
        await Admin(db_settings).stats()
