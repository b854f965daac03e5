"""docs/cli.md's examples are real: this test replays the page's story and compares each output.

The page shows a shop (schema ``shop``: twelve operations, a worker, an operator acting on them)
and a refund workflow (``examples/refund.py``). The test tells that story in the order it
happened: SQL plays the worker ``vm:19434:e90daa89`` (every claim, success and failure it would
record, as the other CLI tests do), and each ``pgoutbox`` command the page shows is run as a user
runs it -- the console script, settings from the environment -- and what it prints (standard
output and error, interleaved as on a terminal) and its exit code (``$ echo $?``) are compared
with the page. Commands are matched to the page by their text, in the page's order.

What is compared, once what changes from run to run is blanked out on both sides (timestamps,
hashes, durations; with same-length masks in tables, so their layout still counts):

* every ``console`` block whose commands are all ``pgoutbox ...`` or ``echo $?``, unless the line
  before its fence is ``<!-- not checked: why -->`` (the demo, a running worker, a progress bar);
* a line ``…`` (alone, or ``…,``) on the page stands for any lines: a trimmed output.

Blocks with other commands (``psql``, ``export``, ``kill``) cannot be replayed and are skipped.
Every checked command on the page must be run by the story and every command the story runs
must be on the page: a new example needs a step here.

When an output changes on purpose, run this test with ``PGOUTBOX_UPDATE_DOCS=1``: it writes the
new outputs into docs/cli.md (not the trimmed ones: edit those by hand) and fails, so that the
change is reviewed. It needs a server whose user is ``postgres``, the role the page shows.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import re
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgoutbox import DatabaseSessionManager, migrations, publish_operation
from pgoutbox.settings import DatabaseSettings

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = ROOT / "docs" / "cli.md"
PGOUTBOX = Path(sys.executable).parent / "pgoutbox"
UPDATE = os.environ.get("PGOUTBOX_UPDATE_DOCS") == "1"

FENCE = re.compile(r"^(\s*)```console\s*$")
NOT_CHECKED = re.compile(r"^\s*<!-- not checked: .+ -->\s*$")
WILDCARD = re.compile(r"^\s*…,?\s*$")


def _mask(match: re.Match[str]) -> str:
    return re.sub(r"\d", "#", match.group(0))


# What changes from run to run. Times and durations in tables keep their length (masked digits),
# so a table's layout is still compared; in JSON and CSV they become a token.
VOLATILE: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00"), "<time>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{3})?Z"), _mask),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<hash>"),
    (re.compile(r'("\w+_seconds": )[0-9.e-]+'), r"\1<seconds>"),
    (re.compile(r"(?<![\w.:])\d+[dhm] \d\d?[hms]\b"), _mask),  # format_seconds: 5m 03s, 2h 10m
    (re.compile(r"(?<![\w.:])\d+(\.\d+)?s\b"), _mask),
]


def normalise(line: str) -> str:
    """``line`` with what changes from run to run blanked out, and no trailing blanks."""
    for pattern, replacement in VOLATILE:
        line = pattern.sub(replacement, line)
    return line.rstrip()


@dataclass
class Example:
    """One ``$ pgoutbox ...`` line of docs/cli.md and the output the page shows for it."""

    command: str
    line: int  # 1-based, for messages
    indent: str
    expected: list[str]
    output: tuple[int, int]  # the expected lines' [start, end) in the page, 0-based
    exit_code: int | None = None  # from a `$ echo $?` right after it
    ran: bool = False

    def matches(self, actual: list[str]) -> bool:
        """Whether ``actual`` is what the page shows, ``…`` lines matching any lines."""
        pattern = "".join(
            r"(?:[^\n]*\n)*?" if WILDCARD.match(line) else re.escape(normalise(line)) + r"\n"
            for line in self.expected
        )
        return re.fullmatch(pattern, "".join(normalise(line) + "\n" for line in actual)) is not None


def parse_examples(lines: list[str]) -> list[Example]:
    """The checked examples of a page, in order."""
    examples: list[Example] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, start = fence.group(1), i + 1
        end = start
        while lines[end].strip() != "```":
            end += 1
        marked = i > 0 and NOT_CHECKED.match(lines[i - 1]) is not None
        block = _commands(lines, start, end, indent)
        replayable = all(c.command.startswith("pgoutbox ") or c.command == "echo $?" for c in block)
        if replayable and not marked:
            examples += _with_exit_codes(block)
        i = end + 1
    return examples


def _commands(lines: list[str], start: int, end: int, indent: str) -> list[Example]:
    commands: list[Example] = []
    i = start
    while i < end:
        text = lines[i].removeprefix(indent)
        assert text.startswith("$ "), f"docs/cli.md:{i + 1}: output before any command"
        command, line = text[2:], i + 1
        while command.endswith("\\"):  # a command continued on the next line
            i += 1
            command = command[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        first = i
        while i < end and not lines[i].removeprefix(indent).startswith("$ "):
            i += 1
        expected = [raw.removeprefix(indent) for raw in lines[first:i]]
        commands.append(Example(command, line, indent, expected, (first, i)))
    return commands


def _with_exit_codes(block: list[Example]) -> list[Example]:
    examples: list[Example] = []
    for command in block:
        if command.command == "echo $?":
            assert examples, f"docs/cli.md:{command.line}: `echo $?` after no pgoutbox command"
            assert len(command.expected) == 1, f"docs/cli.md:{command.line}: one exit code"
            examples[-1].exit_code = int(command.expected[0])
        else:
            examples.append(command)
    return examples


@dataclass
class Drift:
    example: Example
    actual: list[str]
    exit_code: int


@dataclass
class Page:
    """docs/cli.md's examples, and what running them printed."""

    lines: list[str]
    examples: list[Example]
    cwd: Path
    env: dict[str, str]
    before_each: Callable[[], Awaitable[None]] | None = None
    drifts: list[Drift] = field(default_factory=list)

    async def run(self, command: str, *, schema: str = "shop") -> None:
        """Run the page's next example of ``command`` and compare what it prints."""
        example = next((e for e in self.examples if not e.ran and e.command == command), None)
        assert example is not None, f"docs/cli.md shows no (further) example of `{command}`"
        example.ran = True
        if self.before_each is not None:
            await self.before_each()
        argv = shlex.split(command)
        process = await asyncio.create_subprocess_exec(
            str(PGOUTBOX),
            *argv[1:],
            cwd=self.cwd,
            env={**self.env, "PGOUTBOX_DATABASE__SCHEMA": schema},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,  # interleaved, as on a terminal
        )
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        actual = [line.rstrip() for line in stdout.decode().splitlines()]
        exit_ok = example.exit_code is None or example.exit_code == process.returncode
        # Without `echo $?` the output alone is compared: a failure prints something else.
        if not (exit_ok and example.matches(actual)):
            self.drifts.append(Drift(example, actual, process.returncode))

    def report(self) -> str:
        """What differs, one example after the other."""
        parts = []
        for d in self.drifts:
            e = d.example
            parts.append(
                f"docs/cli.md:{e.line}: $ {e.command}  (exit {d.exit_code}"
                + (f", the page says {e.exit_code})" if e.exit_code is not None else ")")
                + "\n--- the page shows\n"
                + "\n".join(e.expected)
                + "\n+++ the command printed\n"
                + "\n".join(d.actual)
            )
        return "\n\n".join(parts)

    def update(self) -> list[Example]:
        """Write the printed outputs into docs/cli.md; return the examples left to edit by hand
        (trimmed with ``…``)."""
        by_hand = []
        for d in sorted(self.drifts, key=lambda d: d.example.output, reverse=True):
            e = d.example
            if any(WILDCARD.match(line) for line in e.expected):
                by_hand.append(e)
                continue
            start, end = e.output
            self.lines[start:end] = [
                (e.indent + line).rstrip() for line in _merge(e.expected, d.actual)
            ]
        CLI_MD.write_text("\n".join(self.lines) + "\n")
        return by_hand


