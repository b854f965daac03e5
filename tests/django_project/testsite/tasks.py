"""A django.tasks task (Django 6+), run by pgoutbox_worker."""

from django.tasks import task
from shop.models import Order


@task
def record_order(email: str, cents: int) -> None:
    Order.objects.create(email=email, cents=cents, state="from-task")
