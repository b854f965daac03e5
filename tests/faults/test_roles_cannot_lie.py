"""The roles that run pgoutbox cannot make the audit log say false things (revision 0010).

Every test connects as a real LOGIN role granted with ``pgoutbox db grant`` and tries, with raw
SQL and nothing but its own grants, what a security review found possible before: forge a
worker's claim or result, take over another worker's lease, make an operator's decision, reset
history, move the retention clock, publish history that never happened. Each is refused (or
normalised), the database is unchanged, and what is accepted is audited with the database role
that did it. A hypothesis test drives random sequences of such statements against a model of
the protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from faultkit import Roles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgoutbox.audit import verify_chains
from pgoutbox.db import new_worker_key, worker_key_fingerprint

REFUSED = (asyncpg.InsufficientPrivilegeError, asyncpg.CheckViolationError)


@dataclass
class Worker:
    """A worker process as the database sees it: a connection carrying a key, and its id."""

    conn: asyncpg.Connection
    id: str
    s: str

    async def claim(self, op_id: int, **override: str) -> None:
        sets = {
            "state": "'claimed'",
            "transition": "'claim'",
            "transition_actor": "$2",
            "attempts": "attempts + 1",
            "step_attempts": "step_attempts + 1",
            "version": "version + 1",
            "lease_owner": "$2",
            "lease_expires_at": "now() + interval '60 seconds'",
            **override,
        }
        await self.update(op_id, sets)

    async def record(self, op_id: int, trigger: str, to_state: str, **override: str) -> None:
        sets = {
            "state": f"'{to_state}'",
            "transition": f"'{trigger}'",
            "transition_actor": "$2",
            "version": "version + 1",
            "lease_owner": "NULL",
            "lease_expires_at": "NULL",
            **override,
        }
        await self.update(op_id, sets)

    async def update(self, op_id: int, sets: dict[str, str]) -> None:
        assignments = ", ".join(f"{column} = {value}" for column, value in sets.items())
        sql = f"UPDATE {self.s}.operations SET {assignments} WHERE id = $1"
        args: list[Any] = [op_id] + ([self.id] if "$2" in sql else [])
        async with self.conn.transaction():
            await self.conn.execute(sql, *args)


@pytest.fixture
def crew(roles: Roles) -> Roles:
    """The test's LOGIN roles (tests/faults/conftest.py), one per kind, granted by the CLI."""
    return roles


@pytest.fixture
async def workers(crew: Roles) -> AsyncIterator[tuple[Worker, Worker]]:
    """Two live workers, both of the worker role, each with its own key."""
    made = []
    for name in ("host-a:1", "host-b:2"):
        key = new_worker_key()
        conn = await crew.connect(crew.worker, worker_key=key)
        made.append(Worker(conn, f"{name}:{worker_key_fingerprint(key)}", crew.s))
    yield made[0], made[1]
    for worker in made:
        await worker.conn.close()


async def _publish(crew: Roles, n: int = 1) -> list[int]:
    pub = await crew.connect(crew.publisher)
    try:
        return [
            await pub.fetchval(
                f"INSERT INTO {crew.s}.operations (operation_type, channel, payload) "
                "VALUES ('lie.op', 'c', '{}') RETURNING id"
            )
            for _ in range(n)
        ]
    finally:
        await pub.close()


async def _snapshot(conn: asyncpg.Connection, crew: Roles) -> list[tuple[Any, ...]]:
    """Every operation and audit row, as the owner sees them."""
    ops = await conn.fetch(f"SELECT * FROM {crew.s}.operations ORDER BY id")
    audit = await conn.fetch(f"SELECT * FROM {crew.s}.audit_log ORDER BY operation_id, seq")
    return [tuple(r.values()) for r in ops] + [tuple(r.values()) for r in audit]


async def _refused(
    conn: asyncpg.Connection, crew: Roles, attempt: Any, match: str | None = None
) -> str:
    """Run ``attempt`` expecting the database to refuse it, leaving everything as it was."""
    before = await _snapshot(conn, crew)
    with pytest.raises(REFUSED, match=match) as excinfo:
        await attempt
    assert await _snapshot(conn, crew) == before
    return str(excinfo.value)


async def _trail(conn: asyncpg.Connection, crew: Roles, op_id: int) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        f"SELECT trigger, actor, db_role FROM {crew.s}.audit_log WHERE operation_id = $1 "
        "ORDER BY seq",
        op_id,
    )
    return [tuple(r.values()) for r in rows]


# -- as the worker role ---------------------------------------------------------------------------


