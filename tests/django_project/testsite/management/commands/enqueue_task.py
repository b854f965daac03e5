"""`manage.py enqueue_task EMAIL CENTS [--fail-after-enqueueing]`: enqueue testsite.tasks'
record_order inside atomic(), and print the result's id."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction


class Command(BaseCommand):
    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email")
        parser.add_argument("cents", type=int)
        parser.add_argument("--fail-after-enqueueing", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        from testsite.tasks import record_order

        try:
            with transaction.atomic():
                result = record_order.enqueue(options["email"], options["cents"])
                if options["fail_after_enqueueing"]:
                    raise RuntimeError("rolled back")
        except RuntimeError as exc:
            self.stdout.write(f"not enqueued: {exc}")
            return
        self.stdout.write(f"enqueued {result.id} {result.status}")
