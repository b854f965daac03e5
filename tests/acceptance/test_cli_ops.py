"""The operator commands run as a user runs them: the installed console script, configured by
environment variables, against a real PostgreSQL. Outputs, exit codes, parsed ``--json``, and
the rows and audit entries each command leaves behind."""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgoutbox import DatabaseSessionManager, publish_operation
from pgoutbox.settings import DatabaseSettings

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"

OPERATION_KEYS = {
    "id",
    "operation_type",
    "channel",
    "lifecycle",
    "state",
    "attempts",
    "max_attempts",
    "priority",
    "run_at",
    "idempotency_key",
    "created_at",
    "created_by",
    "updated_at",
    "last_error",
    "lease_owner",
    "lease_expires_at",
    "version",
    "stale_reason",
}
REPORT_COLUMNS = [
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
]
TO_STATE = {
    "claim": "claimed",
    "succeed": "succeeded",
    "fail": "failed",
    "give_up": "dead",
    "cancel": "cancelled",
}

WORKER_APP = '''\
"""A worker application for `pgoutbox worker ops_app:router`."""
import asyncio

from pgoutbox import WorkflowRouter

router = WorkflowRouter(prefix="ops")


@router.on("hold")
async def hold(ctx, payload):
    await asyncio.sleep(120)  # an external call that takes a while


@router.on("quick")
async def quick(ctx, payload):
    pass
'''


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def _env(dsn: str, schema: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PGOUTBOX_")}
    # Wide enough that table rows stay on one line whatever the terminal running the tests.
    env.update(PGOUTBOX_DATABASE__DSN=dsn, PGOUTBOX_DATABASE__SCHEMA=schema, COLUMNS="200")
    env.update(extra or {})
    return env


class Cli:
    """Runs the console script against the test schema."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema

    async def __call__(self, *args: str, env: dict[str, str] | None = None) -> Completed:
        process = await asyncio.create_subprocess_exec(
            str(PGOUTBOX),
            *args,
            env=_env(self.dsn, self.schema, env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return Completed(process.returncode, stdout.decode(), stderr.decode())


class World:
    """Operations in every state, moved through the audit trigger as workers move them."""

    def __init__(self, sm: DatabaseSessionManager, conn: asyncpg.Connection, schema: str) -> None:
        self.sm, self.conn, self.s = sm, conn, f'"{schema}"'

    async def make(
        self, *triggers: str, operation_type: str = "billing.charge", channel: str = "c"
    ) -> int:
        async with self.sm.session() as session:
            op_id = int(await publish_operation(session, operation_type, {"n": 1}, channel))
            await session.commit()
        for trigger in triggers:
            failure = trigger in ("fail", "give_up")
            await self.conn.execute(
                f"UPDATE {self.s}.operations SET state = $2, transition = $3, "
                "transition_actor = 'worker-1', transition_detail = $4, "
                "attempts = attempts + CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END, "
                "step_attempts = step_attempts + CASE WHEN $3 = 'claim' THEN 1 ELSE 0 END, "
                "lease_owner = CASE WHEN $3 = 'claim' THEN 'worker-1' END, "
                "lease_expires_at = CASE WHEN $3 = 'claim' THEN now() + interval '1 minute' END, "
                "last_error = coalesce($5, last_error) WHERE id = $1",
                op_id,
                TO_STATE[trigger],
                trigger,
                "attempt 1 of 5: ValueError: card [declined]\nTraceback ..." if failure else None,
                "ValueError: card [declined]" if failure else None,
            )
        return op_id

    async def row(self, op_id: int) -> asyncpg.Record | None:
        return await self.conn.fetchrow(f"SELECT * FROM {self.s}.operations WHERE id = $1", op_id)

    async def state(self, op_id: int) -> str | None:
        row = await self.row(op_id)
        return None if row is None else str(row["state"])

    async def audit(self, op_id: int) -> list[asyncpg.Record]:
        return await self.conn.fetch(
            f"SELECT * FROM {self.s}.audit_log WHERE operation_id = $1 ORDER BY seq", op_id
        )

    async def now(self) -> datetime:
        now: datetime = await self.conn.fetchval("SELECT clock_timestamp()")
        return now


@pytest.fixture
def cli(database_dsn: str, db_settings: DatabaseSettings) -> Cli:
    return Cli(database_dsn, db_settings.schema_name)


@pytest.fixture
def world(
    sm: DatabaseSessionManager, conn: asyncpg.Connection, db_settings: DatabaseSettings
) -> World:
    return World(sm, conn, db_settings.schema_name)


@pytest.fixture
async def ids(world: World) -> dict[str, int]:
    """One operation in each state (and a second type and channel)."""
    return {
        "pending": await world.make(),
        "claimed": await world.make("claim"),
        "succeeded": await world.make("claim", "succeed"),
        "failed": await world.make("claim", "fail"),
        "dead": await world.make("claim", "give_up", operation_type="email.send_receipt"),
        "cancelled": await world.make("cancel", channel="other"),
    }


# -- ops list ------------------------------------------------------------------------------


async def test_ops_list_prints_every_operation_newest_first(cli: Cli, ids: dict[str, int]) -> None:
    result = await cli("ops", "list")

    assert (result.returncode, result.stderr) == (0, "")
    assert "6 operations" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [int(line.split("│")[1]) for line in lines] == sorted(ids.values(), reverse=True)
    failed_line = next(line for line in lines if int(line.split("│")[1]) == ids["failed"])
    assert "failed" in failed_line
    assert "ValueError: card [declined]" in failed_line  # taken literally, not as markup


async def test_ops_list_json_has_stable_keys_and_iso_timestamps(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    listed = (await cli("ops", "list", "--json")).json()

    assert [op["id"] for op in listed] == sorted(ids.values(), reverse=True)
    assert all(set(op) == OPERATION_KEYS for op in listed)
    failed = next(op for op in listed if op["id"] == ids["failed"])
    row = await world.row(ids["failed"])
    assert row is not None
    assert datetime.fromisoformat(failed["updated_at"]) == row["updated_at"]
    assert (failed["state"], failed["attempts"], failed["last_error"]) == (
        "failed",
        1,
        "ValueError: card [declined]",
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--state", "failed", "--state", "dead"], ["dead", "failed"]),
        (["--type", "email.*"], ["dead"]),
        (["--type", "billing.charge", "--channel", "other"], ["cancelled"]),
        (["--since", "1h", "--limit", "2"], ["cancelled", "dead"]),
        (["--since", "now"], []),
        (["--until", "2000-01-01"], []),
    ],
)
async def test_ops_list_filters(
    cli: Cli, ids: dict[str, int], args: list[str], expected: list[str]
) -> None:
    result = await cli("ops", "list", "--json", *args)

    assert result.returncode == 0, result.stderr
    assert [op["id"] for op in result.json()] == [ids[state] for state in expected]


async def test_ops_list_stale_names_why_each_operation_is_stuck(
    cli: Cli, ids: dict[str, int], world: World, unaudited: Callable[..., Awaitable[None]]
) -> None:
    await world.conn.execute(
        f"INSERT INTO {world.s}.workers (id, hostname, pid, channel, operation_types) "
        "VALUES ('w1', 'host', 1, 'c', '{billing.charge}')"
    )
    fresh = await world.make()  # handled by the live worker and just published: not stale
    await unaudited(
        world.s,
        f"UPDATE {world.s}.operations SET run_at = now() - interval '10 minutes' WHERE id = $1",
        ids["pending"],
    )

    result = await cli("ops", "list", "--stale", "--json")
    table = await cli("ops", "list", "--stale", "--older-than", "1h")

    # The failed one and `fresh` are handled and due only since they were published.
    assert {op["id"]: op["stale_reason"] for op in result.json()} == {ids["pending"]: "overdue"}
    assert fresh not in {op["id"] for op in result.json()}
    # With a one-hour threshold nothing handled is overdue, and nothing is unhandled.
    assert "0 operations (stale)" in table.stdout
    unhandled = await world.make(operation_type="nobody.handles_this")
    stale = (await cli("ops", "list", "--stale", "--json")).json()
    assert {op["id"]: op["stale_reason"] for op in stale}[unhandled] == "unhandled"
    text = (await cli("ops", "list", "--stale")).stdout
    assert "no live worker handles it" in text


async def test_ops_list_rejects_a_bad_time_with_a_usage_error(cli: Cli) -> None:
    result = await cli("ops", "list", "--since", "yesterday")

    assert result.returncode == 2
    assert "invalid time 'yesterday'" in result.stderr


# -- ops show ------------------------------------------------------------------------------


async def test_ops_show_prints_the_operation_its_attempts_and_audit_trail(
    cli: Cli, ids: dict[str, int]
) -> None:
    result = await cli("ops", "show", str(ids["failed"]))

    assert (result.returncode, result.stderr) == (0, "")
    out = result.stdout
    assert f"{ids['failed']}  billing.charge" in out
    assert '{"n": 1}' in out
    assert "attempts" in out
    assert "audit trail" in out
    assert "attempt 1 of 5: ValueError: card [declined]" in out
    for transition in ("publish", "claim", "fail"):
        assert transition in out
    assert "Traceback" not in out  # tables show the first line; --json has it all


async def test_ops_show_json_matches_the_audit_log(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    detail = (await cli("ops", "show", str(ids["dead"]), "--json")).json()

    audit = await world.audit(ids["dead"])
    assert set(detail) == {"operation_id", "operation", "payload", "attempts", "audit"}
    assert detail["operation"]["state"] == "dead"
    assert detail["payload"] == {"n": 1}
    assert [(r["seq"], r["trigger"], r["actor"], r["hash"]) for r in detail["audit"]] == [
        (r["seq"], r["trigger"], r["actor"], r["hash"].hex()) for r in audit
    ]
    (attempt,) = detail["attempts"]
    assert attempt["number"] == 1
    assert attempt["worker"] == "worker-1"
    assert attempt["outcome"] == "give_up"
    assert attempt["error"] == audit[-1]["detail"]
    assert datetime.fromisoformat(attempt["started_at"]) == audit[1]["recorded_at"]
    assert attempt["duration_seconds"] == pytest.approx(
        (audit[2]["recorded_at"] - audit[1]["recorded_at"]).total_seconds()
    )


async def test_ops_show_of_an_unknown_operation_exits_1(cli: Cli) -> None:
    result = await cli("ops", "show", "987654")

    assert result.returncode == 1
    assert result.stderr == "Error: no operation 987654\n"


# -- ops retry / cancel / replay -----------------------------------------------------------


async def test_ops_retry_moves_a_failed_operation_to_pending_audited_with_the_actor(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    op_id = ids["failed"]
    result = await cli("ops", "retry", str(op_id), "--actor", "alice", "--reason", "INC-42")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"operation {op_id}: failed -> pending (retry, by alice)\n"
    assert await world.state(op_id) == "pending"
    last = (await world.audit(op_id))[-1]
    assert (last["trigger"], last["actor"], last["detail"]) == ("retry", "alice", "INC-42")


async def test_the_actor_defaults_to_the_os_user(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    result = await cli("ops", "cancel", str(ids["pending"]))

    assert result.returncode == 0, result.stderr
    last = (await world.audit(ids["pending"]))[-1]
    assert (last["trigger"], last["actor"]) == ("cancel", getpass.getuser())


async def test_a_refused_action_exits_1_naming_the_id_its_state_and_what_is_allowed(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    succeeded = ids["succeeded"]
    audit_before = await world.audit(succeeded)

    result = await cli("ops", "cancel", str(succeeded), "--actor", "alice")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: cannot cancel operation {succeeded}: it is succeeded; cancel applies only to "
        "dead or failed or pending operations (from succeeded, lifecycle 'default' allows: "
        "nothing)\n"
    )
    assert await world.state(succeeded) == "succeeded"
    assert await world.audit(succeeded) == audit_before


async def test_cancelling_a_running_operation_nobody_answers_exits_1_and_the_request_stands(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    # Claimed by "worker-1", which runs nowhere: the request is recorded, nobody acts on it.
    claimed = ids["claimed"]
    audit_before = await world.audit(claimed)

    result = await cli("ops", "cancel", str(claimed), "--actor", "alice", "--wait", "0s")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"Error: cancel of operation {claimed} requested, but its worker worker-1 did not act "
        "within 0 s; the request stands: the worker stops the handler when it sees it, or a "
        "rescuer cancels the operation once its lease expires ("
    )
    assert await world.state(claimed) == "claimed"
    assert await world.audit(claimed) == audit_before
    row = await world.row(claimed)
    assert row is not None
    assert (row["cancel_requested_by"], row["cancel_request_version"]) == ("alice", row["version"])
    # Asked again: the standing request is waited for, not made twice.
    again = await cli("ops", "cancel", str(claimed), "--actor", "bob", "--wait", "0s")
    assert again.returncode == 1
    assert "the request stands" in again.stderr
    assert (await world.row(claimed) or {})["cancel_requested_by"] == "alice"


async def test_a_cancel_wait_beyond_an_hour_is_a_usage_error(cli: Cli, ids: dict[str, int]) -> None:
    result = await cli("ops", "cancel", str(ids["claimed"]), "--wait", "2h")

    assert result.returncode == 2
    assert "--wait is at most 1h" in result.stderr


async def test_several_ids_are_each_done_or_refused_and_any_refusal_exits_1(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    result = await cli(
        "ops", "replay", str(ids["dead"]), str(ids["succeeded"]), "424242", "--actor", "bob"
    )

    assert result.returncode == 1
    assert result.stdout == f"operation {ids['dead']}: dead -> pending (replay, by bob)\n"
    assert f"cannot replay operation {ids['succeeded']}: it is succeeded" in result.stderr
    assert "cannot replay operation 424242: no such operation" in result.stderr
    assert await world.state(ids["dead"]) == "pending"
    assert await world.state(ids["succeeded"]) == "succeeded"


async def test_ops_replay_json_reports_each_result_and_can_allow_more_attempts(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    result = await cli(
        "ops", "replay", str(ids["cancelled"]), str(ids["dead"]), "--attempts", "3", "--json"
    )

    assert result.returncode == 0, result.stderr
    assert result.json() == [
        {
            "operation_id": ids["cancelled"],
            "action": "replay",
            "ok": True,
            "state_before": "cancelled",
            "state": "pending",
            "message": f"operation {ids['cancelled']}: cancelled -> pending (replay, by "
            f"{getpass.getuser()})",
        },
        {
            "operation_id": ids["dead"],
            "action": "replay",
            "ok": True,
            "state_before": "dead",
            "state": "pending",
            "message": f"operation {ids['dead']}: dead -> pending (replay, by {getpass.getuser()})",
        },
    ]
    dead = await world.row(ids["dead"])
    assert dead is not None
    assert (dead["attempts"], dead["max_attempts"]) == (1, 4)


async def test_ops_cancel_json_includes_refusals(cli: Cli, ids: dict[str, int]) -> None:
    result = await cli("ops", "cancel", str(ids["failed"]), str(ids["succeeded"]), "--json")

    assert result.returncode == 1
    first, second = result.json()
    assert (first["ok"], first["state"]) == (True, "cancelled")
    assert (second["ok"], second["state"]) == (False, "succeeded")
    assert "cancel applies only to dead or failed or pending operations" in second["message"]


# -- ops purge -----------------------------------------------------------------------------


async def test_ops_purge_without_yes_deletes_nothing(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    text = await cli("ops", "purge", "--finished-before", "now")
    data = await cli("ops", "purge", "--finished-before", "now", "--include-dead", "--json")

    assert text.returncode == data.returncode == 0
    assert text.stdout.startswith("would delete 2 finished operations whose last change was ")
    assert "(cancelled: 1, succeeded: 1)" in text.stdout
    assert "dead operations are kept" in text.stdout
    assert "nothing deleted: run again with --yes to purge" in text.stdout
    preview = data.json()
    assert (preview["dry_run"], preview["total"]) == (True, 3)
    assert preview["counts"] == {"cancelled": 1, "dead": 1, "succeeded": 1}
    assert all([await world.row(op_id) for op_id in ids.values()])
    assert await world.conn.fetchval(f"SELECT count(*) FROM {world.s}.purges") == 0


async def test_ops_purge_yes_deletes_finished_operations_keeps_their_audit_and_records_itself(
    cli: Cli, ids: dict[str, int], world: World
) -> None:
    audit_rows = await world.conn.fetchval(f"SELECT count(*) FROM {world.s}.audit_log")

    result = await cli(
        "ops", "purge", "--finished-before", "now", "--yes", "--batch-size", "1", "--actor", "ret"
    )

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("purge 1 by ret: deleted 2 operations (cancelled: 1, ")
    assert result.stdout.endswith("in 2 batches; their audit rows are kept\n")
    assert await world.row(ids["succeeded"]) is None
    assert await world.row(ids["cancelled"]) is None
    assert await world.state(ids["dead"]) == "dead"
    purge = await world.conn.fetchrow(f"SELECT * FROM {world.s}.purges")
    assert (purge["actor"], purge["deleted"], purge["include_dead"]) == ("ret", 2, False)
    assert purge["finished_at"] is not None
    # Every row stays, and each deleted operation's chain ends with its purge.
    assert await world.conn.fetchval(f"SELECT count(*) FROM {world.s}.audit_log") == (
        audit_rows + 2
    )
    purged = await world.conn.fetch(
        f"SELECT actor, detail FROM {world.s}.audit_log WHERE trigger = 'purge' "
        "AND operation_id = ANY($1::bigint[])",
        [ids["succeeded"], ids["cancelled"]],
    )
    assert [tuple(r) for r in purged] == [("ret", "purge 1")] * 2
    audit_rows += 2

    verify = await cli("audit", "verify")
    assert (verify.returncode, verify.stdout) == (
        0,
        f"OK: {audit_rows} audit rows of 6 operations verified\n",
    )
    shown = await cli("ops", "show", str(ids["succeeded"]))
    assert shown.returncode == 0
    assert f"operation {ids['succeeded']} was purged; its audit trail is kept" in shown.stdout

    with_dead = await cli(
        "ops", "purge", "--finished-before", "now", "--include-dead", "--yes", "--json"
    )
    purged = with_dead.json()
    assert (purged["dry_run"], purged["deleted"], purged["counts"]) == (False, 1, {"dead": 1})
    assert purged["include_dead"] is True


# -- audit report / verify -----------------------------------------------------------------


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


async def test_audit_report_csv_is_the_audit_log_row_by_row(
    cli: Cli, world: World, ids: dict[str, int]
) -> None:
    since = await world.now()
    await world.make("claim", "fail", operation_type="email.send_receipt")
    await cli("ops", "retry", str(ids["failed"]), "--actor", "alice")
    until = await world.now()
    await world.make()  # after the window

    result = await cli(
        "audit", "report", "--since", since.isoformat(), "--until", until.isoformat()
    )

    assert result.returncode == 0, result.stderr
    # The period goes to standard error: standard output is the CSV and nothing else.
    assert result.stderr == (
        f"4 audit rows recorded from {since.isoformat()} until {until.isoformat()} (exclusive)\n"
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = await world.conn.fetch(
        f"SELECT * FROM {world.s}.audit_log WHERE recorded_at >= $1 AND recorded_at < $2 "
        "ORDER BY recorded_at, operation_id, seq",
        since,
        until,
    )
    assert len(rows) == len(expected) == 4
    for row, audit in zip(rows, expected, strict=True):
        assert list(row) == REPORT_COLUMNS
        assert row == {column: _csv_value(audit[column]) for column in REPORT_COLUMNS}
    assert rows[-1]["trigger"] == "retry"
    assert rows[-1]["actor"] == "alice"
    # A multi-line detail (a traceback) survives the CSV round trip.
    assert rows[2]["detail"] == "attempt 1 of 5: ValueError: card [declined]\nTraceback ..."


async def test_audit_report_json_to_a_file_filtered_by_type(
    cli: Cli, world: World, ids: dict[str, int], tmp_path: Path
) -> None:
    output = tmp_path / "report.json"
    before = await world.now()

    result = await cli(
        "audit",
        "report",
        "--since",
        "1h",
        "--until",
        "now",
        "--type",
        "email.*",
        "--format",
        "json",
        "-o",
        str(output),
    )

    assert (result.returncode, result.stdout) == (0, "")
    since, until = _period(result.stderr, f"wrote 3 audit rows to {output}, ")
    assert since is not None
    assert before <= until <= await world.now()
    assert before - timedelta(hours=1) <= since <= until - timedelta(hours=1)
    assert not output.with_name("report.json.partial").exists()
    report = json.loads(output.read_text())
    audit = await world.audit(ids["dead"])
    assert [(r["operation_id"], r["seq"], r["trigger"]) for r in report] == [
        (ids["dead"], a["seq"], a["trigger"]) for a in audit
    ]
    assert all(set(r) == set(REPORT_COLUMNS) for r in report)
    assert [datetime.fromisoformat(r["recorded_at"]) for r in report] == [
        a["recorded_at"] for a in audit
    ]


async def test_audit_report_of_an_empty_window_is_valid_json(cli: Cli) -> None:
    result = await cli(
        "audit", "report", "--since", "2000-01-01", "--until", "2000-01-02", "--format", "json"
    )
    assert (result.returncode, result.json()) == (0, [])


def _period(stderr: str, prefix: str) -> tuple[datetime | None, datetime]:
    """The [since, until) that `audit report` said it covered (None: from the first row)."""
    match = re.fullmatch(
        re.escape(prefix) + r"recorded from (.+) until (.+) \(exclusive\)\n", stderr
    )
    assert match is not None, stderr
    since, until = match.groups()
    start = None if since == "the start of the log" else datetime.fromisoformat(since)
    return start, datetime.fromisoformat(until)


async def test_audit_report_without_a_period_reports_all_history_up_to_now_and_says_so(
    cli: Cli, world: World, ids: dict[str, int]
) -> None:
    before = await world.now()

    result = await cli("audit", "report")
    as_json = await cli("audit", "report", "--format", "json", "--until", before.isoformat())

    assert result.returncode == 0, result.stderr
    since, until = _period(result.stderr, "14 audit rows ")
    assert since is None
    assert before <= until <= await world.now()
    everything = await world.conn.fetch(
        f"SELECT * FROM {world.s}.audit_log ORDER BY recorded_at, operation_id, seq"
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows == [{c: _csv_value(audit[c]) for c in REPORT_COLUMNS} for audit in everything]
    # Only --until: from the first row to then, and still a plain JSON array.
    assert as_json.returncode == 0, as_json.stderr
    assert _period(as_json.stderr, "14 audit rows ") == (None, before)
    assert [(r["operation_id"], r["seq"]) for r in as_json.json()] == [
        (audit["operation_id"], audit["seq"]) for audit in everything
    ]


async def test_audit_verify_shows_a_progress_bar_on_a_terminal(
    cli: Cli, ids: dict[str, int]
) -> None:
    result = await cli("audit", "verify", env={"TTY_COMPATIBLE": "1"})

    assert result.returncode == 0
    assert result.stdout == "OK: 14 audit rows of 6 operations verified\n"
    assert "verifying audit chains" in result.stderr
    assert "14/14" in result.stderr


# -- stats, workers ------------------------------------------------------------------------


async def test_stats_table_and_json(cli: Cli, ids: dict[str, int]) -> None:
    table = await cli("stats")
    data = (await cli("stats", "--json")).json()

    assert table.returncode == 0, table.stderr
    assert "billing.charge" in table.stdout
    assert "email.send_receipt" in table.stdout
    assert "2 of 3 finished attempts failed (66.7%)" in table.stdout
    assert f"oldest pending: operation {ids['pending']}" in table.stdout
    assert set(data) == {
        "generated_at", "since", "total", "by_type", "oldest_pending_id", "pauses",
    }  # fmt: skip
    assert data["pauses"] == []
    assert data["total"]["counts"] == {
        "pending": 1,
        "claimed": 1,
        "succeeded": 1,
        "failed": 1,
        "dead": 1,
        "cancelled": 1,
    }
    by_type = {t["operation_type"]: t for t in data["by_type"]}
    assert by_type["email.send_receipt"]["counts"] == {"dead": 1}
    assert by_type["billing.charge"]["failure_rate"] == 0.5
    assert data["oldest_pending_id"] == ids["pending"]


async def test_workers_shows_a_live_worker_started_with_pgoutbox_worker_and_what_it_holds(
    cli: Cli, world: World, tmp_path: Path, database_dsn: str, db_settings: DatabaseSettings
) -> None:
    (tmp_path / "ops_app.py").write_text(WORKER_APP)
    env = _env(
        database_dsn,
        db_settings.schema_name,
        {
            "PYTHONPATH": str(tmp_path),
            "PGOUTBOX_WORKFLOW_SYSTEM__CHANNEL": "ops_channel",
            "PGOUTBOX_WORKFLOW_SYSTEM__POLL_INTERVAL_SECONDS": "0.2",
            "PGOUTBOX_WORKFLOW_SYSTEM__SHUTDOWN_TIMEOUT_SECONDS": "1",
        },
    )
    worker = await asyncio.create_subprocess_exec(
        str(PGOUTBOX),
        "worker",
        "ops_app:router",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert worker.stderr is not None
        started = ""
        async with asyncio.timeout(30):
            while "running" not in started:
                started = (await worker.stderr.readline()).decode()
                assert started, "the worker exited before it was running"
        assert started.startswith("worker "), started
        held = await world.make(operation_type="ops.hold", channel="ops_channel")
        async with asyncio.timeout(15):
            while await world.state(held) != "claimed":  # noqa: ASYNC110 (polling the DB)
                await asyncio.sleep(0.05)

        found = (await cli("workers", "--json")).json()
        table = await cli("workers")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(worker.communicate(), timeout=30)

    (info,) = found
    assert info["id"] == started.split()[1]
    assert (info["channel"], info["live"], info["held"]) == ("ops_channel", True, [held])
    assert info["operation_types"] == ["ops.hold", "ops.quick"]
    assert info["heartbeat_age_seconds"] < 30
    assert "1 live worker (1 registered)" in table.stdout
    assert info["id"] in table.stdout
    # SIGTERM stops it gracefully: the unfinished operation is handed back, audited.
    assert worker.returncode == 0, stderr.decode()
    assert await world.state(held) == "pending"
    assert (await world.audit(held))[-1]["trigger"] == "release"
    assert (await cli("workers", "--json")).json() == []


# -- settings and database problems --------------------------------------------------------


async def test_an_unreachable_database_exits_2(cli: Cli) -> None:
    result = await cli("--dsn", "postgresql://postgres@127.0.0.1:1/postgres", "stats")

    assert result.returncode == 2
    assert result.stderr.startswith(
        "Error: cannot connect to PostgreSQL at 127.0.0.1:1 (database postgres, user postgres): "
    )


async def test_a_schema_without_pgoutbox_exits_2_saying_to_upgrade(cli: Cli) -> None:
    result = await cli("--schema", "not_installed_here", "ops", "list")

    assert result.returncode == 2
    assert "schema not_installed_here is not at pgoutbox's head revision" in result.stderr
    assert "pgoutbox db upgrade" in result.stderr
