"""How the ``pgoutbox`` command reports the failures it expects.

An expected failure -- a database that cannot be reached, invalid settings, a schema not at
head, no way to start an embedded server, an action a lifecycle refused, a role the database
denies, input the database refuses as invalid -- reaches the user as one line on standard error,
``Error: <what went wrong and what to do>``, and an exit code: 1 when a check failed or an
action did not happen (a refusal, a permission denied), 2 for everything else (see
docs/cli.md). Any other exception is a bug and keeps its traceback.

Values read from the database are shown to people with their control characters escaped
(:func:`visible`): in tables and in these error lines alike.

:class:`ReportingGroup` is the ``pgoutbox`` group; commands raise :class:`CliError`, or let
pgoutbox's own exceptions through to it.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import click
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pgoutbox.admin import AdminError
from pgoutbox.embedded import EmbeddedUnavailableError
from pgoutbox.fire import FireRefused
from pgoutbox.lifecycle import LifecycleError
from pgoutbox.migrations import SchemaManagedByHost
from pgoutbox.registry import LifecycleRegistryError
from pgoutbox.roles import RoleError
from pgoutbox.router import RouterError
from pgoutbox.settings import DatabaseSettings
from pgoutbox.worker import SchemaNotReady

# Errors of a database that could not be reached or used. OSError covers refused connections,
# unknown hosts and timeouts.
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, SQLAlchemyError)

# Errors that happen while connecting: the settings point at the wrong place, or nobody is there.
_CONNECT_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidAuthorizationSpecificationError,  # no such role, wrong password
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.TooManyConnectionsError,
)


# C0 controls, DEL and C1 controls: what a terminal may act on instead of printing (ESC starts
# a sequence that can clear the screen or recolour what follows; CR and LF can start a fake
# line). The C1 range matters too: some terminals take U+009B alone as the start of a sequence.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) written as a visible escape --
    ``\\n``, ``\\r``, ``\\t``, else ``\\x1b`` style -- so that a value from the database (a
    payload, an error, an actor, an idempotency key) cannot move the cursor, recolour or clear
    the terminal, or start a line of its own. Everything else, backslashes included, is kept as
    it is: the function is idempotent, and ordinary text (paths, regexes) reads unchanged."""
    return _CONTROL.sub(
        lambda match: _NAMED_CONTROLS.get(match[0], f"\\x{ord(match[0]):02x}"), text
    )


class CliError(click.ClickException):
    """An expected failure of a command: printed as one ``Error: ...`` line on standard error,
    then the command exits 2 (pgoutbox could not be used as configured)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line whatever the source: some messages (SQLAlchemy's, PostgreSQL's details)
        # span several. Messages quote values from the database (a worker id, a role name, the
        # server's own text): any control character left is escaped, not sent to the terminal.
        parts = (part.strip() for part in message.splitlines())
        super().__init__(visible("; ".join(part for part in parts if part)))


class Refused(CliError):
    """An action that did not happen or a lookup that found nothing: like :class:`CliError`,
    but exit 1."""

    exit_code = 1


# pgoutbox's own exceptions a command may end with, and how each is reported. Their messages
# already say what is wrong and what to do.
EXPECTED: tuple[tuple[type[Exception], type[CliError]], ...] = (
    (AdminError, Refused),  # OperationNotFound, TransitionRefused
    (FireRefused, Refused),
    (LifecycleRegistryError, Refused),
    (EmbeddedUnavailableError, CliError),
    (SchemaNotReady, CliError),
    (SchemaManagedByHost, CliError),
    (RoleError, CliError),
    (RouterError, CliError),  # an APP whose router is invalid
    (LifecycleError, CliError),  # an APP whose lifecycle is invalid
)


class ReportingGroup(click.Group):
    """A command group that turns the expected failures of its commands into :class:`CliError`
    (through :func:`as_cli_error`); only the outermost group needs to be one."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; an expected failure becomes one line and an exit code."""
        try:
            return super().invoke(ctx)
        except CliError:
            raise
        except Exception as exc:
            error = as_cli_error(exc)
            if error is None:
                raise
            raise error from exc


def as_cli_error(exc: BaseException) -> CliError | None:
    """The :class:`CliError` an exception of pgoutbox's own stands for, or None when it is not
    one the command line expects (a bug, which should show its traceback)."""
    for kind, error in EXPECTED:
        if isinstance(exc, kind):
            return error(str(exc))
    return None