def _merge(expected: list[str], actual: list[str]) -> list[str]:
    """``actual``, but keeping the page's own text of the lines that differ only in what changes
    from run to run: an update rewrites what changed, not every timestamp of the story."""
    matcher = difflib.SequenceMatcher(
        a=[normalise(line) for line in expected],
        b=[normalise(line) for line in actual],
        autojunk=False,
    )
    merged: list[str] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        merged += expected[i1:i2] if tag == "equal" else actual[j1:j2]
    return merged


# -- the shop: what the worker vm:19434:e90daa89 did, played by SQL --------------------------

WORKER = "vm:19434:e90daa89"
KEY_PREFIX = {
    "billing.charge_card": "charge",
    "email.send_receipt": "receipt",
    "shipping.book_courier": "courier",
}
TO_STATE = {
    "claim": "claimed",
    "succeed": "succeeded",
    "fail": "failed",
    "give_up": "dead",
    "release": "pending",
}
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/shop/shop_app.py", line {line}, in {handler}\n'
    "    raise {error}\n"
    "{error_line}\n"
)


@dataclass(frozen=True)
class Failure:
    """An exception a handler raised: its class, message, and where."""

    kind: str
    message: str
    handler: str
    line: int

    def error(self) -> str:
        return f"{self.kind}: {self.message}"

    def detail(self, attempt: int, max_attempts: int | None) -> str:
        """The audit detail a worker records for it (pgoutbox/worker/dispatcher.py)."""
        verdict = "not retried (DoNotRetry)" if self.kind == "DoNotRetry" else f"of {max_attempts}"
        return f"attempt {attempt} {verdict}: {self.error()}\n" + TRACEBACK.format(
            line=self.line,
            handler=self.handler,
            error=f"{self.kind}({self.message!r})".replace("'", '"'),
            error_line=self.error(),
        )


