"""The lifecycle commands and ``ops fire`` run as a user runs them: the installed console script,
configured by environment variables, against a real PostgreSQL, with an application module of
the user's own in the current directory. Outputs, exit codes, parsed ``--json``, and the rows
and audit entries each command leaves behind."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from pgoutbox import DatabaseSessionManager, Settings, WorkflowSystem, publish_operation
from pgoutbox.settings import DatabaseSettings

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"
CHANNEL = "approvals"

APP_MODULE = "lifecycle_cli_app"
APP = '''\
"""An application with one custom lifecycle, for `pgoutbox lifecycle register APP`."""
from datetime import timedelta

from pgoutbox import Lifecycle, WorkflowRouter

APPROVAL = Lifecycle.define(
    "cli_approval",
    states=["awaiting_approval", "approved"],
    parking=["awaiting_approval"],
    timeouts={"awaiting_approval": ("expire", timedelta(hours=1))},
    transitions=[
        {"trigger": "request_approval", "source": "claimed", "dest": "awaiting_approval"},
        {"trigger": "approve", "source": "awaiting_approval", "dest": "approved"},
        {"trigger": "deny", "source": "awaiting_approval", "dest": "cancelled"},
        {"trigger": "expire", "source": "awaiting_approval", "dest": "dead"},
        {"trigger": "pay", "source": "approved", "dest": "succeeded"},
    ],
)

router = WorkflowRouter(prefix="cli")


@router.on("refund", lifecycle=APPROVAL)
async def review(ctx, payload):
    return "request_approval"


@router.on("refund", step="approved")
async def pay(ctx, payload):
    return "pay"


@router.on("plain")
async def plain(ctx, payload):
    return None
'''

# The declared edges `lifecycle show` draws, and machinery edges it draws only when asked.
DECLARED_EDGES = {
    ("pending", "claimed", "claim"),
    ("claimed", "awaiting_approval", "request_approval"),
    ("awaiting_approval", "approved", "approve"),
    ("awaiting_approval", "cancelled", "deny"),
    ("awaiting_approval", "dead", "expire"),
    ("approved", "succeeded", "pay"),
}
MACHINERY_EDGES = {
    ("approved", "approved", "claim"),
    ("approved", "approved", "retry"),
    ("dead", "awaiting_approval", "replay"),
    ("claimed", "pending", "release"),
}


def edges(mermaid: str) -> set[tuple[str, str, str]]:
    """The (from, to, trigger) edges of a Mermaid state diagram (``a --> b: t1 | t2``)."""
    found = set()
    for line in mermaid.splitlines():
        arrow, _, triggers = line.strip().partition(": ")
        source, sep, dest = arrow.partition(" --> ")
        if sep and source != "[*]":
            found |= {(source, dest, t.strip()) for t in triggers.split("|")}
    return found


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def _env(dsn: str, schema: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PGOUTBOX_")}
    env.update(PGOUTBOX_DATABASE__DSN=dsn, PGOUTBOX_DATABASE__SCHEMA=schema, COLUMNS="200")
    return env


class Cli:
    """Runs the console script against the test schema, in the application's directory."""

    def __init__(self, dsn: str, schema: str, cwd: Path) -> None:
        self.dsn, self.schema, self.cwd = dsn, schema, cwd

    async def __call__(self, *args: str) -> Completed:
        process = await asyncio.create_subprocess_exec(
            str(PGOUTBOX),
            *args,
            cwd=self.cwd,
            env=_env(self.dsn, self.schema),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return Completed(process.returncode, stdout.decode(), stderr.decode())


class Db:
    """Reads what the commands left in the test schema."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn, self.s = conn, f'"{schema}"'

    async def state(self, op_id: int) -> str:
        state: str = await self.conn.fetchval(
            f"SELECT state FROM {self.s}.operations WHERE id = $1", op_id
        )
        return state

    async def audit(self, op_id: int) -> list[asyncpg.Record]:
        return list(
            await self.conn.fetch(
                f"SELECT * FROM {self.s}.audit_log WHERE operation_id = $1 ORDER BY seq", op_id
            )
        )

    async def lifecycles(self) -> list[tuple[str, int, str]]:
        return [
            tuple(r)
            for r in await self.conn.fetch(
                f"SELECT name, version, digest FROM {self.s}.lifecycles ORDER BY name, version"
            )
        ]

    async def types(self) -> list[tuple[str, str]]:
        return [
            tuple(r)
            for r in await self.conn.fetch(
                f"SELECT operation_type, lifecycle FROM {self.s}.lifecycle_types ORDER BY 1"
            )
        ]

    async def wait_for_state(self, op_id: int, state: str, within: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while (current := await self.state(op_id)) != state:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"operation {op_id} is {current!r}, not {state!r}")
            await asyncio.sleep(0.02)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory holding the application module, as a user's project would."""
    (tmp_path / f"{APP_MODULE}.py").write_text(APP)
    return tmp_path


@pytest.fixture
def app(app_dir: Path) -> ModuleType:
    """The same application module, imported into this process (under a name of its own)."""
    spec = importlib.util.spec_from_file_location(
        f"{APP_MODULE}_{uuid.uuid4().hex[:8]}", app_dir / f"{APP_MODULE}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli(database_dsn: str, db_settings: DatabaseSettings, app_dir: Path) -> Cli:
    return Cli(database_dsn, db_settings.schema_name, app_dir)


@pytest.fixture
def db(conn: asyncpg.Connection, db_settings: DatabaseSettings) -> Db:
    return Db(conn, db_settings.schema_name)


@pytest.fixture
async def parked(
    cli: Cli,
    app: ModuleType,
    db: Db,
    db_settings: DatabaseSettings,
    sm: DatabaseSessionManager,
) -> list[int]:
    """Two refunds parked in awaiting_approval: the lifecycle registered by the CLI, the
    first step run by a worker of the same application in this process."""
    registered = await cli("lifecycle", "register", f"{APP_MODULE}:router")
    assert registered.returncode == 0, registered.stderr
    settings = Settings(
        database=db_settings,
        workflow_system={"channel": CHANNEL, "poll_interval_seconds": 0.2, "lease_seconds": 5},
    )
    async with WorkflowSystem(router=app.router, settings=settings):
        async with sm.session() as session:
            ids = [
                int(await publish_operation(session, "cli.refund", {"n": n}, CHANNEL))
                for n in (1, 2)
            ]
            await session.commit()
        for op_id in ids:
            await db.wait_for_state(op_id, "awaiting_approval")
    return ids


# -- lifecycle register ------------------------------------------------------------------------


async def test_lifecycle_register_registers_once_then_changes_nothing(
    cli: Cli, db: Db, app: ModuleType
) -> None:
    first = await cli("lifecycle", "register", f"{APP_MODULE}:router")

    assert (first.returncode, first.stderr) == (0, "")
    assert first.stdout.splitlines() == [
        "lifecycle cli_approval: registered version 1",
        "operation type cli.refund: runs lifecycle cli_approval",
    ]
    # What the command registered is exactly the application's lifecycle.
    assert await db.lifecycles() == [("cli_approval", 1, app.APPROVAL.digest)]
    assert await db.types() == [("cli.refund", "cli_approval")]
    transitions = await db.conn.fetch(
        f"SELECT lifecycle, from_state, trigger, to_state FROM {db.s}.lifecycle_transitions "
        "WHERE lifecycle = 'cli_approval'"
    )
    assert sorted(tuple(r) for r in transitions) == app.APPROVAL.rows()

    again = await cli("lifecycle", "register", f"{APP_MODULE}:router")

    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout.splitlines() == ["already registered: nothing changed"]
    assert await db.lifecycles() == [("cli_approval", 1, app.APPROVAL.digest)]


async def test_lifecycle_register_refuses_an_app_it_cannot_load(cli: Cli, db: Db) -> None:
    result = await cli("lifecycle", "register", "no_such_module:router")

    assert result.returncode == 2
    assert "cannot load 'no_such_module:router'" in result.stderr
    assert await db.lifecycles() == []


async def test_a_worker_of_the_registered_app_finds_its_lifecycle_unchanged(
    parked: list[int], db: Db, app: ModuleType
) -> None:
    # The in-process worker computed the same digest as the CLI: no second version.
    assert await db.lifecycles() == [("cli_approval", 1, app.APPROVAL.digest)]
    for op_id in parked:
        assert [r["trigger"] for r in await db.audit(op_id)] == [
            "publish",
            "claim",
            "request_approval",
        ]


# -- lifecycle show ----------------------------------------------------------------------------


async def test_lifecycle_show_prints_the_registered_lifecycle_as_mermaid(cli: Cli) -> None:
    assert (await cli("lifecycle", "register", f"{APP_MODULE}:router")).returncode == 0

    result = await cli("lifecycle", "show", "cli.refund")

    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "%% cli.refund runs lifecycle cli_approval (version 1)",
        "%% parking states (fire a trigger to move on): awaiting_approval",
        "%% awaiting_approval times out after 1:00:00 with expire",
    ]
    assert "stateDiagram-v2" in lines
    drawn = edges(result.stdout)
    assert drawn >= DECLARED_EDGES
    assert not MACHINERY_EDGES & drawn

    every = await cli("lifecycle", "show", "cli.refund", "--all-transitions")

    assert every.returncode == 0
    assert edges(every.stdout) >= DECLARED_EDGES | MACHINERY_EDGES


async def test_lifecycle_show_of_an_unregistered_type_shows_the_default_lifecycle(
    cli: Cli,
) -> None:
    result = await cli("lifecycle", "show", "billing.never_registered")

    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0] == "%% billing.never_registered runs lifecycle default (built in)"
    assert "stateDiagram-v2" in lines
    assert {
        ("pending", "claimed", "claim"),
        ("claimed", "succeeded", "succeed"),
        ("claimed", "failed", "fail"),
        ("claimed", "dead", "give_up"),
    } <= edges(result.stdout)
    assert not any("awaiting_approval" in line for line in lines)


