"""The audit log the database enforces: lifecycle checks, the hash chain, append-only tables.

Property-based part, and the pattern it uses: pytest-asyncio runs ``@given`` on an ``async def``
test itself (it drives Hypothesis' inner test on the session loop), so the test takes the
ordinary async fixtures ``db_settings`` and ``conn`` directly; no private event loop, no
``asyncio.run``. Those fixtures are function-scoped, i.e. set up once and shared by every
example, hence ``HealthCheck.function_scoped_fixture`` is suppressed. That sharing is harmless
because each example publishes an operation of its own and only asserts about that one (and
``verify_chains`` over the whole schema, which must hold after any example), so a replayed or
shrunk example is independent of the ones before it. ``database=None`` keeps Hypothesis from
saving failing examples into the working tree.

Not used, and why: a sync ``@given`` test calling ``asyncio.run`` per example would need its
own connection and its own migrated schema (the async fixtures live on the session loop), and
``asyncio.run`` resets the thread's current event loop under pytest-asyncio's feet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pgoutbox.audit import AuditProblem, verify_chains
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE
from pgoutbox.settings import DatabaseSettings

STATES = list(DEFAULT_LIFECYCLE.states)
TRIGGERS = sorted({t.trigger for t in DEFAULT_LIFECYCLE.transitions})
# Every trigger with the destination DESIGN §3 gives it: legal or not depending on the state.
NAMED_STEPS = sorted({(t.trigger, t.to_state) for t in DEFAULT_LIFECYCLE.transitions})
# Anything at all: unknown triggers and states, the audit-only "reject", no trigger (None).
ANY_STEP = st.tuples(
    st.sampled_from([*TRIGGERS, "approve", "publish", "reject", "", None]),
    st.sampled_from([*STATES, "archived"]),
)
ACTORS = st.sampled_from(["worker-1", "admin:alice", None])


@dataclass
class OperationModel:
    """What the database should hold for one operation, derived from DEFAULT_LIFECYCLE only."""

    database_user: str  # the actor recorded when none is named
    state: str = "pending"
    attempts: int = 0
    # (from_state, to_state, trigger, attempt, actor) per audit row, in seq order.
    audit: list[tuple[str | None, str, str, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.audit.append((None, "pending", "publish", 0, self.database_user))

    def allows(self, trigger: str | None, to_state: str) -> bool:
        if trigger is None:  # no named transition: only a no-op is possible
            return to_state == self.state
        if trigger == "reject":  # audit-only event, never a state change
            return to_state == self.state
        return to_state in DEFAULT_LIFECYCLE.targets(self.state, trigger)

    def apply(self, trigger: str | None, to_state: str, actor: str | None) -> None:
        if trigger is None:
            return
        if trigger == "claim":
            self.attempts += 1
        actor = actor or self.database_user
        self.audit.append((self.state, to_state, trigger, self.attempts, actor))
        self.state = to_state


async def _publish(conn: asyncpg.Connection, schema: str, operation_type: str = "demo.op") -> int:
    op_id: int = await conn.fetchval(
        f'INSERT INTO "{schema}".operations (operation_type, channel, payload) '
        "VALUES ($1, 'workflow', '{}') RETURNING id",
        operation_type,
    )
    return op_id


async def _transition(
    conn: asyncpg.Connection,
    schema: str,
    op_id: int,
    trigger: str | None,
    to_state: str,
    actor: str | None = "worker-1",
    detail: str | None = None,
) -> None:
    counted = ", attempts = attempts + 1, step_attempts = step_attempts + 1"
    claim = counted if trigger == "claim" else ""
    await conn.execute(
        f'UPDATE "{schema}".operations SET state = $2, transition = $3, transition_actor = $4, '
        f"transition_detail = $5{claim} WHERE id = $1",
        op_id,
        to_state,
        trigger,
        actor,
        detail,
    )


async def _audit(conn: asyncpg.Connection, schema: str, op_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT seq, from_state, to_state, trigger, attempt, actor, detail "
        f'FROM "{schema}".audit_log WHERE operation_id = $1 ORDER BY seq',
        op_id,
    )
    return rows


async def _state(conn: asyncpg.Connection, schema: str, op_id: int) -> tuple[str, int]:
    row = await conn.fetchrow(
        f'SELECT state, attempts FROM "{schema}".operations WHERE id = $1', op_id
    )
    assert row is not None
    return row["state"], row["attempts"]


def _step(state: str) -> st.SearchStrategy[tuple[str | None, str]]:
    """A step to try from ``state``: mostly a legal one, so long histories get explored, but
    often a named trigger out of place or anything at all."""
    legal = sorted(
        (t.trigger, t.to_state) for t in DEFAULT_LIFECYCLE.transitions if t.from_state == state
    )
    anything = st.one_of(st.sampled_from(NAMED_STEPS), ANY_STEP)
    if not legal:
        return anything
    return st.one_of(st.sampled_from(legal), anything)


@hypothesis_settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_database_follows_the_lifecycle_model_and_keeps_an_unbroken_chain(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, data: st.DataObject
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s)
    model = OperationModel(database_user=await conn.fetchval("SELECT current_user"))

    for _ in range(data.draw(st.integers(0, 30), label="steps")):
        trigger, to_state = data.draw(_step(model.state), label="step")
        actor = data.draw(ACTORS, label="actor")
        before = len(await _audit(conn, s, op_id))
        if model.allows(trigger, to_state):
            await _transition(conn, s, op_id, trigger, to_state, actor)
            model.apply(trigger, to_state, actor)
        else:
            with pytest.raises(asyncpg.CheckViolationError, match=r"^pgoutbox: "):
                await _transition(conn, s, op_id, trigger, to_state, actor)
            assert len(await _audit(conn, s, op_id)) == before  # nothing written
        assert await _state(conn, s, op_id) == (model.state, model.attempts)

    rows = await _audit(conn, s, op_id)
    assert [r["seq"] for r in rows] == list(range(1, len(model.audit) + 1))
    assert [
        (r["from_state"], r["to_state"], r["trigger"], r["attempt"], r["actor"]) for r in rows
    ] == model.audit
    verification = await verify_chains(conn, s)
    assert verification.ok, str(verification.problem)


async def test_refusal_names_the_operation_trigger_states_and_lifecycle(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s, "billing.charge")

    with pytest.raises(asyncpg.CheckViolationError) as excinfo:
        await _transition(conn, s, op_id, "succeed", "succeeded")

    assert str(excinfo.value) == (
        f'pgoutbox: operation {op_id} (billing.charge): transition "succeed" from pending to '
        'succeeded is not allowed by lifecycle "default"'
    )


async def test_state_change_without_a_named_transition_is_refused(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s)

    with pytest.raises(asyncpg.CheckViolationError, match="without a named transition"):
        await conn.execute(f"UPDATE \"{s}\".operations SET state = 'claimed' WHERE id = $1", op_id)

    assert await _state(conn, s, op_id) == ("pending", 0)
    assert len(await _audit(conn, s, op_id)) == 1


async def test_new_operation_must_start_pending(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    with pytest.raises(asyncpg.CheckViolationError, match="starts in state pending, not succeeded"):
        await conn.execute(
            f'INSERT INTO "{s}".operations (operation_type, channel, payload, state) '
            "VALUES ('t', 'c', '{}', 'succeeded')"
        )

    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".audit_log') == 0


async def test_transition_detail_and_actor_are_recorded_and_cleared_from_the_row(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s)
    await _transition(conn, s, op_id, "cancel", "cancelled", "admin:alice", "customer asked")

    last = (await _audit(conn, s, op_id))[-1]
    assert (last["trigger"], last["actor"], last["detail"]) == (
        "cancel",
        "admin:alice",
        "customer asked",
    )
    row = await conn.fetchrow(
        f'SELECT transition, transition_actor, transition_detail FROM "{s}".operations '
        "WHERE id = $1",
        op_id,
    )
    assert tuple(row) == (None, None, None)


# --- tampering: verify_chains finds exactly the edited operation and seq ----------------------


def _history() -> Iterator[tuple[str, str]]:
    """claim, fail, claim, succeed: five audit rows with the publish."""
    yield from [("claim", "claimed"), ("fail", "failed"), ("claim", "claimed")]
    yield ("succeed", "succeeded")


@pytest.fixture
async def three_operations(db_settings: DatabaseSettings, conn: asyncpg.Connection) -> list[int]:
    """Three operations with five audit rows each; tests tamper with the middle one."""
    s = db_settings.schema_name
    ids = [await _publish(conn, s) for _ in range(3)]
    for op_id in ids:
        for trigger, to_state in _history():
            await _transition(conn, s, op_id, trigger, to_state, detail=f"step {trigger}")
    assert (await verify_chains(conn, s)).ok
    return ids


@asynccontextmanager
async def _triggers_off(conn: asyncpg.Connection, schema: str, table: str) -> Any:
    """As the superuser: switch the table's triggers off around a tampering edit."""
    qualified = f'"{schema}".{table}'
    names = await conn.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
        qualified,
    )
    async with conn.transaction():
        await conn.execute(f"ALTER TABLE {qualified} DISABLE TRIGGER ALL")
        yield
        for (name,) in names:  # as the migration left them: firing even for replicas
            await conn.execute(f'ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER "{name}"')