PAYMENT_DOWN = Failure("ConnectionError", "payment provider unreachable", "charge_card", 15)
DECLINED = Failure("DoNotRetry", "card declined: expired (code 54)", "charge_card", 13)
COURIER_DOWN = Failure("ConnectionError", "courier API returned 503", "book_courier", 27)


class Shop:
    """Operations published as the shop publishes them, moved as its worker moves them."""

    def __init__(self, conn: asyncpg.Connection, sm: DatabaseSessionManager, schema: str) -> None:
        self.conn, self.sm, self.s = conn, sm, f'"{schema}"'
        self.worker_running = False

    async def publish(
        self,
        operation_type: str,
        payload: dict[str, Any],
        channel: str = "shop",
        *,
        key: str | None = None,
        run_at: datetime | None = None,
    ) -> int:
        async with self.sm.session() as session:
            op_id = int(
                await publish_operation(session, operation_type, payload, channel, run_at, key)
            )
            await session.commit()
        return op_id

    async def step(
        self, op_id: int, trigger: str, failure: Failure | None = None, max_attempts: int = 3
    ) -> None:
        """Record ``trigger`` as the worker records it: a claim takes a lease and counts an
        attempt; a failure keeps its error and, in the audit row, its traceback."""
        attempts = await self.conn.fetchval(
            f"SELECT attempts FROM {self.s}.operations WHERE id = $1", op_id
        )
        row_max = await self.conn.fetchval(
            f"SELECT max_attempts FROM {self.s}.operations WHERE id = $1", op_id
        )
        detail = None if failure is None else failure.detail(attempts, row_max or max_attempts)
        await self.conn.execute(
            f"UPDATE {self.s}.operations SET state = $2, transition = $3, "
            "transition_actor = $4, transition_detail = $5, version = version + 1, "
            "attempts = attempts + CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END, "
            "step_attempts = step_attempts + CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END, "
            "lease_owner = CASE WHEN $3 = 'claim' THEN $4 END, "
            "lease_expires_at = CASE WHEN $3 = 'claim' THEN now() + interval '30 s' END, "
            "run_at = CASE WHEN $3 = 'fail' THEN now() + interval '2 s' ELSE run_at END, "
            "last_error = coalesce($6, last_error) WHERE id = $1",
            op_id,
            TO_STATE[trigger],
            trigger,
            WORKER,
            detail,
            None if failure is None else failure.error(),
        )

    async def start_worker(self) -> None:
        await self.conn.execute(
            f"INSERT INTO {self.s}.workers (id, hostname, pid, channel, operation_types) "
            "VALUES ($1, 'vm', 19434, 'shop', $2)",
            WORKER,
            ["billing.charge_card", "email.send_receipt", "shipping.book_courier"],
        )
        self.worker_running = True

    async def heartbeat(self) -> None:
        """The worker's last heartbeat, a few seconds ago (it beats every 10 s)."""
        if self.worker_running:
            await self.conn.execute(
                f"UPDATE {self.s}.workers SET heartbeat_at = now() - interval '3 s' WHERE id = $1",
                WORKER,
            )

    async def stop_worker(self, holding: int) -> None:
        """A graceful stop: what it still holds goes back to pending, and it unregisters."""
        await self.step(holding, "release")
        await self.conn.execute(f"DELETE FROM {self.s}.workers WHERE id = $1", WORKER)
        self.worker_running = False


