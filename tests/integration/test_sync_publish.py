"""What only the synchronous paths have: Django's atomic() blocks and savepoints, a psycopg
connection's autocommit mode, and callers that are none of the supported kinds. What every path
shares is in test_publish_everywhere.py and test_bad_input.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.test import override_settings

import pgoutbox.sync
from pgoutbox import IdempotencyConflict, PublishError, publish_many, publish_operation
from pgoutbox.settings import DatabaseSettings


def _published(settings: DatabaseSettings) -> list[Any]:
    """The ``n`` of every committed operation's payload, in publish order."""
    with psycopg.connect(**pgoutbox.sync.psycopg_connect_kwargs(settings)) as pg:
        table = f'"{settings.schema_name}".operations'
        rows = pg.execute(f"SELECT payload->>'n' FROM {table} ORDER BY id").fetchall()
    return [row[0] for row in rows]


@pytest.fixture
def django_schema(django_database: None, db_settings: DatabaseSettings) -> Iterator[str]:
    """Django publishing into the test's schema, with a table of the app's own in it. (The
    Django tests are plain functions: in a running event loop Django would keep a connection
    per asyncio task.)"""
    schema = db_settings.schema_name
    with override_settings(PGOUTBOX={"SCHEMA": schema}):
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE TABLE "{schema}".orders (id int PRIMARY KEY)')
        try:
            yield schema
        finally:
            connection.close()


def test_django_rollback_after_publish_takes_the_operation_with_the_model_writes(
    django_schema: str, db_settings: DatabaseSettings
) -> None:
    def place_order() -> None:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(f'INSERT INTO "{django_schema}".orders VALUES (1)')
            publish_operation(connection, "billing.charge", {"n": "1"}, "shop")
            raise RuntimeError("the view failed after publishing")

    with pytest.raises(RuntimeError, match="after publishing"):
        place_order()

    assert _published(db_settings) == []
    with psycopg.connect(**pgoutbox.sync.psycopg_connect_kwargs(db_settings)) as pg:
        assert pg.execute(f'SELECT count(*) FROM "{django_schema}".orders').fetchone() == (0,)


def test_django_savepoint_rolled_back_keeps_the_outer_publish_only(
    django_schema: str, db_settings: DatabaseSettings
) -> None:
    with transaction.atomic():
        publish_operation(connection, "billing.charge", {"n": "outer"}, "shop")
        try:
            with transaction.atomic():  # a savepoint
                publish_operation(connection, "billing.charge", {"n": "inner"}, "shop")
                raise RuntimeError("the inner block failed")
        except RuntimeError:
            pass
        publish_many(
            connection, [{"operation_type": "t", "payload": {"n": "after"}, "channel": "c"}]
        )

    assert _published(db_settings) == ["outer", "after"]


def test_django_conflicting_batch_as_the_first_statement_commits_nothing_by_itself(
    django_schema: str, db_settings: DatabaseSettings
) -> None:
    """The batch's savepoint must not begin (and commit) a transaction of its own when it is the
    first thing to run inside atomic()."""
    with transaction.atomic():
        publish_operation(connection, "t", {"n": "first"}, "c", idempotency_key="k")
    batch = [
        {"operation_type": "t", "payload": {"n": "new"}, "channel": "c", "idempotency_key": "n"},
        {"operation_type": "t", "payload": {"n": "other"}, "channel": "c", "idempotency_key": "k"},
    ]

    def conflicting_then_failing() -> None:
        with transaction.atomic():
            with pytest.raises(IdempotencyConflict, match="'k'"):
                publish_many(connection, batch)
            publish_operation(connection, "t", {"n": "later"}, "c")
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError, match="rolled back"):
        conflicting_then_failing()

    assert _published(db_settings) == ["first"]


def test_django_publish_outside_atomic_is_refused_and_writes_nothing(
    django_schema: str, db_settings: DatabaseSettings
) -> None:
    with pytest.raises(PublishError, match=r"inside `with transaction.atomic\(\):`"):
        publish_operation(connection, "billing.charge", {"n": "1"}, "shop")

    assert _published(db_settings) == []


def test_psycopg_autocommit_connection_publishes_only_inside_a_transaction_block(
    db_settings: DatabaseSettings,
) -> None:
    with pgoutbox.sync.connect(db_settings) as pg:
        pg.autocommit = True
        with pytest.raises(PublishError, match="autocommit mode outside a transaction"):
            publish_operation(pg, "t", {"n": "refused"}, "c")
        with pg.transaction():
            publish_operation(pg, "t", {"n": "1"}, "c")
            publish_many(pg, [{"operation_type": "t", "payload": {"n": "2"}, "channel": "c"}])
        try:
            with pg.transaction():
                publish_operation(pg, "t", {"n": "rolled back"}, "c")
                raise RuntimeError("the caller's error")
        except RuntimeError:
            pass

    assert _published(db_settings) == ["1", "2"]


def test_psycopg_connection_bound_to_settings_publishes_into_their_schema(
    db_settings: DatabaseSettings,
) -> None:
    with psycopg.connect(**pgoutbox.sync.psycopg_connect_kwargs(db_settings)) as pg:
        pgoutbox.sync.bind(pg, db_settings)
        publish_operation(pg, "t", {"n": "1"}, "c")
        pg.commit()

    assert _published(db_settings) == ["1"]


@pytest.mark.parametrize("session", [None, "postgresql://", object()], ids=repr)
def test_publishing_on_something_else_is_refused_naming_what_is_accepted(session: Any) -> None:
    with pytest.raises(PublishError, match=r"pass an SQLAlchemy AsyncSession .* or Session"):
        publish_operation(session, "t", {}, "c")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"SCHEMAS": "x"}, r"PGOUTBOX has unknown key\(s\) \['SCHEMAS'\]", id="key"),
        pytest.param({"SCHEMA": "bad;schema"}, "invalid schema name 'bad;schema'", id="schema"),
        pytest.param({"DATABASE": "other"}, "'other', which is not in DATABASES", id="alias"),
    ],
)
def test_bad_django_settings_are_refused_naming_them_and_nothing_is_written(
    django_schema: str, db_settings: DatabaseSettings, options: dict[str, Any], message: str
) -> None:
    with (
        override_settings(PGOUTBOX=options),
        pytest.raises(ImproperlyConfigured, match=message),
        transaction.atomic(),
    ):
        publish_operation(connection, "billing.charge", {"n": "1"}, "shop")

    assert _published(db_settings) == []
