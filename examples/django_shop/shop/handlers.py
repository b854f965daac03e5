"""The worker's handlers: plain `def`s, run in pgoutbox's thread pool."""

from typing import Any

from sqlalchemy import text

from pgoutbox import HandlerContext, WorkflowRouter

router = WorkflowRouter()


@router.on("shop.charge", transactional=True)
def charge(ctx: HandlerContext, payload: Any) -> None:
    # (the payment provider would be called here, with ctx.idempotency_key)
    # The order's new state commits together with the operation's success, or not at all:
    # ctx.session is pgoutbox's synchronous SQLAlchemy Session, not Django's connection.
    assert ctx.session is not None
    ctx.session.execute(
        text("UPDATE shop_order SET state = 'paid' WHERE id = :order"), {"order": payload["order"]}
    )


@router.on("shop.receipt")
def receipt(ctx: HandlerContext, payload: Any) -> None:
    from .models import Order

    # (the email would be sent here) The Django ORM works in a handler, on a connection of
    # its own: this update is not part of the operation's success transition.
    Order.objects.filter(pk=payload["order"]).update(receipt_sent=True)
