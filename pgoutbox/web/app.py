"""The console's ASGI application: routes, authentication hook, CSRF, and rendering.

Every page is rendered on the server by Jinja2 with autoescaping on, and every value from the
database also goes through :func:`pgoutbox.cli_errors.visible` (control characters shown as
escapes). A Content-Security-Policy allows only the console's own script and stylesheet, so
even a value that escaped escaping could not run. Actions are the operator API's
(:class:`pgoutbox.admin.Admin`): each an ordinary audited transition naming the actor the
host's hook returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import hmac
import inspect
import io
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs, urlencode

import asyncpg
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from pgoutbox.admin import Admin, AdminError, OperationNotFound, When, as_json
from pgoutbox.audit import AuditVerification
from pgoutbox.cli_errors import visible
from pgoutbox.cli_ops import REPORT_COLUMNS, OutOfRange, csv_cell, parse_when
from pgoutbox.fire import FireRefused
from pgoutbox.lifecycle import BUILTIN_STATES
from pgoutbox.settings import DatabaseSettings
from pgoutbox.web.data import ConsoleData, ListFilter, Overview
from pgoutbox.web.diagram import lifecycle_svg

ActorHook = Callable[[Request], str | Awaitable[str | None] | None]
"""The host's authentication hook: who is acting, from the request (a session, a header its
proxy sets), or None for someone who may only look."""

CSRF_COOKIE: Final = "pgoutbox_csrf"
FLASH_COOKIE: Final = "pgoutbox_flash"
ACTIONS: Final = ("retry", "cancel", "replay", "fire")
OVERVIEW_MAX_AGE: Final = 5.0
"""Seconds after which the overview's counts are taken again (in the background)."""
_MAX_REASON: Final = 2000
_MAX_FILTER: Final = 500
_MAX_ID: Final = 2**63 - 1  # bigint: a larger id names no operation

