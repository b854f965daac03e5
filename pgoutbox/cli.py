"""The ``pgoutbox`` command line.

Settings come from the same ``PGOUTBOX_*`` environment variables as :class:`pgoutbox.Settings`;
``--dsn`` and ``--schema``, before or after the command's name, override them. Expected failures
end as one ``Error: ...`` line and exit 1 or 2 (pgoutbox/cli_errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

import asyncpg
import click
from pydantic import ValidationError

from pgoutbox import cli_audit, cli_flow, cli_ops, integrity, migrations
from pgoutbox.cli_errors import (
    DATABASE_ERRORS,
    CliError,
    ReportingGroup,
    database_error,
    settings_error,
)
from pgoutbox.lifecycle import Lifecycle
from pgoutbox.router import WorkflowRouter
from pgoutbox.settings import DatabaseSettings, Settings, parse_dsn
from pgoutbox.sql import queries
from pgoutbox.worker import WorkflowSystem

T = TypeVar("T")


def _run(
    coro: Coroutine[Any, Any, T],
    *,
    settings: DatabaseSettings | None = None,
    fast_loop: bool = False,
) -> T:
    """Run a command's coroutine; a database that can't be reached or used exits 2 with a
    one-line reason naming ``settings``' server (exit 1 is kept for "the check failed", e.g. a
    broken audit chain). ``fast_loop``: on uvloop when it is installed (``pgoutbox[uvloop]``)."""
    try:
        with asyncio.Runner(loop_factory=_loop_factory() if fast_loop else None) as runner:
            return runner.run(coro)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): click ends the command quietly
    except DATABASE_ERRORS as exc:
        raise database_error(exc, settings) from exc


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop if it is installed, else asyncio's own (None)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


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
            raise settings_error(exc) from None

    def settings(self) -> Settings:
        """All settings (the worker's too) from the environment, with database()'s applied."""
        database = self.database()
        try:
            return Settings(database=database)
        except ValidationError as exc:
            raise settings_error(exc) from None


_DSN_HELP = "postgresql:// URL to connect to (default: PGOUTBOX_DATABASE__DSN)."
_SCHEMA_HELP = "pgoutbox's schema (default: PGOUTBOX_DATABASE__SCHEMA or pgoutbox)."


@click.group(cls=ReportingGroup)
@click.option("--dsn", envvar="PGOUTBOX_DATABASE__DSN", help=_DSN_HELP)
@click.option("--schema", help=_SCHEMA_HELP)
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
    _run(migrations.upgrade(settings, revision), settings=settings)
    current = _run(migrations.current(settings), settings=settings)
    click.echo(f"schema {settings.schema_name} is at {current}")


@db.command("current")
@click.pass_obj
def db_current(obj: _Context) -> None:
    """Print the revision the schema is at ('none' when pgoutbox is not installed)."""
    settings = obj.database()
    click.echo(_run(migrations.current(settings), settings=settings) or "none")


@db.command("check")
@click.pass_obj
def db_check(obj: _Context) -> None:
    """Exit 0 when the schema is at pgoutbox's head revision and its triggers and functions
    are the ones that revision installed (pgoutbox/integrity.py), 1 otherwise."""
    settings = obj.database()
    current = _run(migrations.current(settings), settings=settings)
    head = migrations.head_revision()
    if current != head:
        click.echo(
            f"schema {settings.schema_name} is at {current or 'none'}, not at head {head}: "
            "run `pgoutbox db upgrade`",
            err=True,
        )
        sys.exit(1)
    if integrity.report(_run(integrity.check(settings))):
        sys.exit(1)
    click.echo(f"schema {settings.schema_name} is at head {head}")


# -- least privilege: `db grant` (pgoutbox/roles.py, docs/security.md) --------------------------
@db.command("grant")
@click.option("--publisher", metavar="ROLE", help="May publish operations, nothing else.")
@click.option("--worker", metavar="ROLE", help="May run workers (claim, record, rescue).")
@click.option(
    "--operator", metavar="ROLE", help="May read everything; retry, cancel, replay, fire, purge."
)
@click.option("--auditor", metavar="ROLE", help="May read every pgoutbox table, write none.")
@click.pass_obj
def db_grant(
    obj: _Context,
    publisher: str | None,
    worker: str | None,
    operator: str | None,
    auditor: str | None,
) -> None:
    """Grant existing roles only what publishing, running workers, operating or auditing needs.

    Run as the schema owner, again after every upgrade. No role gets write access to the
    audit log."""
    from pgoutbox.roles import grant_roles

    if publisher is None and worker is None and auditor is None:
        raise click.UsageError("name at least one of --publisher, --worker, --auditor")
    settings = obj.database()
    # A RoleError (no such role) ends as one line, exit 2 (pgoutbox/cli_errors.py).
    statements = _run(
        grant_roles(
            settings, publisher=publisher, worker=worker, operator=operator, auditor=auditor
        ),
        settings=settings,
    )
    for statement in statements:
        click.echo(f"{statement};")


# -- end of `db grant` -------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """Verify the audit log and report from it."""


@audit.command("verify")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    help="Also prove that what this signed checkpoint covers is unchanged, and check every "
    "row's meaning (docs/audit.md).",
)
@click.option("--public-key", type=click.Path(dir_okay=False), help="The checkpoint's key.")
@click.option("--heads", type=click.Path(dir_okay=False), help="Default: the checkpoint's own.")
@click.option("--rules", is_flag=True, help="Check every row's meaning too, without a checkpoint.")
@click.option(
    "--archive",
    "archives",
    multiple=True,
    type=click.Path(file_okay=False),
    help="An archive's directory (repeatable): prove its files and where verification starts.",
)
@click.pass_obj
def audit_verify(
    obj: _Context,
    checkpoint: str | None,
    public_key: str | None,
    heads: str | None,
    rules: bool,
    archives: tuple[str, ...],
) -> None:
    """Recompute every hash chain and check the schema's triggers and functions; exit 1
    naming the first bad operation and seq and every weakened trigger or function. With
    --checkpoint and --public-key (or --rules alone): every problem, each naming operation, seq
    and rule."""
    if checkpoint is not None or public_key is not None or rules or archives:
        cli_audit.verify_against(obj, checkpoint, public_key, heads, archives)  # cli_audit.py
        return
    # A progress bar on stderr when it is a terminal (pgoutbox/cli_ops.py).
    result = cli_ops.run_verify(obj)
    if not result.ok:
        for failure in result.failures():  # a broken chain, then any weakened trigger/function
            click.echo(f"FAILED: {failure}", err=True)
        sys.exit(1)
    click.echo(f"OK: {result.rows} audit rows of {result.operations} operations verified")


@cli.command()
@click.argument("app")
@click.pass_obj
def worker(obj: _Context, app: str) -> None:
    """Run a WorkflowSystem for APP (`module:router` or `module:system`) until SIGTERM/SIGINT,
    then stop gracefully (exit 0, also when the signal comes during start-up). Runs on uvloop
    when it is installed (``pgoutbox[uvloop]``), which spends less of the worker's own CPU per
    operation (docs/benchmarks.md)."""
    # First of all: a process manager may stop the worker while it is still loading APP or
    # connecting, and that must end as orderly as a stop of a running worker.
    requested = _StopRequest()
    requested.install()
    system = _load_app(app, obj)
    _run(_serve(system, requested), fast_loop=True)


def _load_app(app: str, obj: _Context) -> WorkflowSystem:
    module_name, _, attribute = app.partition(":")
    if not module_name or not attribute:
        raise click.UsageError(f"invalid APP {app!r}: use module:attribute, e.g. myapp.jobs:router")
    # Like uvicorn: APP is looked up from the current directory too (a console script's
    # sys.path does not include it).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise click.UsageError(f"cannot load {app!r}: {exc}") from None
    if isinstance(target, WorkflowSystem):
        return target
    if isinstance(target, WorkflowRouter):
        return WorkflowSystem(router=target, settings=obj.settings())
    raise click.UsageError(f"{app!r} is a {type(target).__name__}, not a WorkflowRouter or system")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopRequest:
    """Remembers a SIGTERM or SIGINT that came while the worker had no event loop to handle it,
    instead of dying of it (SIGTERM) or raising KeyboardInterrupt (SIGINT) mid-import."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._record)
        # A supervisor can close the window before this point (interpreter start-up, importing
        # pgoutbox) by starting the worker with these signals blocked: they wait, pending,
        # until here, and are then recorded.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum


async def _serve(system: WorkflowSystem, requested: _StopRequest) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        # Looked at only now that the loop has the signals: one that came before is here, any
        # later one sets `stop`, so none falls between the two.
        if requested.signum is not None:
            name = signal.Signals(requested.signum).name
            click.echo(f"{name} before the worker started: not starting it", err=True)
            return
        # A signal during start() is honoured once it returns, by the ordinary stop, which
        # hands back whatever the new worker already claimed.
        await system.start()
        click.echo(f"worker {system.worker_id} running; SIGTERM or Ctrl-C stops it", err=True)
        await stop.wait()
        await system.stop()
    finally:
        # Closing the loop would restore the default actions: a second SIGTERM while the
        # process winds down would then kill it. Recording it keeps the exit status 0.
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        requested.install()


@cli.group()
def lifecycle() -> None:
    """Register operation types' lifecycles and show them as diagrams."""


@lifecycle.command("register")
@click.argument("app")
@click.pass_obj
def lifecycle_register(obj: _Context, app: str) -> None:
    """Register the lifecycles of APP's operation types (`module:router` or `module:system`),
    as the schema owner. Idempotent; a change that would strand operations is refused, naming
    them (exit 1)."""
    from pgoutbox.registry import Registered, register

    system = _load_app(app, obj)
    settings = obj.database()

    async def go() -> Registered:
        conn = await asyncpg.connect(**settings.connect_kwargs())
        try:
            return await register(
                conn, queries(settings.schema_name), settings.schema_name, system.handlers
            )
        finally:
            await conn.close()

    # A refused change (LifecycleRegistryError) ends as one line, exit 1.
    done = _run(go(), settings=settings)
    for name, version in sorted(done.versions.items()):
        click.echo(f"lifecycle {name}: registered version {version}")
    for operation_type, name in sorted(done.types.items()):
        click.echo(f"operation type {operation_type}: runs lifecycle {name}")
    if not done.versions and not done.types:
        click.echo("already registered: nothing changed")


@lifecycle.command("show")
@click.argument("operation_type")
@click.option(
    "--all-transitions",
    is_flag=True,
    help="Also draw the retry, rescue, release and replay edges the database allows.",
)
@click.pass_obj
def lifecycle_show(obj: _Context, operation_type: str, all_transitions: bool) -> None:
    """Print OPERATION_TYPE's lifecycle, as registered in the database, as a Mermaid state
    diagram (types never registered run the default lifecycle)."""
    from pgoutbox.registry import lifecycle_of_type

    settings = obj.database()

    async def go() -> tuple[Lifecycle, int | None]:
        conn = await asyncpg.connect(**settings.connect_kwargs())
        try:
            return await lifecycle_of_type(conn, queries(settings.schema_name), operation_type)
        finally:
            await conn.close()

    found, version = _run(go(), settings=settings)
    which = f"version {version}" if version is not None else "built in"
    click.echo(f"%% {operation_type} runs lifecycle {found.name} ({which})")
    if found.parking:
        parked = ", ".join(sorted(found.parking))
        click.echo(f"%% parking states (fire a trigger to move on): {parked}")
    for state, timeout in sorted(found.timeouts.items()):
        click.echo(f"%% {state} times out after {timeout.after} with {timeout.trigger}")
    click.echo(found.mermaid(machinery=all_transitions))


@cli.command()
@click.option(
    "--web",
    "web_port",
    type=click.IntRange(1, 65535),
    is_flag=False,
    flag_value=8080,
    default=None,
    help="Then serve the web console on the demo's data (port 8080, or --web=PORT) until "
    "Ctrl-C, acting as you.",
)
@click.pass_obj
def demo(obj: _Context, web_port: int | None) -> None:
    """Run a worker and three operations on an embedded PostgreSQL (or --dsn), show them
    change state live, then print an audit trail and verify every hash chain. With --dsn it
    works in a throwaway schema that it drops afterwards."""
    from pgoutbox.demo import run_demo
    from pgoutbox.embedded import EmbeddedUnavailableError

    if obj.schema:
        # The demo drops the schema it used: it must never be one the user named.
        raise CliError(
            f"--schema {obj.schema} is not used by the demo: it creates a throwaway schema "
            "pgoutbox_demo_... and drops it afterwards; leave --schema out"
        )
    settings = obj.database() if obj.dsn else None  # an invalid --dsn fails here, in one line
    try:
        verified = _run(run_demo(obj.dsn, then=_demo_console(web_port)), settings=settings)
    except EmbeddedUnavailableError as exc:
        reason = str(exc).rstrip(". ")
        raise CliError(
            f"cannot start an embedded PostgreSQL for the demo: {reason}. On a server you "
            "have: pgoutbox demo --dsn postgresql://USER@HOST/DATABASE"
        ) from exc
    if not verified:
        sys.exit(1)


def _demo_console(port: int | None) -> Callable[[DatabaseSettings], Awaitable[None]] | None:
    """``demo --web``: the console on the demo's schema, acting as the user running it."""
    if port is None:
        return None

    async def serve_console(database: DatabaseSettings) -> None:
        web = _web_module()
        click.echo(f"\nWeb console: http://localhost:{port}/  (Ctrl-C stops it and the demo)")
        with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
            await web.serve(
                database, port=port, actor=web.actor_hook(cli_ops._default_actor(), None)
            )

    return serve_console


def _web_module() -> Any:
    try:
        from pgoutbox.web import server
    except ImportError as exc:
        raise CliError(
            f"the web console needs the web extra ({exc.name} is missing): "
            "pip install 'pgoutbox[web]'"
        ) from exc
    return server


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--actor", help="Everyone using this console acts as ACTOR (a console of your own).")
@click.option(
    "--actor-header",
    metavar="HEADER",
    help="Who acts is the name an authenticating proxy in front sets in HEADER.",
)
@click.option("--read-only", is_flag=True, help="No actions, whatever --actor says (auditors).")
@click.pass_obj
def web(
    obj: _Context,
    host: str,
    port: int,
    actor: str | None,
    actor_header: str | None,
    read_only: bool,
) -> None:
    """Serve the web console (pgoutbox[web]). Without --actor or --actor-header it is read-only:
    the console has no login of its own."""
    settings = obj.database()
    server = _web_module()
    try:
        hook = server.actor_hook(actor, actor_header)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    mode = "read-only" if read_only or hook is None else "actions on"
    click.echo(f"pgoutbox web console on http://{host}:{port}/ ({mode}); Ctrl-C stops it")
    _run(
        server.serve(settings, host=host, port=port, actor=hook, read_only=read_only),
        settings=settings,
    )


# -- operator tools: `ops`, `audit report`, `stats`, `workers` (pgoutbox/cli_ops.py) -----------
cli_ops.register(cli, audit)
cli_flow.register(cli)  # `pause`, `resume`, `limits` (pgoutbox/cli_flow.py)
cli_audit.register(audit)  # `audit keygen/checkpoint/prove/check-proof/as-of` (cli_audit.py)


def _accept_database_options_after_commands(group: click.Group) -> None:
    """Let every command take --dsn and --schema after its name too (``pgoutbox demo --dsn
    URL``), not only before it: one pair of options added to each command of the tree, setting
    the same :class:`_Context` as the group's. Given in both places, the later one wins."""

    def store(field: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
        def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
            obj = ctx.find_object(_Context)
            if obj is not None and value is not None:
                setattr(obj, field, value)

        return callback

    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_database_options_after_commands(command)
            continue
        # No envvar here: the environment is the group option's default, and must not undo a
        # --dsn given before the command.
        command.params += [
            click.Option(["--dsn"], help=_DSN_HELP, callback=store("dsn"), expose_value=False),
            click.Option(
                ["--schema"], help=_SCHEMA_HELP, callback=store("schema"), expose_value=False
            ),
        ]


_accept_database_options_after_commands(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pgoutbox`` console script; ``argv`` defaults to ``sys.argv[1:]``."""
    cli.main(args=argv, prog_name="pgoutbox")
