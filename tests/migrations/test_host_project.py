"""A host application's Alembic history runs pgoutbox's migrations from an installed wheel.

The wheel is built from this checkout and installed into a new virtualenv; the host project is a
plain async Alembic environment (nothing pgoutbox-specific in its env.py) whose
``version_locations`` names pgoutbox's versions directory. docs/migrations.md quotes these files.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import URL

from pgoutbox import migrations
from pgoutbox.settings import DatabaseSettings, parse_dsn

CHECKOUT = Path(__file__).resolve().parents[2]

HOST_ALEMBIC_INI = """\
[alembic]
script_location = %(here)s/migrations
path_separator = space
# The host's own revisions, then pgoutbox's (the same directory as
# pgoutbox.migrations.versions_path(), resolved from the installed package).
version_locations = %(here)s/migrations/versions pgoutbox.migrations:versions
sqlalchemy.url = {url}
"""

HOST_ENV_PY = '''\
"""Alembic environment of a host application (the standard async template)."""

import asyncio

from alembic import context
from sqlalchemy import BigInteger, Column, MetaData, Table, Text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

host_metadata = MetaData()
Table(
    "host_orders",
    host_metadata,
    Column("id", BigInteger, primary_key=True),
    Column("item", Text, nullable=False),
)


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=host_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def main() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"))
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations)
        await connection.commit()
    await engine.dispose()


asyncio.run(main())
'''

HOST_REVISION = '''\
"""Host orders."""

import sqlalchemy as sa
from alembic import op

revision = "host_0001"
down_revision = None
branch_labels = ("host",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_orders",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("item", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("host_orders")
'''

# A host that runs its migrations from Python (e.g. at deploy time) names the directory with
# versions_path() instead of the package-resource spelling in alembic.ini.
HOST_MIGRATE_PY = """\
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

from pgoutbox.migrations import versions_path