_SECURITY_HEADERS: Final = {
    # Only the console's own files run or style the page: an escaped value can never become a
    # script, and a value that somehow escaped escaping would not run either.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class BadInput(ValueError):
    """A filter or form value the console cannot use; the message names it."""


@dataclass
class _Verification:
    """The one audit verification a console runs at a time, and how far it got."""

    total: int = 0
    rows: int = 0
    running: bool = False
    started_by: str | None = None
    result: AuditVerification | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Console:
    """The console's state: settings, the authentication hook, the open :class:`Admin`."""

    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        actor: ActorHook | None,
        read_only: bool,
        secret: bytes | None,
        overview_max_age: float = OVERVIEW_MAX_AGE,
    ) -> None:
        self.settings = settings
        self.actor_hook = actor
        self.read_only = read_only
        self.secret = secret if secret is not None else secrets.token_bytes(32)
        self._admin: Admin | None = None
        self._opening = asyncio.Lock()
        self.verification = _Verification()
        self.overview_max_age = overview_max_age
        self._overview: tuple[float, Overview] | None = None
        self._overview_refresh: asyncio.Task[None] | None = None
        self._overview_lock = asyncio.Lock()
        self.templates = Environment(
            loader=PackageLoader("pgoutbox.web", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.templates.filters["visible"] = _visible
        self.templates.filters["lines"] = _visible_lines
        self.templates.filters["when"] = _when
        self.templates.filters["seconds"] = _seconds

    async def data(self) -> ConsoleData:
        """The reads, on an Admin opened at the first request (a mounted app gets no lifespan
        events of its own, so it cannot open one at startup)."""
        async with self._opening:
            if self._admin is None:
                admin = Admin(self.settings)
                await admin.open()
                self._admin = admin
        return ConsoleData(self._admin)

    async def overview(self) -> Overview:
        """The overview's counts, at most about ``overview_max_age`` seconds old.

        Counting by state and type and finding stale operations read the whole operations
        table (half a second at a million operations), so a request does not wait for it: it
        gets the latest count while a newer one is taken in the background, once at a time.
        Only the first request waits for the first count. The page says when it was counted.
        """
        snapshot = self._overview
        if snapshot is None:
            async with self._overview_lock:
                if self._overview is None:
                    await self._count()
            assert self._overview is not None
            return self._overview[1]
        taken_at, overview = snapshot
        running = self._overview_refresh is not None and not self._overview_refresh.done()
        if time.monotonic() - taken_at > self.overview_max_age and not running:
            self._overview_refresh = asyncio.create_task(self._count_in_background())
        return overview

    async def _count(self) -> None:
        overview = await (await self.data()).overview()
        self._overview = (time.monotonic(), overview)

    async def _count_in_background(self) -> None:
        # A failed count leaves the previous one shown; the next request tries again.
        with contextlib.suppress(Exception):
            await self._count()

    async def close(self) -> None:
        """Close the database connections (and stop a running verification)."""
        for task in (self.verification.task, self._overview_refresh):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()

    async def who(self, request: Request) -> str | None:
        """Who may act on this request: None when actions are off (read-only console, no hook,
        or the hook names nobody)."""
        if self.read_only or self.actor_hook is None:
            return None
        found = self.actor_hook(request)
        if inspect.isawaitable(found):
            found = await found
        if found is None:
            return None
        if not isinstance(found, str) or not found.strip():
            raise TypeError(f"the console's actor hook returned {found!r}: a name or None")
        return found

    def actions_off_reason(self) -> str:
        if self.read_only:
            return "read-only console: no actions"
        if self.actor_hook is None:
            return "actions are off: the host configured no authentication hook"
        return "actions are off: you are not signed in as someone who may act"

    # -- CSRF: a random token, signed, in a cookie and in every form (double submit) ----------

    def new_token(self) -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign(nonce)}"

    def token_valid(self, token: str | None) -> bool:
        if not token or token.count(".") != 1:
            return False
        nonce, signature = token.split(".")
        return hmac.compare_digest(signature, self._sign(nonce))

    def _sign(self, value: str) -> str:
        return hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()

    def flash_value(self, message: str, ok: bool) -> str:
        body = json.dumps({"m": message, "ok": ok}).encode().hex()
        return f"{body}.{self._sign(body)}"

    def read_flash(self, value: str | None) -> dict[str, Any] | None:
        if not value or value.count(".") != 1:
            return None
        body, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            found: dict[str, Any] = json.loads(bytes.fromhex(body))
        except ValueError:
            return None
        return found


def create_app(
    settings: DatabaseSettings,
    *,
    actor: ActorHook | None = None,
    read_only: bool = False,
    secret: bytes | None = None,
    overview_max_age: float = OVERVIEW_MAX_AGE,
) -> Starlette:
    """The web console as an ASGI application, to mount in a host app or serve alone.

    Usage::

        from pgoutbox.web import create_app

        def actor(request):  # who is acting, from the host's own authentication
            user = request.scope.get("user")
            return user.email if user and user.is_operator else None

        app.mount("/outbox", create_app(Settings().database, actor=actor))

    ``actor`` (a function or coroutine function of the request) names who is acting; the
    console ships no authentication of its own, and without a hook -- or when the hook returns
    None -- it shows no actions and refuses them. ``read_only=True`` turns actions off whatever
    the hook says (for auditors). ``secret`` signs the CSRF tokens; give the same one to every
    process serving the console (default: random per process). The overview's counts are
    taken again in the background when older than ``overview_max_age`` seconds. Viewing is not
    checked: protect the mount point as the host protects its other admin pages.
    """
    if not overview_max_age >= 0:
        raise ValueError(f"invalid overview_max_age {overview_max_age!r}: seconds, 0 or more")
    console = Console(
        settings,
        actor=actor,
        read_only=read_only,
        secret=secret,
        overview_max_age=overview_max_age,
    )
    routes = [
        Route("/", _page(console, _overview)),
        Route("/operations", _page(console, _operations)),
        Route("/operations/{operation_id:int}", _page(console, _operation)),
        Route("/operations/{operation_id:int}/act", _action(console), methods=["POST"]),
        Route("/lifecycles", _page(console, _lifecycles)),
        Route("/audit", _page(console, _audit)),
        Route("/audit/verify", _verify_start(console), methods=["POST"]),
        Route("/audit/verify/status", _verify_status(console)),
        Route("/audit/report", _report(console)),
        Route("/static/{name:str}", _static),
    ]
    app = Starlette(routes=routes)
    app.state.console = console
    return app


# -- rendering -------------------------------------------------------------------------------

PageHandler = Callable[[Console, Request], Awaitable[tuple[str, dict[str, Any]]]]


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _page(console: Console, handler: PageHandler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        token = request.cookies.get(CSRF_COOKIE) or ""
        if not console.token_valid(token):
            token = console.new_token()
        actor = await console.who(request)
        context: dict[str, Any] = {
            "base": _base(request),
            "csrf": token,
            "actor": actor,
            "actions_off": None if actor else console.actions_off_reason(),
            "flash": console.read_flash(request.cookies.get(FLASH_COOKIE)),
            "schema": console.settings.schema_name,
            "path": request.url.path,
        }
        try:
            template, values = await handler(console, request)
            status = 200
        except BadInput as exc:
            template, values, status = "error.html", {"message": str(exc)}, 400
        except OperationNotFound as exc:
            template, values, status = "error.html", {"message": str(exc)}, 404
        html = console.templates.get_template(template).render(**context, **values)
        response = Response(html, status_code=status, media_type="text/html")
        _secure(response)
        response.set_cookie(
            CSRF_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            path=_base(request) or "/",
        )
        if context["flash"] is not None:
            response.delete_cookie(FLASH_COOKIE, path=_base(request) or "/")
        return response

    return endpoint


def _secure(response: Response) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers[name] = value


async def _overview(console: Console, request: Request) -> tuple[str, dict[str, Any]]:
    overview = await console.overview()
    peak = max((b.succeeded + b.failed for b in overview.chart), default=0)
    return "overview.html", {
        "o": overview,
        "chart": _chart_svg(overview.chart, peak),
        "max_age": console.overview_max_age,
    }


def _chart_svg(buckets: list[Any], peak: int) -> Markup:
    """Attempt outcomes per hour as stacked bars (succeeded, failed) with the failure rate as a
    line; numbers only, drawn on the server."""
    width, height, pad = 720, 160, 24
    bar = (width - 2 * pad) / max(len(buckets), 1)
    scale = (height - 2 * pad) / peak if peak else 0
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="attempt outcomes per hour">',
        f'<line class="axis" x1="{pad}" y1="{height - pad}" x2="{width - pad}" '
        f'y2="{height - pad}"/>',
        f'<text class="label" x="{pad}" y="{pad - 8}">peak {peak}/h</text>',
    ]
    rate_points = []
    for i, b in enumerate(buckets):
        x = pad + i * bar
        ok_h = b.succeeded * scale
        bad_h = b.failed * scale
        base = height - pad
        parts.append(
            f'<rect class="ok" x="{x + 1:.1f}" y="{base - ok_h:.1f}" width="{bar - 2:.1f}" '
            f'height="{ok_h:.1f}"><title>{b.start:%H:%M}: {b.succeeded} succeeded, '
            f"{b.failed} failed</title></rect>"
        )
        parts.append(
            f'<rect class="bad" x="{x + 1:.1f}" y="{base - ok_h - bad_h:.1f}" '
            f'width="{bar - 2:.1f}" height="{bad_h:.1f}"/>'
        )
        finished = b.succeeded + b.failed
        if finished:
            rate = b.failed / finished
            rate_points.append(f"{x + bar / 2:.1f},{base - rate * (height - 2 * pad):.1f}")
        if i % 6 == 0:
            parts.append(f'<text class="label" x="{x:.1f}" y="{height - 6}">{b.start:%H:%M}</text>')
    if len(rate_points) > 1:
        parts.append(f'<polyline class="rate" points="{" ".join(rate_points)}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _one(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    if len(value) > _MAX_FILTER:
        raise BadInput(f"the {name} filter is {len(value)} characters long: at most {_MAX_FILTER}")
    return value or None


def _many(request: Request, name: str) -> tuple[str, ...]:
    values: list[str] = []
    for raw in request.query_params.getlist(name):
        values.extend(v.strip() for v in raw.split(",") if v.strip())
    return tuple(values)


def _time(request: Request, name: str) -> When | None:
    value = _one(request, name)
    if value is None:
        return None
    try:
        return parse_when(value)
    except (ValueError, OutOfRange) as exc:
        raise BadInput(
            f"invalid {name} {value!r}: a time (2026-10-01, 2026-10-01T12:00+02:00) or how "
            f"long ago (30m, 2h, 7d) ({exc})"
        ) from None


async def _resolved(admin: Admin, when: When | None) -> datetime | None:
    """A filter's time as an instant; "2h" counts back from the database's clock."""
    return None if when is None else await admin.resolve(when)


async def _operations(console: Console, request: Request) -> tuple[str, dict[str, Any]]:
    before = _one(request, "before")
    if before is not None and not (before.isdigit() and int(before) <= _MAX_ID):
        raise BadInput(f"invalid before {before!r}: an operation id (a positive whole number)")
    data = await console.data()
    f = ListFilter(
        states=_many(request, "state"),
        operation_types=_many(request, "type"),
        channels=_many(request, "channel"),
        since=await _resolved(data.admin, _time(request, "since")),
        until=await _resolved(data.admin, _time(request, "until")),
        idempotency_key=_one(request, "key"),
        ordering_key=_one(request, "ordering_key"),
        search=_one(request, "q"),
        before=int(before) if before is not None else None,
    )
    page = await data.operations(f)
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "before" and v]
    next_url = (
        f"?{urlencode([*params, ('before', str(page.next_before))])}"
        if page.next_before is not None
        else None
    )
    return "operations.html", {
        "page": page,
        "next_url": next_url,
        "first_url": f"?{urlencode(params)}" if f.before is not None else None,
        "q": request.query_params,
        "states": sorted(BUILTIN_STATES),
    }


async def _operation(console: Console, request: Request) -> tuple[str, dict[str, Any]]:
    operation_id: int = request.path_params["operation_id"]
    if operation_id > _MAX_ID:
        raise OperationNotFound(f"no operation {operation_id}")
    data = await console.data()
    detail = await data.admin.get_operation(operation_id)
    chain = await data.chain(operation_id)
    op = detail.operation
    lifecycle = await data.lifecycle_named(
        op.lifecycle if op is not None else DEFAULT_NAME_FOR_PURGED
    )
    taken = [(row.from_state, row.to_state) for row in detail.audit]
    diagram = lifecycle_svg(lifecycle, current=op.state if op else None, taken=taken)
    fire_triggers: list[str] = []
    if op is not None and op.state in lifecycle.parking and op.lease_owner is None:
        fire_triggers = sorted(lifecycle.exits(op.state))
    possible = set(lifecycle.allowed_triggers(op.state)) if op is not None else set()
    payload = _payload_text(detail.payload)
    return "operation.html", {
        "d": detail,
        "op": op,
        "payload": payload,
        "chain": chain,
        "diagram": diagram,
        "lifecycle": lifecycle,
        "fire_triggers": fire_triggers,
        "can": {a: a in possible for a in ("retry", "cancel", "replay")},
    }


DEFAULT_NAME_FOR_PURGED: Final = "default"


async def _lifecycles(console: Console, request: Request) -> tuple[str, dict[str, Any]]:
    found = await (await console.data()).lifecycles()
    return "lifecycles.html", {
        "lifecycles": [(r, lifecycle_svg(r.lifecycle)) for r in found],
    }


async def _audit(console: Console, request: Request) -> tuple[str, dict[str, Any]]:
    return "audit.html", {"v": console.verification}


# -- actions ---------------------------------------------------------------------------------


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form (the console's forms are nothing else), one value per field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        return {}
    body = await request.body()
    if len(body) > 64 * 1024:
        raise BadInput("the form is larger than 64 KiB")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _refuse(status: int, message: str) -> Response:
    response = PlainTextResponse(message, status_code=status)
    _secure(response)
    return response


def _csrf_problem(console: Console, request: Request, form: dict[str, str]) -> str | None:
    """Why this POST is not the console's own form (None: it is). The form's token must be
    the cookie's, and signed by this console: a page elsewhere can neither read the cookie
    nor make a signed token."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return "refused: a cross-site request"
    cookie = request.cookies.get(CSRF_COOKIE)
    token = form.get("csrf")
    if not token or not cookie:
        return "refused: the form has no CSRF token (reload the console's page and try again)"
    if not hmac.compare_digest(token, cookie) or not console.token_valid(token):
        return "refused: invalid CSRF token (reload the console's page and try again)"
    return None


def _action(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        operation_id: int = request.path_params["operation_id"]
        if operation_id > _MAX_ID:
            return _refuse(404, f"no operation {operation_id}")
        try:
            form = await _form(request)
        except BadInput as exc:
            return _refuse(400, str(exc))
        problem = _csrf_problem(console, request, form)
        if problem is not None:
            return _refuse(403, problem)
        actor = await console.who(request)
        if actor is None:
            return _refuse(403, f"refused: {console.actions_off_reason()}")
        action = form.get("action", "")
        reason = form.get("reason", "").strip() or None
        if action not in ACTIONS:
            return _refuse(400, f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
        if reason is not None and len(reason) > _MAX_REASON:
            return _refuse(400, f"the reason is {len(reason)} characters: at most {_MAX_REASON}")
        admin = (await console.data()).admin
        try:
            if action == "fire":
                fired = await admin.fire(
                    operation_id, form.get("trigger", ""), actor=actor, detail=reason
                )
                ok = True
                message = (
                    f"operation {operation_id}: {fired.from_state} -> {fired.to_state} "
                    f"({fired.trigger}, by {actor})"
                )
            else:
                act = getattr(admin, action)
                (result,) = await act([operation_id], actor=actor, reason=reason)
                ok, message = result.ok, result.message
        except (FireRefused, AdminError, ValueError) as exc:
            ok, message = False, str(exc)
        except asyncpg.PostgresError as exc:
            ok, message = False, f"the database refused: {exc}"
        base = _base(request)
        response = RedirectResponse(f"{base}/operations/{operation_id}", status_code=303)
        response.set_cookie(
            FLASH_COOKIE,
            console.flash_value(message, ok),
            httponly=True,
            samesite="strict",
            path=base or "/",
        )
        _secure(response)
        return response

    return endpoint


# -- audit: verify with progress, reports ----------------------------------------------------


def _verify_start(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        form = await _form(request)
        problem = _csrf_problem(console, request, form)
        if problem is not None:
            return _refuse(403, problem)
        v = console.verification
        if not v.running:
            admin = (await console.data()).admin
            total = await admin.audit_row_count()
            console.verification = v = _Verification(total=total, running=True)

            def progress(rows: int) -> None:
                v.rows = rows

            async def run() -> None:
                try:
                    v.result = await admin.verify(progress=progress)
                    v.rows = v.result.rows
                except Exception as exc:  # shown on the page, as the CLI would print it
                    v.error = f"{type(exc).__name__}: {exc}"
                finally:
                    v.running = False

            v.task = asyncio.create_task(run())
        if request.headers.get("accept", "").startswith("application/json"):
            return JSONResponse(_verification_json(v))
        return RedirectResponse(f"{_base(request)}/audit", status_code=303)

    return endpoint


def _verification_json(v: _Verification) -> dict[str, Any]:
    result = v.result
    return {
        "running": v.running,
        "rows": v.rows,
        "total": v.total,
        "error": v.error,
        "ok": None if result is None else result.ok,
        "operations": None if result is None else result.operations,
        "failures": [] if result is None else result.failures(),
    }


def _verify_status(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        response = JSONResponse(_verification_json(console.verification))
        _secure(response)
        return response

    return endpoint


def _report(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        fmt = request.query_params.get("format", "csv")
        if fmt not in ("csv", "json"):
            return _refuse(400, f"invalid format {fmt!r}: csv or json")
        try:
            since = _time(request, "since")
            until = _time(request, "until")
            types = _many(request, "type")
        except BadInput as exc:
            return _refuse(400, str(exc))
        admin = (await console.data()).admin
        until_at = await admin.resolve(until if until is not None else timedelta(0))

        async def rows() -> AsyncIterator[str]:
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS) if fmt == "csv" else None
            if writer is not None:
                writer.writeheader()
            else:
                out.write("[")
            count = 0
            async for record in admin.report(since, until_at, types):
                row = as_json(record)
                if writer is not None:
                    writer.writerow({c: csv_cell(row[c]) for c in REPORT_COLUMNS})
                else:
                    out.write(("," if count else "") + "\n  " + json.dumps(row, ensure_ascii=False))
                count += 1
                if out.tell() > 64 * 1024:
                    yield out.getvalue()
                    out.seek(0)
                    out.truncate()
            if writer is None:
                out.write("\n]\n" if count else "]\n")
            yield out.getvalue()

        stamp = until_at.strftime("%Y%m%dT%H%M%S")
        response = StreamingResponse(
            rows(),
            media_type="text/csv" if fmt == "csv" else "application/json",
            headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.{fmt}"'},
        )
        _secure(response)
        return response

    return endpoint


# -- static files ----------------------------------------------------------------------------

_STATIC_TYPES: Final = {"console.css": "text/css", "console.js": "text/javascript"}


async def _static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in _STATIC_TYPES:
        return _refuse(404, "not found")
    body = resources.files("pgoutbox.web").joinpath("static", name).read_bytes()
    response = Response(body, media_type=_STATIC_TYPES[name])
    response.headers["Cache-Control"] = "public, max-age=3600"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# -- filters ---------------------------------------------------------------------------------

_C1_AND_DEL: Final = re.compile("[\x7f-\x9f]")


def _payload_text(payload: Any) -> str:
    """The payload as indented JSON that is still valid JSON, with every control character
    written as an escape: JSON escapes C0 itself; DEL and C1, which it would keep, as
    ``\\u00XX``."""
    text = json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=True)
    return _C1_AND_DEL.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _visible(value: Any) -> str:
    return "" if value is None else visible(str(value))


def _visible_lines(value: Any) -> str:
    """:func:`_visible` keeping line breaks, for payloads, errors and tracebacks in ``<pre>``."""
    return "" if value is None else "\n".join(visible(line) for line in str(value).split("\n"))


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    from pgoutbox.cli_ops import format_seconds

    return format_seconds(value)
