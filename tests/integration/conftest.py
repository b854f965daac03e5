"""Fixtures of the publishing suites: ``publisher``, every way to publish in turn, on the test's
schema (tests/integration/publishkit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from publishkit import PATHS, PublishPath, close_django, configure_django

from pgoutbox.settings import DatabaseSettings


@pytest.fixture(scope="session")
def django_database(database_dsn: str) -> Iterator[None]:
    """Django configured on the test database; its connections closed before it is dropped."""
    configure_django(database_dsn)
    yield
    close_django()


@pytest.fixture(params=PATHS)
def publish_path(request: pytest.FixtureRequest) -> str:
    """The name of a way to publish (each test runs once per way)."""
    name: str = request.param
    if name == "django":
        request.getfixturevalue("django_database")
    return name


@pytest.fixture
async def publisher(publish_path: str, db_settings: DatabaseSettings) -> AsyncIterator[PublishPath]:
    """The test's way to publish, on its fresh schema."""
    path = PublishPath(publish_path, db_settings)
    yield path
    await path.close()
