"""The ``pgoutbox`` command line.

Settings come from the same ``PGOUTBOX_*`` environment variables as :class:`pgoutbox.Settings`;
``--dsn`` and ``--schema`` override them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from pgoutbox import migrations
from pgoutbox.audit import verify
from pgoutbox.settings import DatabaseSettings, Settings

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class _Context:
    def __init__(self, dsn: str | None, schema: str | None) -> None:
        self.dsn = dsn
        self.schema = schema

    def database(self) -> DatabaseSettings:
        try:
            base = Settings().database
            overrides: dict[str, Any] = {}
            if self.dsn:
                overrides = {**base.model_dump(exclude={"dsn"}), "dsn": self.dsn}
                overrides.update({k: v for k, v in _dsn_fields(self.dsn).items()})
            if self.schema:
                overrides["schema_name"] = self.schema
            return DatabaseSettings(**{**base.model_dump(), **overrides}) if overrides else base
        except (ValidationError, ValueError) as exc:
            raise click.UsageError(f"invalid settings: {exc}") from None


def _dsn_fields(dsn: str) -> dict[str, Any]:
    from pgoutbox.settings import parse_dsn

    return parse_dsn(dsn)


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


@cli.group()
def audit() -> None:
    """Check the audit log."""


@audit.command("verify")
@click.pass_obj
def audit_verify(obj: _Context) -> None:
    """Recompute every hash chain; exit 1 naming the first bad operation and seq."""
    result = _run(verify(obj.database()))
    if result.problem is not None:
        click.echo(f"FAILED: {result.problem}", err=True)
        sys.exit(1)
    click.echo(f"OK: {result.rows} audit rows of {result.operations} operations verified")


@cli.command()
@click.pass_obj
def demo(obj: _Context) -> None:
    """Run a worker and three operations on an embedded PostgreSQL (or --dsn), show them
    change state live, then print an audit trail and verify every hash chain."""
    from pgoutbox.demo import run_demo

    if not _run(run_demo(obj.dsn)):
        sys.exit(1)


def main() -> None:
    """Entry point of the ``pgoutbox`` console script."""
    cli()
