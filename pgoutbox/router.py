"""``WorkflowRouter``: which handler runs which operation type, composed FastAPI-style.

Composition rules, all of them, in one place (:meth:`WorkflowRouter.handlers` applies them):

1. A handler's full operation type is the dot-join of every prefix on the way down, outermost
   first, then its own name: ``WorkflowRouter(prefix="billing")`` + ``@router.on("charge")``
   handles ``billing.charge``; included with ``prefix="v2"`` into a router with prefix ``app``
   it handles ``app.v2.billing.charge``.
2. Options (``max_attempts``, ``retry``, ``on_lost``) resolve from the nearest level that sets
   them: the handler, then its router, then each including router outward, then the library
   defaults. A child overrides its parent.
3. Two handlers for the same full operation type (and step) are an error, as are including a
   router into itself or into one of its own descendants (a cycle), and malformed prefixes or
   types.
4. An operation type with its own lifecycle (``lifecycle=`` on any one of its handlers) needs a
   handler for every working state of it: ``@router.on(type)`` runs in ``claimed``, and
   ``@router.on(type, step="charged")`` in ``charged``. :meth:`WorkflowRouter.handlers` checks
   that every step is there (a router that is still being built may lack some).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

from pgoutbox.flow import Limit, LimitError, Rate
from pgoutbox.lifecycle import CLAIMED, DEFAULT_LIFECYCLE, Lifecycle

OnLost = Literal["retry", "dead"]
# `async def handler(ctx, payload)`, or a plain `def` one (run in a thread: sync_handlers.py).
Handler = Callable[[Any, Any], Awaitable[Any]] | Callable[[Any, Any], Any]
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
    """A registered handler with its resolved options.

    For an operation type, :meth:`WorkflowRouter.handlers` gives the spec of its first step
    (state ``claimed``); ``steps`` holds the specs of its later steps by state, and
    :meth:`for_step` finds any of them.
    """

    operation_type: str
    fn: Handler
    transactional: bool
    max_attempts: int
    retry: RetryPolicy
    on_lost: OnLost
    step: str = CLAIMED
    lifecycle: Lifecycle = DEFAULT_LIFECYCLE
    steps: Mapping[str, HandlerSpec] = field(default_factory=dict, compare=False)
    # Every limit the type is subject to, whichever of its handlers declared it (all steps).
    limits: tuple[Limit, ...] = ()
    # The step's own (timeout=, max_snoozes=); None: the worker's settings decide.
    timeout_seconds: float | None = None
    max_snoozes: int | None = None

    def for_step(self, state: str) -> HandlerSpec:
        """The spec of the step that runs in ``state``."""
        return self if state == self.step else self.steps[state]

    def all_steps(self) -> tuple[HandlerSpec, ...]:
        """The specs of every step of the type, the first one first."""
        return (self, *self.steps.values())


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
    step: str
    lifecycle: Lifecycle | None
    limits: tuple[Limit, ...]
    # The type's own limit (concurrency=, rate=): named after the type's full name, so it is
    # made when the prefixes are known.
    own_limit: tuple[int | None, Rate | None]
    timeout_seconds: float | None = None
    max_snoozes: int | None = None


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
    _own: dict[tuple[str, str], _Registration] = field(default_factory=dict, init=False, repr=False)
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
        lifecycle: Lifecycle | None = None,
        step: str = CLAIMED,
        concurrency: int | None = None,
        rate: Rate | str | None = None,
        limit: Limit | Sequence[Limit] | None = None,
        timeout: float | timedelta | None = None,
        max_snoozes: int | None = None,
    ) -> Callable[[H], H]:
        """Register ``async def handler(ctx, payload)`` for ``operation_type``.

        A plain ``def handler(ctx, payload)`` runs in the worker's thread pool (as many threads
        as ``n_workers``), so blocking code does not stall the event loop (docs/sync.md).
        ``transactional=True`` runs it inside one dispatcher-managed transaction
        (``ctx.session``; a synchronous ``Session`` for a ``def`` handler) that commits together
        with the success transition.
        ``max_attempts`` caps attempts (default 5; per step), ``retry`` sets the backoff,
        ``on_lost`` says what happens when the worker is lost mid-handler: ``"retry"``
        (default) or ``"dead"`` for side effects that must never be repeated blindly.

        ``lifecycle`` gives the type its own :class:`~pgoutbox.lifecycle.Lifecycle` (say it
        on one of the type's handlers); ``step`` names the working state this handler runs in
        (default ``claimed``, the first step). A step returns the name of the trigger to fire
        next, e.g. ``return "charge"``; with the default lifecycle the return value is ignored
        and the operation succeeds.

        ``concurrency`` (at most this many running at once) and ``rate`` (starts per period,
        ``"100/s"``) limit the type cluster wide; ``limit`` subjects it to shared
        :class:`~pgoutbox.flow.Limit` objects too (a group of types, or per partition). A
        limit applies to every step of the type. See docs/flow-control.md.

        ``timeout`` (seconds or a ``timedelta``; ``async def`` handlers only: a plain ``def``
        runs in a thread, which cannot be interrupted) cancels a handler that runs longer: the
        attempt fails with "timed out after N s" and is retried per ``retry`` (a transactional
        handler's transaction rolls back); default: the ``handler_timeout_seconds`` setting
        (none, and never for a ``def``). ``max_snoozes`` bounds how often an operation may
        :class:`~pgoutbox.Snooze` before a snooze counts as a failed attempt (default: the
        ``max_snoozes`` setting, 100).
        """
        if not isinstance(operation_type, str) or not _NAME.fullmatch(operation_type):
            raise RouterError(
                f"invalid operation type {operation_type!r}: dot-separated names of letters, "
                "digits, _ : - (e.g. 'charge' or 'billing.charge')"
            )
        _check_options(max_attempts, retry, on_lost, f"handler {operation_type!r}")
        if lifecycle is not None and not isinstance(lifecycle, Lifecycle):
            raise RouterError(
                f"handler {operation_type!r}: lifecycle must be a Lifecycle (Lifecycle.define"
                f"(...)), got {lifecycle!r}"
            )
        if not isinstance(step, str) or not step:
            raise RouterError(f"handler {operation_type!r}: invalid step {step!r}, a state name")
        if lifecycle is not None and step not in lifecycle.working:
            raise RouterError(
                f"handler {operation_type!r}: {step!r} is not a working state of lifecycle "
                f"{lifecycle.name!r} (working states: {', '.join(sorted(lifecycle.working))})"
            )
        limits, own_limit = _check_limits(operation_type, concurrency, rate, limit)
        timeout_seconds = _check_timeout(operation_type, timeout)
        _check_max_snoozes(operation_type, max_snoozes)
        key = (operation_type, step)

        def register(fn: H) -> H:
            handler = fn  # returned unchanged (iscoroutinefunction narrows fn's type below)
            if not callable(fn) or inspect.isgeneratorfunction(fn):
                raise RouterError(
                    f"handler for {operation_type!r} must be a function "
                    f"`async def {getattr(fn, '__name__', 'handler')}(ctx, payload)` (or a "
                    "plain `def`, run in a thread)"
                )
            if timeout_seconds is not None and not inspect.iscoroutinefunction(fn):
                raise RouterError(
                    f"handler for {operation_type!r}: timeout= needs an `async def` handler; a "
                    "plain `def` runs in a thread, which cannot be interrupted (time out the "
                    "call it makes instead, e.g. the HTTP client's timeout)"
                )
            if key in self._own:
                where = "" if step == CLAIMED else f" for step {step!r}"
                raise RouterError(
                    f"operation type {operation_type!r} already has a handler{where} "
                    f"({self._own[key].fn.__qualname__}) in this router"
                )
            options = _Options(max_attempts, retry, on_lost)
            self._own[key] = _Registration(
                operation_type,
                fn,
                transactional,
                options,
                step,
                lifecycle,
                limits,
                own_limit,
                timeout_seconds=timeout_seconds,
                max_snoozes=max_snoozes,
            )
            try:
                self._resolve(complete=False)  # a clash is an error now, not later
            except RouterError:
                del self._own[key]
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
            self._resolve(complete=False)
        except RouterError:
            self._children.pop()
            raise

    def handlers(self) -> Mapping[str, HandlerSpec]:
        """Every operation type handled from this router, by full name: the spec of its first
        step, with its later steps in ``steps``. Raises :class:`RouterError` if a type lacks a
        step of its lifecycle."""
        return self._resolve(complete=True)

    def _resolve(self, *, complete: bool) -> dict[str, HandlerSpec]:
        by_type: dict[str, dict[str, tuple[HandlerSpec, Lifecycle | None]]] = {}
        for spec, lifecycle in self._walk((), _Options()):
            steps = by_type.setdefault(spec.operation_type, {})
            if spec.step in steps:
                where = "" if spec.step == CLAIMED else f" for step {spec.step!r}"
                raise RouterError(
                    f"operation type {spec.operation_type!r} has two handlers{where}: "
                    f"{steps[spec.step][0].fn.__qualname__} and {spec.fn.__qualname__}"
                )
            steps[spec.step] = (spec, lifecycle)
        found: dict[str, HandlerSpec] = {}
        by_name: dict[str, Lifecycle] = {}
        limits_by_name: dict[str, Limit] = {}
        for operation_type, steps in by_type.items():
            limits: dict[str, Limit] = {}
            for spec, _ in steps.values():
                for limit in spec.limits:
                    known_limit = limits_by_name.setdefault(limit.name, limit)
                    if known_limit != limit:
                        raise RouterError(
                            f"two different limits are both named {limit.name!r} ({known_limit} "
                            f"and {limit}); share one Limit object or give each its own name"
                        )
                    limits[limit.name] = limit
            lifecycle = _one_lifecycle(operation_type, [lc for _, lc in steps.values()])
            if lifecycle is not None:
                known = by_name.setdefault(lifecycle.name, lifecycle)
                if known.digest != lifecycle.digest:
                    raise RouterError(
                        f"two different lifecycles are both named {lifecycle.name!r}; give "
                        "each definition its own name"
                    )
            resolved = lifecycle or DEFAULT_LIFECYCLE
            for step, (spec, _) in steps.items():
                # A step may be registered before the handler that declares the lifecycle
                # (or in a child router): only a complete router must have it by now.
                if lifecycle is None and not complete:
                    continue
                if step not in resolved.working:
                    raise RouterError(
                        f"operation type {operation_type!r}: handler {spec.fn.__qualname__} "
                        f"runs step {step!r}, but lifecycle {resolved.name!r} has no such "
                        f"working state (working states: {', '.join(sorted(resolved.working))})"
                    )
            if complete:
                missing = sorted(resolved.working - set(steps))
                if missing:
                    raise RouterError(
                        f"operation type {operation_type!r} (lifecycle {resolved.name!r}) has no "
                        f"handler for step(s) {', '.join(map(repr, missing))}: register "
                        f"@router.on({operation_type!r}, step=...) for each working state"
                    )
            specs = {
                step: dataclasses.replace(
                    spec, lifecycle=resolved, limits=tuple(sorted(limits.values(), key=_by_name))
                )
                for step, (spec, _) in steps.items()
            }
            first = specs.get(CLAIMED) or next(iter(specs.values()))
            found[operation_type] = dataclasses.replace(
                first, steps={s: v for s, v in specs.items() if s != first.step}
            )
        return found

    def _walk(
        self, prefixes: tuple[str, ...], outer: _Options
    ) -> Iterator[tuple[HandlerSpec, Lifecycle | None]]:
        here = (*prefixes, self.prefix) if self.prefix else prefixes
        options = _Options(self.max_attempts, self.retry, self.on_lost).under(outer)
        for registration in self._own.values():
            resolved = registration.options.under(options)
            full_name = ".".join((*here, registration.name))
            limits = registration.limits
            concurrency, rate = registration.own_limit
            if concurrency is not None or rate is not None:
                own = Limit(full_name, concurrency=concurrency, rate=rate)
                limits = (*limits, own)
            spec = HandlerSpec(
                operation_type=full_name,
                fn=registration.fn,
                transactional=registration.transactional,
                max_attempts=resolved.max_attempts or DEFAULT_MAX_ATTEMPTS,
                retry=resolved.retry or DEFAULT_RETRY,
                on_lost=resolved.on_lost or "retry",
                step=registration.step,
                limits=limits,
                timeout_seconds=registration.timeout_seconds,
                max_snoozes=registration.max_snoozes,
            )
            yield spec, registration.lifecycle
        for include_prefix, child in self._children:
            yield from child._walk((*here, include_prefix) if include_prefix else here, options)

    def _descendants(self) -> Iterator[WorkflowRouter]:
        for _, child in self._children:
            yield child
            yield from child._descendants()


def _one_lifecycle(operation_type: str, declared: list[Lifecycle | None]) -> Lifecycle | None:
    given = {lc.digest: lc for lc in declared if lc is not None}
    if len(given) > 1:
        names = sorted(lc.name for lc in given.values())
        raise RouterError(
            f"operation type {operation_type!r}: its handlers declare different lifecycles "
            f"({', '.join(names)}); say lifecycle= once, or the same one on each"
        )
    return next(iter(given.values()), None)


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


# A day: longer than any lease, and what an asyncio timer and the audit's wording handle.
_MAX_TIMEOUT_SECONDS = 24 * 3600.0


def _check_timeout(operation_type: str, timeout: float | timedelta | None) -> float | None:
    """``timeout`` in seconds, or RouterError naming it."""
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds <= _MAX_TIMEOUT_SECONDS
    ):
        raise RouterError(
            f"handler {operation_type!r}: invalid timeout {timeout!r}: a number of seconds or "
            f"a timedelta, more than 0 and at most a day ({_MAX_TIMEOUT_SECONDS:.0f} s)"
        )
    return float(seconds)


def _check_max_snoozes(operation_type: str, max_snoozes: int | None) -> None:
    if max_snoozes is not None and (
        isinstance(max_snoozes, bool) or not isinstance(max_snoozes, int) or max_snoozes < 0
    ):
        raise RouterError(
            f"handler {operation_type!r}: invalid max_snoozes {max_snoozes!r}, an integer >= 0 "
            "(0: every snooze counts as a failed attempt)"
        )


def _by_name(limit: Limit) -> str:
    return limit.name


def _check_limits(
    operation_type: str,
    concurrency: int | None,
    rate: Rate | str | None,
    limit: Limit | Sequence[Limit] | None,
) -> tuple[tuple[Limit, ...], tuple[int | None, Rate | None]]:
    """The shared limits given to a handler, and its type's own (concurrency, rate)."""
    where = f"handler {operation_type!r}"
    try:
        given = () if limit is None else (limit,) if isinstance(limit, Limit) else tuple(limit)
    except TypeError:
        given = (limit,)  # type: ignore[assignment]  # reported just below
    for each in given:
        if not isinstance(each, Limit):
            raise RouterError(
                f"{where}: limit must be a Limit or a list of them (Limit('stripe', "
                f"concurrency=10)), got {each!r}"
            )
    names = [each.name for each in given]
    if len(set(names)) != len(names):
        raise RouterError(f"{where}: the same limit name is given twice: {names}")
    try:
        own = Limit(operation_type, concurrency=concurrency, rate=rate)
    except LimitError as exc:
        if concurrency is None and rate is None:
            return given, (None, None)
        raise RouterError(f"{where}: {exc}") from None
    return given, (own.concurrency, own.steady_rate)
