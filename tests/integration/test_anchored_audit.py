"""The hostile DBA's edits of the audit log (issue 17), each done as the schema's owner with the
triggers off and back on: caught by ``verify`` against a checkpoint taken before them, naming
the operation and seq; and, done after the last checkpoint, caught by the semantic rules where
the edit breaks the history's meaning (``SEMANTIC`` below is the documented table: docs/audit.md,
"What a checkpoint proves").
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from anchorkit import (
    Signer,
    a_year_before,
    chain,
    named,
    offline_check,
    publish,
    rewrite_chain,
    run,
    shop,
    transition,
    triggers_off,
)

import pgoutbox_proof as proof
from pgoutbox import WorkflowRouter, WorkflowSystem, anchor
from pgoutbox.settings import DatabaseSettings, Settings
from pgoutbox.worker.checkpoints import CheckpointService, RetentionService

Found = set[tuple[int, int, str]]
Tampering = Callable[[asyncpg.Connection, str, dict[str, int]], Awaitable[tuple[Found, Found]]]
TAMPERINGS: dict[str, Tampering] = {}


def tampering(fn: Tampering) -> Tampering:
    TAMPERINGS[fn.__name__] = fn
    return fn


# Each returns (what verify against an earlier checkpoint names, what the semantic rules alone
# name when the same edit is made to history recorded after the last checkpoint).


@tampering
async def rewrite_success_as_give_up(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["succeeded"]
    rows = await chain(conn, s, op)
    rows[-1].update(trigger="give_up", to_state="dead", detail="card declined")
    async with triggers_off(conn, s, "audit_log", "operations"):
        await rewrite_chain(conn, s, op, rows, state="dead")
    # claimed -> dead by give_up is a transition the lifecycle allows: meaningful, and false.
    return {(op, 3, "checkpoint")}, set()


@tampering
async def truncate_and_run_again(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["succeeded"]
    rows = await chain(conn, s, op)
    async with triggers_off(conn, s, "audit_log", "operations"):
        await rewrite_chain(conn, s, op, rows[:1], state="pending")
        await conn.execute(
            f'UPDATE "{s}".operations SET attempts = 0, step_attempts = 0 WHERE id = $1', op
        )
    # A pending operation that was just published is a consistent history.
    return {(op, 2, "checkpoint")}, set()


@tampering
async def delete_operation_and_chain(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["succeeded"]
    async with triggers_off(conn, s, "audit_log", "operations"):
        await conn.execute(f'DELETE FROM "{s}".audit_log WHERE operation_id = $1', op)
        await conn.execute(f'DELETE FROM "{s}".operations WHERE id = $1', op)
    # Nothing is left to check: only a checkpoint knows it existed.
    return {(op, 1, "checkpoint")}, set()


@tampering
async def delete_unpurged_and_drop_last_row(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["succeeded"]
    async with triggers_off(conn, s, "audit_log", "operations"):
        await conn.execute(f'DELETE FROM "{s}".audit_log WHERE operation_id = $1 AND seq = 3', op)
        await conn.execute(f'DELETE FROM "{s}".operations WHERE id = $1', op)
    # Gone while claimed: no purge deletes that.
    return {(op, 3, "checkpoint"), (op, 2, "purge")}, {(op, 2, "purge")}


@tampering
async def fabricate_backdated_chain(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    template = await chain(conn, s, ids["succeeded"])
    fake = 10_000 + max(ids.values())
    rows = [{**r, "recorded_at": a_year_before(r["recorded_at"])} for r in template]
    async with triggers_off(conn, s, "audit_log", "operations"):
        await rewrite_chain(conn, s, fake, rows)
    # Recorded "before" the checkpoint's horizon yet not covered; and no purge explains it.
    return {(fake, 1, "checkpoint"), (fake, 3, "purge")}, {(fake, 3, "purge")}


@tampering
async def fabricate_recent_chain(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    template = await chain(conn, s, ids["succeeded"])
    fake = 10_000 + max(ids.values())
    async with triggers_off(conn, s, "audit_log", "operations"):
        await rewrite_chain(conn, s, fake, template)
    return {(fake, 3, "purge")}, {(fake, 3, "purge")}


@tampering
async def backdate_a_row_by_a_year(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["retried"]
    rows = await chain(conn, s, op)
    rows[3]["recorded_at"] = a_year_before(rows[3]["recorded_at"])
    async with triggers_off(conn, s, "audit_log", "operations"):
        await rewrite_chain(conn, s, op, rows)
    return {(op, 4, "time"), (op, 5, "checkpoint")}, {(op, 4, "time")}


@tampering
async def reorder_two_rows(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["retried"]
    rows = await chain(conn, s, op)
    rows[1], rows[2] = rows[2], rows[1]
    async with triggers_off(conn, s, "audit_log", "operations"):
        await rewrite_chain(conn, s, op, rows)
    semantic = {(op, 2, "from_state"), (op, 3, "time")}
    return semantic | {(op, 5, "checkpoint")}, semantic


async def _edit_operation(conn: asyncpg.Connection, s: str, op: int, assignment: str) -> None:
    async with triggers_off(conn, s, "operations"):
        await conn.execute(f'UPDATE "{s}".operations SET {assignment} WHERE id = $1', op)


@tampering
async def change_payload(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["succeeded"]
    await _edit_operation(conn, s, op, """payload = '{"amount": 999}'""")
    return {(op, 1, "intent")}, {(op, 1, "intent")}  # seq 1 hashed the intent


@tampering
async def change_idempotency_key(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["succeeded"]
    await _edit_operation(conn, s, op, "idempotency_key = 'another'")
    return {(op, 1, "intent")}, {(op, 1, "intent")}


@tampering
async def change_type(conn: asyncpg.Connection, s: str, ids: dict[str, int]) -> tuple[Found, Found]:
    op = ids["succeeded"]
    await _edit_operation(conn, s, op, "operation_type = 'refund'")
    return {(op, 1, "intent")}, {(op, 1, "intent")}  # every audit row carries the type


@tampering
async def change_creator(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["succeeded"]
    await _edit_operation(conn, s, op, "created_by = 'alice'")
    return {(op, 1, "intent")}, {(op, 1, "intent")}  # seq 1's actor is the creator


@tampering
async def add_use_and_remove_an_edge(
    conn: asyncpg.Connection, s: str, ids: dict[str, int]
) -> tuple[Found, Found]:
    op = ids["pending"]
    edge = "('default', 'pending', 'succeed', 'succeeded')"
    await conn.execute(f'INSERT INTO "{s}".lifecycle_transitions VALUES {edge}')
    await conn.execute(
        f"UPDATE \"{s}\".operations SET state = 'succeeded', transition = 'succeed', "
        "transition_actor = 'worker-1' WHERE id = $1",
        op,
    )
    await conn.execute(
        f'DELETE FROM "{s}".lifecycle_transitions WHERE (lifecycle, from_state, trigger, '
        f"to_state) = {edge}"
    )
    # No trigger was disabled: the edge is checked against the default lifecycle in the code.
    return {(op, 2, "edge")}, {(op, 2, "edge")}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
async def test_tampering_before_a_checkpoint_is_named(
    name: str, db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    ids = await shop(conn, s)
    signer = Signer(tmp_path)
    checkpoint = await signer.checkpoint(conn, s)
    assert (await signer.verify(conn, s, checkpoint)).ok

    expected, _ = await TAMPERINGS[name](conn, s, ids)
    result = await signer.verify(conn, s, checkpoint)

    assert not result.ok
    assert expected <= named(result), result.failures()
    assert all(
        str(p).startswith(f"operation {p.operation_id} seq {p.seq}: [") for p in result.problems
    )


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
async def test_tampering_after_the_last_checkpoint_meets_the_semantic_rules(
    name: str, db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    signer = Signer(tmp_path)
    await shop(conn, s)
    checkpoint = await signer.checkpoint(conn, s)
    ids = await shop(conn, s)  # history the checkpoint does not cover

    _, expected = await TAMPERINGS[name](conn, s, ids)
    result = await signer.verify(conn, s, checkpoint)

    if expected:
        assert expected <= named(result), result.failures()
    else:  # documented as not caught without a checkpoint covering it
        assert result.ok, result.failures()


async def test_heads_file_and_checkpoint_must_belong_together(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    signer = Signer(tmp_path)
    await shop(conn, s)
    first = await signer.checkpoint(conn, s)
    await shop(conn, s)
    second = await signer.checkpoint(conn, s)

    document = anchor.read_checkpoint(first, signer.public)
    heads = anchor.read_heads(anchor.heads_path_for(second))
    result = await anchor.verify_against_checkpoint(conn, s, document, heads)

    assert any("does not hash to the checkpoint's signed root" in p.reason for p in result.problems)


async def test_a_checkpoint_altered_after_signing_or_signed_by_another_key_is_refused(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    signer = Signer(tmp_path)
    await shop(conn, s)
    path = await signer.checkpoint(conn, s)
    document = anchor.read_checkpoint(path, signer.public)

    other = Signer(tmp_path)
    with pytest.raises(anchor.CheckpointError, match="signed by key"):
        anchor.read_checkpoint(path, other.public)
    # The size edited in the JSON (the first matching digits may be the key id's).
    path.write_text(json.dumps({**json.loads(path.read_text()), "size": document["size"] - 1}))
    with pytest.raises(anchor.CheckpointError, match="altered after signing"):
        anchor.read_checkpoint(path, signer.public)


async def test_proofs_check_offline_and_fail_on_a_changed_row(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    signer = Signer(tmp_path)
    ids = await shop(conn, s)
    path = await signer.checkpoint(conn, s)
    document = anchor.read_checkpoint(path, signer.public)

    for op in ids.values():
        built = await anchor.prove(conn, s, op, document, anchor.heads_path_for(path))
        assert proof.check_proof(built, signer.public).startswith(f"OK: operation {op}")

    built = await anchor.prove(conn, s, ids["succeeded"], document, anchor.heads_path_for(path))
    built["rows"][-1]["detail"] = "card declined"
    with pytest.raises(proof.ProofError, match="seq 3: hash does not match"):
        proof.check_proof(built, signer.public)
    built = await anchor.prove(conn, s, ids["succeeded"], document, anchor.heads_path_for(path))
    assert built["intent"] is not None
    built["intent"]["payload"] = '{"amount": 999}'
    with pytest.raises(proof.ProofError, match="do not lead to the checkpoint's signed root"):
        proof.check_proof(built, signer.public)


async def test_rows_added_since_the_checkpoint_verify_and_in_flight_ones_are_covered_next_time(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    signer = Signer(tmp_path)
    ids = await shop(conn, s)
    other = await asyncpg.connect(database_dsn)
    try:
        # A transition in flight (not committed) while the checkpoint is taken: not covered,
        # and it holds the horizon back to its start, so its row is not taken for a backdated one.
        tx = other.transaction()
        await tx.start()
        await transition(other, s, ids["pending"], "claim", "claimed")
        first = await signer.checkpoint(conn, s)
        await tx.commit()
    finally:
        await other.close()
    document = anchor.read_checkpoint(first, signer.public)
    assert document["horizon"] is not None
    assert document["horizon"] <= document["taken_at"]
    assert (await signer.verify(conn, s, first)).ok

    second = await signer.checkpoint(conn, s)
    rows = document["rows"]
    assert anchor.read_checkpoint(second, signer.public)["rows"] == rows + 1
    assert (await signer.verify(conn, s, second)).ok


async def test_as_of_matches_a_live_snapshot(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    await shop(conn, s)
    more = await publish(conn, s, 3, operation_type="refund")
    await run(conn, s, more[0], "running")
    snapshot_at: datetime = await conn.fetchval("SELECT clock_timestamp()")
    live = {
        r["id"]: (r["operation_type"], r["state"])
        for r in await conn.fetch(f'SELECT id, operation_type, state FROM "{s}".operations')
    }
    # History moves on after the instant, and an operation is purged: the log still knows.
    await run(conn, s, more[1], "succeeded")
    await transition(conn, s, more[0], "succeed", "succeeded")
    await conn.execute(f'DELETE FROM "{s}".operations WHERE id = $1', more[0])

    history = await anchor.as_of(conn, s, snapshot_at)

    assert {o.operation_id: (o.operation_type, o.state) for o in history.operations} == live
    expected_counts: dict[str, int] = {}
    for _, state in live.values():
        expected_counts[state] = expected_counts.get(state, 0) + 1
    assert history.counts == dict(sorted(expected_counts.items()))
    refunds = await anchor.as_of(conn, s, snapshot_at, types=["refund"])
    assert {o.operation_id for o in refunds.operations} == set(more)
    before = await anchor.as_of(conn, s, datetime(2000, 1, 1, tzinfo=UTC))
    assert before.operations == []


async def test_cli_proof_checks_on_a_machine_without_the_database_stack(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    signer = Signer(tmp_path)
    ids = await shop(conn, s)
    path = await signer.checkpoint(conn, s)
    document = anchor.read_checkpoint(path, signer.public)
    built = await anchor.prove(conn, s, ids["retried"], document, anchor.heads_path_for(path))
    (tmp_path / "proof.json").write_text(json.dumps(built))
    public = tmp_path / "audit.pub"
    public.write_bytes(proof.public_key_pem(signer.public))

    done = offline_check(tmp_path, tmp_path / "proof.json", public)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: operation {ids['retried']}, audit rows 1 to 5, is covered")


def _router() -> WorkflowRouter:
    router = WorkflowRouter()

    @router.on("charge")
    async def charge(ctx: object, payload: object) -> None:
        return None

    return router


async def test_a_worker_takes_checkpoints_on_its_interval(
    settings: Settings,
    conn: asyncpg.Connection,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = settings.database.schema_name
    signer = Signer(tmp_path)
    private, _ = anchor.generate_key()
    monkeypatch.setenv("PGOUTBOX_AUDIT_KEY", private.decode())
    every_hour = settings.model_copy(
        update={
            "workflow_system": settings.workflow_system.model_copy(
                update={
                    "audit_checkpoint_minutes": 60,
                    "audit_checkpoint_dir": str(tmp_path / "cp"),
                }
            )
        }
    )
    await shop(conn, s)
    async with WorkflowSystem(router=_router(), settings=every_hour) as system:
        service = system.services["audit-checkpoint"]
        assert isinstance(service, CheckpointService)
        taken = await service.run_once() or next((tmp_path / "cp").glob("checkpoint-*.json"))
        assert await service.run_once() is None  # one is younger than the interval

    signer.public = anchor.load_private_key(private).public_key()
    assert (await signer.verify(conn, s, taken)).ok
    document = anchor.read_checkpoint(taken, signer.public)
    recorded = await conn.fetchval(f'SELECT root FROM "{s}".audit_checkpoints')
    assert recorded == bytes.fromhex(document["root"])  # the convenience copy


async def test_a_worker_asked_for_checkpoints_without_a_key_does_not_start(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGOUTBOX_AUDIT_KEY", raising=False)
    ws = settings.workflow_system.model_copy(
        update={"audit_checkpoint_minutes": 5, "audit_checkpoint_dir": str(tmp_path)}
    )
    system = WorkflowSystem(
        router=_router(), settings=settings.model_copy(update={"workflow_system": ws})
    )
    with pytest.raises(anchor.CheckpointError, match="PGOUTBOX_AUDIT_KEY"):
        await system.start()


async def test_a_worker_purges_on_its_retention_and_the_purge_explains_the_gone(
    settings: Settings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = settings.database.schema_name
    ids = await shop(conn, s)
    ws = settings.workflow_system.model_copy(
        update={"retention_days": 1e-9, "retention_include_dead": True}
    )
    async with WorkflowSystem(
        router=_router(), settings=settings.model_copy(update={"workflow_system": ws})
    ) as system:
        service = system.services["retention"]
        assert isinstance(service, RetentionService)
        # It ran once as the worker started; a round now finds what is left, if anything.
        await service.run_once()

    finished = {ids["succeeded"], ids["retried"], ids["dead"]}
    left = {r["id"] for r in await conn.fetch(f'SELECT id FROM "{s}".operations')}
    assert left == set(ids.values()) - finished
    purges = await conn.fetch(f'SELECT actor, deleted, include_dead FROM "{s}".purges')
    assert {(p["actor"], p["include_dead"]) for p in purges} == {
        (f"retention:{system.worker_id}", True)
    }
    assert sum(p["deleted"] for p in purges) == len(finished)
    result = await Signer(tmp_path).verify(conn, s, None)  # the rules: every gone one explained
    assert result.ok, result.failures()


async def test_a_deletion_is_the_last_row_of_its_chain_and_a_forged_purge_explains_nothing(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await shop(conn, s)
    # A DELETE outside any purge (the owner here; an operator's role would do the same): its
    # chain records it, with the role.
    await conn.execute(f'DELETE FROM "{s}".operations WHERE id = $1', ids["succeeded"])
    last = (await chain(conn, s, ids["succeeded"]))[-1]
    assert (last["seq"], last["trigger"], last["from_state"], last["to_state"]) == (
        4,
        "purge",
        "succeeded",
        "succeeded",
    )
    assert last["detail"] == "deleted outside a purge"
    assert last["actor"] == last["db_role"] == await conn.fetchval("SELECT current_user")
    signer = Signer(Path("."))
    assert (await signer.verify(conn, s, None)).ok

    # Deleted behind the triggers' back, with a purge forged to explain it: the purge is not
    # in the chain, and a purge made since revision 0014 explains nothing else.
    async with triggers_off(conn, s, "operations", "audit_log"):
        await conn.execute(f'DELETE FROM "{s}".operations WHERE id = $1', ids["dead"])
    await conn.execute(
        f'INSERT INTO "{s}".purges (actor, finished_before, include_dead, batch_size, deleted) '
        "VALUES ('forger', now() + interval '1 day', true, 10, 1)"
    )
    result = await signer.verify(conn, s, None)
    assert named(result) == {(ids["dead"], 3, "purge")}, result.failures()
    # An older purge (not chained: before revision 0014) still explains it.
    await conn.execute(f'UPDATE "{s}".purges SET chained = false')
    assert (await signer.verify(conn, s, None)).ok
