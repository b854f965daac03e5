"""Custom lifecycles in the database: for any valid lifecycle, what ``register`` installs is
what the Python model allows, no more and no less, and registering is idempotent and refuses a
version that would strand an operation.

Pattern (as in test_audit_chain.py): pytest-asyncio runs ``@given`` on the ``async def`` test on
the session loop, so examples use the function-scoped ``conn`` and ``database_dsn`` fixtures
directly (hence ``HealthCheck.function_scoped_fixture`` is suppressed). Unlike there, every
example migrates a schema of its own and drops it afterwards: a lifecycle is registered per
schema under its (drawn) name, and two examples drawing the same name with different
definitions would otherwise be a new version of each other. Migrating costs about 0.1 s.
``database=None`` keeps Hypothesis from saving examples into the working tree.

Generated lifecycles are valid by construction, never filtered: every extra state is entered
from ``claimed`` or an earlier extra state (so it is reachable) and has a direct exit to a final
state (so nothing is trapped); random further edges skip whatever would break a rule (a second
target for a trigger, ``give_up`` from a parking state); ``succeeded`` gets an edge into it.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pgoutbox import DatabaseSessionManager, WorkflowRouter, migrations, publish_operation
from pgoutbox.audit import verify_chains
from pgoutbox.lifecycle import (
    BUILTIN_STATES,
    DEFAULT_LIFECYCLE,
    RESERVED_TRIGGERS,
    Lifecycle,
    Transition,
)
from pgoutbox.registry import LifecycleChangeRefused, Registered, register
from pgoutbox.router import HandlerSpec
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

FINALS = ("succeeded", "dead", "cancelled")
TRIGGERS = ("go", "next", "approve", "finish", "hold", "resume", "halt")
OPERATION_TYPE = "prop.op"
ACTOR = "prop"

PROPERTY_SETTINGS = hypothesis_settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- generating valid lifecycles ------------------------------------------------------------


@st.composite
def lifecycles(draw: st.DrawFn) -> Lifecycle:
    """A random valid custom lifecycle of 1-5 extra states, some parking."""
    name = draw(
        st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(lambda n: n != "default"),
        label="name",
    )
    extra = [f"s{i}" for i in range(draw(st.integers(1, 5), label="states"))]
    parking = {s for s in extra if draw(st.booleans(), label=f"{s} parks")}
    edges: dict[tuple[str, str], str] = {}  # (source, trigger) -> dest: one target per trigger

    def add(source: str, dest: str, trigger: str) -> None:
        candidate, n = trigger, 1
        while (source, candidate) in edges:
            candidate, n = f"{trigger}{n}", n + 1
        edges[(source, candidate)] = dest

    for i, state in enumerate(extra):  # reachable: entered from claimed or an earlier state
        add(draw(st.sampled_from(["claimed", *extra[:i]])), state, draw(st.sampled_from(TRIGGERS)))
    for state in extra:  # never trapped: a way straight to a final state
        add(state, draw(st.sampled_from(FINALS)), draw(st.sampled_from(TRIGGERS)))
    for _ in range(draw(st.integers(0, 6), label="more edges")):
        source = draw(st.sampled_from(["claimed", *extra]))
        dest = draw(st.sampled_from([*extra, *FINALS]))
        trigger = draw(st.sampled_from([*TRIGGERS, "give_up", "cancel"]))
        if (source, trigger) in edges or (trigger == "give_up" and source in parking):
            continue
        edges[(source, trigger)] = dest
    if "succeeded" not in edges.values():
        add("claimed", "succeeded", "finish")

    timeouts: dict[str, tuple[str, timedelta]] = {}
    for state in sorted(parking):
        exits = sorted(t for s, t in edges if s == state)
        if draw(st.booleans(), label=f"{state} times out"):
            after = timedelta(seconds=draw(st.integers(1, 10**6)))
            timeouts[state] = (draw(st.sampled_from(exits)), after)

    return Lifecycle.define(
        name,
        states=extra,
        parking=sorted(parking),
        transitions=[
            {"trigger": trigger, "source": source, "dest": dest}
            for (source, trigger), dest in sorted(edges.items())
        ],
        timeouts=timeouts,
    )


def _step_from(lifecycle: Lifecycle, state: str) -> st.SearchStrategy[tuple[str, str]]:
    """A (trigger, to_state) to try from ``state``: about half the time one the lifecycle allows
    from there, otherwise one of its moves out of place, one of the default lifecycle's, or
    anything (reserved and unknown triggers, an unknown state)."""
    legal = sorted((t.trigger, t.to_state) for t in lifecycle.transitions if t.from_state == state)
    own = sorted({(t.trigger, t.to_state) for t in lifecycle.transitions})
    default = sorted({(t.trigger, t.to_state) for t in DEFAULT_LIFECYCLE.transitions})
    anything = st.tuples(
        st.sampled_from(
            sorted({*TRIGGERS, *RESERVED_TRIGGERS, "give_up", "cancel", "succeed", "unheard"})
        ),
        st.sampled_from([*lifecycle.states, "archived"]),
    )
    wrong = st.one_of(st.sampled_from(own), st.sampled_from(default), anything)
    if not legal:
        return wrong
    return st.one_of(st.sampled_from(legal), st.sampled_from(legal), wrong)


def _allowed(lifecycle: Lifecycle, state: str, trigger: str, to_state: str) -> bool:
    """The Python model. 'reject' is the database's audit-only event (a late result refused):
    any lifecycle records it, as long as it changes no state (migration 0001)."""
    if trigger == "reject":
        return to_state == state
    return to_state in lifecycle.targets(state, trigger)


# -- database helpers -----------------------------------------------------------------------


@asynccontextmanager
async def _fresh_schema(database_dsn: str, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A schema of this example's own, migrated to head; dropped afterwards."""
    db = DatabaseSettings(dsn=database_dsn, schema=f"lcprop_{uuid.uuid4().hex[:10]}")
    await migrations.upgrade(db)
    try:
        yield db.schema_name
    finally:
        await conn.execute(f'DROP SCHEMA "{db.schema_name}" CASCADE')


