"""Fixtures of the publishing suites: ``publisher``, every way to publish in turn
(tests/integration/publishkit.py), on a schema migrated once for the test module."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from publishkit import PATHS, PublishPath, close_django, configure_django

from pgoutbox import migrations
from pgoutbox.settings import DatabaseSettings


@pytest.fixture(scope="session")
def django_database(database_dsn: str) -> Iterator[None]:
    """Django configured on the test database; its connections closed before it is dropped."""
    configure_django(database_dsn)
    yield
    close_django()


@pytest.fixture(scope="module")
async def shared_settings(database_dsn: str) -> AsyncIterator[DatabaseSettings]:
    """One migrated schema for the test module (a fresh one per test cost more than the
    publishing tests themselves); dropped after it."""
    settings = DatabaseSettings(dsn=database_dsn, schema=f"shared_{uuid.uuid4().hex[:10]}")
    await migrations.upgrade(settings)
    yield settings
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(f'DROP SCHEMA "{settings.schema_name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module", params=PATHS)
async def publisher(
    request: pytest.FixtureRequest, shared_settings: DatabaseSettings
) -> AsyncIterator[PublishPath]:
    """Each way to publish in turn (each test runs once per way), on the module's schema."""
    if request.param == "django":
        request.getfixturevalue("django_database")
    path = PublishPath(request.param, shared_settings)
    yield path
    await path.close()
