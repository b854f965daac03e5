"""Placing an order: the order row and the operations that act on it commit together."""

from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

from pgoutbox import publish_many

from .models import Order


def place_order(request: HttpRequest) -> HttpResponse:
    with transaction.atomic():
        order = Order.objects.create(email=request.POST["email"], cents=int(request.POST["cents"]))
        publish_many(
            connection,
            [
                {
                    "operation_type": "shop.charge",
                    "payload": {"order": order.pk, "cents": order.cents},
                    "channel": "shop",
                    "idempotency_key": f"charge-order-{order.pk}",
                    "ordering_key": f"order-{order.pk}",
                },
                {
                    "operation_type": "shop.receipt",
                    "payload": {"order": order.pk, "to": order.email},
                    "channel": "shop",
                    "ordering_key": f"order-{order.pk}",  # after the charge
                },
            ],
        )
        if request.POST.get("fail_after_publishing"):
            # Rolls back the order and both operations: nothing is charged for it, ever.
            raise RuntimeError("the view failed after publishing")
    return JsonResponse({"order": order.pk})