here = Path(__file__).resolve().parent
config = Config(str(here / "alembic.ini"))
config.set_main_option("version_locations", f"{here}/migrations/versions {versions_path()}")
# python migrate.py upgrade heads | python migrate.py downgrade pgoutbox@base
getattr(command, sys.argv[1])(config, sys.argv[2])
"""


def _run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _install_wheel_in_new_venv(tmp_path: Path, env: dict[str, str]) -> Path:
    """Build the wheel, install it (only it) into a new venv; return that venv's python.

    Third-party dependencies come from the dev venv through a .pth file (appended to sys.path
    after the new venv's own site-packages). The dev venv's editable-install hook is a .pth file
    inside its site-packages, which Python does not process for a directory added this way, so
    the checkout is not importable from the new venv.
    """
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, CHECKOUT], tmp_path, env)
    (wheel,) = dist.glob("pgoutbox-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
    ).strip()
    dev_purelib = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "_dev_dependencies.pth").write_text(dev_purelib + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            wheel,
        ],
        tmp_path,
        env,
    )
    return python


@pytest.fixture
async def host_database(server_dsn: str) -> AsyncIterator[DatabaseSettings]:
    """A database of the host's own, as a real host would have; dropped after the test."""
    name = f"pgoutbox_host_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield DatabaseSettings(**{**parse_dsn(server_dsn), "database": name})
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _write_host_project(host: Path, database: DatabaseSettings) -> None:
    versions = host / "migrations" / "versions"
    versions.mkdir(parents=True)
    # A Unix-socket directory (the embedded server) goes in the query, as libpq URLs have it.
    socket = database.host.startswith("/")
    url = URL.create(
        "postgresql+asyncpg",
        username=database.user,
        password=database.password or None,
        host=None if socket else database.host,
        port=None if socket else database.port,
        database=database.database,
        query={"host": database.host, "port": str(database.port)} if socket else {},
    ).render_as_string(hide_password=False)
    (host / "alembic.ini").write_text(HOST_ALEMBIC_INI.format(url=url.replace("%", "%%")))
    (host / "migrations" / "env.py").write_text(HOST_ENV_PY)
    (versions / "host_0001_orders.py").write_text(HOST_REVISION)
    (host / "migrate.py").write_text(HOST_MIGRATE_PY)


def _set_up(tmp_path: Path, database: DatabaseSettings, env: dict[str, str]) -> Path:
    """Install the wheel, write the host project, check pgoutbox comes from the wheel."""
    python = _install_wheel_in_new_venv(tmp_path, env)
    host = tmp_path / "host"
    _write_host_project(host, database)
    location = _run(
        [python, "-c", "import pgoutbox.migrations as m; print(m.__file__, m.versions_path())"],
        host,
        env,
    )
    module_file, versions = location.split()
    assert module_file.startswith(str(tmp_path / "venv"))
    assert not module_file.startswith(str(CHECKOUT))
    assert Path(versions, "0001_initial.py").is_file()
    return python


async def test_host_alembic_upgrade_heads_creates_host_and_pgoutbox_tables_from_a_wheel(
    tmp_path: Path, host_database: DatabaseSettings
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PGOUTBOX_"))}
    python = await asyncio.to_thread(_set_up, tmp_path, host_database, env)
    host = tmp_path / "host"

    schema = f"h_{uuid.uuid4().hex[:10]}"
    alembic: list[str | Path] = [python, "-m", "alembic", "-x", f"pgoutbox_schema={schema}"]
    heads = await asyncio.to_thread(_run, [*alembic, "heads"], host, env)
    assert f"{migrations.head_revision()} (pgoutbox) (head)" in heads
    assert "host_0001 (host) (head)" in heads

    # pgoutbox's branch alone first, then everything.
    await asyncio.to_thread(_run, [*alembic, "upgrade", "pgoutbox@head"], host, env)
    conn = await asyncpg.connect(**host_database.connect_kwargs())
    try:
        assert await conn.fetchval(f"SELECT to_regclass('{schema}.operations') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('public.host_orders')") is None
    finally:
        await conn.close()

    await asyncio.to_thread(_run, [*alembic, "upgrade", "heads"], host, env)

    conn = await asyncpg.connect(**host_database.connect_kwargs())
    try:
        assert await conn.fetchval("SELECT to_regclass('public.host_orders') IS NOT NULL")
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1", schema
        )
        # In a host the version table is the host's (public.alembic_version), not pgoutbox's.
        assert [r["tablename"] for r in tables] == [
            "audit_log",
            "lifecycle_transitions",
            "lifecycle_types",
            "lifecycles",
            "operations",
            "purges",
            "schema_revision",
            "workers",
        ]
        n_triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND NOT t.tgisinternal",
            schema,
        )
        assert n_triggers == 12  # the set listed in test_migrations.PGOUTBOX_TRIGGERS
        versions_rows = await conn.fetch("SELECT version_num FROM public.alembic_version")
        assert sorted(r["version_num"] for r in versions_rows) == sorted(
            [migrations.head_revision(), "host_0001"]
        )
        # The triggers work: an insert gets its audit row.
        await conn.execute(
            f"INSERT INTO {schema}.operations (operation_type, channel, payload) "
            "VALUES ('host.order', 'orders', '{}')"
        )
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.audit_log") == 1

        # pgoutbox's tables live outside the host's default schema, so the host's autogenerate
        # (which compares only that schema) has nothing to add or drop.
        await asyncio.to_thread(_run, [*alembic, "check"], host, env)
    finally:
        await conn.close()

    # Workers see the host-managed schema at head, and auto_migrate leaves it to the host.
    pgoutbox_db = host_database.model_copy(update={"schema_name": schema})
    assert await migrations.current(pgoutbox_db) == migrations.head_revision()
    await migrations.upgrade(pgoutbox_db)  # what WorkflowSystem.start() does: nothing here

    # pgoutbox's branch comes down on its own; here through versions_path() from Python, and
    # the schema chosen by the environment instead of -x.
    by_env = {**env, "PGOUTBOX_DATABASE__SCHEMA": schema}
    downgrade: list[str | Path] = [python, host / "migrate.py", "downgrade", "pgoutbox@base"]
    await asyncio.to_thread(_run, downgrade, host, by_env)
    conn = await asyncpg.connect(**host_database.connect_kwargs())
    try:
        assert await conn.fetchval("SELECT to_regclass('public.host_orders') IS NOT NULL")
        assert await conn.fetchval(f"SELECT to_regclass('{schema}.operations')") is None
        versions_rows = await conn.fetch("SELECT version_num FROM public.alembic_version")
        assert [r["version_num"] for r in versions_rows] == ["host_0001"]
    finally:
        await conn.close()