def _assert_problem_at(problem: AuditProblem | None, op_id: int, seq: int, reason: str) -> None:
    assert problem is not None
    assert (problem.operation_id, problem.seq) == (op_id, seq)
    assert str(problem).startswith(f"operation {op_id} seq {seq}: ")
    assert reason in problem.reason


@pytest.mark.parametrize(
    ("column", "value"),
    [("detail", "step nothing happened"), ("actor", "someone-else"), ("to_state", "dead")],
)
async def test_edited_audit_row_is_reported_at_its_operation_and_seq(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    three_operations: list[int],
    column: str,
    value: str,
) -> None:
    s, middle = db_settings.schema_name, three_operations[1]
    async with _triggers_off(conn, s, "audit_log"):
        await conn.execute(
            f'UPDATE "{s}".audit_log SET {column} = $2 WHERE operation_id = $1 AND seq = 3',
            middle,
            value,
        )

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, middle, 3, "hash does not match")


async def test_deleted_middle_audit_row_is_reported_as_missing(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    s, middle = db_settings.schema_name, three_operations[1]
    async with _triggers_off(conn, s, "audit_log"):
        await conn.execute(
            f'DELETE FROM "{s}".audit_log WHERE operation_id = $1 AND seq = 2', middle
        )

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, middle, 2, "row missing")


