"""The operator commands of ``pgoutbox``: ``ops``, ``audit report``, ``stats``, ``workers``.

Each command is a thin layer over one :class:`pgoutbox.admin.Admin` method: it parses options,
calls the method, and prints a table (``rich``) or, with ``--json``, the result as JSON (stable
keys, ISO-8601 timestamps). Exit codes: 0 done; 1 an operation was not found or an action was
refused; 2 bad usage, or a database that cannot be reached or used. Failures are one ``Error:``
line on standard error (pgoutbox/cli_errors.py).

:func:`register` adds them to the ``pgoutbox`` group (see ``pgoutbox/cli.py``).
"""

from __future__ import annotations

import asyncio
import csv
import getpass
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pgoutbox.admin import (
    LIVE_WITHIN,
    PURGE_BATCH_SIZE,
    ActionResult,
    Admin,
    Operation,
    OperationDetail,
    OperationFilter,
    Stats,
    TypeStats,
    When,
    as_json,
)
from pgoutbox.audit import AuditVerification
from pgoutbox.cli_errors import DATABASE_ERRORS, database_error, visible
from pgoutbox.flow_admin import PauseInfo, utc
from pgoutbox.lifecycle import CLAIMED, DEFAULT_LIFECYCLE, FINISHED_STATES
from pgoutbox.settings import DatabaseSettings

T = TypeVar("T")

STATE_STYLE = {
    "pending": "yellow",
    "claimed": "cyan",
    "failed": "magenta",
    "succeeded": "green",
    "dead": "red",
    "cancelled": "dim",
}
STALE_REASONS = {
    "unhandled": "no live worker handles it",
    "overdue": "due for longer than --older-than",
    "lease_expired": "lease expired, not rescued",
}
# The columns of `audit report --format csv`, in order (the JSON objects have the same keys).
REPORT_COLUMNS = (
    "recorded_at",
    "operation_id",
    "seq",
    "operation_type",
    "trigger",
    "from_state",
    "to_state",
    "attempt",
    "actor",
    "db_role",
    "detail",
    "prev_hash",
    "hash",
)


class _HasDatabase(Protocol):
    def database(self) -> DatabaseSettings: ...


# -- option types ----------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

MAX_DURATION = timedelta(days=36525)
"""The longest duration an option takes: 100 years (``36525d``). Anything longer is a typo, and
much longer would overflow: Python's timedelta ends at 999999999 days, and a time counted back
from now must stay after the year 1."""
_DURATION_RANGE = "durations go from 0s to 36525d (100 years)"
_TIME_RANGE = (
    "times go from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z (Python's datetime; "
    "PostgreSQL's timestamptz holds all of them)"
)
# A year of five or more digits, or the year 0: ISO-8601 but no datetime can hold it.
_YEAR_OUT_OF_RANGE = re.compile(r"[+-]?(?:\d{5,}|0000)-")


class OutOfRange(ValueError):
    """A duration or time written correctly but beyond what the options accept: the message
    names the value and the allowed range."""


