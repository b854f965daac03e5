"""`manage.py place_order EMAIL CENTS [--fail-after-publishing]`: POST to the view, as a browser
would, and print the response."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.test import Client


class Command(BaseCommand):
    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email")
        parser.add_argument("cents", type=int)
        parser.add_argument("--fail-after-publishing", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        data = {"email": options["email"], "cents": options["cents"]}
        if options["fail_after_publishing"]:
            data["fail_after_publishing"] = "1"
        response = Client(raise_request_exception=False).post("/orders", data)
        self.stdout.write(f"{response.status_code} {response.content.decode()}")
