"""Snoozes and cancel requests cannot be forged (revision 0012).

As in test_roles_cannot_lie.py, every statement runs as a real LOGIN role granted with
``pgoutbox db grant`` and nothing but its own grants: a worker cannot write ``abort`` (an
operator's cancel) unless an operator asked for that very attempt, nor in anyone's name but the
operator's; it cannot make or change a request; and a snooze must give back exactly the attempt
its claim took. A hypothesis test drives random sequences of claims, snoozes, failures, cancel
requests and aborts against a model of the protocol, and checks attempts and the audit chain.
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

    async def claim(self, op_id: int) -> None:
        await self.update(
            op_id,
            {
                "state": "'claimed'",
                "transition": "'claim'",
                "transition_actor": "$2",
                "attempts": "attempts + 1",
                "step_attempts": "step_attempts + 1",
                "version": "version + 1",
                "lease_owner": "$2",
                "lease_expires_at": "now() + interval '60 seconds'",
            },
        )

    async def end(self, op_id: int, trigger: str, to_state: str, **override: str) -> None:
        """A step's result (or a snooze, an abort): ends the lease, version one up."""
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

    async def snooze(self, op_id: int, **override: str) -> None:
        honest = {
            "step_attempts": "step_attempts - 1",
            "snoozes": "snoozes + 1",
            "run_at": "now() + interval '1 second'",
        }
        await self.end(op_id, "snooze", "pending", **{**honest, **override})

    async def abort(self, op_id: int, actor: str = "cancel_requested_by") -> None:
        await self.end(op_id, "abort", "cancelled", transition_actor=actor)

    async def update(self, op_id: int, sets: dict[str, str]) -> None:
        assignments = ", ".join(f"{column} = {value}" for column, value in sets.items())
        sql = f"UPDATE {self.s}.operations SET {assignments} WHERE id = $1"
        args: list[Any] = [op_id] + ([self.id] if "$2" in sql else [])
        async with self.conn.transaction():
            await self.conn.execute(sql, *args)


@pytest.fixture
async def workers(roles: Roles) -> AsyncIterator[tuple[Worker, Worker]]:
    """Two live workers of the worker role, each with its own key."""
    made = []
    for name in ("host-a:1", "host-b:2"):
        key = new_worker_key()
        conn = await roles.connect(roles.worker, worker_key=key)
        made.append(Worker(conn, f"{name}:{worker_key_fingerprint(key)}", roles.s))
    yield made[0], made[1]
    for worker in made:
        await worker.conn.close()


@pytest.fixture
async def operator(roles: Roles) -> AsyncIterator[asyncpg.Connection]:
    conn = await roles.connect(roles.operator)
    yield conn
    await conn.close()


async def request_cancel(conn: asyncpg.Connection, roles: Roles, op_id: int, by: str) -> None:
    await conn.execute(
        f"UPDATE {roles.s}.operations SET cancel_requested_by = $2, "
        "cancel_request_reason = 'test' WHERE id = $1",
        op_id,
        by,
    )


async def publish(roles: Roles) -> int:
    pub = await roles.connect(roles.publisher)
    try:
        op_id: int = await pub.fetchval(
            f"INSERT INTO {roles.s}.operations (operation_type, channel, payload) "
            "VALUES ('run.op', 'c', '{}') RETURNING id"
        )
        return op_id
    finally:
        await pub.close()


async def snapshot(conn: asyncpg.Connection, roles: Roles) -> list[tuple[Any, ...]]:
    ops = await conn.fetch(f"SELECT * FROM {roles.s}.operations ORDER BY id")
    audit = await conn.fetch(f"SELECT * FROM {roles.s}.audit_log ORDER BY operation_id, seq")
    return [tuple(r.values()) for r in ops] + [tuple(r.values()) for r in audit]


async def refused(conn: asyncpg.Connection, roles: Roles, attempt: Any, match: str) -> None:
    """``attempt`` is refused with ``match`` in the message, and nothing changed."""
    before = await snapshot(conn, roles)
    with pytest.raises(REFUSED, match=match):
        await attempt
    assert await snapshot(conn, roles) == before


