"""Publishing on Django's connection: the psycopg 3 connection under it, inside ``atomic()``."""

from __future__ import annotations

from typing import Any

import psycopg
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils.connection import ConnectionProxy

from pgoutbox.contrib.django.conf import pgoutbox_settings
from pgoutbox.publish import PublishError
from pgoutbox.settings import DatabaseSettings


def django_connection(connection: Any) -> tuple[psycopg.Connection[Any], DatabaseSettings]:
    """The psycopg 3 connection under Django's ``connection`` and the settings to publish with;
    refuse one whose transaction would not be the caller's."""
    if not isinstance(connection, BaseDatabaseWrapper | ConnectionProxy):
        raise PublishError(
            f"cannot publish on {type(connection).__qualname__}: pass django.db.connection "
            "or django.db.connections[alias]"
        )
    if connection.vendor != "postgresql":
        raise PublishError(
            f"cannot publish on a {connection.vendor} database: pgoutbox needs PostgreSQL"
        )
    if connection.get_autocommit():
        raise PublishError(
            "publish inside `with transaction.atomic():` -- outside it Django's connection is in "
            "autocommit mode, so the operation would commit at once, apart from your model writes"
        )
    # Raises Django's TransactionManagementError in an atomic block an error already broke.
    connection.validate_no_broken_transaction()
    raw = connection.connection
    if not isinstance(raw, psycopg.Connection):
        raise PublishError(
            f"Django's connection runs on {type(raw).__module__}, not psycopg 3; pgoutbox "
            "publishes through psycopg 3: pip install 'pgoutbox[django]'"
        )
    return raw, pgoutbox_settings().database
