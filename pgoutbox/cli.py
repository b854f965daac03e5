"""The ``pgoutbox`` command line.

Settings come from the same ``PGOUTBOX_*`` environment variables as :class:`pgoutbox.Settings`;
``--dsn`` and ``--schema`` override them.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg
import click
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from pgoutbox import cli_ops, migrations
from pgoutbox.router import WorkflowRouter
from pgoutbox.settings import DatabaseSettings, Settings, parse_dsn
from pgoutbox.worker import WorkflowSystem

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; a database that can't be reached or used exits 2 with a
    one-line reason (exit 1 is kept for "the check failed", e.g. a broken audit chain)."""
    try:
        return asyncio.run(coro)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, SQLAlchemyError) as exc:
        click.echo(
            f"error: database unavailable or not usable: {type(exc).__name__}: {exc}", err=True
        )
        sys.exit(2)


class _Context:
    def __init__(self, dsn: str | None, schema: str | None) -> None:
        self.dsn = dsn
        self.schema = schema

    def database(self) -> DatabaseSettings:
        """Settings from the environment, with --dsn and --schema applied on top."""
        try:
            overrides: dict[str, Any] = {}
            if self.dsn:
                overrides.update(parse_dsn(self.dsn), dsn=self.dsn)
            if self.schema:
                overrides["schema_name"] = self.schema
            base = Settings().database
            return DatabaseSettings.model_validate({**base.model_dump(), **overrides})
        except (ValidationError, ValueError) as exc:
            raise click.UsageError(f"invalid settings: {exc}") from None


@click.group()
@click.option("--dsn", envvar="PGOUTBOX_DATABASE__DSN", help="postgresql:// URL to connect to.")
@click.option(
    "--schema", help="pgoutbox's schema (default: PGOUTBOX_DATABASE__SCHEMA or pgoutbox)."
)
@click.pass_context
def cli(ctx: click.Context, dsn: str | None, schema: str | None) -> None:
    """pgoutbox: PostgreSQL-backed outbox and workflow engine."""
    ctx.obj = _Context(dsn, schema)


@cli.group()
def db() -> None:
    """Create and upgrade pgoutbox's schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_obj
def db_upgrade(obj: _Context, revision: str) -> None:
    """Bring the schema to REVISION (default: head), creating it if needed."""
    settings = obj.database()
    _run(migrations.upgrade(settings, revision))
    click.echo(f"schema {settings.schema_name} is at {_run(migrations.current(settings))}")


@db.command("current")
@click.pass_obj
def db_current(obj: _Context) -> None:
    """Print the revision the schema is at ('none' when pgoutbox is not installed)."""
    click.echo(_run(migrations.current(obj.database())) or "none")


@db.command("check")
@click.pass_obj
def db_check(obj: _Context) -> None:
    """Exit 0 when the schema is at pgoutbox's head revision, 1 otherwise."""
    settings = obj.database()
    current = _run(migrations.current(settings))
    head = migrations.head_revision()
    if current != head:
        click.echo(
            f"schema {settings.schema_name} is at {current or 'none'}, not at head {head}: "
            "run `pgoutbox db upgrade`",
            err=True,
        )
        sys.exit(1)
    click.echo(f"schema {settings.schema_name} is at head {head}")


# -- least privilege: `db grant` (pgoutbox/roles.py, docs/security.md) --------------------------
@db.command("grant")
@click.option("--publisher", metavar="ROLE", help="May publish operations, nothing else.")
@click.option("--worker", metavar="ROLE", help="May run workers (claim, record, rescue).")
@click.option("--auditor", metavar="ROLE", help="May read every pgoutbox table, write none.")
@click.pass_obj
def db_grant(obj: _Context, publisher: str | None, worker: str | None, auditor: str | None) -> None:
    """Grant existing roles only what publishing, running workers or auditing needs.

    Run as the schema owner, again after every upgrade. No role gets write access to the
    audit log."""
    from pgoutbox.roles import RoleError, grant_roles

    if publisher is None and worker is None and auditor is None:
        raise click.UsageError("name at least one of --publisher, --worker, --auditor")
    settings = obj.database()
    try:
        statements = _run(
            grant_roles(settings, publisher=publisher, worker=worker, auditor=auditor)
        )
    except RoleError as exc:
        raise click.UsageError(str(exc)) from None
    for statement in statements:
        click.echo(f"{statement};")


# -- end of `db grant` -------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """Verify the audit log and report from it."""


@audit.command("verify")
@click.pass_obj
def audit_verify(obj: _Context) -> None:
    """Recompute every hash chain; exit 1 naming the first bad operation and seq."""
    # A progress bar on stderr when it is a terminal (pgoutbox/cli_ops.py).
    result = cli_ops.run_verify(obj)
    if result.problem is not None:
        click.echo(f"FAILED: {result.problem}", err=True)
        sys.exit(1)
    click.echo(f"OK: {result.rows} audit rows of {result.operations} operations verified")


@cli.command()
@click.argument("app")
@click.pass_obj
def worker(obj: _Context, app: str) -> None:
    """Run a WorkflowSystem for APP (`module:router` or `module:system`) until SIGTERM/SIGINT,
    then stop gracefully."""
    system = _load_app(app, obj)
    _run(_serve(system))


def _load_app(app: str, obj: _Context) -> WorkflowSystem:
    module_name, _, attribute = app.partition(":")
    if not module_name or not attribute:
        raise click.UsageError(f"invalid APP {app!r}: use module:attribute, e.g. myapp.jobs:router")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise click.UsageError(f"cannot load {app!r}: {exc}") from None
    if isinstance(target, WorkflowSystem):
        return target
    if isinstance(target, WorkflowRouter):
        return WorkflowSystem(router=target, settings=Settings(database=obj.database()))
    raise click.UsageError(f"{app!r} is a {type(target).__name__}, not a WorkflowRouter or system")


async def _serve(system: WorkflowSystem) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await system.start()
    click.echo(f"worker {system.worker_id} running; SIGTERM or Ctrl-C stops it", err=True)
    await stop.wait()
    await system.stop()


@cli.command()
@click.pass_obj
def demo(obj: _Context) -> None:
    """Run a worker and three operations on an embedded PostgreSQL (or --dsn), show them
    change state live, then print an audit trail and verify every hash chain."""
    from pgoutbox.demo import run_demo

    if not _run(run_demo(obj.dsn)):
        sys.exit(1)


# -- operator tools: `ops`, `audit report`, `stats`, `workers` (pgoutbox/cli_ops.py) -----------
cli_ops.register(cli, audit)


def main() -> None:
    """Entry point of the ``pgoutbox`` console script."""
    cli()
