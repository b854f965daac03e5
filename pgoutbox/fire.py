"""Firing an external trigger at a parked (or resting) operation: ``fire``.

A parking state runs no step: the operation waits there until something outside (a person
approving a refund, a webhook) fires one of the state's declared triggers. ``fire`` checks the
trigger against the operation's lifecycle, names the allowed ones when it is not, and leaves the
check of record to the database's audit trigger, which writes the audit row with the actor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from pgoutbox.db import session_schema
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE, FINISHED_STATES, Lifecycle
from pgoutbox.sql import Query, queries

_MAX_ACTOR_CHARS = 200
_MAX_DETAIL_CHARS = 10_000


class FireRefused(ValueError):
    """The trigger could not be fired; the message says why. Nothing was changed."""


@dataclass(frozen=True)
class Fired:
    """A trigger that moved an operation."""

    operation_id: int
    trigger: str
    from_state: str
    to_state: str
    actor: str


async def fire(
    session: AsyncSession,
    operation_id: int,
    trigger: str,
    *,
    actor: str,
    detail: str | None = None,
) -> Fired:
    """Fire ``trigger`` at operation ``operation_id`` in the caller's transaction.

    Usage::

        async with sm.session() as session:
            await fire(session, refund_id, "approve", actor="alice@example.com",
                       detail="ticket 4711")
            await session.commit()   # like publish_operation, fire never commits

    ``trigger`` must be one the operation's lifecycle declares from its current state (e.g.
    ``approve`` from ``awaiting_approval``); ``actor`` (who decided) and ``detail`` go into the
    audit row. A state with a timeout gets a fresh deadline; a working state is due at once and
    the channel's workers are woken on commit. Raises :class:`FireRefused` (nothing changed)
    when the operation does not exist, is running a step, is finished, is not in a parking
    state (a working state's triggers are its step's), or its state does not allow ``trigger``
    -- the message lists the triggers that are allowed.
    """
    schema = session_schema(session)
    # A trivial statement first: SQLAlchemy begins the database transaction only with the first
    # statement, and fire_on's savepoint must be inside it, not a transaction of its own.
    await session.execute(text("SELECT 1"))
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, asyncpg.Connection)
    return await fire_on(driver, queries(schema), operation_id, trigger, actor=actor, detail=detail)


async def fire_on(
    conn: asyncpg.Connection,
    q: Mapping[str, Query],
    operation_id: int,
    trigger: str,
    *,
    actor: str,
    detail: str | None = None,
) -> Fired:
    """:func:`fire` on an asyncpg connection, in its current transaction (or its own)."""
    _check_text("actor", actor, _MAX_ACTOR_CHARS, required=True)
    _check_text("detail", detail, _MAX_DETAIL_CHARS, required=False)
    if not isinstance(trigger, str) or not trigger:
        raise FireRefused(f"invalid trigger {trigger!r}: the name of a declared trigger")
    async with conn.transaction():  # a savepoint inside the caller's transaction
        lock = q["operations_lock_for_fire"]
        row = await lock.fetchrow(conn, id=operation_id)
        if row is None:
            raise FireRefused(f"cannot fire {trigger!r}: no operation {operation_id}")
        state = row["state"]
        lifecycle = (
            Lifecycle.from_definition(json.loads(row["definition"]))
            if row["definition"] is not None
            else DEFAULT_LIFECYCLE
        )
        where = f"operation {operation_id} ({row['operation_type']}, lifecycle {lifecycle.name!r})"
        if row["lease_owner"] is not None:
            raise FireRefused(
                f"cannot fire {trigger!r} at {where}: it is running step {state!r} on worker "
                f"{row['lease_owner']}; fire when the step has finished"
            )
        if state in FINISHED_STATES:
            raise FireRefused(
                f"cannot fire {trigger!r} at {where}: it is {state}, finished "
                "(pgoutbox ops replay runs it again)"
            )
        if state not in lifecycle.parking:
            # A working state's triggers are its step's to fire: firing one from outside would
            # record a step as done that never ran.
            parking = ", ".join(sorted(lifecycle.parking)) or "none in this lifecycle"
            raise FireRefused(
                f"cannot fire {trigger!r} at {where}: it is in {state!r}, which is not a "
                f"parking state (its triggers are fired by workers and operators' retry, "
                f"cancel and replay); fire applies to parking states: {parking}"
            )
        exits = lifecycle.exits(state)
        if trigger not in exits:
            allowed = ", ".join(sorted(exits)) or "none (only workers and operators move it)"
            raise FireRefused(
                f"cannot fire {trigger!r} at {where}: from {state!r} its lifecycle allows "
                f"the triggers: {allowed}"
            )
        to_state = exits[trigger]
        timeout = lifecycle.timeouts.get(to_state)
        update = q["operations_fire"]
        await update.fetchrow(
            conn,
            id=operation_id,
            to_state=to_state,
            trigger=trigger,
            actor=actor,
            detail=detail,
            new_step=to_state != state and to_state not in FINISHED_STATES,
            wait_seconds=timeout.seconds if timeout is not None else None,
            wake=to_state in lifecycle.working,
        )
    return Fired(operation_id, trigger, state, to_state, actor)


def _check_text(name: str, value: str | None, limit: int, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip() or len(value) > limit or "\x00" in value:
        raise FireRefused(
            f"invalid {name} {value!r}: a non-empty string of at most {limit} characters "
            "without NUL"
        )
