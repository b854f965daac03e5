"""Every failure the `pgoutbox` command expects reaches the user as one line on standard error,
``Error: <what is wrong and what to do>``, and exit code 2 -- never a traceback. (Exit 1, for
refusals and lookups that find nothing, is tested with each command.)"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pgoutbox.migrations import head_revision

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1
APP = """\
from pgoutbox import WorkflowRouter

router = WorkflowRouter(prefix="errors")


@router.on("noop")
async def noop(ctx, payload):
    pass
"""


def _run(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with no PGOUTBOX_* settings but ``env``'s."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("PGOUTBOX_")}
    return subprocess.run(
        argv, env=clean | (env or {}), cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on standard error, having checked it is one line
    and the exit code 2."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("Error: "), result.stderr
    return result.stderr.removesuffix("\n")


def test_demo_without_an_embedded_server_says_how_to_get_one_in_one_line() -> None:
    simulate = (
        "import pgoutbox.embedded as embedded\n"
        "def unavailable(*args, **kwargs):\n"
        "    raise embedded.EmbeddedUnavailableError(\n"
        "        'No PostgreSQL server binaries found; install them (apt install postgresql).')\n"
        "embedded.start_embedded = unavailable\n"
        "from pgoutbox.cli import main\n"
        "main(['demo'])\n"
    )

    result = _run(sys.executable, "-c", simulate)

    assert _error_line(result) == (
        "Error: cannot start an embedded PostgreSQL for the demo: No PostgreSQL server binaries "
        "found; install them (apt install postgresql). On a server you have: pgoutbox demo "
        "--dsn postgresql://USER@HOST/DATABASE"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["db", "current"],
        ["db", "upgrade"],
        ["audit", "verify"],
        ["audit", "report", "--since", "1d", "--until", "now"],
        ["ops", "list"],
        ["lifecycle", "show", "billing.refund"],
        ["demo"],
    ],
)
@pytest.mark.parametrize("where", ["environment", "option"])
def test_an_unreachable_database_is_one_line_naming_it_and_what_to_check(
    command: list[str], where: str
) -> None:
    if where == "environment":
        result = _run(str(PGOUTBOX), *command, env={"PGOUTBOX_DATABASE__DSN": UNREACHABLE})
    else:
        result = _run(str(PGOUTBOX), *command, "--dsn", UNREACHABLE)

    line = _error_line(result)
    assert line.startswith(
        "Error: cannot connect to PostgreSQL at 127.0.0.1:1 (database postgres, user postgres): "
        "ConnectionRefusedError: "
    ), line
    assert line.endswith(
        "; check --dsn (or PGOUTBOX_DATABASE__DSN) and that the server is running and accepts "
        "connections"
    ), line


@pytest.mark.parametrize("command", [["stats"], ["db", "upgrade"], ["demo"]])
def test_an_invalid_dsn_is_one_line_naming_what_is_wrong(command: list[str]) -> None:
    result = _run(str(PGOUTBOX), *command, "--dsn", "mysql://app@db.internal/app")

    assert _error_line(result) == (
        "Error: invalid settings: invalid dsn scheme 'mysql': expected a postgresql:// URL"
    )


def test_a_worker_on_a_schema_not_at_head_is_one_line_saying_to_upgrade(
    database_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "errors_app.py").write_text(APP)
    schema = f"never_installed_{uuid.uuid4().hex[:8]}"

    result = _run(
        str(PGOUTBOX),
        "worker",
        "errors_app:router",
        env={
            "PGOUTBOX_DATABASE__DSN": database_dsn,
            "PGOUTBOX_DATABASE__SCHEMA": schema,
            "PGOUTBOX_WORKFLOW_SYSTEM__AUTO_MIGRATE": "false",
        },
        cwd=tmp_path,
    )

    assert _error_line(result) == (
        f"Error: schema '{schema}' is at revision none, not at pgoutbox's head "
        f"{head_revision()}; run `pgoutbox db upgrade` (or set workflow_system.auto_migrate=true)"
    )


def test_an_invalid_worker_setting_is_one_line_naming_it(database_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "errors_app.py").write_text(APP)

    result = _run(
        str(PGOUTBOX),
        "worker",
        "errors_app:router",
        env={
            "PGOUTBOX_DATABASE__DSN": database_dsn,
            "PGOUTBOX_WORKFLOW_SYSTEM__LEASE_SECONDS": "0",
        },
        cwd=tmp_path,
    )

    assert _error_line(result) == (
        "Error: invalid settings: workflow_system.lease_seconds: Input should be greater than 0"
    )


def test_an_unexpected_error_keeps_its_traceback() -> None:
    # Only the failures pgoutbox expects are shortened: a bug must show where it happened.
    simulate = (
        "import pgoutbox.migrations as migrations\n"
        "async def broken(settings):\n"
        "    raise ZeroDivisionError('a bug')\n"
        "migrations.current = broken\n"
        "from pgoutbox.cli import main\n"
        "main(['db', 'current'])\n"
    )

    result = _run(sys.executable, "-c", simulate, env={"PGOUTBOX_DATABASE__DSN": UNREACHABLE})

    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.endswith("ZeroDivisionError: a bug\n")