def parse_duration(value: str, *, positive: bool = False) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``2w`` (combinable: ``1h30m``) as a timedelta, from 0s
    (more than 0s when ``positive``) to :data:`MAX_DURATION`."""
    text = value.strip().replace(" ", "")
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(
            f"invalid duration {value!r}: use a number and a unit s, m, h, d or w, e.g. 90s, "
            "15m, 2h, 7d, 1h30m"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    # Checked on the float, before timedelta sees it: a long run of digits is inf, which
    # timedelta refuses with an OverflowError, and a large finite one overflows its days.
    if not seconds <= MAX_DURATION.total_seconds():
        raise OutOfRange(f"duration {value!r} is out of range: {_DURATION_RANGE}")
    duration = timedelta(seconds=seconds)
    if positive and duration <= timedelta(0):  # 0.0000001s is 0 too: timedelta counts in µs
        raise OutOfRange(
            f"duration {value!r} is out of range: this one must be more than 0s and at most "
            "36525d (100 years)"
        )
    return duration


def parse_when(value: str) -> When:
    """A point in time: ``now``, a duration meaning that long ago (``7d``: 7 days before the
    database's clock, at most :data:`MAX_DURATION`), or an ISO-8601 date or datetime (UTC
    unless it has an offset) that is a valid instant in UTC (years 1 to 9999)."""
    text = value.strip()
    if text == "now":
        return timedelta(0)
    try:
        return parse_duration(text)
    except OutOfRange:
        raise
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        if _YEAR_OUT_OF_RANGE.match(text):
            raise OutOfRange(f"time {value!r} is out of range: {_TIME_RANGE}") from None
        raise ValueError(
            f"invalid time {value!r}: use an ISO-8601 date or datetime (2026-11-01, "
            "2026-11-01T12:00:00+01:00; UTC when no offset is given), 'now', or a duration "
            "meaning that long ago (30m, 24h, 7d)"
        ) from None
    if len(text) == 10:  # a bare date: midnight UTC
        parsed = datetime.combine(date.fromisoformat(text), datetime.min.time())
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    try:
        # What the database is sent (asyncpg converts to UTC): 9999-12-31T23:00-05:00 is a
        # valid datetime whose UTC instant is past the year 9999. Kept with its own offset.
        parsed.astimezone(UTC)
    except OverflowError:
        raise OutOfRange(f"time {value!r} is out of range: {_TIME_RANGE}") from None
    return parsed


def _converter(
    parse: Callable[[str], Any],
) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """An option callback turning its text into a value with ``parse`` (a usage error if it
    cannot)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def _positive_duration(value: str) -> timedelta:
    return parse_duration(value, positive=True)


DURATION: dict[str, Any] = {"metavar": "DURATION", "callback": _converter(parse_duration)}
POSITIVE_DURATION: dict[str, Any] = {
    "metavar": "DURATION",
    "callback": _converter(_positive_duration),
}
WHEN: dict[str, Any] = {"metavar": "WHEN", "callback": _converter(parse_when)}
# Integers as the database stores them: an operation id is a bigint, a LIMIT takes one; a batch
# size and a number of attempts are integers. Larger ones are a usage error naming the option,
# instead of an encoding error from the driver.
OPERATION_ID = click.IntRange(min=1, max=2**63 - 1)
BIGINT_COUNT = click.IntRange(min=1, max=2**63 - 1)
INT_COUNT = click.IntRange(min=1, max=2**31 - 1)


