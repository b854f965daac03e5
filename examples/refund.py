"""A refund workflow: approval above a limit, charge, receipt, compensation.

Run it (embedded PostgreSQL unless you pass a DSN)::

    python examples/refund.py
    python examples/refund.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Three refunds are published. The small one is paid out and receipted straight away; the large
one parks in ``awaiting_approval`` until a person fires ``approve`` (here: the script, as
``alice``); the third one's receipt cannot be delivered, so its receipt step gives up and the
``compensating`` step voids the payout. Each step's side effect goes to a fake payment provider
that, like a real one, deduplicates by idempotency key: ``ctx.idempotency_key`` is stable per
operation and step, so a retried step can never pay out twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg

from pgoutbox import (
    Admin,
    DatabaseSessionManager,
    DatabaseSettings,
    DoNotRetry,
    HandlerContext,
    Lifecycle,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    WorkflowSystemSettings,
    publish_operation,
)

APPROVAL_LIMIT_CENTS = 50_000

REFUND = Lifecycle.define(
    "refund",
    states=["awaiting_approval", "approved", "charged", "compensating"],
    parking=["awaiting_approval"],
    timeouts={"awaiting_approval": ("expire", timedelta(days=2))},
    transitions=[
        # claimed: the first step looks at the amount.
        {"trigger": "request_approval", "source": "claimed", "dest": "awaiting_approval"},
        {"trigger": "charge", "source": ["claimed", "approved"], "dest": "charged"},
        # awaiting_approval: parked until someone decides, or two days pass.
        {"trigger": "approve", "source": "awaiting_approval", "dest": "approved"},
        {"trigger": "deny", "source": "awaiting_approval", "dest": "cancelled"},
        {"trigger": "expire", "source": "awaiting_approval", "dest": "dead"},
        # charged: the money is out; send the receipt.
        {"trigger": "send_receipt", "source": "charged", "dest": "succeeded"},
        {"trigger": "give_up", "source": "charged", "dest": "compensating"},
        # compensating: the receipt could not be sent; void the payout.
        {"trigger": "compensated", "source": "compensating", "dest": "cancelled"},
    ],
)


class FakeProvider:
    """A payment and e-mail provider that, like real ones, deduplicates by idempotency key."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[str, dict[str, Any]]] = {}

    async def call(self, idempotency_key: str, action: str, **details: Any) -> None:
        await asyncio.sleep(0.05)  # the network
        self.calls.setdefault(idempotency_key, (action, details))


def build_router(provider: FakeProvider) -> WorkflowRouter:
    """One handler per working state of the refund lifecycle."""
    router = WorkflowRouter(prefix="billing")

    @router.on("refund", lifecycle=REFUND)
    async def review(ctx: HandlerContext, payload: dict[str, Any]) -> str:
        if payload["cents"] > APPROVAL_LIMIT_CENTS:
            return "request_approval"
        await provider.call(ctx.idempotency_key, "payout", cents=payload["cents"])
        return "charge"

    @router.on("refund", step="approved", on_lost="dead")
    async def pay_out(ctx: HandlerContext, payload: dict[str, Any]) -> str:
        await provider.call(ctx.idempotency_key, "payout", cents=payload["cents"])
        return "charge"

    @router.on("refund", step="charged", max_attempts=3)
    async def send_receipt(ctx: HandlerContext, payload: dict[str, Any]) -> str:
        if payload["email"].endswith(".invalid"):
            raise DoNotRetry(f"receipt to {payload['email']} bounced: no such domain")
        await provider.call(ctx.idempotency_key, "receipt", to=payload["email"])
        return "send_receipt"

    @router.on("refund", step="compensating")
    async def void_payout(ctx: HandlerContext, payload: dict[str, Any]) -> str:
        await provider.call(ctx.idempotency_key, "void", cents=payload["cents"])
        return "compensated"

    return router


@contextlib.asynccontextmanager
async def _database(dsn: str | None) -> AsyncIterator[DatabaseSettings]:
    schema = f"refund_example_{uuid.uuid4().hex[:6]}"
    server = None
    if dsn is None:
        from pgoutbox.embedded import start_embedded

        server = start_embedded()
        dsn = server.dsn
    db = DatabaseSettings(dsn=dsn, schema_name=schema)
    try:
        yield db
    finally:
        conn = await asyncpg.connect(**db.connect_kwargs())
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        if server is not None:
            server.stop()


async def _wait_for(admin: Admin, operation_id: int, states: set[str]) -> str:
    for _ in range(400):
        detail = await admin.get_operation(operation_id)
        if detail.operation is not None and detail.operation.state in states:
            return detail.operation.state
        await asyncio.sleep(0.05)
    raise TimeoutError(f"operation {operation_id} did not reach {sorted(states)}")


async def run(dsn: str | None = None) -> dict[str, Any]:
    """Run the example; return what happened (final states, provider calls, one trail)."""
    provider = FakeProvider()
    async with _database(dsn) as db:
        settings = Settings(
            database=db,
            workflow_system=WorkflowSystemSettings(channel="refunds", poll_interval_seconds=0.2),
        )
        sm = DatabaseSessionManager(db)
        async with WorkflowSystem(router=build_router(provider), settings=settings):
            async with sm.session() as session:
                small, large, bounced = [
                    await publish_operation(
                        session,
                        "billing.refund",
                        {"order": order, "cents": cents, "email": email},
                        "refunds",
                        idempotency_key=f"refund-order-{order}",
                        ordering_key=f"order-{order}",
                    )
                    for order, cents, email in [
                        (1001, 2_500, "ada@example.com"),
                        (1002, 120_000, "grace@example.com"),
                        (1003, 4_000, "nobody@bounce.invalid"),
                    ]
                ]
                await session.commit()
            async with Admin(db) as admin:
                await _wait_for(admin, large, {"awaiting_approval"})
                print(f"refund {large} is waiting for approval; alice approves it")
                await admin.fire(large, "approve", actor="alice", detail="ticket 4711")
                final = {
                    op_id: await _wait_for(admin, op_id, {"succeeded", "dead", "cancelled"})
                    for op_id in (small, large, bounced)
                }
                trail = (await admin.get_operation(large)).audit
        await sm.close()
    for op_id, state in final.items():
        print(f"refund {op_id}: {state}")
    print("provider calls (by idempotency key):")
    for key, (action, details) in sorted(provider.calls.items()):
        print(f"  {key:32} {action:8} {details}")
    print(f"audit trail of refund {large}:")
    for row in trail:
        print(
            f"  {row.seq:>2} {row.trigger:17} {row.from_state or '-':>17} -> {row.to_state:17}"
            f" {row.actor}"
        )
    return {"ids": (small, large, bounced), "final": final, "calls": provider.calls, "trail": trail}


def main() -> None:
    """``python examples/refund.py [--dsn DSN]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded one)")
    asyncio.run(run(parser.parse_args().dsn))


if __name__ == "__main__":
    main()
