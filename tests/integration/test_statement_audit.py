"""Audit rows written once per statement (revision ``0007_statement_audit``), against the real
database: a row trigger stages each transition's audit entry on the operation row, a statement
trigger checks every transition of the statement against the lifecycle in one query and appends
all their audit rows in one INSERT.

What that design must guarantee, and what these tests check by outcome (rows, states, audit
entries, error messages), never by looking at how the triggers are written:

- one UPDATE moving many operations writes exactly one audit row per operation, each with the
  operation's own seq, from/to state, trigger, attempt, actor and detail, and every chain
  verifies with :func:`pgoutbox.audit.verify_chains` (the Python re-implementation);
- a single refused row aborts the whole statement: no state, no bookkeeping, no audit row;
- rows a statement touches without a transition (a heartbeat) get no audit row, and their staged
  entry is cleared, so a staged entry always belongs to the statement that wrote it;
- the staged entry cannot be written by anyone but the audit trigger;
- ``reject`` is audited without a state change and refused with one;
- under concurrency, a statement extends each chain from the head committed before it.

The property test at the end follows test_lifecycle_properties.py: each example migrates a
schema of its own (so examples are independent, whatever Hypothesis replays or shrinks) and
drops it afterwards; ``database=None`` keeps Hypothesis from saving examples into the tree.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pgoutbox import migrations
from pgoutbox.audit import verify_chains
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE
from pgoutbox.roles import grant_roles
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries
from pgoutbox.worker.dispatcher import NOTHING_RECORDED

OPERATION_TYPE = "stmt.op"
CHANNEL = "stmt"
WORKER = "worker-7"

INTENT_REFUSED = re.compile(
    r"^pgoutbox: operation (\d+) is recorded intent: its type, channel, lifecycle, payload, "
    r"idempotency key, ordering key, creation, trace context, lease key and audit head cannot be "
    r"changed$"
)
REJECT_REFUSED = 'pgoutbox: "reject" records a refused result and cannot change state'

# (seq, from_state, to_state, trigger, attempt, actor, detail): one audit row as compared here.
AuditRow = tuple[int, str | None, str, str, int, str, str | None]
# (audit_from_state, audit_trigger, audit_actor, audit_detail, audit_prev_hash)
Staged = tuple[str | None, str | None, str | None, str | None, bytes | None]
NOTHING_STAGED: Staged = (None, None, None, None, None)


def _not_allowed(op_id: int, trigger: str, from_state: str, to_state: str) -> str:
    """The statement trigger's refusal of a transition the default lifecycle does not allow."""
    return (
        f'pgoutbox: operation {op_id} ({OPERATION_TYPE}): transition "{trigger}" from '
        f'{from_state} to {to_state} is not allowed by lifecycle "default"'
    )


def _unnamed(op_id: int, from_state: str, to_state: str) -> str:
    """The row trigger's refusal of a state change that names no transition."""
    return (
        f"pgoutbox: operation {op_id} cannot change state from {from_state} to {to_state} "
        "without a named transition"
    )


def _message(error: BaseException) -> str:
    """The primary message of a PostgreSQL error (asyncpg's ``str()`` appends the HINT)."""
    return str(getattr(error, "message", error))


# -- database helpers -----------------------------------------------------------------------


async def _publish(conn: asyncpg.Connection, schema: str, n: int) -> list[int]:
    """``n`` new operations, created by one INSERT statement; their ids in order."""
    rows = await conn.fetch(
        f'INSERT INTO "{schema}".operations (operation_type, channel, payload) '
        "SELECT $1, $2, jsonb_build_object('n', n) FROM generate_series(1, $3::int) AS n "
        "RETURNING id",
        OPERATION_TYPE,
        CHANNEL,
        n,
    )
    return sorted(int(r["id"]) for r in rows)


@dataclass(frozen=True)
class Move:
    """What one statement does to one row: a transition (``trigger`` named) or, with
    ``trigger=None`` and ``to_state`` its current state, a heartbeat (a lease extension)."""

    op_id: int
    trigger: str | None
    to_state: str
    actor: str | None = None
    detail: str | None = None


async def _statement(conn: asyncpg.Connection, schema: str, moves: Sequence[Move]) -> str:
    """One UPDATE statement applying every move (one row each). A claim counts an attempt, as
    the worker's claim does; a row without a trigger only gets its lease extended."""
    return str(
        await conn.execute(
            f'UPDATE "{schema}".operations o '
            "SET state = v.to_state, transition = v.trigger, transition_actor = v.actor, "
            "    transition_detail = v.detail, "
            "    attempts = o.attempts + CASE WHEN v.trigger = 'claim' THEN 1 ELSE 0 END, "
            "    lease_expires_at = CASE WHEN v.trigger IS NULL "
            "        THEN clock_timestamp() + interval '30 seconds' ELSE o.lease_expires_at END "
            "FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[]) "
            "     AS v(id, trigger, to_state, actor, detail) "
            "WHERE o.id = v.id",
            [m.op_id for m in moves],
            [m.trigger for m in moves],
            [m.to_state for m in moves],
            [m.actor for m in moves],
            [m.detail for m in moves],
        )
    )


