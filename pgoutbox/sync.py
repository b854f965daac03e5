"""Synchronous access: SQLAlchemy ``Session`` and psycopg 3 connections for pgoutbox's database,
and the adapters through which ``publish_operation`` / ``publish_many`` run on them.

Needs the ``sync`` extra (``pip install 'pgoutbox[sync]'``: psycopg 3). The publishing API is the
one of :mod:`pgoutbox.publish`; called with a synchronous session or connection it runs at once
and returns the ids instead of a coroutine (docs/sync.md).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine
from sqlalchemy import create_engine as sqlalchemy_create_engine
from sqlalchemy.orm import Session, sessionmaker

from pgoutbox.db import HOT_PATH_SETTINGS, SESSION_SETTINGS_KEY, WORKER_KEY_SETTING
from pgoutbox.settings import DEFAULT_MAX_PAYLOAD_BYTES, DatabaseSettings
from pgoutbox.sql import Query

if TYPE_CHECKING:
    import psycopg

# The settings of psycopg connections made by `connect` or passed to `bind` (a connection has no
# `info` dict of its own, as a Session has). Weak: a closed, dropped connection leaves no entry.
_BOUND: weakref.WeakKeyDictionary[Any, DatabaseSettings] = weakref.WeakKeyDictionary()


def psycopg_connect_kwargs(
    settings: DatabaseSettings, *, worker_key: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``psycopg.connect`` from ``settings``; with ``worker_key``, the
    connection carries it as a worker's do (its transactional handlers record on it)."""
    kwargs: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "user": settings.user,
        "dbname": settings.database,
        "application_name": settings.application_name,
    }
    if settings.password:
        kwargs["password"] = settings.password
    if settings.sslmode:
        kwargs["sslmode"] = settings.sslmode
    if worker_key is not None:
        # libpq passes server settings only through `options`; the key is hex, so no quoting.
        kwargs["options"] = f"-c {WORKER_KEY_SETTING}={worker_key}"
    return kwargs


def connect(settings: DatabaseSettings) -> psycopg.Connection[Any]:
    """A psycopg 3 connection to pgoutbox's database, bound to ``settings`` (its schema and
    payload limit apply to what is published on it).

    Usage::

        with pgoutbox.sync.connect(settings.database) as conn:   # commits on success
            conn.execute("UPDATE orders SET state = 'paid' WHERE id = %s", [42])
            publish_operation(conn, "email.receipt", {"order": 42}, channel="workflow")
    """
    import psycopg

    return bind(psycopg.connect(**psycopg_connect_kwargs(settings)), settings)


def bind(
    connection: psycopg.Connection[Any], settings: DatabaseSettings
) -> psycopg.Connection[Any]:
    """Publish on ``connection`` (made elsewhere) into ``settings``' schema, with its payload
    limit; return the connection. An unbound connection publishes into schema ``pgoutbox``."""
    _BOUND[connection] = settings
    return connection


def create_sync_engine(
    settings: DatabaseSettings, *, pool_size: int | None = None, worker_key: str | None = None
) -> Engine:
    """A synchronous SQLAlchemy engine over psycopg 3 for ``settings`` (connections made from
    the settings' fields, as :func:`pgoutbox.db.create_engine` does for asyncpg)."""
    import psycopg

    kwargs = psycopg_connect_kwargs(settings, worker_key=worker_key)
    if worker_key is not None:
        # A worker's statements, as on its asyncpg pool (see HOT_PATH_SETTINGS).
        for name, value in HOT_PATH_SETTINGS.items():
            kwargs["options"] += f" -c {name}={value}"

    def creator() -> Any:
        return psycopg.connect(**kwargs)

    return sqlalchemy_create_engine(
        "postgresql+psycopg://",
        creator=creator,
        pool_size=pool_size or settings.pool_size,
        max_overflow=0,
    )


