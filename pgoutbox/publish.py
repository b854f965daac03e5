"""Recording intent: ``publish_operation`` and ``publish_many``.

Both insert in the caller's transaction and never commit: the operation exists exactly when the
caller's own writes do. Workers are woken with ``pg_notify``, which PostgreSQL delivers only on
commit.

One implementation serves every kind of caller. What a publish does is written once, as a
*plan*: a generator that validates, then yields the statements to run (and a savepoint around
some) and receives their rows. A driver runs the plan: awaiting an ``AsyncSession``, or at once
on a synchronous ``Session``, psycopg 3 connection or Django connection (the adapters of
:mod:`pgoutbox.sync`). So validation, idempotency and errors are the same on every path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NewType, TypeAlias, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from pgoutbox.context import GuardedSession, SyncGuardedSession
from pgoutbox.db import session_schema, session_settings
from pgoutbox.observability import capture_trace_context
from pgoutbox.settings import DEFAULT_MAX_PAYLOAD_BYTES, validate_identifier
from pgoutbox.sql import Query, queries

if TYPE_CHECKING:
    import psycopg

    from pgoutbox.sync import SyncTarget

# What the synchronous paths accept: an SQLAlchemy Session, a psycopg 3 connection, or Django's
# connection (typed Any: Django ships no type information).
SyncSession: TypeAlias = "Session | psycopg.Connection[Any] | Any"
T = TypeVar("T")

OperationId = NewType("OperationId", int)

_OPERATION_TYPE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_MAX_TYPE_CHARS = 200
_MAX_KEY_CHARS = 500
# Deeper JSON is refused before encoding: whether json.dumps raises RecursionError depends on the
# Python version (3.11 at about 1000 levels, 3.13 not at 5000), and PostgreSQL's jsonb parser
# may run out of stack on what Python accepts.
_MAX_PAYLOAD_DEPTH = 500
_INT32 = 2**31 - 1
# An escaped NUL in JSON text: \u0000 not itself preceded by an escaping backslash (the string
# "\\u0000", a backslash followed by "u0000", is fine).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class PublishError(ValueError):
    """The operation was not recorded: the arguments were invalid. Nothing was written."""


class IdempotencyConflict(PublishError):
    """An operation with this idempotency key exists and records a different intent."""


# The keyword arguments a ``publish_many`` item may hold.
PUBLISH_KEYS = frozenset(
    {
        "operation_type",
        "payload",
        "channel",
        "run_at",
        "idempotency_key",
        "priority",
        "max_attempts",
        "ordering_key",
    }
)


@dataclass(frozen=True, slots=True)
class _Run:
    """A plan's step: run ``query``; the plan receives its rows."""

    query: Query
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Savepoint:
    """A plan's step: run ``plan`` under a savepoint; the plan receives its result."""

    plan: _Plan[Any]


_Plan: TypeAlias = Generator["_Run | _Savepoint", Any, T]


@overload
def publish_operation(
    session: AsyncSession | GuardedSession,
    operation_type: str,
    payload: Any,
    channel: str,
    run_at: datetime | None = None,
    idempotency_key: str | None = None,
    *,
    priority: int = 0,
    max_attempts: int | None = None,
    ordering_key: str | None = None,
) -> Coroutine[Any, Any, OperationId]: ...


@overload
def publish_operation(
    session: SyncSession,
    operation_type: str,
    payload: Any,
    channel: str,
    run_at: datetime | None = None,
    idempotency_key: str | None = None,
    *,
    priority: int = 0,
    max_attempts: int | None = None,
    ordering_key: str | None = None,
) -> OperationId: ...


