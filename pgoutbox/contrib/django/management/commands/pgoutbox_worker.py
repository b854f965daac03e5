"""``manage.py pgoutbox_worker``: run a worker for the project's router."""

from __future__ import annotations

import importlib
from typing import Any

import click
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pgoutbox.cli import _run, _serve, _StopRequest
from pgoutbox.contrib.django.conf import database_problem, pgoutbox_options, pgoutbox_settings
from pgoutbox.router import WorkflowRouter
from pgoutbox.worker import WorkflowSystem

TASK_BACKEND = "pgoutbox.contrib.django.tasks.PgoutboxTaskBackend"


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type information
    help = (
        "Run a pgoutbox worker for PGOUTBOX['ROUTER'] (or --router module:attribute) and, when "
        "TASKS uses pgoutbox's backend, for django.tasks tasks, until SIGTERM or Ctrl-C; then "
        "stop gracefully."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--router", help="module:attribute of a WorkflowRouter")

    def handle(self, *args: Any, **options: Any) -> None:
        # As `pgoutbox worker`: a stop requested while loading is honoured, not fatal.
        requested = _StopRequest()
        requested.install()
        path = options["router"] or pgoutbox_options().get("ROUTER")
        tasks = _uses_task_backend()
        if not path and not tasks:
            raise CommandError(
                "nothing to run: set PGOUTBOX['ROUTER'] (or pass --router module:attr), or "
                "TASKS with pgoutbox.contrib.django.tasks.PgoutboxTaskBackend"
            )
        router = WorkflowRouter()
        if path:
            router.include_router(_load_router(str(path)))
        if tasks:
            from pgoutbox.contrib.django.tasks import tasks_router

            router.include_router(tasks_router())
        config = pgoutbox_settings()
        system = WorkflowSystem(router=router, settings=config)
        try:
            _run(_serve(system, requested), settings=config.database, fast_loop=True)
        except click.ClickException as exc:  # the database could not be reached or used
            cause = exc.__cause__
            if cause is not None:
                raise database_problem(cause, config.database) from cause
            raise CommandError(exc.format_message()) from exc


def _load_router(path: str) -> WorkflowRouter:
    module_name, _, attribute = path.partition(":")
    try:
        router = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CommandError(f"cannot load router {path!r}: {exc}") from None
    if not isinstance(router, WorkflowRouter):
        raise CommandError(f"{path!r} is a {type(router).__name__}, not a WorkflowRouter")
    return router


def _uses_task_backend() -> bool:
    """Whether Django's TASKS (Django 6+) enqueue through pgoutbox."""
    tasks = getattr(settings, "TASKS", {}) or {}
    return any(
        isinstance(params, dict) and params.get("BACKEND") == TASK_BACKEND
        for params in tasks.values()
    )