async def _audit(conn: asyncpg.Connection, schema: str) -> dict[int, list[AuditRow]]:
    """Every operation's audit rows, in seq order."""
    rows = await conn.fetch(
        "SELECT operation_id, seq, from_state, to_state, trigger, attempt, actor, detail "
        f'FROM "{schema}".audit_log ORDER BY operation_id, seq'
    )
    audit: dict[int, list[AuditRow]] = {}
    for r in rows:
        audit.setdefault(r["operation_id"], []).append(tuple(r)[1:])
    return audit


async def _chain(conn: asyncpg.Connection, schema: str, op_id: int) -> list[asyncpg.Record]:
    """One operation's audit rows with their hashes and timestamps."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f'SELECT seq, prev_hash, hash, recorded_at FROM "{schema}".audit_log '
        "WHERE operation_id = $1 ORDER BY seq",
        op_id,
    )
    return rows


async def _operations(conn: asyncpg.Connection, schema: str) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch(f'SELECT * FROM "{schema}".operations ORDER BY id')
    return {r["id"]: r for r in rows}


def _staged(row: asyncpg.Record) -> Staged:
    return (
        row["audit_from_state"],
        row["audit_trigger"],
        row["audit_actor"],
        row["audit_detail"],
        row["audit_prev_hash"],
    )


async def _snapshot(
    conn: asyncpg.Connection, schema: str
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every column of every operation and every audit row: "nothing changed" is equality."""
    operations = await conn.fetch(f'SELECT * FROM "{schema}".operations ORDER BY id')
    log = await conn.fetch(f'SELECT * FROM "{schema}".audit_log ORDER BY operation_id, seq')
    return [tuple(r) for r in operations], [tuple(r) for r in log]


async def _assert_chains_verify(
    conn: asyncpg.Connection, schema: str, operations: int, rows: int
) -> None:
    verification = await verify_chains(conn, schema)
    assert verification.ok, str(verification.problem)
    assert (verification.operations, verification.rows) == (operations, rows)


async def _claim_all(conn: asyncpg.Connection, schema: str) -> list[asyncpg.Record]:
    """The worker's own claim query over every due operation of the test channel."""
    rows: list[asyncpg.Record] = await queries(schema)["operations_record_and_claim"].fetch(
        conn,
        **NOTHING_RECORDED,
        channel=CHANNEL,
        operation_types=[OPERATION_TYPE],
        lifecycles=["default"],
        batch_size=1000,
        worker_id=WORKER,
        lease_seconds=30,
    )
    return rows


# -- 1. one statement, many transitions ------------------------------------------------------


async def test_one_statement_moves_many_operations_with_one_audit_row_each(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 50)
    failed = ids[::2]  # half of them at seq 3 in state failed, the rest at seq 1 pending
    await _statement(conn, s, [Move(i, "claim", "claimed", "worker-1") for i in failed])
    await _statement(conn, s, [Move(i, "fail", "failed", "worker-1", "boom") for i in failed])
    before = await _audit(conn, s)
    user = await conn.fetchval("SELECT current_user")

    status = await conn.execute(
        f"UPDATE \"{s}\".operations SET state = 'cancelled', transition = 'cancel', "
        "transition_actor = CASE WHEN id % 3 = 0 THEN 'admin:alice' END, "
        "transition_detail = 'bulk cancel of ' || id "
        "WHERE id = ANY($1::bigint[])",
        ids,
    )

    assert status == "UPDATE 50"
    after = await _audit(conn, s)
    rows = await _operations(conn, s)
    for op_id in ids:
        was_failed = op_id in failed
        seq, attempt = (4, 1) if was_failed else (2, 0)
        from_state = "failed" if was_failed else "pending"
        actor = "admin:alice" if op_id % 3 == 0 else user
        detail = f"bulk cancel of {op_id}"
        # Exactly one new audit row per operation, its own.
        assert after[op_id] == [
            *before[op_id],
            (seq, from_state, "cancelled", "cancel", attempt, actor, detail),
        ]
        chain = await _chain(conn, s, op_id)
        row = rows[op_id]
        assert (row["state"], row["audit_seq"], row["audit_hash"]) == (
            "cancelled",
            seq,
            chain[-1]["hash"],
        )
        assert chain[-1]["prev_hash"] == chain[-2]["hash"]
        assert chain[-1]["recorded_at"] == row["updated_at"]
        # The write-only transition columns are consumed, the entry staged on the row.
        assert (row["transition"], row["transition_actor"], row["transition_detail"]) == (
            None,
            None,
            None,
        )
        assert _staged(row) == (from_state, "cancel", actor, detail, chain[-2]["hash"])
    assert sum(map(len, after.values())) == sum(map(len, before.values())) + 50
    await _assert_chains_verify(conn, s, 50, 25 * 4 + 25 * 2)