class SyncSessionManager:
    """Hands out synchronous SQLAlchemy ``Session`` objects connected to pgoutbox's database.

    Usage::

        sm = SyncSessionManager(settings.database)
        with sm.session() as session:
            publish_operation(session, operation_type="demo.hello", payload={}, channel="c")
            session.commit()
        sm.close()

    A ``Session`` of your own engine works too (schema ``pgoutbox`` unless its ``info`` holds
    settings: ``session.info["pgoutbox.settings"] = settings.database``).
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.engine = create_sync_engine(settings)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session; it rolls back whatever was not committed when the block exits."""
        with self._sessions() as session:
            session.info[SESSION_SETTINGS_KEY] = self.settings
            yield session

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


# -- the adapters publish_operation / publish_many run on --------------------------------


class SyncTarget(Protocol):
    """Where a synchronous publish runs: the schema, the payload limit, and two primitives."""

    schema: str
    max_payload_bytes: int

    def rows(self, query: Query, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run ``query`` in the caller's transaction; its rows."""

    def savepoint(self) -> contextlib.AbstractContextManager[object]:
        """A savepoint around a block: released on success, rolled back to on an exception."""


def schema_and_limit(settings: DatabaseSettings | None) -> tuple[str, int]:
    """The schema and payload limit of ``settings``, or the defaults."""
    if settings is None:
        return "pgoutbox", DEFAULT_MAX_PAYLOAD_BYTES
    return settings.schema_name, settings.max_payload_bytes


@dataclass
class _SessionTarget:
    session: Session
    schema: str
    max_payload_bytes: int

    def rows(self, query: Query, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.session.execute(query.clause(), params)]

    def savepoint(self) -> contextlib.AbstractContextManager[object]:
        return self.session.begin_nested()


@dataclass
class _PsycopgTarget:
    conn: psycopg.Connection[Any]
    schema: str
    max_payload_bytes: int
    queries: dict[str, Query]

    def rows(self, query: Query, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(query.psycopg_sql, params)
        return cursor.fetchall() if cursor.description is not None else []

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[object]:
        # Not conn.transaction(): on a connection with autocommit off and no statement run yet
        # (as inside Django's atomic()), it would BEGIN and COMMIT a transaction of its own.
        self.rows(self.queries["publish_savepoint_set"], {})
        try:
            yield None
        except BaseException:
            self.rows(self.queries["publish_savepoint_rollback"], {})
            self.rows(self.queries["publish_savepoint_release"], {})
            raise
        self.rows(self.queries["publish_savepoint_release"], {})


def sync_target(session: Any) -> SyncTarget:
    """The adapter publishing runs on for a synchronous ``session``: an SQLAlchemy ``Session``,
    a psycopg 3 connection, or Django's connection (inside ``transaction.atomic()``)."""
    from pgoutbox.publish import PublishError
    from pgoutbox.sql import queries

    if isinstance(session, Session):
        found = session.info.get(SESSION_SETTINGS_KEY)
        schema, limit = schema_and_limit(found if isinstance(found, DatabaseSettings) else None)
        return _SessionTarget(session, schema, limit)
    if "django" in sys.modules and type(session).__module__.startswith("django."):
        from pgoutbox.contrib.django.publishing import django_connection

        raw, settings = django_connection(session)
        schema, limit = schema_and_limit(settings)
        return _PsycopgTarget(raw, schema, limit, queries(schema))
    if "psycopg" in sys.modules:
        import psycopg

        if isinstance(session, psycopg.Connection):
            check_psycopg_transaction(session)
            schema, limit = schema_and_limit(_BOUND.get(session))
            return _PsycopgTarget(session, schema, limit, queries(schema))
    raise PublishError(
        f"cannot publish on {type(session).__module__}.{type(session).__qualname__}: pass an "
        "SQLAlchemy AsyncSession (await the call) or Session, a psycopg 3 connection, or "
        "Django's connection (django.db.connection, inside transaction.atomic())"
    )


def check_psycopg_transaction(conn: psycopg.Connection[Any]) -> None:
    """Refuse a connection on which the operation would commit at once, apart from the
    caller's writes: autocommit on, outside a ``conn.transaction()`` block."""
    from psycopg.pq import TransactionStatus

    from pgoutbox.publish import PublishError

    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise PublishError(
            "the psycopg connection is in autocommit mode outside a transaction, so the "
            "operation would commit at once, apart from your own writes; publish inside "
            "`with conn.transaction():`, or use a connection with autocommit off"
        )
