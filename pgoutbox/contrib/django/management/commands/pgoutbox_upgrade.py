"""``manage.py pgoutbox_upgrade``: create or upgrade pgoutbox's schema."""

from __future__ import annotations

import asyncio
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from pgoutbox import migrations
from pgoutbox.cli_errors import DATABASE_ERRORS
from pgoutbox.contrib.django.conf import database_problem, pgoutbox_settings


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type information
    help = (
        "Create or upgrade pgoutbox's schema (PGOUTBOX['SCHEMA']) in the database of "
        "PGOUTBOX['DATABASE'], with pgoutbox's own migrations (Alembic, its own version table)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--revision", default="head", help="target revision (default: head)")

    def handle(self, *args: Any, **options: Any) -> None:
        db = pgoutbox_settings().database
        try:
            before = asyncio.run(migrations.current(db))
            asyncio.run(migrations.upgrade(db, options["revision"]))
            after = asyncio.run(migrations.current(db))
        except DATABASE_ERRORS as exc:
            raise database_problem(exc, db) from exc
        if before == after:
            self.stdout.write(f"schema {db.schema_name!r} already at revision {after}")
        else:
            self.stdout.write(
                f"schema {db.schema_name!r} upgraded from {before or 'nothing'} to {after}"
            )