async def test_the_workers_claim_batch_audits_every_operation_it_claims(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 40)

    claimed = await _claim_all(conn, s)

    assert sorted(r["id"] for r in claimed) == ids
    audit = await _audit(conn, s)
    creator = await conn.fetchval("SELECT current_user")
    for op_id in ids:
        assert audit[op_id] == [
            (1, None, "pending", "publish", 0, creator, None),
            (2, "pending", "claimed", "claim", 1, WORKER, None),
        ]
    await _assert_chains_verify(conn, s, 40, 80)


async def test_one_insert_statement_writes_one_creation_row_per_created_operation(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    insert = (
        f'INSERT INTO "{s}".operations (operation_type, channel, payload, idempotency_key, '
        "created_by) "
        "SELECT $1, $2, '{}', k, coalesce(CASE WHEN right(k, 1) = '0' THEN 'app:' || k END, "
        "current_user) FROM unnest($3::text[]) AS k "
        "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id"
    )
    first = await conn.fetch(insert, OPERATION_TYPE, CHANNEL, [f"k{i}" for i in range(30)])
    # 10 keys already taken (skipped by ON CONFLICT, no audit row), 5 new ones.
    again = [f"k{i}" for i in range(20, 35)]
    second = await conn.fetch(insert, OPERATION_TYPE, CHANNEL, again)

    assert (len(first), len(second)) == (30, 5)
    created = [r["id"] for r in [*first, *second]]
    audit = await _audit(conn, s)
    assert sorted(audit) == sorted(created)
    rows = await _operations(conn, s)
    for op_id in created:
        row = rows[op_id]
        assert audit[op_id] == [(1, None, "pending", "publish", 0, row["created_by"], None)]
        [head] = await _chain(conn, s, op_id)
        assert (head["prev_hash"], head["hash"], head["recorded_at"]) == (
            None,
            row["audit_hash"],
            row["created_at"],
        )
        assert _staged(row) == NOTHING_STAGED
    # A created_by the INSERT names is replaced by the inserting role (revision 0010).
    user = await conn.fetchval("SELECT current_user")
    assert {rows[i]["created_by"] for i in created} == {user}
    await _assert_chains_verify(conn, s, 35, 35)


# -- 2. all or nothing -----------------------------------------------------------------------


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("refusal", ["lifecycle", "unnamed", "reject"])
async def test_one_refused_row_aborts_the_whole_statement(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, refusal: str, position: str
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 30)
    bad = {"first": ids[0], "middle": ids[15], "last": ids[-1]}[position]
    # Some history, so the statement meets rows at different seqs and with staged entries.
    await _statement(conn, s, [Move(i, "claim", "claimed", "worker-1") for i in ids[::4]])
    await _statement(conn, s, [Move(i, "fail", "failed", "worker-1") for i in ids[::4]])
    if refusal == "lifecycle":  # cancel is allowed from pending and failed, not from claimed
        await _statement(conn, s, [Move(bad, "claim", "claimed", "worker-1")])
    before_state = (await _operations(conn, s))[bad]["state"]
    odd_one = {
        "lifecycle": Move(bad, "cancel", "cancelled", "admin:alice"),
        "unnamed": Move(bad, None, "succeeded"),
        "reject": Move(bad, "reject", "cancelled", "admin:alice"),
    }[refusal]
    moves = [odd_one if i == bad else Move(i, "cancel", "cancelled", "admin:alice") for i in ids]
    before = await _snapshot(conn, s)
    before_rows = await _operations(conn, s)
    before_count = await conn.fetchval(f'SELECT count(*) FROM "{s}".audit_log')

    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await _statement(conn, s, moves)

    assert refused.value.sqlstate == "23514"
    assert (
        _message(refused.value)
        == {
            "lifecycle": _not_allowed(bad, "cancel", "claimed", "cancelled"),
            "unnamed": _unnamed(bad, before_state, "succeeded"),
            "reject": REJECT_REFUSED,
        }[refusal]
    )
    # Nothing changed, on any row: states, seqs, heads, staged entries, the log.
    after_rows = await _operations(conn, s)
    for op_id in ids:
        assert (after_rows[op_id]["state"], after_rows[op_id]["audit_seq"]) == (
            before_rows[op_id]["state"],
            before_rows[op_id]["audit_seq"],
        )
    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".audit_log') == before_count
    assert await _snapshot(conn, s) == before
    await _assert_chains_verify(conn, s, 30, before_count)


async def test_a_refused_statement_inside_a_transaction_leaves_earlier_statements_intact(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 6)
    async with conn.transaction():
        await _statement(conn, s, [Move(i, "claim", "claimed", "worker-1") for i in ids[:3]])
        after_claim = await _snapshot(conn, s)
        with pytest.raises(asyncpg.CheckViolationError):
            async with conn.transaction():  # a savepoint around the refused statement
                await _statement(conn, s, [Move(i, "cancel", "cancelled") for i in ids])
        assert await _snapshot(conn, s) == after_claim
        await _statement(conn, s, [Move(i, "cancel", "cancelled") for i in ids[3:]])

    audit = await _audit(conn, s)
    assert [len(audit[i]) for i in ids] == [2, 2, 2, 2, 2, 2]
    assert [audit[i][-1][3] for i in ids] == ["claim"] * 3 + ["cancel"] * 3
    await _assert_chains_verify(conn, s, 6, 12)


# -- 3. transitions and non-transitions in one statement ----------------------------------


MIXED_STATEMENTS = {
    # One UPDATE whose CASEs make a transition on some rows and only extend the lease on others.
    "case": (
        'UPDATE "{s}".operations SET '
        "state = CASE WHEN id = ANY($1::bigint[]) THEN 'succeeded' ELSE state END, "
        "transition = CASE WHEN id = ANY($1::bigint[]) THEN 'succeed' END, "
        "transition_actor = CASE WHEN id = ANY($1::bigint[]) THEN 'worker-1' END, "
        "lease_expires_at = clock_timestamp() + interval '1 hour' "
        "WHERE id = ANY($2::bigint[])"
    ),
    # Two UPDATEs of operations in one statement: the transition tables are the statement's.
    "cte": (
        "WITH moved AS (UPDATE \"{s}\".operations SET state = 'succeeded', "
        "transition = 'succeed', transition_actor = 'worker-1' "
        "WHERE id = ANY($1::bigint[]) RETURNING id) "
        "UPDATE \"{s}\".operations SET lease_expires_at = clock_timestamp() + interval '1 hour' "
        "WHERE id = ANY($2::bigint[]) AND id <> ALL($1::bigint[])"
    ),
}


@pytest.mark.parametrize("shape", sorted(MIXED_STATEMENTS))
async def test_only_the_rows_that_transition_are_audited_and_the_others_are_settled(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, shape: str
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 10)
    # Every row claimed by one statement: each carries that claim's staged entry.
    await _statement(conn, s, [Move(i, "claim", "claimed", "worker-1") for i in ids])
    movers, others = ids[1::3], [i for i in ids if i not in ids[1::3]]
    before = await _operations(conn, s)
    before_audit = await _audit(conn, s)
    assert all(_staged(before[i])[1] == "claim" for i in ids)

    await conn.execute(MIXED_STATEMENTS[shape].replace("{s}", s), movers, ids)

    after = await _operations(conn, s)
    audit = await _audit(conn, s)
    for op_id in movers:
        chain = await _chain(conn, s, op_id)
        assert audit[op_id] == [
            *before_audit[op_id],
            (3, "claimed", "succeeded", "succeed", 1, "worker-1", None),
        ]
        assert (after[op_id]["state"], after[op_id]["audit_seq"]) == ("succeeded", 3)
        assert _staged(after[op_id]) == ("claimed", "succeed", "worker-1", None, chain[1]["hash"])
    for op_id in others:
        # Touched, but no transition: no audit row, nothing staged, the head unchanged.
        assert audit[op_id] == before_audit[op_id]
        assert _staged(after[op_id]) == NOTHING_STAGED
        assert before[op_id]["lease_expires_at"] is None
        assert after[op_id]["lease_expires_at"] is not None
        for column in ("state", "audit_seq", "audit_hash", "updated_at", "version", "attempts"):
            assert after[op_id][column] == before[op_id][column], column
    await _assert_chains_verify(conn, s, 10, 20 + len(movers))


# -- 4. heartbeats ---------------------------------------------------------------------------


async def test_a_heartbeat_after_a_claim_writes_no_audit_row_and_clears_the_staged_entry(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    q = queries(s)
    ids = await _publish(conn, s, 3)
    claimed = await _claim_all(conn, s)
    claimed_rows = await _operations(conn, s)
    for op_id in ids:
        [_, claim] = await _chain(conn, s, op_id)
        assert _staged(claimed_rows[op_id])[:4] == ("pending", "claim", WORKER, None)
        assert claimed_rows[op_id]["audit_hash"] == claim["hash"]

    for _ in range(2):  # the second heartbeat finds nothing staged: the same outcome
        extended = await q["operations_extend_leases"].fetch(
            conn,
            ids=[r["id"] for r in claimed],
            versions=[r["version"] for r in claimed],
            worker_id=WORKER,
            lease_seconds=300,
        )
        assert sorted(r["id"] for r in extended) == ids
        rows = await _operations(conn, s)
        for op_id in ids:
            row, was = rows[op_id], claimed_rows[op_id]
            assert _staged(row) == NOTHING_STAGED
            assert row["lease_expires_at"] > was["lease_expires_at"]
            assert (row["state"], row["audit_seq"], row["audit_hash"], row["updated_at"]) == (
                "claimed",
                2,
                was["audit_hash"],
                was["updated_at"],
            )
        assert [len(rows) for rows in (await _audit(conn, s)).values()] == [2, 2, 2]

    # The next real transitions (one statement) continue the chain at seq 3.
    await _statement(
        conn,
        s,
        [
            Move(ids[0], "succeed", "succeeded", WORKER),
            Move(ids[1], "fail", "failed", WORKER, "timed out"),
        ],
    )

    audit = await _audit(conn, s)
    assert audit[ids[0]][2:] == [(3, "claimed", "succeeded", "succeed", 1, WORKER, None)]
    assert audit[ids[1]][2:] == [(3, "claimed", "failed", "fail", 1, WORKER, "timed out")]
    assert len(audit[ids[2]]) == 2
    for op_id in ids[:2]:
        chain = await _chain(conn, s, op_id)
        assert chain[2]["prev_hash"] == claimed_rows[op_id]["audit_hash"]
    await _assert_chains_verify(conn, s, 3, 8)


async def test_an_actor_or_detail_set_without_a_transition_is_not_kept_for_the_next_one(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    [op_id] = await _publish(conn, s, 1)
    await conn.execute(
        f"UPDATE \"{s}\".operations SET transition_actor = 'someone-else', "
        "transition_detail = 'stale' WHERE id = $1",
        op_id,
    )
    row = (await _operations(conn, s))[op_id]
    assert (row["transition_actor"], row["transition_detail"], row["audit_seq"]) == (None, None, 1)
    await conn.execute(
        f"UPDATE \"{s}\".operations SET state = 'cancelled', transition = 'cancel' WHERE id = $1",
        op_id,
    )
    me = await conn.fetchval("SELECT current_user")
    assert (await _audit(conn, s))[op_id][1:] == [
        (2, "pending", "cancelled", "cancel", 0, me, None)
    ]
    await _assert_chains_verify(conn, s, 1, 2)


# -- 5. the staged entry is the audit trigger's alone ----------------------------------------


@pytest.mark.parametrize("with_transition", [False, True], ids=["alone", "with-transition"])
@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("audit_trigger", "'succeed'"),
        ("audit_trigger", "NULL"),
        ("audit_prev_hash", "'\\x00'::bytea"),
        ("audit_prev_hash", "NULL"),
        ("audit_from_state", "'failed'"),
        ("audit_actor", "'forger'"),
        ("audit_detail", "'forged'"),
    ],
)
async def test_the_staged_entry_cannot_be_written_directly(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    column: str,
    value: str,
    with_transition: bool,
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 5)
    await _claim_all(conn, s)  # every row carries a staged claim entry
    before = await _snapshot(conn, s)
    transition = ", state = 'succeeded', transition = 'succeed'" if with_transition else ""

    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await conn.execute(
            f'UPDATE "{s}".operations SET {column} = {value}{transition} '
            "WHERE id = ANY($1::bigint[])",
            ids,
        )

    named = INTENT_REFUSED.match(_message(refused.value))
    assert named is not None, _message(refused.value)
    assert int(named.group(1)) in ids
    assert await _snapshot(conn, s) == before
    await _assert_chains_verify(conn, s, 5, 10)


async def test_an_insert_that_names_a_staged_entry_is_refused_and_writes_nothing(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    # The immutability trigger guards UPDATEs; an INSERT planting a staged entry is refused by
    # the insert trigger, naming it (revision 0010), so nothing planted can reach the log.
    s = db_settings.schema_name
    before = await _snapshot(conn, s)
    with pytest.raises(asyncpg.CheckViolationError, match="staged audit entry"):
        await conn.execute(
            f'INSERT INTO "{s}".operations (operation_type, channel, payload, audit_from_state, '
            "audit_trigger, audit_actor, audit_detail, audit_prev_hash) "
            "SELECT $1, $2, '{}', 'claimed', 'succeed', 'forger', 'forged', '\\x00'::bytea "
            "FROM generate_series(1, 4)",
            OPERATION_TYPE,
            CHANNEL,
        )
    assert await _snapshot(conn, s) == before


# -- 6. reject: audit-only -------------------------------------------------------------------


async def test_reject_without_a_state_change_is_audited_for_every_row_of_the_statement(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 4)
    await _statement(conn, s, [Move(i, "claim", "claimed", "worker-1") for i in ids[1:3]])
    await _statement(conn, s, [Move(ids[2], "fail", "failed", "worker-1")])
    before = await _operations(conn, s)
    before_audit = await _audit(conn, s)

    await conn.execute(
        f"UPDATE \"{s}\".operations SET transition = 'reject', transition_actor = 'worker-old', "
        "transition_detail = 'late result for attempt ' || attempts "
        "WHERE id = ANY($1::bigint[])",
        ids[:3],
    )

    after = await _operations(conn, s)
    audit = await _audit(conn, s)
    for op_id in ids[:3]:
        state, attempt = before[op_id]["state"], before[op_id]["attempts"]
        seq = before[op_id]["audit_seq"] + 1
        detail = f"late result for attempt {attempt}"
        assert audit[op_id] == [
            *before_audit[op_id],
            (seq, state, state, "reject", attempt, "worker-old", detail),
        ]
        assert (after[op_id]["state"], after[op_id]["audit_seq"]) == (state, seq)
        assert _staged(after[op_id])[:4] == (state, "reject", "worker-old", detail)
    assert audit[ids[3]] == before_audit[ids[3]]
    assert after[ids[3]]["audit_seq"] == 1
    await _assert_chains_verify(conn, s, 4, 2 + 3 + 4 + 1)


async def test_reject_with_a_state_change_is_refused_and_writes_nothing(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 3)
    await _statement(conn, s, [Move(i, "claim", "claimed", "worker-1") for i in ids])
    before = await _snapshot(conn, s)

    with pytest.raises(asyncpg.CheckViolationError) as alone:
        await conn.execute(
            f"UPDATE \"{s}\".operations SET state = 'succeeded', transition = 'reject' "
            "WHERE id = $1",
            ids[0],
        )
    # Among allowed moves, one reject that changes state refuses them all.
    with pytest.raises(asyncpg.CheckViolationError) as among_others:
        await _statement(
            conn,
            s,
            [
                Move(ids[0], "succeed", "succeeded", "worker-1"),
                Move(ids[1], "reject", "failed", "worker-old"),
                Move(ids[2], "reject", "claimed", "worker-old"),
            ],
        )

    assert _message(alone.value) == REJECT_REFUSED
    assert _message(among_others.value) == REJECT_REFUSED
    assert await _snapshot(conn, s) == before
    await _assert_chains_verify(conn, s, 3, 6)


# -- the actor is the caller, the writer is the owner ----------------------------------------


@pytest.fixture
async def app_role(db_settings: DatabaseSettings, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A fresh NOLOGIN role granted what ``pgoutbox db grant --publisher --operator`` grants (no
    privilege on audit_log); dropped with everything it owns or was granted at teardown."""
    name = f"stmt_app_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE ROLE "{name}" NOLOGIN')
    try:
        await grant_roles(db_settings, publisher=name, operator=name)
        yield name
    finally:
        await conn.execute(f'DROP OWNED BY "{name}"')
        await conn.execute(f'DROP ROLE "{name}"')


async def test_the_default_actor_is_the_calling_role_not_the_trigger_owner(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, app_role: str
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 10)
    owner = await conn.fetchval("SELECT current_user")

    async with conn.transaction():
        await conn.execute(f'SET LOCAL ROLE "{app_role}"')
        await conn.execute(
            f"UPDATE \"{s}\".operations SET state = 'cancelled', transition = 'cancel', "
            "transition_actor = CASE WHEN id = $2 THEN 'admin:alice' END "
            "WHERE id = ANY($1::bigint[])",
            ids,
            ids[4],
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute(f'DELETE FROM "{s}".audit_log')

    audit = await _audit(conn, s)
    assert app_role != owner
    for op_id in ids:
        actor = "admin:alice" if op_id == ids[4] else app_role
        assert audit[op_id][1] == (2, "pending", "cancelled", "cancel", 0, actor, None)
    await _assert_chains_verify(conn, s, 10, 20)


# What a caller with a schema of its own could put ahead of pg_catalog on its search_path.
SHADOWS = {
    "clock": (
        "CREATE FUNCTION {own}.clock_timestamp() RETURNS timestamptz LANGUAGE sql "
        "AS $$ SELECT timestamptz '2001-01-01 00:00:00+00' $$",
    ),
    "plus": (
        "CREATE FUNCTION {own}.plus(integer, integer) RETURNS integer LANGUAGE sql "
        "AS $$ SELECT pg_catalog.int4pl(pg_catalog.int4pl($1, $2), 1) $$",
        "CREATE OPERATOR {own}.+ (LEFTARG = integer, RIGHTARG = integer, FUNCTION = {own}.plus)",
    ),
}


@pytest.mark.parametrize("shadow", sorted(SHADOWS))
async def test_a_callers_search_path_cannot_change_what_is_recorded(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, app_role: str, shadow: str
) -> None:
    # The row triggers run with the caller's rights (SECURITY INVOKER), but their search_path is
    # pinned: a role's own clock_timestamp() or integer "+" changes neither when a creation or
    # a transition is recorded nor its seq.
    s = db_settings.schema_name
    own = f'"{s}_own"'
    await conn.execute(f'CREATE SCHEMA {own} AUTHORIZATION "{app_role}"')
    try:
        start = await conn.fetchval("SELECT pg_catalog.clock_timestamp()")
        async with conn.transaction():
            await conn.execute(f'SET LOCAL ROLE "{app_role}"')
            for statement in SHADOWS[shadow]:
                await conn.execute(statement.replace("{own}", own))
            await conn.execute(f"SET LOCAL search_path = {own}, pg_catalog")
            op_id = await conn.fetchval(
                f'INSERT INTO "{s}".operations (operation_type, channel, payload) '
                "VALUES ($1, $2, '{}') RETURNING id",
                OPERATION_TYPE,
                CHANNEL,
            )
            await conn.execute(
                f"UPDATE \"{s}\".operations SET state = 'cancelled', transition = 'cancel' "
                "WHERE id = $1",
                op_id,
            )
        end = await conn.fetchval("SELECT pg_catalog.clock_timestamp()")
    finally:
        await conn.execute(f"DROP SCHEMA {own} CASCADE")

    chain = await _chain(conn, s, op_id)
    assert [row["seq"] for row in chain] == [1, 2]
    for row in chain:
        assert start <= row["recorded_at"] <= end
    assert (await _audit(conn, s))[op_id][1] == (
        2,
        "pending",
        "cancelled",
        "cancel",
        0,
        app_role,
        None,
    )
    await _assert_chains_verify(conn, s, 1, 2)


# -- concurrency: each statement extends the committed head ----------------------------------


@asynccontextmanager
async def _connections(dsn: str, n: int) -> AsyncIterator[list[asyncpg.Connection]]:
    opened = [await asyncpg.connect(dsn) for _ in range(n)]
    try:
        yield opened
    finally:
        for c in opened:
            await c.close()


async def _wait_until_blocked(conn: asyncpg.Connection, pid: int) -> None:
    for _ in range(500):
        if await conn.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for the other transaction's row locks")


async def _race(
    database_dsn: str, conn: asyncpg.Connection, schema: str, ids: list[int], second_sql: str
) -> BaseException | None:
    """The first connection claims ``ids[:10]`` in an open transaction; the second runs
    ``second_sql`` over all ``ids`` meanwhile (and waits for the row locks); then the first
    commits. Returns what the second raised, if anything."""
    async with _connections(database_dsn, 2) as (first, second):
        tx = first.transaction()
        await tx.start()
        try:
            await _statement(
                first, schema, [Move(i, "claim", "claimed", "worker-1") for i in ids[:10]]
            )
            blocked = asyncio.ensure_future(second.execute(second_sql, ids))
            await _wait_until_blocked(conn, second.get_server_pid())
        finally:
            await tx.commit()
        results = await asyncio.gather(blocked, return_exceptions=True)
    outcome = results[0]
    return outcome if isinstance(outcome, BaseException) else None


async def test_a_statement_waiting_on_rows_extends_their_chains_from_the_committed_head(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 20)

    raised = await _race(
        database_dsn,
        conn,
        s,
        ids,
        f'UPDATE "{s}".operations SET '
        "state = CASE state WHEN 'pending' THEN 'cancelled' ELSE 'succeeded' END, "
        "transition = CASE state WHEN 'pending' THEN 'cancel' ELSE 'succeed' END, "
        "transition_actor = 'admin:bob' WHERE id = ANY($1::bigint[])",
    )

    assert raised is None
    audit = await _audit(conn, s)
    for op_id in ids[:10]:
        assert [a[:5] for a in audit[op_id][1:]] == [
            (2, "pending", "claimed", "claim", 1),
            (3, "claimed", "succeeded", "succeed", 1),
        ]
    for op_id in ids[10:]:
        assert audit[op_id][1:] == [(2, "pending", "cancelled", "cancel", 0, "admin:bob", None)]
    await _assert_chains_verify(conn, s, 20, 10 * 3 + 10 * 2)


async def test_a_statement_refused_after_waiting_on_rows_changes_none_of_them(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    ids = await _publish(conn, s, 20)

    raised = await _race(
        database_dsn,
        conn,
        s,
        ids,
        f"UPDATE \"{s}\".operations SET state = 'cancelled', transition = 'cancel' "
        "WHERE id = ANY($1::bigint[])",
    )

    # Rechecked against the committed rows: cancel is not allowed from claimed.
    assert isinstance(raised, asyncpg.CheckViolationError)
    assert _message(raised) in {_not_allowed(i, "cancel", "claimed", "cancelled") for i in ids[:10]}
    rows = await _operations(conn, s)
    assert [rows[i]["state"] for i in ids] == ["claimed"] * 10 + ["pending"] * 10
    audit = await _audit(conn, s)
    assert [len(audit[i]) for i in ids] == [2] * 10 + [1] * 10
    await _assert_chains_verify(conn, s, 20, 30)


# -- 7. property: random multi-row statements against the default lifecycle ---------------------


STATES = sorted(DEFAULT_LIFECYCLE.states)
TRIGGERS = sorted({t.trigger for t in DEFAULT_LIFECYCLE.transitions})
NAMED_STEPS = sorted({(t.trigger, t.to_state) for t in DEFAULT_LIFECYCLE.transitions})
ACTORS = ["worker-1", "admin:alice", None]
DETAILS = [None, "late result", "naïve détail ✓ | 1:x"]

PROPERTY_SETTINGS = hypothesis_settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class OperationModel:
    """What the database should hold for one operation, from DEFAULT_LIFECYCLE only."""

    database_user: str
    state: str = "pending"
    attempts: int = 0
    audit: list[AuditRow] = field(default_factory=list)
    staged: tuple[str | None, str | None, str | None, str | None] = (None, None, None, None)

    def __post_init__(self) -> None:
        self.audit.append((1, None, "pending", "publish", 0, self.database_user, None))

    def allows(self, move: Move) -> bool:
        if move.trigger is None or move.trigger == "reject":  # heartbeat / audit-only event
            return move.to_state == self.state
        return move.to_state in DEFAULT_LIFECYCLE.targets(self.state, move.trigger)

    def apply(self, move: Move) -> None:
        if move.trigger is None:  # a heartbeat: no audit row, the staged entry cleared
            self.staged = (None, None, None, None)
            return
        if move.trigger == "claim":
            self.attempts += 1
        actor = move.actor or self.database_user
        self.audit.append(
            (
                len(self.audit) + 1,
                self.state,
                move.to_state,
                move.trigger,
                self.attempts,
                actor,
                move.detail,
            )
        )
        self.staged = (self.state, move.trigger, actor, move.detail)
        self.state = move.to_state

    def refusal(self, move: Move) -> str:
        """The message refusing ``move`` (which :meth:`allows` refuses)."""
        if move.trigger is None:
            return _unnamed(move.op_id, self.state, move.to_state)
        if move.trigger == "reject":
            return REJECT_REFUSED
        return _not_allowed(move.op_id, move.trigger, self.state, move.to_state)


def _step(state: str) -> st.SearchStrategy[tuple[str | None, str]]:
    """A (trigger, to_state) for a row in ``state``: mostly one the lifecycle allows, else a
    heartbeat, an audit-only reject, or anything at all (named or not, allowed or not)."""
    legal = sorted(
        (t.trigger, t.to_state) for t in DEFAULT_LIFECYCLE.transitions if t.from_state == state
    )
    quiet = st.sampled_from([(None, state), ("reject", state)])
    anything = st.tuples(
        st.sampled_from([*TRIGGERS, "reject", "unheard", None]), st.sampled_from(STATES)
    )
    wrong = st.one_of(st.sampled_from(NAMED_STEPS), anything)
    if not legal:
        return st.one_of(quiet, wrong)
    return st.one_of(st.sampled_from(legal), st.sampled_from(legal), quiet, wrong)


@asynccontextmanager
async def _fresh_schema(database_dsn: str, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A schema of this example's own, migrated to head; dropped afterwards."""
    db = DatabaseSettings(dsn=database_dsn, schema_name=f"stmtprop_{uuid.uuid4().hex[:10]}")
    await migrations.upgrade(db)
    try:
        yield db.schema_name
    finally:
        await conn.execute(f'DROP SCHEMA "{db.schema_name}" CASCADE')


async def _assert_matches_model(
    conn: asyncpg.Connection, schema: str, models: dict[int, OperationModel]
) -> None:
    rows = await _operations(conn, schema)
    audit = await _audit(conn, schema)
    heads = {
        r["operation_id"]: r["prev_hash"]
        for r in await conn.fetch(
            f'SELECT a.operation_id, a.prev_hash FROM "{schema}".audit_log a '
            f'JOIN "{schema}".operations o ON o.id = a.operation_id AND a.seq = o.audit_seq'
        )
    }
    assert sorted(rows) == sorted(models)
    for op_id, model in models.items():
        row = rows[op_id]
        assert (row["state"], row["attempts"], row["audit_seq"]) == (
            model.state,
            model.attempts,
            len(model.audit),
        ), op_id
        assert audit[op_id] == model.audit, op_id
        staged = _staged(row)
        assert staged[:4] == model.staged, op_id
        # A staged entry is the newest audit row's: it chains onto that row's predecessor.
        assert staged[4] == (heads[op_id] if model.staged[1] else None), op_id


@PROPERTY_SETTINGS
@given(data=st.data())
async def test_random_multi_row_statements_are_all_or_nothing_and_audited_row_by_row(
    database_dsn: str, conn: asyncpg.Connection, data: st.DataObject
) -> None:
    async with _fresh_schema(database_dsn, conn) as s:
        ids = await _publish(conn, s, data.draw(st.integers(2, 6), label="operations"))
        user = await conn.fetchval("SELECT current_user")
        models = {op_id: OperationModel(database_user=user) for op_id in ids}

        for _ in range(data.draw(st.integers(1, 12), label="statements")):
            chosen = data.draw(
                st.lists(st.sampled_from(ids), min_size=1, unique=True), label="rows"
            )
            moves = []
            for op_id in chosen:
                trigger, to_state = data.draw(_step(models[op_id].state), label=f"op {op_id}")
                named = trigger is not None
                actor = data.draw(st.sampled_from(ACTORS), label="actor") if named else None
                detail = data.draw(st.sampled_from(DETAILS), label="detail") if named else None
                moves.append(Move(op_id, trigger, to_state, actor, detail))
            refused = [m for m in moves if not models[m.op_id].allows(m)]
            before = await _snapshot(conn, s)

            if refused:
                with pytest.raises(asyncpg.CheckViolationError) as excinfo:
                    await _statement(conn, s, moves)
                # A state change without a trigger is refused row by row, before the statement
                # trigger runs; otherwise the statement trigger names one refused row.
                unnamed = [m for m in refused if m.trigger is None]
                expected = {models[m.op_id].refusal(m) for m in unnamed or refused}
                event("refused: " + ("by the row trigger" if unnamed else "by the statement"))
                if len(refused) < len(moves):
                    event("refused: along with rows that were allowed")
                assert _message(excinfo.value) in expected
                assert await _snapshot(conn, s) == before  # nothing at all changed
            else:
                event("accepted: one row" if len(moves) == 1 else "accepted: several rows")
                if {m.trigger is None for m in moves} == {True, False}:
                    event("accepted: transitions and heartbeats together")
                assert await _statement(conn, s, moves) == f"UPDATE {len(moves)}"
                for move in moves:
                    models[move.op_id].apply(move)
            await _assert_matches_model(conn, s, models)

        await _assert_chains_verify(
            conn, s, len(ids), sum(len(model.audit) for model in models.values())
        )
