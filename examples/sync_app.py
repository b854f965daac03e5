"""A synchronous web app (Flask-style: a WSGI app on SQLAlchemy's Session) records intent in its
own transaction; a worker handles it with plain ``def`` handlers.

Run it (embedded PostgreSQL unless you pass a DSN)::

    pip install 'pgoutbox[sync]'
    python examples/sync_app.py
    python examples/sync_app.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

The view inserts an order and publishes its receipt in one transaction: the receipt exists
exactly when the order does (the third request fails after publishing, and leaves neither).
With Flask the view reads the same, under ``@app.post("/orders")``. Here the worker runs in a
thread of this process so that the script is self-contained; in production it is a process of
its own: ``pgoutbox worker examples.sync_app:router``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, urlencode
from wsgiref.util import setup_testing_defaults

from sqlalchemy import text

from pgoutbox import (
    DatabaseSettings,
    HandlerContext,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    publish_operation,
)
from pgoutbox.sync import SyncSessionManager

CHANNEL = "shop"
router = WorkflowRouter()
SENT: list[str] = []  # the fake mail server's outbox


@router.on("shop.receipt", transactional=True)
def send_receipt(ctx: HandlerContext, payload: dict[str, Any]) -> None:
    """A blocking SMTP call, then a write that commits with the operation's success."""
    time.sleep(0.01)  # the mail server; a plain def runs in a thread, off the event loop
    SENT.append(f"{payload['to']} (key {ctx.idempotency_key})")
    assert ctx.session is not None
    ctx.session.execute(
        text(f"UPDATE {payload['schema']}.orders SET receipt_sent = true WHERE id = :id"),
        {"id": payload["order"]},
    )


class App:
    """The web app: one view, ``POST /orders``."""

    def __init__(self, sessions: SyncSessionManager, schema: str) -> None:
        self.sessions, self.schema = sessions, schema

    def place_order(self, form: dict[str, str]) -> str:
        with self.sessions.session() as session:
            order_id = session.execute(
                text(f"INSERT INTO {self.schema}.orders (email) VALUES (:email) RETURNING id"),
                {"email": form["email"]},
            ).scalar_one()
            publish_operation(
                session,
                "shop.receipt",
                {"order": order_id, "to": form["email"], "schema": self.schema},
                CHANNEL,
                idempotency_key=f"receipt-{self.schema}-{order_id}",
            )
            if form.get("fail"):
                raise RuntimeError("the view failed after publishing")  # rolls back both
            session.commit()  # the order and its receipt operation, together
        return f"order {order_id} placed"

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)).decode()
        form = {key: values[-1] for key, values in parse_qs(body).items()}
        try:
            status, reply = "200 OK", self.place_order(form)
        except RuntimeError as exc:
            status, reply = "500 Internal Server Error", str(exc)
        start_response(status, [("Content-Type", "text/plain")])
        return [reply.encode()]


def post(app: App, form: dict[str, str]) -> str:
    """One request to the WSGI app, as a server would make it."""
    body = urlencode(form).encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/orders",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    setup_testing_defaults(environ)
    status: list[str] = []
    reply = b"".join(app(environ, lambda s, headers: status.append(s)))
    return f"{status[0].split()[0]} {reply.decode()}"


def run(dsn: str | None = None) -> dict[str, Any]:
    """Run the example; return the responses and the orders as the database has them."""
    server = None
    if dsn is None:
        from pgoutbox.embedded import start_embedded

        server = start_embedded()
        dsn = server.dsn
    schema = f"sync_example_{uuid.uuid4().hex[:6]}"
    db = DatabaseSettings(dsn=dsn, schema_name=schema)
    settings = Settings(database=db, workflow_system={"channel": CHANNEL, "n_workers": 2})
    sessions = SyncSessionManager(db)
    try:
        with sessions.session() as session:
            session.execute(text(f"CREATE SCHEMA {schema}"))
            session.execute(
                text(
                    f"CREATE TABLE {schema}.orders (id serial PRIMARY KEY, email text NOT NULL, "
                    "receipt_sent boolean NOT NULL DEFAULT false)"
                )
            )
            session.commit()
        system = WorkflowSystem(router=router, settings=settings)
        stop = threading.Event()
        started = threading.Event()

        async def worker() -> None:
            async with system:
                started.set()
                await asyncio.to_thread(stop.wait)  # until the app is done

        thread = threading.Thread(target=asyncio.run, args=(worker(),))
        thread.start()
        try:
            if not started.wait(60):
                raise TimeoutError("the worker did not start")
            app = App(sessions, schema)
            responses = [
                post(app, {"email": "ada@example.com"}),
                post(app, {"email": "grace@example.com"}),
                post(app, {"email": "mallory@example.com", "fail": "1"}),
            ]
            for response in responses:
                print(response)
            orders = _wait_for_receipts(sessions, schema)
        finally:
            stop.set()
            thread.join()
        for email, receipt_sent in orders:
            print(f"{email}: receipt sent {receipt_sent}")
        return {"responses": responses, "orders": orders, "sent": list(SENT)}
    finally:
        with sessions.session() as session:
            session.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            session.commit()
        sessions.close()
        if server is not None:
            server.stop()


def _wait_for_receipts(sessions: SyncSessionManager, schema: str) -> list[tuple[str, bool]]:
    query = text(f"SELECT email, receipt_sent FROM {schema}.orders ORDER BY id")
    for _ in range(600):
        with sessions.session() as session:
            orders = [(email, sent) for email, sent in session.execute(query)]
        if all(sent for _, sent in orders):
            return orders
        time.sleep(0.05)
    raise TimeoutError(f"receipts not sent: {orders}")


def main() -> None:
    """``python examples/sync_app.py [--dsn DSN]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded one)")
    run(parser.parse_args().dsn)


if __name__ == "__main__":
    main()