async def test_deleted_last_audit_row_is_reported_as_missing(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    s, middle = db_settings.schema_name, three_operations[1]
    async with _triggers_off(conn, s, "audit_log"):
        await conn.execute(
            f'DELETE FROM "{s}".audit_log WHERE operation_id = $1 AND seq = 5', middle
        )

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, middle, 5, "row missing")


async def test_deleted_first_audit_row_is_reported_as_missing(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    s, middle = db_settings.schema_name, three_operations[1]
    async with _triggers_off(conn, s, "audit_log"):
        await conn.execute(
            f'DELETE FROM "{s}".audit_log WHERE operation_id = $1 AND seq = 1', middle
        )

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, middle, 1, "")


async def test_swapped_audit_rows_are_reported_at_the_first_swapped_seq(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    s, middle = db_settings.schema_name, three_operations[1]
    async with _triggers_off(conn, s, "audit_log"):
        for old, new in [(2, -1), (3, 2), (-1, 3)]:
            await conn.execute(
                f'UPDATE "{s}".audit_log SET seq = $3 WHERE operation_id = $1 AND seq = $2',
                middle,
                old,
                new,
            )

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, middle, 2, "prev_hash does not match")


async def test_forged_appended_audit_row_is_reported(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    # INSERT is allowed on an append-only log; the operation's recorded head exposes the forgery.
    s, middle = db_settings.schema_name, three_operations[1]
    await conn.execute(
        f'INSERT INTO "{s}".audit_log SELECT operation_id, 6, operation_type, to_state, '
        "'dead', 'give_up', attempt, actor, detail, recorded_at, hash, hash "
        f'FROM "{s}".audit_log WHERE operation_id = $1 AND seq = 5',
        middle,
    )

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, middle, 6, "")


async def test_state_changed_behind_the_audit_triggers_back_is_reported(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    s, middle = db_settings.schema_name, three_operations[1]
    async with _triggers_off(conn, s, "operations"):
        await conn.execute(f"UPDATE \"{s}\".operations SET state = 'failed' WHERE id = $1", middle)

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, middle, 5, "'failed'")


