"""pgoutbox's Alembic migrations: run standalone, or as a labelled branch of a host's history.

Standalone, pgoutbox keeps its own version table inside its schema (``pgoutbox db upgrade``, or
``alembic upgrade head`` in a checkout). A host project with its own Alembic environment adds
:func:`versions_path` to its ``version_locations`` and runs ``alembic upgrade heads``; the base
revision carries the branch label ``pgoutbox``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import weakref
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

# Alembic's ``context`` and ``op`` are module-level proxies. Two upgrades interleaved on one event
# loop (two schemas migrated at once, e.g. two WorkflowSystems starting together) would read each
# other's configuration and run DDL against the wrong schema, so upgrades in one loop take turns.
_UPGRADE_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


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


@functools.cache
def head_revision() -> str:
    """The newest revision pgoutbox ships. Cached: reading it loads every revision file, which
    each worker start asked for twice (about 25 ms apiece with 14 revisions)."""
    head = ScriptDirectory.from_config(alembic_config("pgoutbox")).get_current_head()
    assert head is not None
    return head


class SchemaManagedByHost(RuntimeError):
    """The schema was installed through a host project's Alembic history; upgrade it there."""


def current_revision(connection: Connection, schema: str) -> str | None:
    """The revision ``schema`` is at, or ``None`` when pgoutbox was never installed there.

    Read from ``<schema>.schema_revision``, which every revision maintains, so the answer is the
    same whether pgoutbox was migrated standalone or inside a host project's history.
    """
    from sqlalchemy import text

    exists = connection.execute(
        text("SELECT to_regclass(:table) IS NOT NULL"),
        {"table": f"{quote_schema(schema)}.schema_revision"},
    ).scalar()
    if not exists:
        return None
    revision = connection.execute(
        text(f"SELECT revision FROM {quote_schema(schema)}.schema_revision")
    ).scalar()
    return None if revision is None else str(revision)


def _standalone_revision(connection: Connection, schema: str) -> str | None:
    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    return context.get_current_revision()


def upgrade_sync(connection: Connection, schema: str, revision: str = "head") -> None:
    """Bring ``schema`` to ``revision`` on an open connection, serialised by an advisory lock.

    The lock lets many workers start at once with ``auto_migrate``: one migrates, the others
    wait and then find nothing to do. A schema installed through a host project's Alembic
    history is left to the host: at head there is nothing to do, otherwise
    :class:`SchemaManagedByHost` says where to upgrade it.
    """
    from sqlalchemy import text

    connection.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('pgoutbox.migrate.' || :schema))"),
        {"schema": schema},
    )
    installed = current_revision(connection, schema)
    if installed == head_revision() and revision in ("head", installed):
        # Nothing to do, and nothing attempted: a least-privilege worker role may not even
        # be allowed the CREATE SCHEMA IF NOT EXISTS that Alembic's environment would run.
        return
    if installed is not None and _standalone_revision(connection, schema) is None:
        raise SchemaManagedByHost(
            f"schema {schema!r} was installed through a host project's Alembic history and is at "
            f"{installed}, not pgoutbox's head {head_revision()}: run the host's "
            "`alembic upgrade heads`"
        )
    command.upgrade(alembic_config(schema, connection), revision)


def downgrade_sync(connection: Connection, schema: str, revision: str) -> None:
    """Take ``schema`` down to ``revision`` (``base`` removes every pgoutbox table)."""
    command.downgrade(alembic_config(schema, connection), revision)


async def upgrade(settings: DatabaseSettings, revision: str = "head") -> None:
    """Create or upgrade pgoutbox's schema described by ``settings`` (asyncio entry point)."""
    loop = asyncio.get_running_loop()
    lock = _UPGRADE_LOCKS.setdefault(loop, asyncio.Lock())
    async with lock:
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
