"""``manage.py pgoutbox_worker``: run a worker for the project's router."""

from __future__ import annotations

import importlib
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pgoutbox.cli import _run, _serve, _StopRequest
from pgoutbox.contrib.django.conf import pgoutbox_options, pgoutbox_settings
from pgoutbox.router import WorkflowRouter
from pgoutbox.worker import WorkflowSystem


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type information
    help = (
        "Run a pgoutbox worker for PGOUTBOX['ROUTER'] (or --router module:attribute) until "
        "SIGTERM or Ctrl-C, then stop gracefully."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--router", help="module:attribute of a WorkflowRouter")

    def handle(self, *args: Any, **options: Any) -> None:
        # As `pgoutbox worker`: a stop requested while loading is honoured, not fatal.
        requested = _StopRequest()
        requested.install()
        path = options["router"] or pgoutbox_options().get("ROUTER")
        if not path:
            raise CommandError("no router: set PGOUTBOX['ROUTER'] or pass --router module:attr")
        module_name, _, attribute = str(path).partition(":")
        try:
            router = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise CommandError(f"cannot load router {path!r}: {exc}") from None
        if not isinstance(router, WorkflowRouter):
            raise CommandError(f"{path!r} is a {type(router).__name__}, not a WorkflowRouter")
        settings = pgoutbox_settings()
        system = WorkflowSystem(router=router, settings=settings)
        _run(_serve(system, requested), settings=settings.database, fast_loop=True)