# -- ops fire ----------------------------------------------------------------------------------


async def test_ops_fire_moves_a_parked_operation_audited_with_the_actor(
    cli: Cli, db: Db, parked: list[int]
) -> None:
    op_id = parked[0]

    result = await cli("ops", "fire", str(op_id), "approve", "--actor", "alice", "--detail", "x")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"operation {op_id}: awaiting_approval -> approved (approve, by alice)"
    ]
    assert await db.state(op_id) == "approved"
    last = (await db.audit(op_id))[-1]
    assert (last["trigger"], last["from_state"], last["to_state"], last["actor"]) == (
        "approve",
        "awaiting_approval",
        "approved",
        "alice",
    )
    assert last["detail"] == "x"
    assert await db.state(parked[1]) == "awaiting_approval"  # only the one fired at


async def test_ops_fire_refuses_a_disallowed_trigger_listing_the_allowed_ones(
    cli: Cli, db: Db, parked: list[int]
) -> None:
    op_id = parked[0]
    before = await db.audit(op_id)

    result = await cli("ops", "fire", str(op_id), "pay", "--actor", "alice")

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("Error: cannot fire 'pay' at operation")
    assert "allows the triggers: approve, deny, expire" in result.stderr
    assert await db.audit(op_id) == before
    assert await db.state(op_id) == "awaiting_approval"

    missing = await cli("ops", "fire", "999999", "approve", "--actor", "alice")

    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no operation 999999" in missing.stderr


