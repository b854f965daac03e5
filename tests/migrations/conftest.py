"""Fixtures for the migration tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from pgoutbox.settings import DatabaseSettings


@pytest.fixture
async def new_schema(database_dsn: str) -> AsyncIterator[Callable[[], DatabaseSettings]]:
    """Makes settings for schemas that do not exist yet; drops them (if created) after the test."""
    made: list[DatabaseSettings] = []

    def make() -> DatabaseSettings:
        made.append(DatabaseSettings(dsn=database_dsn, schema_name=f"m_{uuid.uuid4().hex[:10]}"))
        return made[-1]

    yield make
    conn = await asyncpg.connect(database_dsn)
    try:
        for settings in made:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.schema_name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def fresh_schema(new_schema: Callable[[], DatabaseSettings]) -> DatabaseSettings:
    """Settings for a schema that does not exist yet (dropped after the test)."""
    return new_schema()
