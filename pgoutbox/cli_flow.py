"""``pgoutbox pause``, ``pgoutbox resume`` and ``pgoutbox limits``: flow control for operators.

Usage::

    pgoutbox pause charge --actor alice --reason "gateway outage, INC-42"
    pgoutbox pause --limit stripe --partition acct_1 --reason "merchant under review"
    pgoutbox pause --list
    pgoutbox resume charge --actor alice --reason "gateway back, INC-42"
    pgoutbox limits
    pgoutbox limits set stripe --concurrency 2 --rate 10/s --reason "provider asked us to slow"
    pgoutbox limits reset stripe --reason "back to normal"

Errors (not paused, paused already, an unknown limit, a bad number) exit 1 with one line that
names the value; nothing is written.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from pgoutbox.admin import Admin
from pgoutbox.cli_ops import (
    _check_actor,
    _console,
    _HasDatabase,
    _print_json,
    _run,
    _text,
    _time,
)
from pgoutbox.flow import LimitError, Rate
from pgoutbox.flow_admin import FlowControlError, PauseInfo, Scope, utc


def _target(
    operation_type: str | None, channel: str | None, limit: str | None, partition: str | None
) -> tuple[Scope, str, str | None]:
    given = [(s, v) for s, v in (("type", operation_type), ("channel", channel), ("limit", limit))]
    chosen = [(s, v) for s, v in given if v is not None]
    if len(chosen) != 1:
        raise click.UsageError(
            "name exactly one thing: an operation TYPE, or --channel NAME, or --limit NAME "
            "(with --partition VALUE for one partition of it)"
        )
    scope, value = chosen[0]
    if partition is not None and scope != "limit":
        raise click.UsageError("--partition goes with --limit NAME")
    assert value is not None
    return scope, value, partition  # type: ignore[return-value]  # one of the three literals


def _target_options(fn: Any) -> Any:
    fn = click.option("--partition", help="One partition of the --limit (e.g. a merchant id).")(fn)
    fn = click.option("--limit", "limit_name", metavar="NAME", help="A limit's types.")(fn)
    fn = click.option("--channel", metavar="NAME", help="A whole channel.")(fn)
    fn = click.option(
        "--reason", help="Why, recorded with the change (e.g. a ticket number); required."
    )(fn)
    fn = click.option(
        "--actor", callback=_check_actor, help="Who acts, recorded (default: the OS user)."
    )(fn)
    return click.argument("operation_type", required=False, metavar="[TYPE]")(fn)


def _required_reason(reason: str | None) -> str:
    if reason is None:
        raise click.UsageError("say why with --reason (recorded with the change)")
    return reason


def _pauses_table(pauses: list[PauseInfo]) -> Table:
    table = Table(title=f"{len(pauses)} paused")
    for name in ("paused", "since", "by", "db role", "reason"):
        table.add_column(name)
    for p in pauses:
        table.add_row(
            _text(p.what), _time(p.paused_at), _text(p.paused_by), _text(p.paused_role),
            _text(p.reason),
        )  # fmt: skip
    return table


@click.command()
@click.option("--list", "show", is_flag=True, help="Show what is paused, and change nothing.")
@click.option("--json", "as_json_", is_flag=True, help="With --list: print JSON.")
@_target_options
@click.pass_obj
def pause(
    obj: _HasDatabase,
    operation_type: str | None,
    actor: str,
    reason: str | None,
    channel: str | None,
    limit_name: str | None,
    partition: str | None,
    show: bool,
    as_json_: bool,
) -> None:
    """Stop workers claiming an operation TYPE (or a --channel, or a --limit's types), cluster
    wide within one poll interval. Running work finishes; nothing is cancelled."""
    if show:
        pauses = _run(obj, lambda admin: admin.pauses())
        _print_json(pauses) if as_json_ else _console().print(_pauses_table(pauses))
        return
    scope, target, part = _target(operation_type, channel, limit_name, partition)
    reason = _required_reason(reason)

    async def go(admin: Admin) -> PauseInfo:
        return await admin.pause(scope, target, partition=part, actor=actor, reason=reason)

    done = _run(obj, _refusing(go))
    click.echo(f"paused {done.what} (pause {done.id}) by {actor}: {reason}")


@click.command()
@_target_options
@click.pass_obj
def resume(
    obj: _HasDatabase,
    operation_type: str | None,
    actor: str,
    reason: str | None,
    channel: str | None,
    limit_name: str | None,
    partition: str | None,
) -> None:
    """End a pause: workers claim the TYPE (or --channel, or --limit) again within one poll
    interval."""
    scope, target, part = _target(operation_type, channel, limit_name, partition)
    reason = _required_reason(reason)

    async def go(admin: Admin) -> Any:
        return await admin.resume(scope, target, partition=part, actor=actor, reason=reason)

    since = _run(obj, _refusing(go))
    what = f"{scope} {target}" + (f" partition {part}" if part is not None else "")
    click.echo(f"resumed {what} (paused since {utc(since)}) by {actor}: {reason}")


@click.group(invoke_without_command=True)
@click.option("--json", "as_json_", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def limits(ctx: click.Context, as_json_: bool) -> None:
    """The limits workers declared, the numbers in force (after any override), and how many of
    each limit's operations run now."""
    if ctx.invoked_subcommand is not None:
        return
    found = _run(ctx.obj, lambda admin: admin.limits())
    if as_json_:
        _print_json(found)
        return
    table = Table(title=f"{len(found)} limits")
    for name in ("limit", "types", "per", "running", "concurrency", "rate", "burst", "override"):
        table.add_column(name)
    for info in found:
        override = (
            f"{info.overridden_by} at {utc(info.overridden_at)}: {info.override_reason}"
            if info.overridden_at is not None
            else ""
        )
        table.add_row(
            _text(info.name),
            _text(", ".join(info.operation_types)),
            _text(info.partition_by or "-"),
            _text(info.running),
            _text(info.concurrency if info.concurrency is not None else "-"),
            _text(str(info.rate) if info.rate is not None else "-"),
            _text(info.burst if info.rate is not None else "-"),
            _text(override),
        )
    _console().print(table)


def _rate(ctx: click.Context, param: click.Parameter, value: str | None) -> Rate | None:
    try:
        return Rate.parse(value) if value is not None else None
    except LimitError as exc:
        raise click.BadParameter(str(exc)) from None


@limits.command("set")
@click.argument("name")
@click.option("--concurrency", type=click.IntRange(min=1), help="At most this many at once.")
@click.option("--rate", callback=_rate, help="Starts per period, e.g. 10/s or 600/min.")
@click.option("--burst", type=click.IntRange(min=1), help="Starts allowed at once.")
@click.option("--reason", required=True, help="Why, recorded with the override.")
@click.option("--actor", callback=_check_actor, help="Who acts (default: the OS user).")
@click.pass_obj
def limits_set(
    obj: _HasDatabase,
    name: str,
    concurrency: int | None,
    rate: Rate | None,
    burst: int | None,
    reason: str,
    actor: str,
) -> None:
    """Override limit NAME's numbers at run time, cluster wide (those not given stay as
    declared)."""
    if concurrency is None and rate is None and burst is None:
        raise click.UsageError("give --concurrency, --rate or --burst (`limits reset` undoes)")

    async def go(admin: Admin) -> None:
        await admin.override_limit(
            name, concurrency=concurrency, rate=rate, burst=burst, actor=actor, reason=reason
        )

    _run(obj, _refusing(go))
    click.echo(f"limit {name} overridden by {actor}: {reason}")


@limits.command("reset")
@click.argument("name")
@click.option("--reason", required=True, help="Why, recorded with the change.")
@click.option("--actor", callback=_check_actor, help="Who acts (default: the OS user).")
@click.pass_obj
def limits_reset(obj: _HasDatabase, name: str, reason: str, actor: str) -> None:
    """Put limit NAME back to the numbers its router declares."""

    async def go(admin: Admin) -> None:
        await admin.override_limit(name, actor=actor, reason=reason)

    _run(obj, _refusing(go))
    click.echo(f"limit {name} back to its declaration, by {actor}: {reason}")


def _refusing(action: Any) -> Any:
    """``action``, with a :class:`FlowControlError` reported as one line and exit 1."""

    async def go(admin: Admin) -> Any:
        try:
            return await action(admin)
        except FlowControlError as exc:
            raise click.ClickException(str(exc)) from None

    return go


def register(cli: click.Group) -> None:
    """Add ``pause``, ``resume`` and ``limits`` to the ``pgoutbox`` group."""
    cli.add_command(pause)
    cli.add_command(resume)
    cli.add_command(limits)
