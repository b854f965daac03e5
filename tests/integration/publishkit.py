"""Every way to publish, behind one small interface, so that one suite of tests runs against all
of them: an SQLAlchemy ``AsyncSession`` (awaited), a synchronous ``Session``, a psycopg 3
connection, and Django's connection inside ``transaction.atomic()``.

A path is opened on one ``DatabaseSettings``; ``path.transaction()`` is the caller's
transaction, committed when the block ends (``commit=False``: rolled back), and rolled back when
it raises. The synchronous paths are called straight from the test's event loop: a publish is a
few quick statements, and Django is told it may (DJANGO_ALLOW_ASYNC_UNSAFE, tests only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import asyncpg

from pgoutbox import DatabaseSessionManager, publish_many, publish_operation
from pgoutbox.settings import DatabaseSettings

PATHS = ("async_session", "session", "psycopg", "django")

MARKER = "marker"


class Tx:
    """The caller's transaction on one path."""

    def __init__(self, target: Any, awaited: bool) -> None:
        self.target = target
        self._awaited = awaited

    async def publish(self, *args: Any, **kwargs: Any) -> int:
        result = publish_operation(self.target, *args, **kwargs)
        op_id: int = await result if self._awaited else result
        return op_id

    async def publish_many(self, items: Sequence[dict[str, Any]]) -> list[int]:
        result = publish_many(self.target, items)
        ids: list[int] = await result if self._awaited else result
        return ids


class PublishPath:
    """One way to publish, opened on ``settings``."""

    def __init__(self, name: str, settings: DatabaseSettings) -> None:
        self.name, self.settings = name, settings
        self._closers: list[Any] = []

    @contextlib.asynccontextmanager
    async def transaction(self, *, commit: bool = True) -> AsyncIterator[Tx]:
        if self.name == "async_session":
            sm = self._async_sm()
            async with sm.session() as session:
                yield Tx(session, awaited=True)
                if commit:
                    await session.commit()
        else:
            with self._sync_transaction(commit) as tx:
                yield tx

    @contextlib.contextmanager
    def _sync_transaction(self, commit: bool) -> Iterator[Tx]:
        if self.name == "session":
            with self._sync_sm().session() as session:
                yield Tx(session, awaited=False)
                if commit:
                    session.commit()
        elif self.name == "psycopg":
            conn = self._psycopg()
            try:
                yield Tx(conn, awaited=False)
            except BaseException:
                conn.rollback()
                raise
            conn.commit() if commit else conn.rollback()
        else:
            from django.db import connection, transaction
            from django.test import override_settings

            options = {
                "SCHEMA": self.settings.schema_name,
                "MAX_PAYLOAD_BYTES": self.settings.max_payload_bytes,
            }
            try:
                with override_settings(PGOUTBOX=options), transaction.atomic():
                    yield Tx(connection, awaited=False)
                    if not commit:
                        transaction.set_rollback(True)
            finally:
                # In a running event loop Django keeps a connection per asyncio task, and each
                # test is a task of its own: one left open would leak.
                connection.close()
        assert self.name in PATHS

    def _async_sm(self) -> DatabaseSessionManager:
        if not hasattr(self, "_asm"):
            self._asm = DatabaseSessionManager(self.settings)
            self._closers.append(self._asm.close)
        return self._asm

    def _sync_sm(self) -> Any:
        from pgoutbox.sync import SyncSessionManager

        if not hasattr(self, "_ssm"):
            self._ssm = SyncSessionManager(self.settings)
            self._closers.append(self._ssm.close)
        return self._ssm

    def _psycopg(self) -> Any:
        import pgoutbox.sync

        if not hasattr(self, "_conn"):
            self._conn = pgoutbox.sync.connect(self.settings)
            self._closers.append(self._conn.close)
        return self._conn

    async def close(self) -> None:
        for close in reversed(self._closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result


def configure_django(database_dsn: str) -> None:
    """Point Django's default database at the test database (once per process)."""
    import django
    from django.conf import settings

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # the tests call Django from a loop
    if settings.configured:
        return
    db = DatabaseSettings(dsn=database_dsn)
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": db.database,
                "USER": db.user,
                "PASSWORD": db.password,
                "HOST": db.host,
                "PORT": str(db.port),
            }
        },
        INSTALLED_APPS=["pgoutbox.contrib.django"],
        USE_TZ=True,
    )
    django.setup()


def close_django() -> None:
    from django.db import connections

    connections.close_all()


class Listener:
    """Collects NOTIFY payloads of one channel on a plain asyncpg connection.

    ``drain()`` sends a marker notification and returns everything that arrived before it:
    PostgreSQL delivers notifications in commit order, so a notification that was sent (that
    is, committed) before the marker is in the result, and one that was not is not. No sleeping.
    """

    def __init__(self, conn: asyncpg.Connection, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.queue.put_nowait(payload)

    async def drain(self) -> list[str]:
        await self.conn.execute("SELECT pg_notify($1, $2)", self.channel, MARKER)
        payloads = []
        while (payload := await asyncio.wait_for(self.queue.get(), timeout=10)) != MARKER:
            payloads.append(payload)
        return payloads