def _check_states(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for state in value:
        if not _STATE_NAME.fullmatch(state):
            raise click.BadParameter(
                f"{state!r} is not a state name: the default lifecycle's are "
                f"{', '.join(DEFAULT_LIFECYCLE.states)}; custom lifecycles add lower-case names "
                "such as awaiting_approval"
            )
    return value


_STATE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise click.UsageError("cannot tell which OS user you are: pass --actor NAME") from None


def _check_actor(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    actor = _default_actor() if value is None else value
    if not actor.strip() or len(actor) > 200:
        raise click.BadParameter("name who acts (a person or a job), 1 to 200 characters")
    return actor


def _action_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json_", is_flag=True, help="Print the results as JSON.")(fn)
    fn = click.option(
        "--reason", help="Why (recorded in the audit row's detail), e.g. a ticket number."
    )(fn)
    fn = click.option(
        "--actor",
        callback=_check_actor,
        help="Who acts, recorded in the audit trail (default: the OS user).",
    )(fn)
    return click.argument("ids", nargs=-1, required=True, type=OPERATION_ID)(fn)


# -- running and printing --------------------------------------------------------------------


def _run(
    obj: _HasDatabase, action: Callable[[Admin], Awaitable[T]], live_within: timedelta = LIVE_WITHIN
) -> T:
    """Run ``action`` with an open Admin. A database that cannot be reached or used exits 2;
    pgoutbox's own errors (a missing operation: exit 1) are reported by the ``pgoutbox`` group
    (pgoutbox/cli_errors.py)."""
    settings = obj.database()

    async def go() -> T:
        async with Admin(settings, live_within=live_within) as admin:
            return await action(admin)

    try:
        return asyncio.run(go())
    except BrokenPipeError:
        raise  # the reader went away (`| head`): click ends the command quietly
    except DATABASE_ERRORS as exc:
        raise database_error(exc, settings) from exc


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped: don't squeeze tables into 80 columns (COLUMNS=... chooses a width).
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


_RIGHT_ALIGNED = frozenset({"id", "attempts", "#", "seq", "attempt", "duration"})
_FREE_TEXT = frozenset({"last error", "stale because", "error", "detail"})


def _add_columns(table: Table, *names: str) -> None:
    """Free text (errors, details) wraps when the terminal is narrow; ids, states and
    timestamps stay on one line."""
    for name in names:
        table.add_column(
            name,
            justify="right" if name in _RIGHT_ALIGNED else "left",
            no_wrap=name not in _FREE_TEXT,
        )


def _print_json(value: Any) -> None:
    click.echo(json.dumps(as_json(value), indent=2, ensure_ascii=False))


def _text(value: Any, style: str = "") -> Text:
    """A table cell, the one way a value from the database reaches a table: taken literally
    (errors and payloads may contain rich markup) and with its control characters escaped
    (:func:`visible`: a payload's ``\\x1b[2J`` or ``\\r\\n`` is shown, not obeyed). A cell
    spans several lines only where the command puts them (:func:`_actor_and_role`)."""
    return Text("-" if value is None or value == "" else visible(str(value)), style=style)


def _actor_and_role(actor: str, db_role: str | None) -> Text:
    """The declared actor, and beneath it the database role that acted when that differs (an
    operator's name behind a shared role, a worker id): both are in the audit row. The line
    break is the command's; each name is a cell of its own (:func:`_text`)."""
    if db_role is None or db_role == actor:
        return _text(actor)
    return Text("\n").join([_text(actor), _text(f"as {db_role}")])


def _state(state: str | None) -> Text:
    return _text(state, STATE_STYLE.get(state or "", ""))


def _time(value: datetime | None, *, ms: bool = False) -> Text:
    if value is None:
        return _text(None)
    text = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f" if ms else "%Y-%m-%d %H:%M:%S")
    return Text((text[:-3] if ms else text) + "Z")


def format_seconds(seconds: float | None) -> str:
    """A duration for people: ``0.31s``, ``42s``, ``5m 03s``, ``2h 10m``, ``3d 4h``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit} {whole % size // sub_size}{sub}"
    if whole >= 60:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole}s"


def _count(n: int, noun: str) -> str:
    """``1 operation``, ``2 operations``."""
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def shorten(text: str, limit: int) -> str:
    """The first line of ``text``, its control characters escaped (:func:`visible`), at most
    ``limit`` characters: when longer, cut after the last whole word that fits and ended with
    ``…``, so a reader sees it goes on (a single word longer than the limit is cut inside)."""
    # Escaped before measuring: the limit is what the column shows.
    line = visible(text.split("\n", 1)[0])
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]  # room for the ellipsis
    if cut and cut[-1].isalnum() and line[limit - 1].isalnum() and " " in cut:
        cut = cut.rsplit(" ", 1)[0]  # the cut falls inside a word: drop the word's start
    return cut.rstrip(" ,;:") + "…"


def _first_line(text: str | None, limit: int = 70) -> str | None:
    return None if text is None else shorten(text, limit)


def _report_actions(results: list[ActionResult], as_json_: bool) -> None:
    if as_json_:
        _print_json(results)
    else:
        for result in results:
            # A message may quote the database (the worker holding a lease).
            message = visible(result.message)
            click.echo(message if result.ok else f"Error: {message}", err=not result.ok)
    if not all(result.ok for result in results):
        sys.exit(1)


# -- ops -------------------------------------------------------------------------------------


@click.group()
def ops() -> None:
    """Inspect operations and act on them (retry, cancel, replay, purge)."""


@ops.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    callback=_check_states,
    help="Only this state, e.g. dead or awaiting_approval (repeatable).",
)
@click.option(
    "--type",
    "operation_types",
    multiple=True,
    metavar="TYPE",
    help="Only this operation type; * matches anything, e.g. 'billing.*' (repeatable).",
)
@click.option("--channel", "channels", multiple=True, help="Only this channel (repeatable).")
@click.option("--since", **WHEN, help="Created at or after (ISO-8601, or e.g. 24h for ago).")
@click.option("--until", **WHEN, help="Created before (ISO-8601, or e.g. 1h for ago).")
@click.option(
    "--stale",
    is_flag=True,
    help="Only operations that look stuck: pending/failed that no live worker handles or that "
    "are due for longer than --older-than; claimed whose lease expired that long ago.",
)
@click.option(
    "--older-than",
    **DURATION,
    default="5m",
    show_default=True,
    help="The --stale threshold.",
)
@click.option(
    "--live-within",
    **POSITIVE_DURATION,
    default="30s",
    show_default=True,
    help="A worker is live if its heartbeat is this recent.",
)
@click.option("--limit", type=BIGINT_COUNT, default=100, show_default=True)
@click.option("--json", "as_json_", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def ops_list(
    obj: _HasDatabase,
    states: tuple[str, ...],
    operation_types: tuple[str, ...],
    channels: tuple[str, ...],
    since: When | None,
    until: When | None,
    stale: bool,
    older_than: timedelta,
    live_within: timedelta,
    limit: int,
    as_json_: bool,
) -> None:
    """List operations, newest first."""
    filters = OperationFilter(
        states, operation_types, channels, since, until, stale, older_than, limit
    )

    async def listed(admin: Admin) -> tuple[list[Operation], list[PauseInfo]]:
        return await admin.list_operations(filters), await admin.pauses()

    operations, pauses = _run(obj, listed, live_within)
    if as_json_:
        _print_json(operations)
        return
    paused = {(p.scope, p.target) for p in pauses}
    table = Table(title=_count(len(operations), "operation") + (" (stale)" if stale else ""))
    _add_columns(
        table,
        "id",
        "type",
        "channel",
        "state",
        "attempts",
        "updated_at",
        "stale because" if stale else "last error",
    )
    for op in operations:
        table.add_row(
            _text(op.id),
            _text(op.operation_type),
            _text(op.channel),
            _state(op.state)
            + (
                " (paused)"
                # waiting, not running: what a pause holds back
                if op.state not in FINISHED_STATES | {CLAIMED}
                and {("type", op.operation_type), ("channel", op.channel)} & paused
                else ""
            ),
            _text(f"{op.attempts}/{op.max_attempts}" if op.max_attempts else op.attempts),
            _time(op.updated_at),
            _text(
                STALE_REASONS.get(op.stale_reason or "", op.stale_reason)
                if stale
                else _first_line(op.last_error, 60)
            ),
        )
    console = _console()
    console.print(table)
    for p in pauses:
        console.print(_text(f"paused: {p.what} by {p.paused_by}: {p.reason}", "yellow"))


@ops.command("show")
@click.argument("operation_id", type=OPERATION_ID)
@click.option("--json", "as_json_", is_flag=True, help="Print JSON instead of tables.")
@click.pass_obj
def ops_show(obj: _HasDatabase, operation_id: int, as_json_: bool) -> None:
    """Show one operation, every attempt (worker, duration, outcome, error) and its full
    audit trail."""
    detail = _run(obj, lambda admin: admin.get_operation(operation_id))
    if as_json_:
        _print_json(detail)
        return
    _print_detail(_console(), detail)


def _attempts_text(attempts: int, max_attempts: int | None) -> str:
    if max_attempts is None:
        return f"{attempts} (limit: the handler's max_attempts)"
    return f"{attempts} of {max_attempts}"


def _print_detail(console: Console, detail: OperationDetail) -> None:
    op = detail.operation
    if op is None:
        console.print(
            Text(f"operation {detail.operation_id} was purged; its audit trail is kept:\n")
        )
    else:
        summary = Table.grid(padding=(0, 2))
        summary.add_column(style="bold")
        summary.add_column()
        rows: list[tuple[str, Text]] = [
            ("operation", _text(f"{op.id}  {op.operation_type}")),
            ("state", _state(op.state)),
            ("channel", _text(op.channel)),
            ("lifecycle", _text(op.lifecycle)),
            ("attempts", _text(_attempts_text(op.attempts, op.max_attempts))),
            ("priority", _text(op.priority)),
            ("run_at", _time(op.run_at, ms=True)),
            ("created", Text.assemble(_time(op.created_at, ms=True), " by ", _text(op.created_by))),
            ("updated", _time(op.updated_at, ms=True)),
            ("idempotency key", _text(op.idempotency_key)),
            ("lease", _text(op.lease_owner and f"{op.lease_owner} until {op.lease_expires_at}")),
            ("last error", _text(op.last_error)),
            ("payload", _text(json.dumps(detail.payload, ensure_ascii=False))),
        ]
        for key, value in rows:
            summary.add_row(key, value)
        console.print(summary)
    attempts = Table(title="attempts", title_justify="left")
    _add_columns(
        attempts,
        "#",
        "worker",
        "started",
        "duration",
        "outcome",
        "error",
    )
    for a in detail.attempts:
        attempts.add_row(
            _text(a.number),
            _text(a.worker),
            _time(a.started_at, ms=True),
            _text(format_seconds(a.duration_seconds)),
            _state(a.state_after) if a.outcome == "running" else _text(a.outcome),
            _text(_first_line(a.error)),
        )
    console.print(attempts)
    trail = Table(title="audit trail", title_justify="left")
    _add_columns(
        trail,
        "seq",
        "recorded_at",
        "transition",
        "from -> to",
        "attempt",
        "actor (as db role)",
        "detail",
    )
    for r in detail.audit:
        trail.add_row(
            _text(r.seq),
            _time(r.recorded_at, ms=True),
            _text(r.trigger),
            _text(f"{r.from_state or '-'} -> {r.to_state}"),
            _text(r.attempt),
            _actor_and_role(r.actor, r.db_role),
            _text(_first_line(r.detail)),
        )
    console.print(trail)


@ops.command("retry")
@_action_options
@click.pass_obj
def ops_retry(
    obj: _HasDatabase, ids: tuple[int, ...], actor: str, reason: str | None, as_json_: bool
) -> None:
    """Run failed operations IDS now instead of at their scheduled retry (failed -> pending)."""
    results = _run(obj, lambda admin: admin.retry(ids, actor=actor, reason=reason))
    _report_actions(results, as_json_)


def _cancel_wait(value: str) -> timedelta:
    wait = parse_duration(value)
    if wait > _MAX_CANCEL_WAIT:
        raise OutOfRange(f"duration {value!r} is out of range: --wait is at most 1h")
    return wait


_MAX_CANCEL_WAIT = timedelta(hours=1)


@ops.command("cancel")
@_action_options
@click.option(
    "--wait",
    "wait",
    default="30s",
    show_default=True,
    metavar="DURATION",
    callback=_converter(_cancel_wait),
    help="How long to wait for the worker running an operation to stop it (at most 1h).",
)
@click.pass_obj
def ops_cancel(
    obj: _HasDatabase,
    ids: tuple[int, ...],
    actor: str,
    reason: str | None,
    as_json_: bool,
    wait: timedelta,
) -> None:
    """Cancel operations IDS (-> cancelled): pending, failed or dead ones at once; a running
    one (claimed, or a custom lifecycle's working step) by asking the worker that holds it,
    on whatever host, to cancel its handler, waiting up to --wait for it. Exits 1 if the
    handler finished first (its outcome stands) or nobody acted in time (the request
    stands)."""
    results = _run(
        obj,
        lambda admin: admin.cancel(
            ids, actor=actor, reason=reason, wait_seconds=wait.total_seconds()
        ),
    )
    _report_actions(results, as_json_)


@ops.command("replay")
@_action_options
@click.option(
    "--attempts",
    "extra_attempts",
    type=INT_COUNT,
    default=1,
    show_default=True,
    help="How many more attempts it gets (max_attempts = attempts + N).",
)
@click.pass_obj
def ops_replay(
    obj: _HasDatabase,
    ids: tuple[int, ...],
    actor: str,
    reason: str | None,
    as_json_: bool,
    extra_attempts: int,
) -> None:
    """Run dead or cancelled operations IDS again, now, from where they stopped (pending, or
    the later step or parking state of a custom lifecycle), with --attempts more attempts of
    that step (default 1). The attempt count keeps counting."""
    results = _run(
        obj,
        lambda admin: admin.replay(ids, actor=actor, reason=reason, extra_attempts=extra_attempts),
    )
    _report_actions(results, as_json_)


@ops.command("fire")
@click.argument("operation_id", type=OPERATION_ID)
@click.argument("trigger")
@click.option(
    "--actor",
    callback=_check_actor,
    help="Who decided, recorded in the audit trail (default: the OS user).",
)
@click.option("--detail", help="Why (recorded in the audit row), e.g. a ticket number.")
@click.option("--json", "as_json_", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def ops_fire(
    obj: _HasDatabase,
    operation_id: int,
    trigger: str,
    actor: str,
    detail: str | None,
    as_json_: bool,
) -> None:
    """Fire TRIGGER at operation OPERATION_ID, e.g. `approve` at a refund parked in
    awaiting_approval. Exit 1, changing nothing, if its lifecycle does not allow TRIGGER from
    its current state (the message lists what it allows)."""
    # A refusal (FireRefused) ends as one line, exit 1 (pgoutbox/cli_errors.py).
    fired = _run(obj, lambda admin: admin.fire(operation_id, trigger, actor=actor, detail=detail))
    if as_json_:
        _print_json(fired)
    else:
        click.echo(
            visible(
                f"operation {fired.operation_id}: {fired.from_state} -> {fired.to_state} "
                f"({fired.trigger}, by {fired.actor})"
            )
        )


@ops.command("purge")
@click.option(
    "--finished-before",
    **WHEN,
    required=True,
    help="Delete operations whose last change was before this (ISO-8601, or e.g. 90d for ago).",
)
@click.option("--include-dead", is_flag=True, help="Delete dead operations too (kept otherwise).")
@click.option(
    "--batch-size",
    type=INT_COUNT,
    default=PURGE_BATCH_SIZE,
    show_default=True,
    help="Operations deleted per transaction.",
)
@click.option("--actor", callback=_check_actor, help="Who purges (default: the OS user).")
@click.option("--yes", is_flag=True, help="Really delete. Without it, only say what would go.")
@click.option("--json", "as_json_", is_flag=True, help="Print JSON.")
@click.pass_obj
def ops_purge(
    obj: _HasDatabase,
    finished_before: When,
    include_dead: bool,
    batch_size: int,
    actor: str,
    yes: bool,
    as_json_: bool,
) -> None:
    """Delete finished operations (succeeded, cancelled; dead with --include-dead) in batches.

    Nothing is deleted without --yes. Each purge is recorded in <schema>.purges; the audit rows
    of deleted operations are kept, and `audit verify` still checks them.
    """
    if not yes:
        preview = _run(
            obj, lambda admin: admin.purge_preview(finished_before, include_dead=include_dead)
        )
        if as_json_:
            _print_json({"dry_run": True, **as_json(preview)})
            return
        click.echo(
            f"would delete {_count(preview.total, 'finished operation')} whose last change was "
            "before "
            f"{preview.finished_before.isoformat()}{_by_state(preview.counts)}"
        )
        if not include_dead:
            click.echo("dead operations are kept (--include-dead deletes them too)")
        click.echo("nothing deleted: run again with --yes to purge")
        return
    result = _run(
        obj,
        lambda admin: admin.purge(
            finished_before, actor=actor, include_dead=include_dead, batch_size=batch_size
        ),
    )
    if as_json_:
        _print_json({"dry_run": False, **as_json(result)})
        return
    click.echo(
        visible(
            f"purge {result.purge_id} by {result.actor}: deleted "
            f"{_count(result.deleted, 'operation')}{_by_state(result.counts)} in "
            f"{_count(result.batches, 'batch')}; their audit rows are kept"
        )
    )


def _by_state(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    states = ", ".join(f"{visible(state)}: {n}" for state, n in sorted(counts.items()))
    return f" ({states})"


# -- audit report / verify -------------------------------------------------------------------


@click.command("report")
@click.option(
    "--since",
    **WHEN,
    help="From (inclusive): ISO-8601 or e.g. 30d. Default: the first row of the log.",
)
@click.option("--until", **WHEN, help="To (exclusive): ISO-8601, now, or 1d. Default: now.")
@click.option(
    "--type",
    "operation_types",
    multiple=True,
    metavar="TYPE",
    help="Only this operation type; * matches anything (repeatable).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write to FILE (replaced only once complete) instead of standard output.",
)
@click.pass_obj
def audit_report(
    obj: _HasDatabase,
    since: When | None,
    until: When | None,
    operation_types: tuple[str, ...],
    fmt: str,
    output: Path | None,
) -> None:
    """Every state change recorded in [--since, --until), by default all of them up to now:
    one row per transition with who (actor), what (operation, transition, states, attempt,
    detail) and when, plus the hash that chains it, in the order it was recorded. The period
    covered is said on standard error, so the CSV or JSON stays exactly that."""

    if output is None:
        written = _run(
            obj, lambda admin: _write_report(admin, since, until, operation_types, fmt, sys.stdout)
        )
        sys.stdout.flush()  # the report before the line saying what it covered, on a terminal too
        click.echo(f"{_count(written.rows, 'audit row')} {written.period()}", err=True)
        return
    # Written beside FILE and renamed once complete: a half-written report never has its name.
    partial = output.with_name(output.name + ".partial")
    try:
        out = partial.open("w", newline="", encoding="utf-8")
    except OSError as exc:
        raise click.BadParameter(
            f"cannot write {partial}: {exc.strerror}", param_hint="'-o' / '--output'"
        ) from None
    try:
        with out:
            written = _run(
                obj, lambda admin: _write_report(admin, since, until, operation_types, fmt, out)
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    click.echo(
        f"wrote {_count(written.rows, 'audit row')} to {output}, {written.period()}", err=True
    )


@dataclass(frozen=True)
class _Written:
    """What `audit report` wrote: how many rows, recorded in [since, until)."""

    rows: int
    since: datetime | None  # None: from the first row of the log
    until: datetime

    def period(self) -> str:
        """The period covered, exactly, so the next report can start where this one ended."""
        start = "the start of the log" if self.since is None else self.since.isoformat()
        return f"recorded from {start} until {self.until.isoformat()} (exclusive)"


async def _write_report(
    admin: Admin,
    since: When | None,
    until: When | None,
    operation_types: Sequence[str],
    fmt: str,
    out: IO[str],
) -> _Written:
    # Both ends as instants, resolved before reading: the period said is the period read.
    since_at = None if since is None else await admin.resolve(since)
    until_at = await admin.resolve(timedelta(0) if until is None else until)
    count = 0
    writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    else:
        out.write("[")
    async for record in admin.report(since_at, until_at, operation_types):
        row = as_json(record)
        if writer is not None:
            writer.writerow({column: csv_cell(row[column]) for column in REPORT_COLUMNS})
        else:
            out.write(("," if count else "") + "\n  " + json.dumps(row, ensure_ascii=False))
        count += 1
    if writer is None:
        out.write("\n]\n" if count else "]\n")
    return _Written(count, since_at, until_at)


# The first characters OWASP ("CSV Injection") lists as making a spreadsheet evaluate a cell:
# `=`, `+`, `-`, `@`, and tab and carriage return, which some spreadsheets skip before a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """One cell of ``audit report --format csv``: the value as text (empty for NULL), with a
    single quote before it when it starts like a formula, so that a spreadsheet opening the
    report shows ``=HYPERLINK(...)`` from an actor or a detail instead of evaluating it. The
    report's own columns never start so (ids, counts and hashes are digits, times ISO-8601,
    states and triggers lower-case names): only names and text that people and processes chose
    (an actor, a role name, a detail) can be prefixed -- an ``--actor -x`` is written ``'-x``."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


async def verify_with_progress(admin: Admin) -> AuditVerification:
    """Verify every chain, with a progress bar on standard error when it is a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return await admin.verify()
    total = await admin.audit_row_count()
    columns = (
        TextColumn("verifying audit chains"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("verify", total=total)

        def advance(rows: int) -> None:
            progress.update(task, completed=rows, total=max(total, rows))

        result = await admin.verify(progress=advance)
        progress.update(task, completed=result.rows, total=max(total, result.rows))
        return result


def run_verify(obj: _HasDatabase) -> AuditVerification:
    """``audit verify``'s work: the verification, shown with a progress bar on a terminal."""
    return _run(obj, verify_with_progress)


# -- stats, workers --------------------------------------------------------------------------


@click.command()
@click.option(
    "--since",
    **WHEN,
    default="24h",
    show_default=True,
    help="The failure rate counts attempts that ended since then.",
)
@click.option("--json", "as_json_", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def stats(obj: _HasDatabase, since: When, as_json_: bool) -> None:
    """Operations per state and type, the oldest pending operation's wait, failure rate."""
    result = _run(obj, lambda admin: admin.stats(since))
    if as_json_:
        _print_json(result)
        return
    _print_stats(_console(), result)


def _print_stats(console: Console, result: Stats) -> None:
    states = list(DEFAULT_LIFECYCLE.states)
    states += sorted({s for t in result.by_type for s in t.counts} - set(states))
    table = Table(title=f"operations at {_time(result.generated_at)}")
    table.add_column("type")
    for state in [*states, "total"]:
        table.add_column(state, justify="right")
    table.add_column("oldest pending", justify="right")
    table.add_column("failure rate", justify="right")

    def row(t: TypeStats, name: str, style: str = "") -> None:
        rate = "-" if t.failure_rate is None else f"{t.failure_rate:.0%}"
        table.add_row(
            _text(name, style),
            *(_text(t.counts.get(state, 0), style) for state in states),
            _text(t.total, style),
            _text(format_seconds(t.oldest_pending_seconds), style),
            _text(f"{rate} ({t.failed_attempts}/{t.finished_attempts})", style),
        )

    for t in result.by_type:
        row(t, t.operation_type)
    table.add_section()
    row(result.total, "all", "bold")
    console.print(table)
    total = result.total
    if result.oldest_pending_id is not None:
        console.print(
            Text(
                f"oldest pending: operation {result.oldest_pending_id}, due for "
                f"{format_seconds(total.oldest_pending_seconds)}"
            )
        )
    for p in result.pauses:
        console.print(
            _text(f"paused: {p.what} since {utc(p.paused_at)} by {p.paused_by}: "
                  f"{p.reason}", "yellow")
        )  # fmt: skip
    console.print(
        Text(
            f"failure rate since {_time(result.since)}: {total.failed_attempts} of "
            f"{total.finished_attempts} finished attempts failed"
            + ("" if total.failure_rate is None else f" ({total.failure_rate:.1%})")
        )
    )


@click.command()
@click.option(
    "--live-within",
    **POSITIVE_DURATION,
    default="30s",
    show_default=True,
    help="A worker is live if its heartbeat is this recent.",
)
@click.option("--json", "as_json_", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def workers(obj: _HasDatabase, live_within: timedelta, as_json_: bool) -> None:
    """Registered workers: channel, operation types, heartbeat, live or not, what they hold."""
    found = _run(obj, lambda admin: admin.workers(), live_within)
    if as_json_:
        _print_json(found)
        return
    live = sum(w.live for w in found)
    table = Table(title=f"{_count(live, 'live worker')} ({len(found)} registered)")
    for column in ("worker", "channel", "operation types", "started", "heartbeat", "live", "holds"):
        table.add_column(column)
    for w in found:
        table.add_row(
            _text(w.id),
            _text(w.channel),
            _text(", ".join(w.operation_types)),
            _time(w.started_at),
            _text(f"{format_seconds(w.heartbeat_age_seconds)} ago"),
            _text("yes", "green") if w.live else _text("no", "red"),
            _text(", ".join(map(str, w.held)) or None),
        )
    _console().print(table)


def register(cli: click.Group, audit: click.Group) -> None:
    """Add the operator commands to the ``pgoutbox`` group and its ``audit`` group."""
    cli.add_command(ops)
    cli.add_command(stats)
    cli.add_command(workers)
    audit.add_command(audit_report)