async def test_a_claim_cannot_be_attributed_to_a_worker_whose_key_the_session_lacks(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    real, attacker = workers
    [op] = await _publish(crew)
    forged = attacker.claim(op, transition_actor=f"'{real.id}'", lease_owner=f"'{real.id}'")
    await _refused(conn, crew, forged, match="actor is the worker whose key the session holds")
    keyless = await crew.connect(crew.worker)
    try:
        no_key = Worker(keyless, real.id, crew.s)
        await _refused(conn, crew, no_key.claim(op), match="pgoutbox.worker_key")
    finally:
        await keyless.close()
    # Claiming as itself is the protocol: audited with its own id and the worker role.
    await attacker.claim(op)
    assert (await _trail(conn, crew, op))[-1] == ("claim", attacker.id, crew.worker)


async def test_a_claim_must_count_the_attempt_and_lease_in_database_time(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    worker, _ = workers
    [op] = await _publish(crew)
    for override in (
        {"attempts": "attempts"},
        {"attempts": "attempts + 2"},
        {"version": "version"},
        {"step_attempts": "0"},
        {"lease_expires_at": "'infinity'"},
        {"lease_expires_at": "now() - interval '1 second'"},
        {"lease_owner": "'someone-else'"},
        {"max_attempts": "1000"},
        {"run_at": "'2000-01-01'"},
    ):
        await _refused(conn, crew, worker.claim(op, **override))


async def test_an_operation_that_never_ran_cannot_be_marked_succeeded(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    worker, _ = workers
    [op] = await _publish(crew)
    await _refused(conn, crew, worker.record(op, "succeed", "succeeded"))
    # The finding: claim with attempts untouched, then succeed -- the claim is refused.
    await _refused(conn, crew, worker.claim(op, attempts="attempts"))
    assert await conn.fetchval(f"SELECT state FROM {crew.s}.operations WHERE id = $1", op) == (
        "pending"
    )


async def test_a_result_is_recorded_only_by_the_worker_holding_the_lease(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    holder, other = workers
    [op] = await _publish(crew)
    await holder.claim(op)
    # Attributed to the holder (the finding) or to itself: neither holds the key of the lease.
    await _refused(
        conn,
        crew,
        other.record(op, "succeed", "succeeded", transition_actor=f"'{holder.id}'"),
        match="only the worker holding its lease",
    )
    await _refused(conn, crew, other.record(op, "succeed", "succeeded"))
    await _refused(conn, crew, other.record(op, "release", "pending"))
    # The real worker's own result is then recorded, as its own.
    await holder.record(op, "succeed", "succeeded")
    assert (await _trail(conn, crew, op))[-2:] == [
        ("claim", holder.id, crew.worker),
        ("succeed", holder.id, crew.worker),
    ]


async def test_a_live_lease_cannot_be_dropped_moved_or_stretched_without_its_key(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    holder, other = workers
    [op] = await _publish(crew)
    await holder.claim(op)
    for sets in (
        {"lease_owner": "NULL"},
        {"lease_owner": f"'{other.id}'"},
        {"lease_expires_at": "now() + interval '50 seconds'"},  # a heartbeat by another worker
        {"lease_expires_at": "'infinity'"},
    ):
        await _refused(conn, crew, other.update(op, sets))
    # Not even the holder may shorten it, drop it without a transition, or make it endless.
    for sets in (
        {"lease_owner": "NULL"},
        {"lease_expires_at": "now()"},
        {"lease_expires_at": "'infinity'"},
    ):
        await _refused(conn, crew, holder.update(op, sets))
    # A heartbeat: the holder extends its own lease.
    await holder.update(op, {"lease_expires_at": "now() + interval '90 seconds'"})
    # A lease is lost (rescued) only once it has expired.
    lose = {
        "state": "'failed'",
        "transition": "'lose'",
        "transition_actor": "$2",
        "version": "version + 1",
        "lease_owner": "NULL",
        "lease_expires_at": "NULL",
    }
    await _refused(conn, crew, other.update(op, lose), match="lost only once it has expired")


async def test_operator_decisions_need_the_operator_role(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    worker, _ = workers
    [op] = await _publish(crew)
    cancel = {
        "state": "'cancelled'",
        "transition": "'cancel'",
        "transition_actor": "'alice'",
        "version": "version + 1",
    }
    message = await _refused(conn, crew, worker.update(op, cancel))
    assert f"role {crew.worker} may not make operator transitions" in message
    operator = await crew.connect(crew.operator)
    try:
        as_operator = Worker(operator, "unused", crew.s)
        await as_operator.update(op, cancel)
        assert (await _trail(conn, crew, op))[-1] == ("cancel", "alice", crew.operator)
        replay = {**cancel, "state": "'pending'", "transition": "'replay'"}
        await _refused(conn, crew, worker.update(op, replay))
        # Nor can the operator act as a worker, even with a key of its own: a claim writes
        # columns it has no privilege on, and a transition it could write (a reject) is a
        # worker's, refused by kind.
        key = new_worker_key()
        keyed = await crew.connect(crew.operator, worker_key=key)
        try:
            pretend = Worker(keyed, f"ops:1:{worker_key_fingerprint(key)}", crew.s)
            await _refused(conn, crew, pretend.claim(op), match="permission denied")
            reject = {"transition": "'reject'", "transition_actor": "$2"}
            message = await _refused(conn, crew, pretend.update(op, reject))
            assert f"role {crew.operator} may not make worker transitions" in message
        finally:
            await keyed.close()
    finally:
        await operator.close()


async def test_a_reject_cannot_rewrite_history(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    worker, _ = workers
    [op] = await _publish(crew)
    await worker.claim(op)
    await worker.record(op, "give_up", "dead", last_error="'card declined'")
    reject = {"transition": "'reject'", "transition_actor": "$2"}
    for tamper in (
        {"attempts": "0"},
        {"version": "1"},
        {"max_attempts": "1000"},
        {"last_error": "NULL"},
        {"step_attempts": "0"},
    ):
        await _refused(conn, crew, worker.update(op, {**reject, **tamper}), match="reject")
    await worker.update(op, reject)  # an audit-only event stays allowed
    assert (await _trail(conn, crew, op))[-1] == ("reject", worker.id, crew.worker)


@pytest.mark.parametrize(
    "sets",
    [
        {"updated_at": "'2000-01-01'"},
        {"updated_at": "'infinity'"},
        {"trace_context": """'{"traceparent": "00-forged"}'"""},
        {"created_by": "'alice'"},
        {"payload": "'{}'"},
    ],
)
async def test_bookkeeping_the_audit_does_not_cover_cannot_be_set(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection, sets: dict[str, str]
) -> None:
    worker, _ = workers
    [op] = await _publish(crew)
    await _refused(conn, crew, worker.update(op, sets))
    await worker.claim(op)
    await _refused(conn, crew, worker.update(op, {**sets, "lease_expires_at": "now() + '2m'"}))
    operator = await crew.connect(crew.operator)
    try:
        await _refused(conn, crew, Worker(operator, "x", crew.s).update(op, sets))
    finally:
        await operator.close()


# -- as the publisher role ------------------------------------------------------------------------


async def test_created_by_is_the_inserting_role(crew: Roles, conn: asyncpg.Connection) -> None:
    pub = await crew.connect(crew.publisher)
    try:
        op = await pub.fetchval(
            f"INSERT INTO {crew.s}.operations (operation_type, channel, payload, created_by) "
            "VALUES ('lie.op', 'c', '{}', 'alice_the_cfo') RETURNING id"
        )
    finally:
        await pub.close()
    assert await conn.fetchval(f"SELECT created_by FROM {crew.s}.operations WHERE id = $1", op) == (
        crew.publisher
    )
    assert await _trail(conn, crew, op) == [("publish", crew.publisher, crew.publisher)]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("attempts", "7"),
        ("step_attempts", "3"),
        ("version", "424242"),
        ("last_error", "'it failed before'"),
        ("lease_owner", "'host:1:0123456789abcdef'"),
        ("lease_expires_at", "now() + interval '1 hour'"),
        ("transition", "'succeed'"),
        ("transition_actor", "'alice'"),
        ("audit_actor", "'alice'"),
    ],
)
async def test_a_new_operation_cannot_carry_history(
    crew: Roles, conn: asyncpg.Connection, column: str, value: str
) -> None:
    pub = await crew.connect(crew.publisher)
    try:
        insert = pub.execute(
            f"INSERT INTO {crew.s}.operations (operation_type, channel, payload, {column}) "
            f"VALUES ('lie.op', 'c', '{{}}', {value})"
        )
        message = await _refused(conn, crew, insert)
    finally:
        await pub.close()
    assert f"cannot set {column}" in message or "staged audit entry" in message


async def test_a_publisher_cannot_choose_ids(crew: Roles, conn: asyncpg.Connection) -> None:
    pub = await crew.connect(crew.publisher)
    try:
        insert = pub.execute(
            f"INSERT INTO {crew.s}.operations (id, operation_type, channel, payload) "
            "OVERRIDING SYSTEM VALUE VALUES (1000000, 'lie.op', 'c', '{}')"
        )
        await _refused(conn, crew, insert, match="permission denied")
    finally:
        await pub.close()
    # The next publish is not blocked by a planted id.
    assert len(await _publish(crew, 2)) == 2


# -- every chain still verifies, with its roles ----------------------------------------------------


async def test_what_the_roles_did_verifies_and_names_them(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    worker, _ = workers
    ops = await _publish(crew, 3)
    for op in ops:
        await worker.claim(op)
        await worker.record(op, "succeed", "succeeded")
    rows = await conn.fetch(f"SELECT DISTINCT db_role FROM {crew.s}.audit_log")
    assert {r["db_role"] for r in rows} == {crew.publisher, crew.worker}
    result = await verify_chains(conn, crew.base.schema_name)
    assert result.ok, result
    # A db_role edited (triggers off, as the owner) breaks the chain at that row.
    async with conn.transaction():
        await conn.execute(f"ALTER TABLE {crew.s}.audit_log DISABLE TRIGGER audit_log_append_only")
        await conn.execute(
            f"UPDATE {crew.s}.audit_log SET db_role = 'postgres' "
            "WHERE operation_id = $1 AND seq = 2",
            ops[1],
        )
        await conn.execute(
            f"ALTER TABLE {crew.s}.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only"
        )
    broken = await verify_chains(conn, crew.base.schema_name)
    assert not broken.ok
    assert broken.problem is not None
    assert (broken.problem.operation_id, broken.problem.seq) == (ops[1], 2)


# -- random sequences against a model of the protocol ---------------------------------------------


@dataclass
class Model:
    """What the protocol allows, for one operation: the state a statement must find."""

    state: str = "pending"
    attempts: int = 0
    holder: int | None = None  # which worker (0 or 1) holds the lease


# (name, worker index, whether the statement is honest). Dishonest variants forge an actor or
# tamper with a column; the protocol refuses every one of them.
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["claim", "succeed", "fail", "release", "reject", "heartbeat", "cancel"]),
        st.integers(0, 1),
        st.sampled_from(["honest", "forged_actor", "tampered"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(actions=ACTIONS)
async def test_random_raw_statements_are_accepted_exactly_when_the_protocol_allows(
    crew: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection, actions: list[Any]
) -> None:
    [op] = await _publish(crew)
    model = Model()
    expected_trail = [("publish", crew.publisher, crew.publisher)]
    for name, index, honesty in actions:
        me, them = workers[index], workers[1 - index]
        actor = {"transition_actor": f"'{them.id}'"} if honesty == "forged_actor" else {}
        tamper = {"attempts": "attempts + 5"} if honesty == "tampered" else {}
        holds = model.holder == index
        if name == "claim":
            statement = me.claim(op, **actor, **({"attempts": "attempts"} if tamper else {}))
            allowed = model.state in ("pending", "failed") and model.holder is None
            after = ("claimed", model.attempts + 1, index)
        elif name in ("succeed", "fail", "release"):
            to_state = {"succeed": "succeeded", "fail": "failed", "release": "pending"}[name]
            extra = {"run_at": "now()"} if name == "fail" else {}
            statement = me.record(op, name, to_state, **actor, **tamper, **extra)
            allowed = model.state == "claimed" and holds
            after = (to_state, model.attempts, None)
        elif name == "reject":
            reject = {"transition": "'reject'", "transition_actor": "$2", **actor, **tamper}
            statement = me.update(op, reject)
            allowed = True
            after = (model.state, model.attempts, model.holder)
        elif name == "heartbeat":  # no actor to forge: "forged" extends whatever lease there is
            shrink = honesty == "tampered"
            until = "now() - interval '1 second'" if shrink else "now() + interval '2 minutes'"
            statement = me.update(op, {"lease_expires_at": until})
            allowed = holds and not shrink
            after = (model.state, model.attempts, model.holder)
        else:  # a worker making an operator's decision
            statement = me.update(
                op, {"state": "'cancelled'", "transition": "'cancel'", "version": "version + 1"}
            )
            allowed = False
            after = (model.state, model.attempts, model.holder)
        if name != "heartbeat":
            allowed = allowed and honesty == "honest"
        if allowed:
            await statement
            model.state, model.attempts, model.holder = after
            if name != "heartbeat":
                expected_trail.append((name, me.id, crew.worker))
        else:
            await _refused(conn, crew, statement)
        row = await conn.fetchrow(
            f"SELECT state, attempts, lease_owner FROM {crew.s}.operations WHERE id = $1", op
        )
        holder_id = None if model.holder is None else workers[model.holder].id
        assert (row["state"], row["attempts"], row["lease_owner"]) == (
            model.state,
            model.attempts,
            holder_id,
        )
        assert await _trail(conn, crew, op) == expected_trail
    result = await verify_chains(conn, crew.base.schema_name)
    assert result.ok, result
