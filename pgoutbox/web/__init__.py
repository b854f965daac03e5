"""The web console: an ASGI application for operators and auditors (``pgoutbox[web]``).

Usage::

    from pgoutbox import Settings
    from pgoutbox.web import create_app

    console = create_app(Settings().database, actor=lambda request: request.headers.get("x-user"))
    host_app.mount("/outbox", console)       # Starlette / FastAPI; or `pgoutbox web --port 8080`

Pages: an overview (counts, a chart of attempt outcomes, stale operations, workers), the
operations list (filters, keyset pagination), one operation (payload, attempts, audit trail,
lifecycle diagram, chain verification, actions), every lifecycle, and audit (verify, reports).
See docs/web.md.
"""

from pgoutbox.web.app import ActorHook, Console, create_app

__all__ = ["ActorHook", "Console", "create_app"]
