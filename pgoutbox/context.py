"""What a handler receives: ``HandlerContext`` and the guarded session of transactional handlers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session


class DoNotRetry(Exception):
    """Raise from a handler to record the attempt as failed and send the operation to ``dead``
    at once, without further attempts (e.g. the card was declined, the address is invalid)."""


# Longer than any Retry-After a provider sends; keeps the database's interval arithmetic finite.
_MAX_SNOOZE_SECONDS = 366 * 24 * 3600.0


class Snooze(Exception):
    """Raise (or return) from a handler to run the step again later without spending an
    attempt: a provider answered "429, retry after 30 s".

    Usage::

        @router.on("payments.charge")
        async def charge(ctx, payload):
            response = await provider.charge(payload, idempotency_key=ctx.idempotency_key)
            if response.status_code == 429:
                raise Snooze(float(response.headers.get("Retry-After", 30)), reason="429")

    The operation waits (in ``pending``, or a later step in its own state) until ``seconds``
    from now in database time, audited as a ``snooze`` transition; ``max_attempts`` is not
    touched. After ``max_snoozes`` snoozes of one operation (a handler option or setting,
    default 100) a snooze counts as an ordinary failed attempt. In a transactional handler
    the transaction rolls back, as for any exception.
    """

    def __init__(self, seconds: float | timedelta, reason: str | None = None) -> None:
        value = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= _MAX_SNOOZE_SECONDS
        ):
            raise ValueError(
                f"invalid Snooze({seconds!r}): a number of seconds or a timedelta, from 0 to "
                f"{_MAX_SNOOZE_SECONDS:.0f} (a year)"
            )
        if reason is not None and not isinstance(reason, str):
            raise ValueError(f"invalid Snooze reason {reason!r}: a string or None")
        self.seconds = float(value)
        self.reason = reason
        super().__init__(f"snoozed for {self.seconds:g} s" + (f": {reason}" if reason else ""))


class SessionControlError(RuntimeError):
    """A handler tried to control the dispatcher-managed transaction."""


def _refuse_control(name: str) -> NoReturn:
    raise SessionControlError(
        f"ctx.session.{name}() is not allowed: pgoutbox commits the handler's writes together "
        "with the operation's success, or rolls them back when the handler raises. Raise an "
        "exception to fail the attempt; use ctx.session.unsafe only if you accept losing "
        "that guarantee."
    )


class GuardedSession:
    """The ``AsyncSession`` of a transactional handler, minus transaction control.

    Everything but ``commit``, ``rollback``, ``close``, ``begin`` and ``begin_nested`` is passed
    to the real session. The dispatcher commits the handler's writes together with the success
    transition; ``unsafe`` is the raw session, for those who accept losing that guarantee.
    """

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @property
    def unsafe(self) -> AsyncSession:
        """The raw session. Committing through it breaks pgoutbox's guarantees."""
        return self._session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def _refuse(self, name: str) -> NoReturn:
        _refuse_control(name)

    async def commit(self) -> NoReturn:
        """Refused: see the class docstring."""
        self._refuse("commit")

    async def rollback(self) -> NoReturn:
        """Refused: see the class docstring."""
        self._refuse("rollback")

    async def close(self) -> NoReturn:
        """Refused: see the class docstring."""
        self._refuse("close")

    def begin(self) -> NoReturn:
        """Refused: see the class docstring."""
        self._refuse("begin")

    def begin_nested(self) -> NoReturn:
        """Refused: see the class docstring."""
        self._refuse("begin_nested")


class SyncGuardedSession:
    """The synchronous ``Session`` of a transactional ``def`` handler, minus transaction control:
    as :class:`GuardedSession`, with the same refusals and the same ``unsafe`` escape hatch."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def unsafe(self) -> Session:
        """The raw session. Committing through it breaks pgoutbox's guarantees."""
        return self._session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def commit(self) -> NoReturn:
        """Refused: see :class:`GuardedSession`."""
        _refuse_control("commit")

    def rollback(self) -> NoReturn:
        """Refused: see :class:`GuardedSession`."""
        _refuse_control("rollback")

    def close(self) -> NoReturn:
        """Refused: see :class:`GuardedSession`."""
        _refuse_control("close")

    def begin(self) -> NoReturn:
        """Refused: see :class:`GuardedSession`."""
        _refuse_control("begin")

    def begin_nested(self) -> NoReturn:
        """Refused: see :class:`GuardedSession`."""
        _refuse_control("begin_nested")


@dataclass(frozen=True)
class HandlerContext:
    """Everything a handler knows about the attempt it is running.

    ``idempotency_key`` is stable across attempts of one operation: pass it to the external
    API (e.g. a payment provider's idempotency key) so a retried attempt cannot charge twice.
    It is the key the operation was published with, or ``pgoutbox-<schema>-<id>``; each step
    of a custom lifecycle gets its own, ``<that key>:<step>``. ``attempt`` counts the attempts
    of this step (``max_attempts`` applies to each step), and ``step`` is the state the step
    runs in (``claimed`` for the first).
    """

    operation_id: int
    operation_type: str
    attempt: int
    max_attempts: int
    idempotency_key: str
    session: GuardedSession | SyncGuardedSession | None  # the latter for a `def` handler
    logger: logging.LoggerAdapter[logging.Logger]
    worker_id: str
    step: str = "claimed"
