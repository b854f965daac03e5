"""Operator controls of flow: pause and resume, and run-time overrides of limits.

Called through :class:`pgoutbox.admin.Admin` (``admin.pause(...)``) or the CLI (``pgoutbox
pause``, ``pgoutbox resume``, ``pgoutbox limits``). Every change is a row that names the
operator (``actor``, free text) and the database role (set by the database): ``flow_pauses``
keeps each pause and its resume, ``flow_overrides`` every override. Workers read both every
poll interval, so a change holds cluster wide within one poll interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import asyncpg

from pgoutbox.flow import LimitError, Rate, check_burst, check_concurrency
from pgoutbox.sql import Query

Scope = Literal["channel", "type", "limit"]
SCOPES: tuple[Scope, ...] = ("channel", "type", "limit")
_MAX_TEXT = 1000


class FlowControlError(ValueError):
    """A pause, resume or override that cannot be done (nothing was written); says why."""


@dataclass(frozen=True)
class PauseInfo:
    """A pause in force: what is paused (``scope`` and ``target``, ``partition`` of a limit),
    who paused it (``paused_by``, and the database role ``paused_role``), why and when."""

    id: int
    scope: str
    target: str
    partition: str | None
    paused_by: str
    reason: str
    paused_role: str
    paused_at: datetime

    @property
    def what(self) -> str:
        """``type charge``, ``limit stripe partition acct_1``, ``channel default``."""
        part = f" partition {self.partition}" if self.partition is not None else ""
        return f"{self.scope} {self.target}{part}"


@dataclass(frozen=True)
class LimitInfo:
    """A declared limit, the override in force (if any) and the numbers that apply."""

    name: str
    operation_types: list[str]
    partition_by: str | None
    concurrency: int | None
    rate: Rate | None
    burst: int
    declared_at: datetime
    overridden_by: str | None
    override_reason: str | None
    overridden_at: datetime | None
    running: int  # operations of its types holding a lease now


def utc(when: datetime) -> str:
    """``when`` as the CLI shows times: UTC, to the second, ``Z``."""
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


def check_text(value: object, what: str) -> str:
    """``value`` if it is non-blank text of at most 1000 characters without NUL."""
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_TEXT or "\x00" in value:
        raise FlowControlError(
            f"invalid {what} {value!r}: 1 to {_MAX_TEXT} characters (no NUL); say who acts and why"
        )
    return value


def _check_target(scope: str, target: object, partition: object) -> tuple[Scope, str, str | None]:
    if scope not in SCOPES:
        raise FlowControlError(f"invalid scope {scope!r}: one of {', '.join(SCOPES)}")
    name = check_text(target, f"{scope} name")
    if partition is not None:
        if scope != "limit":
            raise FlowControlError(
                f"a partition ({partition!r}) can only be paused under a limit (scope 'limit'), "
                f"not under a {scope}"
            )
        if not isinstance(partition, str) or "\x00" in partition or len(partition) > _MAX_TEXT:
            raise FlowControlError(f"invalid partition {partition!r}: text without NUL")
    return scope, name, partition


async def pause(
    conn: asyncpg.Connection,
    q: dict[str, Query],
    scope: str,
    target: str,
    *,
    partition: str | None = None,
    actor: str,
    reason: str,
) -> PauseInfo:
    """Pause ``target``; raise :class:`FlowControlError` if it is paused already."""
    scope, target, partition = _check_target(scope, target, partition)
    actor, reason = check_text(actor, "actor"), check_text(reason, "reason")
    row = await q["flow_pauses_add"].fetchrow(
        conn, scope=scope, target=target, partition=partition, actor=actor, reason=reason
    )
    if row is None:
        current = [
            p
            for p in await pauses(conn, q)
            if (p.scope, p.target, p.partition) == (scope, target, partition)
        ]
        since = f" by {current[0].paused_by} since {utc(current[0].paused_at)}" if current else ""
        raise FlowControlError(f"{scope} {target!r} is paused already{since}; nothing changed")
    return PauseInfo(row["id"], scope, target, partition, actor, reason, "", row["paused_at"])


async def resume(
    conn: asyncpg.Connection,
    q: dict[str, Query],
    scope: str,
    target: str,
    *,
    partition: str | None = None,
    actor: str,
    reason: str,
) -> datetime:
    """Close the pause of ``target``; the time it had been paused since. Raises
    :class:`FlowControlError` if it is not paused."""
    scope, target, partition = _check_target(scope, target, partition)
    actor, reason = check_text(actor, "actor"), check_text(reason, "reason")
    row = await q["flow_pauses_close"].fetchrow(
        conn, scope=scope, target=target, partition=partition, actor=actor, reason=reason
    )
    if row is None:
        part = f" partition {partition!r}" if partition is not None else ""
        raise FlowControlError(
            f"{scope} {target!r}{part} is not paused; nothing changed (`pgoutbox pause --list` "
            "shows what is)"
        )
    paused_at: datetime = row["paused_at"]
    return paused_at


async def pauses(conn: asyncpg.Connection, q: dict[str, Query]) -> list[PauseInfo]:
    """The pauses in force, oldest first."""
    return [
        PauseInfo(
            r["id"], r["scope"], r["target"], r["partition"], r["paused_by"], r["pause_reason"],
            r["paused_role"], r["paused_at"],
        )
        for r in await q["flow_pauses_open"].fetch(conn)
    ]  # fmt: skip


async def limits(conn: asyncpg.Connection, q: dict[str, Query]) -> list[LimitInfo]:
    """Every declared limit with the numbers in force."""
    found = []
    for r in await q["flow_limits_all"].fetch(conn):
        concurrency = r["override_concurrency"] or r["concurrency"]
        rate = None
        if r["override_rate_count"] is not None:
            rate = Rate(r["override_rate_count"], r["override_rate_period_seconds"])
        elif r["rate_count"] is not None:
            rate = Rate(r["rate_count"], r["rate_period_seconds"])
        found.append(
            LimitInfo(
                name=r["name"],
                operation_types=list(r["operation_types"]),
                partition_by=r["partition_by"],
                concurrency=concurrency,
                rate=rate,
                burst=r["override_burst"] or r["burst"],
                declared_at=r["declared_at"],
                overridden_by=r["override_actor"],
                override_reason=r["override_reason"],
                overridden_at=r["override_set_at"],
                running=r["running"],
            )
        )
    return found


async def override_limit(
    conn: asyncpg.Connection,
    q: dict[str, Query],
    name: str,
    *,
    concurrency: int | None = None,
    rate: Rate | str | None = None,
    burst: int | None = None,
    actor: str,
    reason: str,
) -> None:
    """Set a declared limit's numbers at run time (None: as declared). With none given, the
    limit goes back to its declaration. Raises :class:`FlowControlError` for an unknown limit
    or a bad number (nothing written)."""
    actor, reason = check_text(actor, "actor"), check_text(reason, "reason")
    try:
        check_concurrency(concurrency, name)
        parsed = Rate.parse(rate) if rate is not None else None
        if burst is not None:
            check_burst(burst, name)
    except LimitError as exc:
        raise FlowControlError(str(exc)) from None
    known = {info.name: info for info in await limits(conn, q)}
    if name not in known:
        names = ", ".join(sorted(known)) or (
            "none yet (a worker declares its router's limits when it starts)"
        )
        raise FlowControlError(f"no limit named {name!r}; declared limits: {names}")
    await q["flow_overrides_add"].execute(
        conn,
        limit_name=name,
        concurrency=concurrency,
        rate_count=parsed.count if parsed else None,
        rate_period_seconds=parsed.period_seconds if parsed else None,
        burst=burst,
        actor=actor,
        reason=reason,
    )