async def op_row(conn: asyncpg.Connection, roles: Roles, op_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(f"SELECT * FROM {roles.s}.operations WHERE id = $1", op_id)
    assert row is not None
    return row


# -- abort ----------------------------------------------------------------------------------------


async def test_a_worker_cannot_abort_what_no_operator_asked_to_cancel(
    roles: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    holder, _ = workers
    op = await publish(roles)
    await holder.claim(op)

    await refused(conn, roles, holder.abort(op), "no operator requested that this attempt")
    await refused(
        conn, roles, holder.abort(op, actor="'alice'"), "no operator requested that this attempt"
    )


async def test_an_abort_is_the_holders_in_the_requesting_operators_name_only(
    roles: Roles,
    workers: tuple[Worker, Worker],
    operator: asyncpg.Connection,
    conn: asyncpg.Connection,
) -> None:
    holder, other = workers
    op = await publish(roles)
    await holder.claim(op)
    await request_cancel(operator, roles, op, "alice")

    # Another worker, while the lease is live; the holder in its own name or another's.
    await refused(conn, roles, other.abort(op), r"only the lease holder \(.*\) aborts")
    await refused(conn, roles, holder.abort(op, actor="$2"), "audited with the operator")
    await refused(conn, roles, holder.abort(op, actor="'mallory'"), "audited with the operator")
    # Keeping the lease, or touching attempts, is not an abort either.
    await refused(
        conn,
        roles,
        holder.end(op, "abort", "cancelled", transition_actor="cancel_requested_by", attempts="0"),
        "an abort ends the lease",
    )

    await holder.abort(op)

    row = await op_row(conn, roles, op)
    assert (row["state"], row["attempts"]) == ("cancelled", 1)
    last = await conn.fetchrow(
        f"SELECT trigger, actor, db_role FROM {roles.s}.audit_log WHERE operation_id = $1 "
        "ORDER BY seq DESC LIMIT 1",
        op,
    )
    assert tuple(last.values()) == ("abort", "alice", roles.worker)


async def test_a_request_is_for_one_attempt_a_later_attempt_cannot_be_aborted_with_it(
    roles: Roles,
    workers: tuple[Worker, Worker],
    operator: asyncpg.Connection,
    conn: asyncpg.Connection,
) -> None:
    holder, _ = workers
    op = await publish(roles)
    await holder.claim(op)
    await request_cancel(operator, roles, op, "alice")
    # The handler finished first: its failure is recorded; the next attempt is not cancelled.
    await holder.end(op, "fail", "failed", run_at="now()")
    await holder.claim(op)

    await refused(conn, roles, holder.abort(op), "no operator requested that this attempt")


async def test_only_an_operator_requests_a_cancel_once_per_attempt_and_only_of_running_work(
    roles: Roles,
    workers: tuple[Worker, Worker],
    operator: asyncpg.Connection,
    conn: asyncpg.Connection,
) -> None:
    holder, _ = workers
    op = await publish(roles)

    # Not running: cancelled directly instead.
    await refused(conn, roles, request_cancel(operator, roles, op, "alice"), "not running")
    await holder.claim(op)
    # The worker's grants do not reach the request's columns; a publisher's neither.
    await refused(conn, roles, request_cancel(holder.conn, roles, op, "alice"), "permission")
    # The operator cannot backdate it or aim it at another attempt: stamped by the database.
    await refused(
        conn,
        roles,
        operator.execute(
            f"UPDATE {roles.s}.operations SET cancel_request_version = 99 WHERE id = $1", op
        ),
        "permission",
    )
    await request_cancel(operator, roles, op, "alice")
    row = await op_row(conn, roles, op)
    assert (row["cancel_requested_role"], row["cancel_request_version"]) == (
        roles.operator,
        row["version"],
    )
    await refused(
        conn, roles, request_cancel(operator, roles, op, "bob"), "requested already, by alice"
    )
    # The very same request written again changes nothing: not even its time.
    await request_cancel(operator, roles, op, "alice")
    assert (await op_row(conn, roles, op))["cancel_requested_at"] == row["cancel_requested_at"]


# -- snooze ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"attempts": "attempts - 1"}, "a snooze ends the lease"),
        ({"step_attempts": "step_attempts"}, "a snooze ends the lease"),
        ({"step_attempts": "step_attempts - 2"}, "a snooze ends the lease"),
        ({"snoozes": "snoozes"}, "a snooze ends the lease"),
        ({"snoozes": "snoozes + 2"}, "a snooze ends the lease"),
        ({"run_at": "now() - interval '1 hour'"}, "a snooze ends the lease"),
        ({"max_attempts": "50"}, "a snooze ends the lease"),
        ({"last_error": "'ok'"}, "a snooze ends the lease"),
        ({"lease_owner": "$2"}, "a snooze ends the lease"),
    ],
)
async def test_a_snooze_must_give_back_exactly_the_attempt_its_claim_took(
    roles: Roles,
    workers: tuple[Worker, Worker],
    conn: asyncpg.Connection,
    override: dict[str, str],
    match: str,
) -> None:
    holder, _ = workers
    op = await publish(roles)
    await holder.claim(op)

    await refused(conn, roles, holder.snooze(op, **override), match)