def database_error(exc: BaseException, settings: DatabaseSettings | None) -> CliError:
    """The one-line error for a database that could not be reached or used, or that refused
    what the command asked; ``settings`` (if known) say which database was meant, without the
    password.

    The one place the command line tells a database's errors apart:

    * a schema not at head, a server that cannot be reached: exit 2, saying what to check;
    * insufficient privilege (SQLSTATE 42501: a missing GRANT, or pgoutbox's triggers refusing
      a transition to a role not granted its kind): exit 1, naming the command and the role --
      the database is fine, this role may not do this;
    * a data exception (class 22, e.g. a value out of range, text that is not valid UTF-8) or a
      check violation (23514, as pgoutbox's triggers raise for a row they refuse): bad input,
      exit 2;
    * anything else: the database is unavailable or not usable, exit 2.
    """
    exc = _postgres_error(exc)
    reason = f"{type(exc).__name__}: {exc}"
    where = f" at {describe(settings)}" if settings is not None else ""
    if isinstance(exc, (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError)):
        schema = settings.schema_name if settings is not None else "pgoutbox"
        return CliError(
            f"schema {schema} is not at pgoutbox's head revision ({exc}): run `pgoutbox db upgrade`"
        )
    if isinstance(exc, _CONNECT_ERRORS):
        return CliError(
            f"cannot connect to PostgreSQL{where}: {reason}; check --dsn (or "
            "PGOUTBOX_DATABASE__DSN) and that the server is running and accepts connections"
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return Refused(
            f"permission denied for {_command()}{_on(settings)}: "
            + _server_message(exc, default_hint=_grant_hint(settings))
        )
    if isinstance(exc, (asyncpg.DataError, asyncpg.CheckViolationError)):
        return CliError(f"invalid input for {_command()}: {_server_message(exc)}")
    return CliError(f"database unavailable or not usable{where}: {reason}")


# The commands that change operations: an operator role's (the others of `ops`, `stats`,
# `workers` and `audit` only read, which an auditor role may).
_OPERATOR_COMMANDS = frozenset({"ops retry", "ops cancel", "ops replay", "ops fire", "ops purge"})


def _grant_hint(settings: DatabaseSettings | None) -> str:
    """What to do about a plain "permission denied" (a missing GRANT, where the server gives
    no hint of its own): which ``pgoutbox db grant`` the command needs, for the role used."""
    command = _command().removeprefix("pgoutbox ")
    if command.startswith(("db ", "lifecycle register")):
        return "run it as the role that owns the schema (docs/security.md)"
    kind = "auditor"
    if command in _OPERATOR_COMMANDS:
        kind = "operator"
    elif command == "worker":
        kind = "worker"
    role = settings.user if settings is not None else "ROLE"
    return f"the schema's owner grants it: pgoutbox db grant --{kind} {role} (docs/security.md)"


def _postgres_error(exc: BaseException) -> BaseException:
    """The database's own error inside SQLAlchemy's wrappers (``db upgrade`` runs through
    SQLAlchemy): DBAPIError adds a multi-line preamble around the driver's adapted error, whose
    cause is asyncpg's, with the SQLSTATE class this module tells errors apart by."""
    if isinstance(exc, DBAPIError) and isinstance(exc.orig, BaseException):
        exc = exc.orig
        if isinstance(exc.__cause__, asyncpg.PostgresError):
            exc = exc.__cause__
    return exc


def _server_message(exc: BaseException, default_hint: str | None = None) -> str:
    """The server's message without the ``HINT:`` lines asyncpg appends to ``str()``, then
    the hint on the same line, if the server gave one (else ``default_hint``)."""
    message = getattr(exc, "message", None) or (str(exc.args[0]) if exc.args else str(exc))
    hint = getattr(exc, "hint", None) or default_hint
    return f"{message}; hint: {hint}" if hint else message


def _command() -> str:
    """The command being run, ``pgoutbox ops cancel``, for messages."""
    ctx = click.get_current_context(silent=True)
    return ctx.command_path if ctx is not None else "pgoutbox"


def _on(settings: DatabaseSettings | None) -> str:
    """`` in schema S at HOST:PORT (database D) as role R``: where a permission was denied,
    and to whom (the role is the one connected as: the one to grant to)."""
    if settings is None:
        return ""
    return (
        f" in schema {settings.schema_name} at {_server(settings)} (database "
        f"{settings.database}) as role {settings.user}"
    )


def describe(settings: DatabaseSettings) -> str:
    """Which database ``settings`` mean, for messages: ``127.0.0.1:5432 (database app, user
    app)``, or the socket directory for a Unix socket; never the password."""
    return f"{_server(settings)} (database {settings.database}, user {settings.user})"


def _server(settings: DatabaseSettings) -> str:
    if settings.host.startswith("/"):
        return f"the Unix socket in {settings.host} (port {settings.port})"
    return f"{settings.host}:{settings.port}"


def settings_error(exc: ValidationError | ValueError) -> CliError:
    """One line for settings that do not validate, naming each bad field and why."""
    if isinstance(exc, ValidationError):
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {message}" if field else message)
        return CliError("invalid settings: " + "; ".join(problems))
    return CliError(f"invalid settings: {exc}")