async def _noop_step(ctx: Any, payload: Any) -> None:
    return None


def _handlers(lifecycle: Lifecycle) -> dict[str, HandlerSpec]:
    """A complete router for OPERATION_TYPE running ``lifecycle``: a handler per working state."""
    router = WorkflowRouter()
    router.on(OPERATION_TYPE, lifecycle=lifecycle)(_noop_step)
    for state in sorted(lifecycle.step_states):
        router.on(OPERATION_TYPE, step=state)(_noop_step)
    return dict(router.handlers())


async def _register(conn: asyncpg.Connection, schema: str, lifecycle: Lifecycle) -> Registered:
    return await register(conn, queries(schema), schema, _handlers(lifecycle))


async def _publish(database_dsn: str, schema: str) -> int:
    sm = DatabaseSessionManager(DatabaseSettings(dsn=database_dsn, schema=schema))
    try:
        async with sm.session() as session:
            op_id = await publish_operation(session, OPERATION_TYPE, {"n": 1}, "props")
            await session.commit()
    finally:
        await sm.close()
    return int(op_id)


async def _move(
    conn: asyncpg.Connection, schema: str, op_id: int, trigger: str, to_state: str
) -> None:
    # Only what the audit trigger looks at: the lifecycle check is (lifecycle, from, trigger, to).
    await conn.execute(
        f'UPDATE "{schema}".operations SET state = $2, transition = $3, transition_actor = $4 '
        "WHERE id = $1",
        op_id,
        to_state,
        trigger,
        ACTOR,
    )


async def _row(conn: asyncpg.Connection, schema: str, op_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT state, lifecycle, audit_seq, audit_hash, updated_at, version, transition "
        f'FROM "{schema}".operations WHERE id = $1',
        op_id,
    )
    assert row is not None
    return row


async def _audit(conn: asyncpg.Connection, schema: str, op_id: int) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT seq, from_state, to_state, trigger, attempt, actor "
        f'FROM "{schema}".audit_log WHERE operation_id = $1 ORDER BY seq',
        op_id,
    )
    return [tuple(r) for r in rows]


async def _installed(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """Everything register() writes: versions, transitions, type assignments."""
    return {
        "lifecycles": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT name, version, digest, definition::text, registered_at "
                f'FROM "{schema}".lifecycles ORDER BY name, version'
            )
        ],
        "transitions": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT lifecycle, from_state, trigger, to_state "
                f"FROM \"{schema}\".lifecycle_transitions WHERE lifecycle <> 'default' "
                "ORDER BY 1, 2, 3, 4"
            )
        ],
        "types": [
            tuple(r)
            for r in await conn.fetch(
                f'SELECT operation_type, lifecycle FROM "{schema}".lifecycle_types ORDER BY 1'
            )
        ],
    }


def _path(lifecycle: Lifecycle, start: str, goals: set[str]) -> list[Transition]:
    """The shortest run of allowed transitions from ``start`` into one of ``goals``."""
    before: dict[str, Transition | None] = {start: None}
    todo = deque([start])
    while todo:
        here = todo.popleft()
        if here in goals:
            path: list[Transition] = []
            while (step := before[here]) is not None:
                path.append(step)
                here = step.from_state
            return path[::-1]
        for t in sorted(lifecycle.transitions, key=lambda t: (t.from_state, t.trigger, t.to_state)):
            if t.from_state == here and t.to_state not in before and t.trigger != "replay":
                before[t.to_state] = t
                todo.append(t.to_state)
    raise AssertionError(f"no path from {start} to {sorted(goals)} in {lifecycle.rows()}")


