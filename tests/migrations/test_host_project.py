"""A host application's Alembic history runs pgoutbox's migrations from an installed wheel.

The wheel is built from this checkout once and installed into a new virtualenv; the host project
is a plain async Alembic environment (nothing pgoutbox-specific in its env.py) whose
``version_locations`` names pgoutbox's versions directory. docs/migrations.md quotes these files,
and the host's first revision is made with the commands that file shows, read from it.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import URL

from pgoutbox import migrations
from pgoutbox.settings import DatabaseSettings, parse_dsn

CHECKOUT = Path(__file__).resolve().parents[2]
DOC = CHECKOUT / "docs" / "migrations.md"

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

PGOUTBOX_TABLES = [
    "audit_archive_heads",
    "audit_archives",
    "audit_checkpoints",
    "audit_log",
    "flow_buckets",
    "flow_limits",
    "flow_overrides",
    "flow_pauses",
    "lifecycle_transitions",
    "lifecycle_types",
    "lifecycles",
    "operations",
    "purges",
    "role_grants",
    "schema_revision",
    "workers",
]

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


def _clean_env() -> dict[str, str]:
    """This environment without the dev venv's PYTHON* settings or any PGOUTBOX_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PGOUTBOX_"))}


@dataclass(frozen=True)
class InstalledWheel:
    python: Path  # the new virtualenv's interpreter
    versions: Path  # pgoutbox.migrations.versions_path() as the installed package answers it


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """The wheel built from this checkout, installed into a new venv (once for this module)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = _clean_env()
    python = _install_wheel_in_new_venv(tmp, env)
    location = _run(
        [python, "-c", "import pgoutbox.migrations as m; print(m.__file__, m.versions_path())"],
        tmp,
        env,
    )
    module_file, versions = (Path(part) for part in location.split())
    assert module_file.is_relative_to(tmp / "venv")
    assert not module_file.is_relative_to(CHECKOUT)
    assert (versions / "0001_initial.py").is_file()
    return InstalledWheel(python, versions)


def _sqlalchemy_url(database: DatabaseSettings) -> str:
    """The database as an alembic.ini ``sqlalchemy.url`` value (``%`` doubled for the ini)."""
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
    return url.replace("%", "%%")


def _write_host_project(host: Path, database: DatabaseSettings) -> None:
    versions = host / "migrations" / "versions"
    versions.mkdir(parents=True)
    (host / "alembic.ini").write_text(HOST_ALEMBIC_INI.format(url=_sqlalchemy_url(database)))
    (host / "migrations" / "env.py").write_text(HOST_ENV_PY)
    (versions / "host_0001_orders.py").write_text(HOST_REVISION)
    (host / "migrate.py").write_text(HOST_MIGRATE_PY)


async def test_host_alembic_upgrade_heads_creates_host_and_pgoutbox_tables_from_a_wheel(
    tmp_path: Path, host_database: DatabaseSettings, installed_wheel: InstalledWheel
) -> None:
    env = _clean_env()
    python = installed_wheel.python
    host = tmp_path / "host"
    await asyncio.to_thread(_write_host_project, host, host_database)

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
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 "
            "AND NOT to_regclass(quote_ident(schemaname) || '.' || quote_ident(tablename))"
            "::oid IN (SELECT inhrelid FROM pg_inherits) ORDER BY 1",
            schema,
        )
        # In a host the version table is the host's (public.alembic_version), not pgoutbox's.
        assert [r["tablename"] for r in tables] == PGOUTBOX_TABLES
        n_triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND NOT t.tgisinternal AND NOT c.relispartition",
            schema,
        )
        assert n_triggers == 21  # the set listed in test_migrations.PGOUTBOX_TRIGGERS
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


# --- The host's first revision, as docs/migrations.md shows it --------------------------------

# What the developer writes in place of the template's empty upgrade() and downgrade().
HOST_ORDERS_BODY = """\
def upgrade() -> None:
    op.create_table(
        "host_orders",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("item", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("host_orders")
"""


def _doc_blocks(heading: str, language: str) -> list[str]:
    """The fenced ``language`` blocks under ``heading`` in docs/migrations.md, up to the next
    heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    blocks: list[str] = []
    inside = False
    fence: str | None = None  # the language of the fenced block being read, if any
    lines: list[str] = []
    for line in DOC.read_text().splitlines():
        if fence is not None:
            if line != "```":
                lines.append(line)
                continue
            if inside and fence == language:
                blocks.append("\n".join(lines) + "\n")
            fence = None
        elif line.startswith("```"):
            fence, lines = line.removeprefix("```"), []
        elif line == heading:
            inside = True
        elif inside and re.match(rf"#{{1,{level}}} ", line):
            break
    assert blocks, f"no {language} block under {heading!r} in {DOC}"
    return blocks


def _documented_commands() -> list[list[str]]:
    """The commands of "The host's first revision", each split as a shell would."""
    (block,) = _doc_blocks("### The host's first revision", "sh")
    commands = [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]
    assert commands, block
    assert all(words[0] == "alembic" for words in commands), commands
    return commands


def _configure_as_documented(host: Path, database: DatabaseSettings) -> None:
    """Edit what ``alembic init`` wrote as the doc says: its alembic.ini settings (with the test
    database's URL) and its env.py."""
    section = "## Inside a host project's Alembic history"
    (doc_ini,) = _doc_blocks(section, "ini")
    (env_py,) = [b for b in _doc_blocks(section, "python") if "context.configure(" in b]
    settings = configparser.ConfigParser(interpolation=None)
    settings.read_string(doc_ini)
    ini = configparser.ConfigParser(interpolation=None)
    assert ini.read(host / "alembic.ini")
    for key, value in settings["alembic"].items():
        ini["alembic"][key] = value
    ini["alembic"]["sqlalchemy.url"] = _sqlalchemy_url(database)
    with (host / "alembic.ini").open("w") as f:
        ini.write(f)
    (host / "migrations" / "env.py").write_text(env_py)


def _generated(output: str) -> Path:
    """The revision file named by ``alembic revision``'s "Generating <path> ...  done"."""
    match = re.search(r"^Generating (.+\.py) \.\.\.", output, re.MULTILINE)
    assert match, output
    return Path(match[1]).resolve()


def _revision_id(script: Path) -> str:
    match = re.search(r"^revision\b[^=\n]*= ['\"]([^'\"]+)['\"]", script.read_text(), re.MULTILINE)
    assert match, script.read_text()
    return match[1]


def _plain_revision_lands_in_the_package(
    wheel: InstalledWheel, host: Path, env: dict[str, str]
) -> None:
    """The trap: without --head base the revision continues pgoutbox's branch, in its directory."""
    alembic: list[str | Path] = [wheel.python, "-m", "alembic"]
    trapped = _generated(_run([*alembic, "revision", "-m", "host orders"], host, env))
    try:
        assert trapped.parent == wheel.versions.resolve()
        assert not list((host / "migrations" / "versions").glob("*.py"))
        # One head, the host's revision, labelled pgoutbox's.
        heads = _run([*alembic, "heads"], host, env)
        assert heads.splitlines() == [f"{_revision_id(trapped)} (pgoutbox) (head)"]
    finally:
        trapped.unlink()
        for cached in (trapped.parent / "__pycache__").glob(f"{trapped.stem}.*"):
            cached.unlink()


def _follow_the_doc(
    wheel: InstalledWheel, host: Path, database: DatabaseSettings, env: dict[str, str]
) -> list[str]:
    """Run the documented commands in ``host``; return the host revisions they made, in order."""
    host.mkdir()
    host_versions = host / "migrations" / "versions"
    revisions: list[str] = []
    for words in _documented_commands():
        output = _run([wheel.python, "-m", "alembic", *words[1:]], host, env)
        subcommand = words[1]
        if subcommand == "init":
            _configure_as_documented(host, database)
            _plain_revision_lands_in_the_package(wheel, host, env)
        elif subcommand == "revision":
            script = _generated(output)
            if script.parent != host_versions.resolve():
                script.unlink()  # the venv is shared with the module's other test
                pytest.fail(f"`{shlex.join(words)}` wrote {script}, not into {host_versions}")
            assert not script.is_relative_to(wheel.versions.parent.parent.resolve())
            text = script.read_text()
            if not revisions:
                # The first starts the host's own branch; the developer writes its body.
                assert re.search(r"^down_revision\b.*= None$", text, re.MULTILINE), text
                script.write_text(text[: text.index("def upgrade(")] + HOST_ORDERS_BODY)
            else:
                assert f"Revises: {revisions[-1]}\n" in text
            revisions.append(_revision_id(script))
        elif subcommand == "heads":
            assert sorted(output.splitlines()) == sorted(
                [
                    f"{revisions[-1]} (host) (head)",
                    f"{migrations.head_revision()} (pgoutbox) (head)",
                ]
            )
            # With two heads the trap is closed: a plain revision is refused, not misplaced.
            plain = subprocess.run(
                [wheel.python, "-m", "alembic", "revision", "-m", "host orders"],
                cwd=host,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert plain.returncode != 0
            assert "Multiple heads are present" in plain.stdout + plain.stderr
        else:
            assert subcommand == "upgrade", words
    assert [w[1] for w in _documented_commands()].count("revision") == len(revisions) == 2
    # pgoutbox's own directory holds only what the wheel installed.
    assert not {p.name for p in wheel.versions.glob("*.py")} - {
        p.name for p in Path(migrations.versions_path()).glob("*.py")
    }
    return revisions


async def test_documented_first_host_revision_starts_a_branch_in_the_hosts_directory(
    tmp_path: Path, host_database: DatabaseSettings, installed_wheel: InstalledWheel
) -> None:
    host = tmp_path / "host"
    revisions = await asyncio.to_thread(
        _follow_the_doc, installed_wheel, host, host_database, _clean_env()
    )

    # The documented `alembic upgrade heads`, on a new database, made pgoutbox's tables (in its
    # default schema) and the host's, and recorded one head per branch.
    conn = await asyncpg.connect(**host_database.connect_kwargs())
    try:
        tables = await conn.fetch(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname IN ('public', 'pgoutbox') AND NOT to_regclass(quote_ident("
            "schemaname) || '.' || quote_ident(tablename))::oid IN (SELECT inhrelid FROM "
            "pg_inherits) ORDER BY 1, 2"
        )
        assert [(r["schemaname"], r["tablename"]) for r in tables] == [
            *(("pgoutbox", t) for t in PGOUTBOX_TABLES),
            ("public", "alembic_version"),
            ("public", "host_orders"),
        ]
        versions_rows = await conn.fetch("SELECT version_num FROM public.alembic_version")
        assert sorted(r["version_num"] for r in versions_rows) == sorted(
            [migrations.head_revision(), revisions[0]]
        )
    finally:
        await conn.close()
