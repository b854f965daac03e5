"""``WorkflowRouter``: which handler runs which operation type, composed FastAPI-style.

Composition rules, all of them, in one place (:meth:`WorkflowRouter.handlers` applies them):

1. A handler's full operation type is the dot-join of every prefix on the way down, outermost
   first, then its own name: ``WorkflowRouter(prefix="billing")`` + ``@router.on("charge")``
   handles ``billing.charge``; included with ``prefix="v2"`` into a router with prefix ``app``
   it handles ``app.v2.billing.charge``.
2. Options (``max_attempts``, ``retry``, ``on_lost``) resolve from the nearest level that sets
   them: the handler, then its router, then each including router outward, then the library
   defaults. A child overrides its parent.
3. Two handlers for the same full operation type are an error, as are including a router into
   itself or into one of its own descendants (a cycle), and malformed prefixes or types.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

OnLost = Literal["retry", "dead"]
Handler = Callable[[Any, Any], Awaitable[Any]]
H = TypeVar("H", bound=Handler)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_:-]*(\.[A-Za-z0-9_][A-Za-z0-9_:-]*)*")
DEFAULT_MAX_ATTEMPTS = 5
_MAX_BACKOFF_SECONDS = 10 * 365 * 24 * 3600


class RouterError(ValueError):
    """The router was built wrongly (duplicate type, bad prefix, cycle, bad option)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before attempt n+1: ``min(max_seconds, base_seconds * 2**(n-1))``,
    shortened by up to ``jitter`` (a fraction) at random. Computed by the database.
    ``max_seconds`` is at most ten years."""

    base_seconds: float = 1.0
    max_seconds: float = 300.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("base_seconds", "max_seconds", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RouterError(f"invalid RetryPolicy {name}={value!r}: a number")
        # The bound keeps the database's backoff arithmetic finite: PostgreSQL turns an infinite
        # or huge interval into an error (or, for infinity, a negative interval).
        if not (0 <= self.base_seconds <= self.max_seconds <= _MAX_BACKOFF_SECONDS):
            raise RouterError(
                f"invalid RetryPolicy(base_seconds={self.base_seconds}, "
                f"max_seconds={self.max_seconds}): need 0 <= base_seconds <= max_seconds "
                f"<= {_MAX_BACKOFF_SECONDS} (ten years)"
            )
        if not 0 <= self.jitter <= 1:
            raise RouterError(f"invalid RetryPolicy jitter={self.jitter}: a fraction in [0, 1]")


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class HandlerSpec:
    """A registered handler with its resolved options."""

    operation_type: str
    fn: Handler
    transactional: bool
    max_attempts: int
    retry: RetryPolicy
    on_lost: OnLost


@dataclass(frozen=True)
class _Options:
    max_attempts: int | None = None
    retry: RetryPolicy | None = None
    on_lost: OnLost | None = None

    def under(self, outer: _Options) -> _Options:
        """These options, with what they leave unset taken from ``outer``."""
        return _Options(
            self.max_attempts if self.max_attempts is not None else outer.max_attempts,
            self.retry if self.retry is not None else outer.retry,
            self.on_lost if self.on_lost is not None else outer.on_lost,
        )


@dataclass(frozen=True)
class _Registration:
    name: str
    fn: Handler
    transactional: bool
    options: _Options


@dataclass
class WorkflowRouter:
    """Maps operation types to handlers.

    Usage::

        router = WorkflowRouter(prefix="billing")

        @router.on("charge", max_attempts=3, on_lost="dead")
        async def charge(ctx, payload):
            await payments.charge(payload["card"], idempotency_key=ctx.idempotency_key)

        app = WorkflowRouter()
        app.include_router(router)          # handles "billing.charge"
    """

    prefix: str = ""
    max_attempts: int | None = None
    retry: RetryPolicy | None = None
    on_lost: OnLost | None = None
    _own: dict[str, _Registration] = field(default_factory=dict, init=False, repr=False)
    _children: list[tuple[str, WorkflowRouter]] = field(
        default_factory=list, init=False, repr=False
    )

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)
        _check_options(self.max_attempts, self.retry, self.on_lost, "WorkflowRouter")

    def on(
        self,
        operation_type: str,
        *,
        transactional: bool = False,
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        on_lost: OnLost | None = None,
    ) -> Callable[[H], H]:
        """Register ``async def handler(ctx, payload)`` for ``operation_type``.

        ``transactional=True`` runs it inside one dispatcher-managed transaction
        (``ctx.session``) that commits together with the success transition.
        ``max_attempts`` caps attempts (default 5), ``retry`` sets the backoff, ``on_lost``
        says what happens when the worker is lost mid-handler: ``"retry"`` (default) or
        ``"dead"`` for side effects that must never be repeated blindly.
        """
        if not isinstance(operation_type, str) or not _NAME.fullmatch(operation_type):
            raise RouterError(
                f"invalid operation type {operation_type!r}: dot-separated names of letters, "
                "digits, _ : - (e.g. 'charge' or 'billing.charge')"
            )
        _check_options(max_attempts, retry, on_lost, f"handler {operation_type!r}")

        def register(fn: H) -> H:
            handler = fn  # returned unchanged (iscoroutinefunction narrows fn's type below)
            if not inspect.iscoroutinefunction(fn):
                raise RouterError(
                    f"handler for {operation_type!r} must be an async function "
                    f"`async def {getattr(fn, '__name__', 'handler')}(ctx, payload)`"
                )
            if operation_type in self._own:
                raise RouterError(
                    f"operation type {operation_type!r} already has a handler "
                    f"({self._own[operation_type].fn.__qualname__}) in this router"
                )
            options = _Options(max_attempts, retry, on_lost)
            self._own[operation_type] = _Registration(operation_type, fn, transactional, options)
            try:
                self.handlers()  # a clash with an included router is an error now, not later
            except RouterError:
                del self._own[operation_type]
                raise
            return handler

        return register

    def include_router(self, router: WorkflowRouter, *, prefix: str = "") -> None:
        """Handle everything ``router`` handles, under ``prefix`` (and the router's own)."""
        if not isinstance(router, WorkflowRouter):
            raise RouterError(f"include_router expects a WorkflowRouter, got {router!r}")
        _check_prefix(prefix)
        if router is self:
            raise RouterError("a router cannot include itself")
        if any(descendant is self for descendant in router._descendants()):
            raise RouterError(
                f"including router {router.prefix or '<no prefix>'!r} would create a cycle: "
                "it already (indirectly) includes this router"
            )
        self._children.append((prefix, router))
        try:
            self.handlers()
        except RouterError:
            self._children.pop()
            raise

    def handlers(self) -> Mapping[str, HandlerSpec]:
        """Every handler reachable from this router, by full operation type."""
        found: dict[str, HandlerSpec] = {}
        for spec in self._walk((), _Options()):
            if spec.operation_type in found:
                raise RouterError(
                    f"operation type {spec.operation_type!r} has two handlers: "
                    f"{found[spec.operation_type].fn.__qualname__} and {spec.fn.__qualname__}"
                )
            found[spec.operation_type] = spec
        return found

    def _walk(self, prefixes: tuple[str, ...], outer: _Options) -> Iterator[HandlerSpec]:
        here = (*prefixes, self.prefix) if self.prefix else prefixes
        options = _Options(self.max_attempts, self.retry, self.on_lost).under(outer)
        for registration in self._own.values():
            resolved = registration.options.under(options)
            yield HandlerSpec(
                operation_type=".".join((*here, registration.name)),
                fn=registration.fn,
                transactional=registration.transactional,
                max_attempts=resolved.max_attempts or DEFAULT_MAX_ATTEMPTS,
                retry=resolved.retry or DEFAULT_RETRY,
                on_lost=resolved.on_lost or "retry",
            )
        for include_prefix, child in self._children:
            yield from child._walk((*here, include_prefix) if include_prefix else here, options)

    def _descendants(self) -> Iterator[WorkflowRouter]:
        for _, child in self._children:
            yield child
            yield from child._descendants()


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or (prefix and not _NAME.fullmatch(prefix)):
        raise RouterError(
            f"invalid prefix {prefix!r}: dot-separated names of letters, digits, _ : - with no "
            "leading, trailing or double dots (e.g. 'billing' or 'billing.v2'), or ''"
        )


def _check_options(
    max_attempts: int | None, retry: RetryPolicy | None, on_lost: str | None, where: str
) -> None:
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise RouterError(f"{where}: invalid max_attempts {max_attempts!r}, an integer >= 1")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise RouterError(f"{where}: retry must be a RetryPolicy, got {retry!r}")
    if on_lost not in (None, "retry", "dead"):
        raise RouterError(f"{where}: invalid on_lost {on_lost!r}, use 'retry' or 'dead'")