# -- the properties ---------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(lifecycle=lifecycles(), data=st.data())
async def test_the_database_enforces_exactly_the_registered_lifecycle(
    database_dsn: str, conn: asyncpg.Connection, lifecycle: Lifecycle, data: st.DataObject
) -> None:
    async with _fresh_schema(database_dsn, conn) as s:
        done = await _register(conn, s, lifecycle)

        assert done == Registered({lifecycle.name: 1}, {OPERATION_TYPE: lifecycle.name})
        installed = await _installed(conn, s)
        assert installed["transitions"] == lifecycle.rows()
        assert installed["types"] == [(OPERATION_TYPE, lifecycle.name)]
        [(name, version, digest, definition, _)] = installed["lifecycles"]
        assert (name, version, digest) == (lifecycle.name, 1, lifecycle.digest)
        assert Lifecycle.from_definition(json.loads(definition)).digest == lifecycle.digest

        op_id = await _publish(database_dsn, s)
        # The type's lifecycle, set by the database whatever the publisher sent.
        row = await _row(conn, s, op_id)
        assert (row["lifecycle"], row["state"]) == (lifecycle.name, "pending")

        state = "pending"
        accepted: list[tuple[str | None, str, str]] = [(None, "pending", "publish")]
        for _ in range(data.draw(st.integers(0, 25), label="steps")):
            trigger, to_state = data.draw(_step_from(lifecycle, state), label="step")
            before_row, before_audit = await _row(conn, s, op_id), await _audit(conn, s, op_id)
            if _allowed(lifecycle, state, trigger, to_state):
                await _move(conn, s, op_id, trigger, to_state)
                after = await _audit(conn, s, op_id)
                # Exactly one new audit row, recording this move.
                assert after[:-1] == before_audit
                assert after[-1] == (len(before_audit) + 1, state, to_state, trigger, 0, ACTOR)
                accepted.append((state, to_state, trigger))
                state = to_state
            else:
                with pytest.raises(asyncpg.CheckViolationError, match=r"^pgoutbox: ") as refused:
                    await _move(conn, s, op_id, trigger, to_state)
                if trigger != "reject":
                    assert (
                        f'transition "{trigger}" from {state} to {to_state} is not allowed by '
                        f'lifecycle "{lifecycle.name}"'
                    ) in str(refused.value)
                # Nothing written: the row and its chain are exactly as before.
                assert await _row(conn, s, op_id) == before_row
                assert await _audit(conn, s, op_id) == before_audit
            assert (await _row(conn, s, op_id))["state"] == state

        audit = await _audit(conn, s, op_id)
        assert [r[0] for r in audit] == list(range(1, len(accepted) + 1))
        assert [(r[1], r[2], r[3]) for r in audit] == accepted
        verification = await verify_chains(conn, s)
        assert verification.ok, str(verification.problem)
        assert (verification.operations, verification.rows) == (1, len(accepted))


@PROPERTY_SETTINGS
@given(lifecycle=lifecycles(), data=st.data())
async def test_registering_again_changes_nothing_and_a_stranding_version_is_refused(
    database_dsn: str, conn: asyncpg.Connection, lifecycle: Lifecycle, data: st.DataObject
) -> None:
    extra = [state for state in lifecycle.states if state not in BUILTIN_STATES]
    async with _fresh_schema(database_dsn, conn) as s:
        assert (await _register(conn, s, lifecycle)).versions == {lifecycle.name: 1}
        first = await _installed(conn, s)

        # The same lifecycle again, and an equal one read back from its definition: no-ops.
        assert await _register(conn, s, lifecycle) == Registered({}, {})
        restored = Lifecycle.from_definition(json.loads(json.dumps(lifecycle.definition())))
        assert await _register(conn, s, restored) == Registered({}, {})
        assert await _installed(conn, s) == first

        # An operation sits in one extra state; a new version drops that state.
        op_id = await _publish(database_dsn, s)
        sitting = data.draw(st.sampled_from(extra), label="sits in")
        for t in _path(lifecycle, "pending", {sitting}):
            await _move(conn, s, op_id, t.trigger, t.to_state)
        assert (await _row(conn, s, op_id))["state"] == sitting
        kept = [state for state in extra if state != sitting]
        smaller = Lifecycle.define(
            lifecycle.name,
            states=kept,
            transitions=[
                {"trigger": "finish", "source": "claimed", "dest": "succeeded"},
                *({"trigger": f"to_{x}", "source": "claimed", "dest": x} for x in kept),
                *({"trigger": "finish", "source": x, "dest": "succeeded"} for x in kept),
            ],
        )

        with pytest.raises(LifecycleChangeRefused) as refused:
            await _register(conn, s, smaller)

        message = str(refused.value)
        assert message.startswith(
            f"lifecycle {lifecycle.name!r}: the new version removes states {sitting}, "
        )
        assert f"{op_id} ({sitting})" in message
        assert await _installed(conn, s) == first  # nothing written, not even the version row
        assert (await _row(conn, s, op_id))["state"] == sitting

        # Once the operation has moved on to a final state, the same version is accepted.
        for t in _path(lifecycle, sitting, set(FINALS)):
            await _move(conn, s, op_id, t.trigger, t.to_state)
        assert await _register(conn, s, smaller) == Registered({lifecycle.name: 2}, {})
        now = await _installed(conn, s)
        assert now["transitions"] == smaller.rows()
        assert [row[:3] for row in now["lifecycles"]] == [
            (lifecycle.name, 1, lifecycle.digest),
            (lifecycle.name, 2, smaller.digest),
        ]
        assert (await verify_chains(conn, s)).ok