def publish_operation(
    session: AsyncSession | GuardedSession | SyncSession,
    operation_type: str,
    payload: Any,
    channel: str,
    run_at: datetime | None = None,
    idempotency_key: str | None = None,
    *,
    priority: int = 0,
    max_attempts: int | None = None,
    ordering_key: str | None = None,
) -> Coroutine[Any, Any, OperationId] | OperationId:
    """Record the intent to run ``operation_type`` with ``payload``; return its id.

    Usage::

        async with sm.session() as session:
            op_id = await publish_operation(session, operation_type="billing.charge",
                                            payload={"order": 42}, channel="workflow",
                                            idempotency_key="charge-order-42")
            await session.commit()   # publish_operation never commits

    ``session`` is an SQLAlchemy ``AsyncSession`` (then await the call), or, from synchronous
    code, an SQLAlchemy ``Session``, a psycopg 3 connection, or Django's connection inside
    ``transaction.atomic()`` (then the call returns the id itself; see docs/sync.md)::

        with transaction.atomic():
            order.save()
            publish_operation(connection, "billing.charge", {"order": order.pk}, "workflow")

    A transactional handler's ``ctx.session`` publishes in the handler's transaction: a
    follow-up operation exists exactly when the handler's success does.

    ``run_at`` (timezone-aware) delays the operation; by default it is due at once (database
    time). Publishing again with the same ``idempotency_key`` returns the existing operation's
    id; the same key with a different type, channel or payload raises
    :class:`IdempotencyConflict`. ``max_attempts`` overrides the handler's retry limit (in a
    multi-step lifecycle, the first step's: each later step starts under its own handler's).
    Invalid input raises :class:`PublishError` before anything is written. Inside an
    OpenTelemetry span (with ``pgoutbox[otel]``), the trace context is stored with the
    operation and its attempts continue that trace.

    Operations sharing an ``ordering_key`` (e.g. ``"order-42"``) run one at a time, in publish
    order, whatever their type: one starts only when every earlier one of its key has
    succeeded or been cancelled. A ``dead`` one holds the rest back until an operator replays
    or cancels it. Publishers of one key take turns: a second transaction publishing the same
    key waits until the first commits or rolls back, so the order is the commit order.
    """
    item = dict(
        operation_type=operation_type,
        payload=payload,
        channel=channel,
        run_at=run_at,
        idempotency_key=idempotency_key,
        priority=priority,
        max_attempts=max_attempts,
        ordering_key=ordering_key,
    )
    session = _unguarded(session)
    if isinstance(session, AsyncSession):
        return _drive_async(session, lambda schema, limit: _publish_one(item, schema, limit))
    target = _sync_target(session)
    return _drive(target, _publish_one(item, target.schema, target.max_payload_bytes))


@overload
def publish_many(
    session: AsyncSession | GuardedSession, operations: Iterable[Mapping[str, Any]]
) -> Coroutine[Any, Any, list[OperationId]]: ...


@overload
def publish_many(
    session: SyncSession, operations: Iterable[Mapping[str, Any]]
) -> list[OperationId]: ...


def publish_many(
    session: AsyncSession | GuardedSession | SyncSession, operations: Iterable[Mapping[str, Any]]
) -> Coroutine[Any, Any, list[OperationId]] | list[OperationId]:
    """Record many operations in one statement; return their ids in input order.

    Usage::

        ids = await publish_many(session, [
            {"operation_type": "email.send", "payload": {"to": "a@example.com"},
             "channel": "workflow"},
            {"operation_type": "email.send", "payload": {"to": "b@example.com"},
             "channel": "workflow", "idempotency_key": "welcome-b"},
        ])
        await session.commit()

    Each item holds :func:`publish_operation`'s keyword arguments. Every item is validated
    before anything is written; if any is invalid (or conflicts with an existing idempotency
    key), nothing of the batch is written. ``session`` is any of :func:`publish_operation`'s:
    from synchronous code, call it without ``await``.
    """
    session = _unguarded(session)
    if isinstance(session, AsyncSession):
        return _drive_async(
            session, lambda schema, limit: _publish_batch(operations, schema, limit)
        )
    target = _sync_target(session)
    return _drive(target, _publish_batch(operations, target.schema, target.max_payload_bytes))


# -- the plans: what a publish does, for every driver ---------------------------------------


def _publish_one(item: dict[str, Any], schema: str, limit: int) -> _Plan[OperationId]:
    row = _validated(item, limit)
    q = queries(schema)
    yield from _lock_ordering_keys(q, schema, [row])
    inserted = yield _Run(
        q["operations_publish"],
        {**row, "created_by": None, "trace_context": capture_trace_context()},
    )
    if inserted:
        return OperationId(inserted[0][0])
    # The key exists (committed, or just committed by a concurrent publisher we waited for).
    return (yield from _match_existing(q["operations_match_idempotency_keys"], [row]))[0]


