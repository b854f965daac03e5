"""How the ``pgoutbox`` command reports the failures it expects.

An expected failure -- a database that cannot be reached, invalid settings, a schema not at
head, no way to start an embedded server, an action a lifecycle refused -- reaches the user as
one line on standard error, ``Error: <what went wrong and what to do>``, and an exit code: 1
when a check failed or an action did not happen, 2 for everything else (see docs/cli.md). Any
other exception is a bug and keeps its traceback.

:class:`ReportingGroup` is the ``pgoutbox`` group; commands raise :class:`CliError`, or let
pgoutbox's own exceptions through to it.
"""

from __future__ import annotations

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


class CliError(click.ClickException):
    """An expected failure of a command: printed as one ``Error: ...`` line on standard error,
    then the command exits 2 (pgoutbox could not be used as configured)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line whatever the source: some messages (SQLAlchemy's, PostgreSQL's details)
        # span several.
        super().__init__("; ".join(part.strip() for part in message.splitlines() if part.strip()))


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
    """The one-line error for a database that could not be reached or used; ``settings`` (if
    known) say which database was meant, without the password."""
    if isinstance(exc, DBAPIError) and isinstance(exc.orig, BaseException):
        exc = exc.orig  # SQLAlchemy's wrapper adds a multi-line preamble; the cause is inside
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
    return CliError(f"database unavailable or not usable{where}: {reason}")


def describe(settings: DatabaseSettings) -> str:
    """Which database ``settings`` mean, for messages: ``127.0.0.1:5432 (database app, user
    app)``, or the socket directory for a Unix socket; never the password."""
    if settings.host.startswith("/"):
        server = f"the Unix socket in {settings.host} (port {settings.port})"
    else:
        server = f"{settings.host}:{settings.port}"
    return f"{server} (database {settings.database}, user {settings.user})"


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
