"""Connections: the SQLAlchemy session manager users publish through, and asyncpg pools."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from pgoutbox.settings import DatabaseSettings

# Set on every session a DatabaseSessionManager hands out, so publish_operation can apply the
# configured payload limit without a settings argument.
SESSION_SETTINGS_KEY = "pgoutbox.settings"

# The worker's own connections plan each statement once, not on every run. Its statements run
# thousands of times a second with other parameter values; PostgreSQL's default would replan the
# claim every time (a LIMIT given as a parameter makes its generic plan look costlier than a
# custom one), which took about a third of the server's time at batch 10. Every statement on
# this pool is written so that its generic plan finds rows by index whatever the parameters and
# statistics (tests/integration/test_generic_plans.py).
HOT_PATH_SETTINGS = {"plan_cache_mode": "force_generic_plan"}

# A worker's connections carry its key in this setting: the database lets only the session that
# holds a lease's key record, release or extend it, and only a worker id ending in the key's
# fingerprint act as that worker (revision 0010; docs/security.md).
WORKER_KEY_SETTING = "pgoutbox.worker_key"


def new_worker_key() -> str:
    """A fresh random worker key (256 bits, hex)."""
    return secrets.token_hex(32)


def worker_key_fingerprint(key: str) -> str:
    """The 16 hex digits of sha256(key) a worker's id ends with (the database checks them)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _with_worker_key(kwargs: dict[str, Any], worker_key: str | None) -> dict[str, Any]:
    if worker_key is not None:
        kwargs["server_settings"] = {**kwargs["server_settings"], WORKER_KEY_SETTING: worker_key}
    return kwargs


def session_settings(session: AsyncSession) -> DatabaseSettings | None:
    """The settings of a session a DatabaseSessionManager handed out; None for another one."""
    settings = session.info.get(SESSION_SETTINGS_KEY)
    return settings if isinstance(settings, DatabaseSettings) else None


def session_schema(session: AsyncSession) -> str:
    """The schema pgoutbox's statements on ``session`` use: its settings', else ``pgoutbox``."""
    settings = session_settings(session)
    return settings.schema_name if settings else "pgoutbox"


def create_engine(
    settings: DatabaseSettings, *, pool_size: int | None = None, worker_key: str | None = None
) -> AsyncEngine:
    """An async SQLAlchemy engine over asyncpg for ``settings``.

    Connections are made by asyncpg from the settings' fields (not from a URL), so Unix-socket
    hosts, passwords with special characters and ``application_name`` need no escaping. A
    ``worker_key`` is sent with every connection (a worker's transactional handlers record their
    results on them).
    """
    kwargs = _with_worker_key(settings.connect_kwargs(), worker_key)

    async def connect() -> Any:
        return await asyncpg.connect(**kwargs)

    return create_async_engine(
        "postgresql+asyncpg://",
        async_creator=connect,
        pool_size=pool_size or settings.pool_size,
        max_overflow=0,
        # No pre-ping: it costs a round trip per checkout (a third of a publish); a dropped
        # connection surfaces as an error to the caller, whose transaction is lost anyway.
    )


async def create_pool(
    settings: DatabaseSettings,
    *,
    min_size: int = 1,
    max_size: int | None = None,
    worker_key: str | None = None,
) -> asyncpg.Pool:
    """An asyncpg pool for pgoutbox's own hot path (claim, record, heartbeat); a worker's
    carries its ``worker_key``."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        min_size=min_size,
        max_size=max_size or settings.pool_size,
        reset=_keep_session,
        **hot_path_connect_kwargs(settings, worker_key),
    )
    return pool


def hot_path_connect_kwargs(
    settings: DatabaseSettings, worker_key: str | None = None
) -> dict[str, Any]:
    """``settings.connect_kwargs()`` for a connection of the worker's hot path: with
    HOT_PATH_SETTINGS, and a worker's key when given."""
    kwargs = settings.connect_kwargs()
    kwargs["server_settings"] = {**kwargs["server_settings"], **HOT_PATH_SETTINGS}
    return _with_worker_key(kwargs, worker_key)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Reset nothing when a connection goes back to the pool.

    asyncpg's default runs a reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) on
    every release: one more round trip per claim and per record. pgoutbox's own statements
    leave no session state behind: their advisory locks are transaction-scoped and LISTEN has a
    connection of its own. asyncpg still rolls back a transaction left open (a cancelled task)
    before calling this.
    """


class DatabaseSessionManager:
    """Hands out SQLAlchemy ``AsyncSession`` objects connected to pgoutbox's database.

    Usage::

        sm = DatabaseSessionManager(settings.database)
        async with sm.session() as session:
            await publish_operation(session, operation_type="demo.hello", payload={}, channel="c")
            await session.commit()
        await sm.close()
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.engine = create_engine(settings)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session; it rolls back whatever was not committed when the block exits."""
        async with self._sessions() as session:
            session.info[SESSION_SETTINGS_KEY] = self.settings
            yield session

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
