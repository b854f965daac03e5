"""Settings as users pass them: keyword arguments (the Quickstart), environment variables, dsn."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from pgoutbox import DatabaseSettings, Settings, WorkflowSystemSettings
from pgoutbox.settings import parse_dsn

QUICKSTART_DATABASE = {
    "host": "localhost",
    "port": 5432,
    "user": "postgres",
    "password": "postgres",
    "database": "postgres",
    "application_name": "pgoutbox",
    "schema": "pgoutbox",
}

BAD_IDENTIFIERS = [
    pytest.param('pg"x', id="double-quote"),
    pytest.param("x'y", id="single-quote"),
    pytest.param("a;drop_table", id="semicolon"),
    pytest.param("nul\x00byte", id="nul"),
    pytest.param("a" * 64, id="64-bytes"),
    pytest.param("Workflow", id="upper-case"),
    pytest.param("pg_workflow", id="pg-prefix"),
    pytest.param("", id="empty"),
    pytest.param("two words", id="space"),
    pytest.param("1st", id="leading-digit"),
]


@pytest.fixture(autouse=True)
def _no_pgoutbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the PGOUTBOX_* variables it sets itself."""
    for name in list(os.environ):
        if name.startswith("PGOUTBOX_"):
            monkeypatch.delenv(name)


def test_quickstart_settings_are_accepted_as_written() -> None:
    settings = Settings(
        database=QUICKSTART_DATABASE,
        workflow_system={"channel": "workflow", "n_workers": 5},
    )

    db = settings.database
    assert (db.host, db.port, db.user, db.password, db.database) == (
        "localhost",
        5432,
        "postgres",
        "postgres",
        "postgres",
    )
    assert db.application_name == "pgoutbox"
    assert db.schema_name == "pgoutbox"
    assert settings.workflow_system.channel == "workflow"
    assert settings.workflow_system.n_workers == 5


def test_quickstart_settings_give_asyncpg_connect_arguments() -> None:
    settings = Settings(database=QUICKSTART_DATABASE, workflow_system={"channel": "workflow"})

    assert settings.database.connect_kwargs() == {
        "host": "localhost",
        "port": 5432,
        "user": "postgres",
        "password": "postgres",
        "database": "postgres",
        "server_settings": {"application_name": "pgoutbox"},
    }


def test_defaults_need_no_arguments() -> None:
    settings = Settings()

    assert settings.database.schema_name == "pgoutbox"
    assert settings.database.max_payload_bytes == 1024 * 1024
    assert settings.workflow_system.heartbeat_interval == pytest.approx(
        settings.workflow_system.lease_seconds / 3
    )


def test_environment_variables_fill_nested_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGOUTBOX_DATABASE__HOST", "db.internal")
    monkeypatch.setenv("PGOUTBOX_DATABASE__SCHEMA", "billing_outbox")
    monkeypatch.setenv("PGOUTBOX_WORKFLOW_SYSTEM__N_WORKERS", "7")

    settings = Settings()

    assert settings.database.host == "db.internal"
    assert settings.database.schema_name == "billing_outbox"
    assert settings.workflow_system.n_workers == 7


def test_keyword_arguments_win_over_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGOUTBOX_DATABASE__HOST", "from-env")
    monkeypatch.setenv("PGOUTBOX_DATABASE__SCHEMA", "env_schema")

    settings = Settings(database={"host": "from-code"})

    assert settings.database.host == "from-code"
    # Fields not given in code still come from the environment.
    assert settings.database.schema_name == "env_schema"


def test_invalid_environment_variable_is_rejected_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGOUTBOX_WORKFLOW_SYSTEM__N_WORKERS", "many")

    with pytest.raises(ValidationError, match="n_workers") as excinfo:
        Settings()
    assert "many" in str(excinfo.value)


def test_dsn_with_escaped_password_and_port_is_parsed() -> None:
    db = DatabaseSettings(dsn="postgresql://alice:p%40ss@db.example:6543/ledger")

    assert (db.user, db.password, db.host, db.port, db.database) == (
        "alice",
        "p@ss",
        "db.example",
        6543,
        "ledger",
    )


def test_dsn_with_unix_socket_directory_is_parsed() -> None:
    assert parse_dsn("postgresql://alice@/ledger?host=/tmp/x&port=5433") == {
        "host": "/tmp/x",
        "port": 5433,
        "user": "alice",
        "database": "ledger",
    }