async def test_operation_without_audit_rows_is_reported(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    s = db_settings.schema_name
    async with _triggers_off(conn, s, "audit_log"):
        await conn.execute(
            f'DELETE FROM "{s}".audit_log WHERE operation_id = $1', three_operations[1]
        )

    result = await verify_chains(conn, s)

    _assert_problem_at(result.problem, three_operations[1], 1, "")


async def test_untampered_log_verifies_with_row_and_operation_counts(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, three_operations: list[int]
) -> None:
    result = await verify_chains(conn, db_settings.schema_name)

    assert (result.ok, result.operations, result.rows) == (True, 3, 15)


# --- append-only and immutable intent --------------------------------------------------------


async def _execute(conn: asyncpg.Connection, statement: str, *, replica: bool) -> None:
    """Run ``statement`` in a transaction, as a logical-replication apply worker would if
    ``replica`` (``session_replication_role = replica`` skips ordinary triggers)."""
    async with conn.transaction():
        if replica:
            await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(statement)


APPEND_ONLY_STATEMENTS = [
    pytest.param("UPDATE {s}.audit_log SET detail = 'x' WHERE seq = 1", "UPDATE", id="update"),
    pytest.param("DELETE FROM {s}.audit_log WHERE seq = 1", "DELETE", id="delete"),
    pytest.param("TRUNCATE {s}.audit_log", "TRUNCATE", id="truncate"),
]


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica-role"])
@pytest.mark.parametrize(("statement", "verb"), APPEND_ONLY_STATEMENTS)
async def test_audit_log_refuses_update_delete_and_truncate(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    statement: str,
    verb: str,
    replica: bool,
) -> None:
    s = db_settings.schema_name
    await _publish(conn, s)

    with pytest.raises(asyncpg.InsufficientPrivilegeError) as excinfo:
        await _execute(conn, statement.replace("{s}", f'"{s}"'), replica=replica)

    assert str(excinfo.value) == (f"pgoutbox: {s}.audit_log is append-only; {verb} is not allowed")
    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".audit_log') == 1
    assert (await verify_chains(conn, s)).ok


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica-role"])
async def test_operation_payload_cannot_be_changed(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, replica: bool
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s)

    update = f"""UPDATE "{s}".operations SET payload = '{{"amount": 1}}' WHERE id = {op_id}"""

    with pytest.raises(asyncpg.CheckViolationError, match=f"operation {op_id} is recorded intent"):
        await _execute(conn, update, replica=replica)

    payload = await conn.fetchval(f'SELECT payload FROM "{s}".operations WHERE id = $1', op_id)
    assert payload == "{}"


@pytest.mark.parametrize(
    "change",
    [
        "attempts = 5",
        "max_attempts = 99",
        "run_at = now() + interval '1 day'",
        "priority = 7",
        "version = version + 1",
        "last_error = 'nothing happened'",
    ],
)
async def test_bookkeeping_changes_only_with_a_named_transition(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, change: str
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s)
    before = await conn.fetchrow(f'SELECT * FROM "{s}".operations WHERE id = $1', op_id)

    with pytest.raises(asyncpg.CheckViolationError, match="only in the same UPDATE as a named"):
        await conn.execute(f'UPDATE "{s}".operations SET {change} WHERE id = $1', op_id)

    assert await conn.fetchrow(f'SELECT * FROM "{s}".operations WHERE id = $1', op_id) == before
    # A lease extension (the heartbeat) is not bookkeeping of what happened: it needs no audit.
    await conn.execute(f'UPDATE "{s}".operations SET lease_expires_at = now() WHERE id = $1', op_id)


@pytest.mark.parametrize(
    "state_path", [[], [("claim", "claimed")], [("claim", "claimed"), ("fail", "failed")]]
)
async def test_unfinished_operation_cannot_be_deleted(
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    state_path: list[tuple[str, str]],
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s)
    for trigger, to_state in state_path:
        await _transition(conn, s, op_id, trigger, to_state)
    state, _ = await _state(conn, s, op_id)

    with pytest.raises(asyncpg.CheckViolationError, match=f"operation {op_id} is {state}, not"):
        await conn.execute(f'DELETE FROM "{s}".operations WHERE id = $1', op_id)

    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".operations') == 1


async def test_operations_cannot_be_truncated(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    await _publish(conn, s)

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only; TRUNCATE"):
        await conn.execute(f'TRUNCATE "{s}".operations')


async def test_finished_operation_can_be_deleted_and_its_chain_still_verifies(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    op_id = await _publish(conn, s)
    await _transition(conn, s, op_id, "cancel", "cancelled", "admin:alice")

    await conn.execute(f'DELETE FROM "{s}".operations WHERE id = $1', op_id)

    # The deletion is the chain's last row (revision 0014): no state change, by the role.
    rows = await _audit(conn, s, op_id)
    assert [(r["trigger"], r["to_state"]) for r in rows] == [
        ("publish", "pending"),
        ("cancel", "cancelled"),
        ("purge", "cancelled"),
    ]
    assert rows[-1]["detail"] == "deleted outside a purge"
    assert (await verify_chains(conn, s)).ok