def _publish_batch(
    operations: Iterable[Mapping[str, Any]], schema: str, limit: int
) -> _Plan[list[OperationId]]:
    rows = []
    for index, item in enumerate(operations):
        unknown = set(item) - PUBLISH_KEYS
        if unknown:
            raise PublishError(
                f"operations[{index}]: unknown argument(s) {sorted(unknown)}; "
                f"allowed: {sorted(PUBLISH_KEYS)}"
            )
        try:
            rows.append(_validated(dict(item), limit))
        except PublishError as exc:
            raise PublishError(f"operations[{index}]: {exc}") from None
    if not rows:
        return []
    q = queries(schema)
    yield from _lock_ordering_keys(q, schema, rows)
    keyed = [row for row in rows if row["idempotency_key"] is not None]
    columns = {
        "operation_types": [r["operation_type"] for r in rows],
        "channels": [r["channel"] for r in rows],
        "payloads": [r["payload"] for r in rows],
        "run_ats": [r["run_at"] for r in rows],
        "idempotency_keys": [r["idempotency_key"] for r in rows],
        "priorities": [r["priority"] for r in rows],
        "max_attempts": [r["max_attempts"] for r in rows],
        "ordering_keys": [r["ordering_key"] for r in rows],
        "created_by": None,
        "trace_context": capture_trace_context(),  # the whole batch is published in one span
    }
    if not keyed:
        inserted = yield _Run(q["operations_publish_many"], columns)
        return [OperationId(row[0]) for row in inserted]
    # With keys, a conflict found after inserting must undo the batch's rows, but not the
    # caller's earlier work in the same transaction: hence the savepoint.
    unkeyed_ids, matched = yield _Savepoint(_publish_keyed(q, columns, keyed))
    by_key = dict(zip([r["idempotency_key"] for r in keyed], matched, strict=True))
    unkeyed = iter(unkeyed_ids)
    return [
        by_key[row["idempotency_key"]] if row["idempotency_key"] is not None else next(unkeyed)
        for row in rows
    ]


def _publish_keyed(
    q: dict[str, Query], columns: dict[str, Any], keyed: list[dict[str, Any]]
) -> _Plan[tuple[list[OperationId], list[OperationId]]]:
    """Insert a batch holding keys; the new unkeyed ids and the ids of the keyed rows."""
    inserted = yield _Run(q["operations_publish_many"], columns)
    unkeyed_ids = [OperationId(op_id) for op_id, key in inserted if key is None]
    matched = yield from _match_existing(q["operations_match_idempotency_keys"], keyed)
    return unkeyed_ids, matched


def _match_existing(query: Query, rows: list[dict[str, Any]]) -> _Plan[list[OperationId]]:
    """The ids of the operations holding these rows' keys; raise on a different intent."""
    result = yield _Run(
        query,
        {
            "idempotency_keys": [r["idempotency_key"] for r in rows],
            "operation_types": [r["operation_type"] for r in rows],
            "channels": [r["channel"] for r in rows],
            "payloads": [r["payload"] for r in rows],
        },
    )
    # A key given twice in one batch yields a row per occurrence: it is the same intent only if
    # every occurrence is (otherwise the second payload would silently be dropped).
    found: dict[str, tuple[OperationId, bool]] = {}
    for op_id, key, same in result:
        previous = found.get(key)
        found[key] = (OperationId(op_id), same and (previous is None or previous[1]))
    ids = []
    for row in rows:
        key = row["idempotency_key"]
        if key not in found:  # pragma: no cover - the key was just seen to conflict
            raise PublishError(f"idempotency key {key!r} vanished while publishing; retry")
        op_id, same = found[key]
        if not same:
            raise IdempotencyConflict(
                f"idempotency key {key!r} already belongs to operation {op_id}, which records a "
                "different operation type, channel or payload; use a new key for new intent"
            )
        ids.append(op_id)
    return ids


def _lock_ordering_keys(
    q: dict[str, Query], schema: str, rows: list[dict[str, Any]]
) -> _Plan[None]:
    """Wait for the turn of these rows' ordering keys (held until the transaction ends)."""
    keys = [row["ordering_key"] for row in rows if row["ordering_key"] is not None]
    if keys:
        yield _Run(q["operations_lock_ordering_keys"], {"schema": schema, "ordering_keys": keys})


# -- the drivers ---------------------------------------------------------------------------


async def _drive_async(session: AsyncSession, make_plan: Callable[[str, int], _Plan[T]]) -> T:
    """Run a plan on an ``AsyncSession`` (made here, so that even validation happens when the
    caller awaits, as it always has)."""
    return await _drive_async_plan(
        session, make_plan(_schema(session), _max_payload_bytes(session))
    )


async def _drive_async_plan(session: AsyncSession, plan: _Plan[T]) -> T:
    reply: Any = None
    try:
        while True:
            step = plan.send(reply)
            if isinstance(step, _Savepoint):
                async with session.begin_nested():
                    reply = await _drive_async_plan(session, step.plan)
            else:
                reply = (await session.execute(step.query.clause(), step.params)).all()
    except StopIteration as done:
        result: T = done.value
        return result


def _drive(target: SyncTarget, plan: _Plan[T]) -> T:
    """Run a plan on a synchronous session or connection."""
    reply: Any = None
    try:
        while True:
            step = plan.send(reply)
            if isinstance(step, _Savepoint):
                with target.savepoint():
                    reply = _drive(target, step.plan)
            else:
                reply = target.rows(step.query, step.params)
    except StopIteration as done:
        result: T = done.value
        return result


