"""Alembic environment for pgoutbox's standalone migrations.

pgoutbox's runner passes an open connection in ``config.attributes["connection"]``; the plain
``alembic`` command (from a checkout) builds one from :class:`pgoutbox.Settings` instead.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from pgoutbox.migrations import SCHEMA_ATTRIBUTE, VERSION_TABLE, schema_for_migration


def _run(connection: Connection) -> None:
    schema = schema_for_migration()
    # The version table lives in pgoutbox's schema, so the schema must exist before Alembic
    # looks for it.
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
    context.configure(
        connection=connection,
        version_table=VERSION_TABLE,
        version_table_schema=schema.strip('"'),
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    from pgoutbox.db import create_engine
    from pgoutbox.settings import Settings

    settings = Settings().database
    schema = context.config.attributes.get(SCHEMA_ATTRIBUTE)
    if schema:
        settings = settings.model_copy(update={"schema_name": schema})
    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("pgoutbox migrations need a live connection (offline mode is not supported)")
connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_standalone())
