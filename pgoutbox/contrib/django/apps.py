"""The Django app of pgoutbox: its management commands, and settings kept current."""

from __future__ import annotations

from django.apps import AppConfig


class PgoutboxConfig(AppConfig):  # type: ignore[misc]  # Django ships no type information
    """``INSTALLED_APPS = [..., "pgoutbox.contrib.django"]``."""

    name = "pgoutbox.contrib.django"
    label = "pgoutbox"
    verbose_name = "pgoutbox"