def _unguarded(session: Any) -> Any:
    """A transactional handler's ``ctx.session`` publishes in the handler's transaction: the
    guard is about transaction control, which publishing never exercises."""
    if isinstance(session, GuardedSession | SyncGuardedSession):
        return session.unsafe
    return session


def _sync_target(session: Any) -> SyncTarget:
    # Imported here: pgoutbox.sync's psycopg and Django parts are optional extras.
    from pgoutbox.sync import sync_target

    return sync_target(session)


def _schema(session: AsyncSession) -> str:
    return session_schema(session)


def _max_payload_bytes(session: AsyncSession) -> int:
    settings = session_settings(session)
    return settings.max_payload_bytes if settings else DEFAULT_MAX_PAYLOAD_BYTES


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether lists and dicts in ``value`` nest more than ``limit`` levels (iteratively: no
    recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _utf8(text: str) -> bool:
    """Whether ``text`` is valid Unicode text (no lone surrogate), as PostgreSQL stores it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _key_text(value: object) -> bool:
    """A key PostgreSQL can store and compare: a non-empty, bounded string, no NUL, valid text."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_KEY_CHARS
        and "\x00" not in value
        and _utf8(value)
    )


def _validated(item: dict[str, Any], max_payload_bytes: int) -> dict[str, Any]:
    """Check one operation's arguments; return them as query parameters."""
    operation_type = item.get("operation_type")
    if (
        not isinstance(operation_type, str)
        or len(operation_type) > _MAX_TYPE_CHARS
        or not _OPERATION_TYPE.fullmatch(operation_type)
    ):
        raise PublishError(
            f"invalid operation_type {operation_type!r}: use letters, digits and . _ : - "
            f"(at most {_MAX_TYPE_CHARS} characters), e.g. 'billing.charge'"
        )
    channel = item.get("channel")
    try:
        validate_identifier(channel, "channel")  # type: ignore[arg-type]
    except ValueError as exc:
        raise PublishError(str(exc)) from None
    if "payload" not in item:
        raise PublishError("payload is required (use {} for none)")
    if _depth_exceeds(item["payload"], _MAX_PAYLOAD_DEPTH):
        raise PublishError(
            f"payload of {operation_type!r} is nested more than {_MAX_PAYLOAD_DEPTH} levels "
            "deep; flatten it"
        )
    try:
        payload = json.dumps(item["payload"], allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise PublishError(
            f"payload of {operation_type!r} is not JSON-serialisable ({exc}); pass dicts, lists, "
            "strings, finite numbers (not NaN or infinity), booleans and None"
        ) from None
    if _JSON_NUL.search(payload):
        raise PublishError(
            f"payload of {operation_type!r} contains a NUL character, which PostgreSQL's jsonb "
            "cannot store; encode binary data (e.g. base64) first"
        )
    if not _utf8(payload):
        raise PublishError(
            f"payload of {operation_type!r} contains a lone surrogate (half of a UTF-16 pair), "
            "which is not text PostgreSQL can store; decode it properly or encode it (base64)"
        )
    size = len(payload.encode())
    if size > max_payload_bytes:
        raise PublishError(
            f"payload of {operation_type!r} is {size} bytes as JSON, over the limit of "
            f"{max_payload_bytes}; store large data elsewhere and publish a reference, or raise "
            "database.max_payload_bytes"
        )
    run_at = item.get("run_at")
    if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
        raise PublishError(
            f"invalid run_at {run_at!r}: pass a timezone-aware datetime, "
            "e.g. datetime.now(timezone.utc) + timedelta(seconds=10)"
        )
    key = item.get("idempotency_key")
    if key is not None and not _key_text(key):
        raise PublishError(
            f"invalid idempotency_key {key!r}: a non-empty string of at most {_MAX_KEY_CHARS} "
            "characters, without NUL or lone surrogates, or None"
        )
    priority = item.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > _INT32:
        raise PublishError(f"invalid priority {priority!r}: an integer (higher runs first)")
    max_attempts = item.get("max_attempts")
    if max_attempts is not None and (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= _INT32
    ):
        raise PublishError(f"invalid max_attempts {max_attempts!r}: an integer >= 1, or None")
    ordering_key = item.get("ordering_key")
    if ordering_key is not None and not _key_text(ordering_key):
        raise PublishError(
            f"invalid ordering_key {ordering_key!r}: a non-empty string of at most "
            f"{_MAX_KEY_CHARS} characters, without NUL or lone surrogates (e.g. 'order-42'), "
            "or None"
        )
    return {
        "operation_type": operation_type,
        "channel": channel,
        "payload": payload,
        "run_at": run_at,
        "idempotency_key": key,
        "priority": priority,
        "max_attempts": max_attempts,
        "ordering_key": ordering_key,
    }
