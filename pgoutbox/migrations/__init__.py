"""pgoutbox's Alembic migrations: run standalone, or as a labelled branch of a host's history.

Standalone, pgoutbox keeps its own version table inside its schema (``pgoutbox db upgrade``, or
``alembic upgrade head`` in a checkout). A host project with its own Alembic environment adds
:func:`versions_path` to its ``version_locations`` and runs ``alembic upgrade heads``; the base
revision carries the branch label ``pgoutbox``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from pgoutbox.settings import validate_identifier

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from pgoutbox.settings import DatabaseSettings

VERSION_TABLE = "alembic_version"
SCHEMA_ATTRIBUTE = "pgoutbox_schema"
_HERE = Path(__file__).resolve().parent


def versions_path() -> str:
    """Absolute path of pgoutbox's revision files, for a host's ``version_locations``."""
    return str(_HERE / "versions")


def quote_schema(schema: str) -> str:
    """The validated schema name as a quoted SQL identifier."""
    return '"' + validate_identifier(schema, "schema name") + '"'


def schema_for_migration() -> str:
    """The quoted schema a running migration targets.

    Looked up, in order: the Alembic config attribute ``pgoutbox_schema`` (set by pgoutbox's own
    runner), ``-x pgoutbox_schema=NAME`` on the alembic command line, the environment variable
    ``PGOUTBOX_DATABASE__SCHEMA``, and finally ``pgoutbox``.
    """
    from alembic import context

    config = context.config
    schema = (
        config.attributes.get(SCHEMA_ATTRIBUTE)
        or context.get_x_argument(as_dictionary=True).get(SCHEMA_ATTRIBUTE)
        or os.environ.get("PGOUTBOX_DATABASE__SCHEMA")
        or "pgoutbox"
    )
    return quote_schema(str(schema))


def split_statements(script: str) -> list[str]:
    """Split a SQL script on top-level semicolons (not inside quotes, $$ bodies or comments).

    asyncpg sends each statement as a prepared statement, which holds one command only.
    """
    statements, current, i = [], [], 0
    quote: str | None = None  # the closing delimiter we are inside: ', ", $$ or end of line
    while i < len(script):
        if quote is None:
            for opener, closer in (("--", "\n"), ("$$", "$$"), ("'", "'"), ('"', '"')):
                if script.startswith(opener, i):
                    quote, i = closer, i + len(opener)
                    current.append(opener)
                    break
            else:
                if script[i] == ";":
                    statements.append("".join(current).strip())
                    current = []
                else:
                    current.append(script[i])
                i += 1
        elif script.startswith(quote, i):
            current.append(quote)
            i += len(quote)
            quote = None
        else:
            current.append(script[i])
            i += 1
    statements.append("".join(current).strip())
    return [
        s
        for s in statements
        if s
        and not all(line.lstrip().startswith("--") or not line.strip() for line in s.splitlines())
    ]


def execute_script(script: str) -> None:
    """Run a multi-statement SQL script inside the current migration."""
    from alembic import op

    for statement in split_statements(script):
        op.execute(statement)


def alembic_config(schema: str, connection: Connection | None = None) -> Config:
    """An Alembic config for pgoutbox's standalone history in ``schema``."""
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes[SCHEMA_ATTRIBUTE] = validate_identifier(schema, "schema name")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision pgoutbox ships."""
    head = ScriptDirectory.from_config(alembic_config("pgoutbox")).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection, schema: str) -> str | None:
    """The revision ``schema`` is at, or ``None`` when pgoutbox was never installed there."""
    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    return context.get_current_revision()


def upgrade_sync(connection: Connection, schema: str, revision: str = "head") -> None:
    """Bring ``schema`` to ``revision`` on an open connection, serialised by an advisory lock.

    The lock lets many workers start at once with ``auto_migrate``: one migrates, the others
    wait and then find nothing to do.
    """
    from sqlalchemy import text

    connection.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('pgoutbox.migrate.' || :schema))"),
        {"schema": schema},
    )
    command.upgrade(alembic_config(schema, connection), revision)


def downgrade_sync(connection: Connection, schema: str, revision: str) -> None:
    """Take ``schema`` down to ``revision`` (``base`` removes every pgoutbox table)."""
    command.downgrade(alembic_config(schema, connection), revision)


async def upgrade(settings: DatabaseSettings, revision: str = "head") -> None:
    """Create or upgrade pgoutbox's schema described by ``settings`` (asyncio entry point)."""
    await _run(settings, upgrade_sync, revision)


async def current(settings: DatabaseSettings) -> str | None:
    """The revision the configured schema is at (``None``: not installed)."""
    result: str | None = await _run(settings, current_revision)
    return result


async def _run(settings: DatabaseSettings, fn: Any, *args: Any) -> Any:
    from pgoutbox.db import create_engine

    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn, settings.schema_name, *args)
    finally:
        await engine.dispose()
