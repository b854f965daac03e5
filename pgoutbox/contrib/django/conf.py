"""pgoutbox's settings from Django's: the database from ``DATABASES``, the rest from
``PGOUTBOX``.

Usage (settings.py)::

    PGOUTBOX = {
        "DATABASE": "default",            # the DATABASES alias (default: "default")
        "SCHEMA": "pgoutbox",             # where pgoutbox's tables live
        "ROUTER": "shop.handlers:router", # what `manage.py pgoutbox_worker` runs
        "WORKFLOW_SYSTEM": {"channel": "shop", "n_workers": 4},  # WorkflowSystemSettings
        "MAX_PAYLOAD_BYTES": 1048576,
    }
"""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from django.core.signals import setting_changed
from pydantic import ValidationError

from pgoutbox.cli_errors import describe
from pgoutbox.settings import DatabaseSettings, Settings

_KEYS = frozenset({"DATABASE", "SCHEMA", "ROUTER", "WORKFLOW_SYSTEM", "MAX_PAYLOAD_BYTES"})


def pgoutbox_options() -> dict[str, Any]:
    """The ``PGOUTBOX`` setting, checked for unknown keys."""
    options = getattr(django_settings, "PGOUTBOX", {})
    if not isinstance(options, dict):
        raise ImproperlyConfigured(f"PGOUTBOX must be a dict, not {type(options).__name__}")
    unknown = sorted(set(options) - _KEYS)
    if unknown:
        raise ImproperlyConfigured(f"PGOUTBOX has unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    return options


@functools.cache
def pgoutbox_settings() -> Settings:
    """pgoutbox :class:`~pgoutbox.Settings` for this Django project (cached; recomputed when a
    test changes Django's settings).

    From ``DATABASES[PGOUTBOX["DATABASE"]]``: ``NAME``, ``USER``, ``PASSWORD``, ``HOST`` (a
    directory is a Unix socket's; empty means ``localhost``), ``PORT`` and, of ``OPTIONS``,
    ``sslmode`` and ``application_name``; other ``OPTIONS`` are not used by pgoutbox's own
    connections. The engine must be ``django.db.backends.postgresql``.
    """
    options = pgoutbox_options()
    alias = options.get("DATABASE", "default")
    databases = django_settings.DATABASES
    if alias not in databases:
        raise ImproperlyConfigured(
            f"PGOUTBOX['DATABASE'] is {alias!r}, which is not in DATABASES "
            f"({', '.join(sorted(databases))})"
        )
    db = databases[alias]
    if db.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}] uses {db.get('ENGINE')!r}; pgoutbox needs PostgreSQL "
            "(django.db.backends.postgresql)"
        )
    db_options = db.get("OPTIONS") or {}
    database: dict[str, Any] = {
        "host": db.get("HOST") or "localhost",
        "user": db.get("USER") or "postgres",
        "password": db.get("PASSWORD") or "",
        "database": db.get("NAME") or "postgres",
        "schema": options.get("SCHEMA", "pgoutbox"),
    }
    if db.get("PORT"):
        database["port"] = int(db["PORT"])
    for key in ("sslmode", "application_name"):
        if key in db_options:
            database[key] = db_options[key]
    if "MAX_PAYLOAD_BYTES" in options:
        database["max_payload_bytes"] = options["MAX_PAYLOAD_BYTES"]
    try:
        return Settings(database=database, workflow_system=options.get("WORKFLOW_SYSTEM", {}))
    except ValidationError as exc:
        raise ImproperlyConfigured(
            f"invalid pgoutbox settings (PGOUTBOX, DATABASES): {exc}"
        ) from None


def database_problem(exc: BaseException, db: DatabaseSettings) -> CommandError:
    """A management command's one-line error for a database it could not reach or use."""
    alias = pgoutbox_options().get("DATABASE", "default")
    return CommandError(
        f"cannot use PostgreSQL at {describe(db)} (DATABASES[{alias!r}]): "
        f"{type(exc).__name__}: {exc}"
    )


def _forget(*, setting: str, **_: Any) -> None:
    if setting in ("PGOUTBOX", "DATABASES"):
        pgoutbox_settings.cache_clear()


setting_changed.connect(_forget)