async def test_ops_fire_json_prints_what_was_fired(cli: Cli, db: Db, parked: list[int]) -> None:
    op_id = parked[1]

    result = await cli("ops", "fire", str(op_id), "deny", "--actor", "bob", "--json")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.json() == {
        "operation_id": op_id,
        "trigger": "deny",
        "from_state": "awaiting_approval",
        "to_state": "cancelled",
        "actor": "bob",
    }
    assert await db.state(op_id) == "cancelled"
    assert (await db.audit(op_id))[-1]["actor"] == "bob"


# -- ops list --state --------------------------------------------------------------------------


async def test_ops_list_accepts_a_custom_state_name(cli: Cli, db: Db, parked: list[int]) -> None:
    approved = await cli("ops", "fire", str(parked[0]), "approve", "--actor", "alice")
    assert approved.returncode == 0

    listed = await cli("ops", "list", "--state", "awaiting_approval", "--json")

    assert (listed.returncode, listed.stderr) == (0, "")
    assert [(op["id"], op["state"], op["lifecycle"]) for op in listed.json()] == [
        (parked[1], "awaiting_approval", "cli_approval")
    ]
    table = await cli("ops", "list", "--state", "awaiting_approval", "--state", "approved")
    assert table.returncode == 0
    assert "2 operations" in table.stdout
    assert "awaiting_approval" in table.stdout


async def test_ops_list_refuses_a_state_that_is_no_state_name(cli: Cli) -> None:
    result = await cli("ops", "list", "--state", "Bad!")

    assert (result.returncode, result.stdout) == (2, "")
    assert "'Bad!' is not a state name" in result.stderr