REFUND_APP = f"""\
\"\"\"examples/refund.py's router, for `pgoutbox lifecycle register refund_app:router`.\"\"\"
import importlib.util

path = {str(ROOT / "examples" / "refund.py")!r}
spec = importlib.util.spec_from_file_location("refund_example", path)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
router = example.build_router(example.FakeProvider())
"""


@pytest.fixture
async def fresh_schemas(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """No `shop` or `refunds` schema in the test database, before and after."""
    conn = await asyncpg.connect(database_dsn)
    drop = 'DROP SCHEMA IF EXISTS shop CASCADE; DROP SCHEMA IF EXISTS "refunds" CASCADE'
    try:
        await conn.execute(drop)
        yield conn
        await conn.execute(drop)
    finally:
        await conn.close()


async def test_every_cli_md_example_is_what_the_command_prints(
    database_dsn: str, fresh_schemas: asyncpg.Connection, tmp_path: Path
) -> None:
    conn = fresh_schemas
    if await conn.fetchval("SELECT current_user") != "postgres":
        pytest.skip("docs/cli.md shows the role postgres: run against a server as postgres")
    lines = CLI_MD.read_text().splitlines()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PGOUTBOX_", "TTY_"))
        and name not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR")
    }
    # The page's tables are 120 columns wide, like a terminal's: piped, they would be 160.
    env.update(PGOUTBOX_DATABASE__DSN=database_dsn, COLUMNS="120")
    page = Page(lines, parse_examples(lines), tmp_path, env)
    (tmp_path / "refund_app.py").write_text(REFUND_APP)

    await _tell_the_story(page, conn, database_dsn)

    missed = [f"docs/cli.md:{e.line}: $ {e.command}" for e in page.examples if not e.ran]
    problems = []
    if missed:
        problems.append("examples the story does not run (add a step):\n" + "\n".join(missed))
    if page.drifts and UPDATE:
        by_hand = page.update()
        problems.append(
            f"rewrote {len(page.drifts) - len(by_hand)} outputs in docs/cli.md: review them"
            + "".join(
                f"\nedit by hand (trimmed): docs/cli.md:{e.line}: $ {e.command}" for e in by_hand
            )
        )
    elif page.drifts:
        problems.append(
            "docs/cli.md shows outputs the CLI no longer prints (PGOUTBOX_UPDATE_DOCS=1 "
            "rewrites them):\n\n" + page.report()
        )
    assert not problems, "\n\n".join(problems)