async def test_only_the_holder_snoozes_and_no_other_transition_touches_snoozes(
    roles: Roles, workers: tuple[Worker, Worker], conn: asyncpg.Connection
) -> None:
    holder, other = workers
    op = await publish(roles)
    await holder.claim(op)

    await refused(conn, roles, other.snooze(op), r"only the worker holding its lease")
    await refused(
        conn,
        roles,
        holder.end(op, "fail", "failed", run_at="now()", snoozes="snoozes + 1"),
        "only a snooze changes snoozes",
    )
    # A failure that resets its step's count would escape max_attempts.
    await refused(
        conn,
        roles,
        holder.end(op, "fail", "failed", run_at="now()", step_attempts="0"),
        "keeps step_attempts",
    )

    await holder.snooze(op)
    row = await op_row(conn, roles, op)
    assert (row["state"], row["attempts"], row["step_attempts"], row["snoozes"]) == (
        "pending",
        1,
        0,
        1,
    )
    # Without a transition, the count cannot be reset.
    await refused(conn, roles, holder.update(op, {"snoozes": "0"}), "change only in the same")


# -- random sequences -----------------------------------------------------------------------------


@dataclass
class Model:
    state: str = "pending"
    attempts: int = 0
    step_attempts: int = 0
    snoozes: int = 0
    holder: int | None = None
    requested_at_version: int | None = None
    version: int = 0


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["claim", "snooze", "fail", "succeed", "request", "abort"]),
        st.integers(0, 1),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(actions=ACTIONS)
async def test_random_claims_snoozes_failures_and_cancels_keep_the_arithmetic_and_the_chain(
    roles: Roles,
    workers: tuple[Worker, Worker],
    operator: asyncpg.Connection,
    conn: asyncpg.Connection,
    actions: list[tuple[str, int]],
) -> None:
    op = await publish(roles)
    m = Model()
    for step, (name, index) in enumerate(actions):
        me = workers[index]
        holds = m.holder == index
        running = m.state == "claimed"
        if name == "claim":
            statement = me.claim(op)
            allowed = m.state in ("pending", "failed") and m.holder is None
        elif name == "snooze":
            statement = me.snooze(op)
            allowed = running and holds
        elif name == "fail":
            statement = me.end(op, "fail", "failed", run_at="now()")
            allowed = running and holds
        elif name == "succeed":
            statement = me.end(op, "succeed", "succeeded")
            allowed = running and holds
        elif name == "request":
            # A different operator each time: writing the very same request again changes
            # nothing, so no trigger runs and there is nothing to refuse.
            statement = request_cancel(operator, roles, op, f"operator-{step}")
            allowed = running and m.requested_at_version != m.version
        else:
            statement = me.abort(op)
            allowed = running and holds and m.requested_at_version == m.version
        if not allowed:
            with pytest.raises(REFUSED):
                await statement
            continue
        await statement
        if name == "claim":
            m.state, m.holder = "claimed", index
            m.attempts += 1
            m.step_attempts += 1
        elif name == "request":
            m.requested_at_version = m.version
            continue  # no transition: version stays
        else:
            m.holder = None
            m.state = {
                "snooze": "pending",
                "fail": "failed",
                "succeed": "succeeded",
                "abort": "cancelled",
            }[name]
            if name == "snooze":
                m.step_attempts -= 1
                m.snoozes += 1
        m.version += 1
        row = await op_row(conn, roles, op)
        assert (
            row["state"],
            row["attempts"],
            row["step_attempts"],
            row["snoozes"],
            row["version"],
        ) == (m.state, m.attempts, m.step_attempts, m.snoozes, m.version)
    result = await verify_chains(conn, roles.base.schema_name)
    assert result.ok, result