def test_dsn_from_environment_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGOUTBOX_DATABASE__DSN", "postgres://bob:s3cret@10.0.0.5:6000/app")

    db = Settings().database

    assert (db.user, db.password, db.host, db.port, db.database) == (
        "bob",
        "s3cret",
        "10.0.0.5",
        6000,
        "app",
    )


def test_fields_given_alongside_a_dsn_take_precedence() -> None:
    db = DatabaseSettings(dsn="postgresql://alice@h:6543/ledger", port=7000, schema="ops")

    assert (db.host, db.port, db.database, db.schema_name) == ("h", 7000, "ledger", "ops")


def test_dsn_of_another_database_kind_is_rejected_naming_it() -> None:
    with pytest.raises(ValidationError, match=r"invalid dsn scheme 'mysql'"):
        DatabaseSettings(dsn="mysql://u@h/db")


@pytest.mark.parametrize("name", BAD_IDENTIFIERS)
def test_invalid_schema_name_is_rejected_naming_the_value(name: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        Settings(database={**QUICKSTART_DATABASE, "schema": name})

    assert f"invalid schema name {name!r}" in str(excinfo.value)


@pytest.mark.parametrize("name", BAD_IDENTIFIERS)
def test_invalid_channel_name_is_rejected_naming_the_value(name: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        Settings(workflow_system={"channel": name})

    assert f"invalid channel name {name!r}" in str(excinfo.value)


def test_schema_name_of_63_bytes_is_accepted() -> None:
    assert DatabaseSettings(schema="s" * 63).schema_name == "s" * 63


def test_invalid_schema_name_from_environment_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGOUTBOX_DATABASE__SCHEMA", 'x";drop')

    with pytest.raises(ValidationError, match="invalid schema name"):
        Settings()


@pytest.mark.parametrize("heartbeat", [10.0, 12.5])
def test_heartbeat_not_shorter_than_lease_is_rejected(heartbeat: float) -> None:
    with pytest.raises(ValidationError, match=r"must be shorter than lease_seconds=10\.0"):
        WorkflowSystemSettings(lease_seconds=10, heartbeat_seconds=heartbeat)


def test_heartbeat_shorter_than_lease_is_accepted() -> None:
    ws = WorkflowSystemSettings(lease_seconds=10, heartbeat_seconds=9.5)

    assert ws.heartbeat_interval == 9.5


def test_unknown_top_level_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="workflow_sytem"):
        Settings(workflow_sytem={"channel": "workflow"})  # type: ignore[call-arg]


def test_unknown_database_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="hots"):
        Settings(database={**QUICKSTART_DATABASE, "hots": "localhost"})


def test_unknown_workflow_system_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="n_worker"):
        Settings(workflow_system={"channel": "workflow", "n_worker": 5})


def test_unknown_nested_environment_variable_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGOUTBOX_DATABASE__HOTS", "localhost")

    with pytest.raises(ValidationError, match="hots"):
        Settings()


def test_settings_are_immutable() -> None:
    settings = Settings(database=QUICKSTART_DATABASE)

    with pytest.raises(ValidationError, match="frozen"):
        settings.database.host = "elsewhere"  # type: ignore[misc]


def test_password_is_kept_out_of_repr() -> None:
    settings = Settings(database={**QUICKSTART_DATABASE, "password": "hunter2"})
    from_dsn = DatabaseSettings(dsn="postgresql://alice:hunter2@h/ledger")

    assert from_dsn.password == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in repr(from_dsn)
    assert "hunter2" not in str(from_dsn)


def test_dsn_sslmode_reaches_the_driver_and_unknown_parameters_are_refused() -> None:
    settings = DatabaseSettings(dsn="postgresql://u@h/db?sslmode=require")
    assert settings.connect_kwargs()["ssl"] == "require"
    with pytest.raises(ValidationError, match=r"unsupported dsn parameter\(s\) \['options'\]"):
        DatabaseSettings(dsn="postgresql://u@h/db?options=-csearch_path%3Dx")


def test_a_bad_dsn_error_does_not_echo_the_password() -> None:
    with pytest.raises(ValidationError) as raised:
        DatabaseSettings(dsn="mysql://u:s3cret@h/db")
    assert "s3cret" not in str(raised.value)