async def _tell_the_story(page: Page, conn: asyncpg.Connection, dsn: str) -> None:
    # -- settings, exit codes; the schema ------------------------------------------------------
    await page.run("pgoutbox --dsn postgresql://postgres@127.0.0.1:1/postgres stats")
    await page.run("pgoutbox --schema nowhere ops list")
    await page.run("pgoutbox db upgrade")
    await page.run("pgoutbox db current")
    await page.run("pgoutbox db check")

    # -- twelve operations, and a worker for three of their types --------------------------------
    sm = DatabaseSessionManager(DatabaseSettings(dsn=dsn, schema="shop"))
    shop = Shop(conn, sm, "shop")
    page.before_each = shop.heartbeat
    try:
        ops: dict[int, int] = {}
        for n, (operation_type, payload) in enumerate(
            [
                ("billing.charge_card", {"card": "visa", "cents": 1999, "order": 1001}),
                ("email.send_receipt", {"order": 1001, "to": "ada@example.com"}),
                ("billing.charge_card", {"card": "expired", "cents": 750, "order": 1002}),
                ("email.send_receipt", {"order": 1002, "to": "bob@example.com"}),
                ("billing.charge_card", {"card": "visa", "cents": 2500, "order": 1003}),
                ("email.send_receipt", {"order": 1003, "to": "cy@example.com"}),
                ("billing.charge_card", {"card": "flaky", "cents": 4200, "order": 1004}),
                ("email.send_receipt", {"order": 1004, "to": "di@example.com"}),
                ("shipping.book_courier", {"order": 1001}),
                ("shipping.book_courier", {"order": 1003}),
            ],
            start=1,
        ):
            key = f"{KEY_PREFIX[operation_type]}-{payload['order']}"  # e.g. charge-1004
            ops[n] = await shop.publish(operation_type, payload, key=key)
        # The ledger export has no worker yet; it has been due for ten minutes (shown as 10m
        # and some seconds, whatever the seconds: no run is slow enough to reach 11m).
        due = datetime.now(UTC) - timedelta(minutes=10)
        ops[11] = await shop.publish("ledger.export", {"day": "2026-11-26"}, run_at=due)
        # The last receipt is due in an hour.
        later = datetime.now(UTC) + timedelta(hours=1)
        ops[12] = await shop.publish(
            "email.send_receipt", {"order": 1005, "to": "ed@example.com"}, run_at=later
        )
        assert list(ops.values()) == list(range(1, 13))

        await shop.start_worker()
        for op in range(1, 11):
            await shop.step(op, "claim")
        for op in (1, 2, 4, 5, 6, 8):
            await shop.step(op, "succeed")
        await shop.step(3, "give_up", DECLINED)
        await shop.step(9, "fail", COURIER_DOWN, max_attempts=5)
        for attempt in (1, 2, 3):
            if attempt > 1:
                await shop.step(7, "claim")
            await shop.step(7, "fail" if attempt < 3 else "give_up", PAYMENT_DOWN)
        # Operation 10's courier booking is still running.

        # -- looking at them -----------------------------------------------------------------
        await page.run("pgoutbox ops list")
        await page.run("pgoutbox ops list --type 'billing.*' --since 1h")
        await page.run("pgoutbox ops list --state dead --json")
        await page.run("pgoutbox ops list --stale")
        await page.run("pgoutbox ops show 7")
        await page.run("pgoutbox stats")
        await page.run("pgoutbox workers")
        await page.run("pgoutbox workers --json")
        await page.run("pgoutbox audit report --since 1h --until now --type 'email.*'")
        await page.run("pgoutbox ops show 99")

        # -- flow control: the courier's limit (as the worker's router declares it), a pause --
        await conn.execute(
            "INSERT INTO shop.flow_limits (name, operation_types, concurrency, rate_count, "
            "rate_period_seconds) VALUES ('courier', '{shipping.book_courier}', 2, 30, 60)"
        )
        await page.run("pgoutbox limits")
        await page.run(
            "pgoutbox limits set courier --concurrency 1 --actor alice "
            '--reason "courier asked us to slow down (INC-311)"'
        )
        await page.run("pgoutbox limits")
        await page.run(
            "pgoutbox pause shipping.book_courier --actor alice "
            '--reason "courier API down (INC-311)"'
        )
        await page.run("pgoutbox pause --list")
        await page.run("pgoutbox ops list --type 'shipping.*'")
        await page.run(
            "pgoutbox resume shipping.book_courier --actor alice "
            '--reason "courier API is back (INC-311)"'
        )
        await page.run('pgoutbox resume shipping.book_courier --actor alice --reason "again"')

        # -- acting on them ------------------------------------------------------------------
        await page.run(
            'pgoutbox ops retry 9 --actor alice --reason "courier API is back (INC-311)"'
        )
        await shop.step(9, "claim")
        await shop.step(9, "fail", COURIER_DOWN, max_attempts=5)
        await page.run("pgoutbox ops retry 1 --actor alice")
        # 10 is claimed by the worker this story plays, which is not running: the cancel request
        # is recorded and nobody answers it.
        await page.run(
            'pgoutbox ops cancel 9 10 --actor alice --reason "booked by phone" --wait 1s'
        )
        await page.run("pgoutbox ops show 9")
        await page.run(
            "pgoutbox ops replay 3 --actor alice --reason "
            '"customer updated the card (ticket 8812)" --json'
        )
        await shop.step(3, "claim")
        await shop.step(3, "give_up", DECLINED)  # declined again
        await page.run("pgoutbox ops replay 7 --actor alice --attempts 3")
        await shop.step(7, "claim")
        await shop.step(7, "fail", PAYMENT_DOWN)
        await page.run("pgoutbox ops show 7")
        await shop.step(7, "claim")
        await shop.step(7, "fail", PAYMENT_DOWN)
        await page.run("pgoutbox ops show 7 --json")

        # -- retention, and the audit log ----------------------------------------------------
        await page.run("pgoutbox ops purge --finished-before 90d")
        await page.run("pgoutbox ops purge --finished-before now")
        await page.run("pgoutbox ops purge --finished-before now --yes --actor retention-job")
        await page.run("pgoutbox ops purge --finished-before now --include-dead --json")
        await page.run("pgoutbox ops show 2")
        await page.run("pgoutbox audit verify")
        await page.run("pgoutbox audit verify")

        # -- the worker stops: what it held, and what nobody handles now ---------------------
        await shop.stop_worker(holding=10)
        await page.run("pgoutbox ops list --stale")
        await page.run("pgoutbox audit report --format json -o audit.json")
        report = json.loads((page.cwd / "audit.json").read_text())
        assert len(report) == await conn.fetchval("SELECT count(*) FROM shop.audit_log")
    finally:
        page.before_each = None
        await sm.close()

    # -- a refund waiting for approval (schema refunds) ------------------------------------------
    refunds_db = DatabaseSettings(dsn=dsn, schema="refunds")
    await migrations.upgrade(refunds_db)
    await page.run("pgoutbox lifecycle register refund_app:router", schema="refunds")
    await page.run("pgoutbox lifecycle register refund_app:router", schema="refunds")
    await page.run("pgoutbox lifecycle show billing.refund", schema="refunds")
    refunds_sm = DatabaseSessionManager(refunds_db)
    try:
        refunds = Shop(conn, refunds_sm, "refunds")
        refund = await refunds.publish(
            "billing.refund", {"cents": 120_000, "email": "ada@example.com"}, "refunds"
        )
        await refunds.step(refund, "claim")
        await conn.execute(
            "UPDATE refunds.operations SET state = 'awaiting_approval', "
            "transition = 'request_approval', transition_actor = $2, version = version + 1, "
            "lease_owner = NULL, "
            "lease_expires_at = NULL WHERE id = $1",
            refund,
            WORKER,
        )
    finally:
        await refunds_sm.close()
    await page.run("pgoutbox ops list", schema="refunds")
    await page.run("pgoutbox ops fire 1 charge --actor bob", schema="refunds")
    await page.run(
        'pgoutbox ops fire 1 approve --actor alice --detail "ticket 4711"', schema="refunds"
    )
