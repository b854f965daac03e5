"""Settings: what to connect to and how workers behave.

Settings come from keyword arguments (as in the Quickstart), from environment variables
(``PGOUTBOX_DATABASE__HOST``, ``PGOUTBOX_WORKFLOW_SYSTEM__N_WORKERS``, ...) or from a ``dsn``.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

# Lower-case letters, digits and underscores, starting with a letter or underscore: such a name
# means the same thing quoted or unquoted, so a user's psql session finds what pgoutbox created.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently truncated


def validate_identifier(value: str, what: str) -> str:
    """Return ``value`` if it is a safe PostgreSQL identifier, else raise ``ValueError``.

    Used for schema and channel names, which end up in DDL and in ``LISTEN``.
    """
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use lower-case letters, digits and underscores, "
            "starting with a letter or underscore (for example 'pgoutbox')"
        )
    if len(value.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"invalid {what} {value!r}: {len(value.encode())} bytes is longer than PostgreSQL's "
            f"limit of {_MAX_IDENTIFIER_BYTES}; choose a shorter name"
        )
    if value.startswith("pg_"):
        raise ValueError(f"invalid {what} {value!r}: names starting with 'pg_' are reserved")
    return value


class DatabaseSettings(BaseModel):
    """Where pgoutbox's tables live and how to reach them.

    Either the separate fields (``host``, ``port``, ...) or a ``dsn`` such as
    ``postgresql://user:password@host:5432/db`` (``?host=/socket/dir`` for a Unix socket). A dsn
    fills the fields it names; fields given alongside it take precedence.
    """

    # hide_input_in_errors: a validation error must not print the dsn or password it was given.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, hide_input_in_errors=True
    )

    host: str = "localhost"
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = "postgres"
    # Kept out of repr (tracebacks, logs, pytest failure output): both may hold the password.
    password: str = Field(default="", repr=False)
    database: str = "postgres"
    application_name: str = "pgoutbox"
    # ``schema`` would shadow a (deprecated) BaseModel method, so the field is ``schema_name``
    # and ``schema`` is accepted as its name in input, exactly as the Quickstart passes it.
    schema_name: str = Field(
        default="pgoutbox", validation_alias=AliasChoices("schema", "schema_name")
    )
    dsn: str | None = Field(default=None, repr=False)
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        None
    )
    pool_size: int = Field(default=10, ge=1, description="connections per engine/pool")
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1, description="largest JSON payload accepted"
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_dsn(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("dsn"):
            return data
        return {**parse_dsn(str(data["dsn"])), **data}

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        return validate_identifier(value, "schema name")

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect`` / ``asyncpg.create_pool``."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password or None,
            "database": self.database,
            "server_settings": {"application_name": self.application_name},
            **({"ssl": self.sslmode} if self.sslmode else {}),
        }


def parse_dsn(dsn: str) -> dict[str, Any]:
    """Split a ``postgresql://`` URL into :class:`DatabaseSettings` fields."""
    parts = urlsplit(dsn)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        # The dsn itself is not echoed: it may hold a password.
        raise ValueError(f"invalid dsn scheme {parts.scheme!r}: expected a postgresql:// URL")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    fields: dict[str, Any] = {}
    if parts.hostname or "host" in query:
        fields["host"] = query.get("host") or unquote(parts.hostname or "")
    port = query.get("port") or parts.port
    if port:
        fields["port"] = int(port)
    if parts.username:
        fields["user"] = unquote(parts.username)
    if parts.password:
        fields["password"] = unquote(parts.password)
    if parts.path.strip("/"):
        fields["database"] = unquote(parts.path.strip("/"))
    unsupported = sorted(set(query) - {"host", "port", "application_name", "sslmode"})
    if unsupported:
        raise ValueError(
            f"unsupported dsn parameter(s) {unsupported}: pgoutbox understands host, port, "
            "application_name and sslmode; set other options in DatabaseSettings fields"
        )
    for key in ("application_name", "sslmode"):
        if key in query:
            fields[key] = query[key]
    return fields


class WorkflowSystemSettings(BaseModel):
    """How a :class:`~pgoutbox.WorkflowSystem` claims and runs operations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = "pgoutbox"
    n_workers: int = Field(default=10, ge=1, description="handlers running at once")
    batch_size: int = Field(
        default=10, ge=1, le=10_000, description="operations claimed per statement"
    )
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float | None = Field(default=None, gt=0, description="default: lease / 3")
    rescue_interval_seconds: float | None = Field(
        default=None, gt=0, description="default: lease / 3"
    )
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    shutdown_timeout_seconds: float = Field(default=30.0, ge=0)
    listen: bool = True
    auto_migrate: bool = True
    error_max_chars: int = Field(
        default=8000, ge=200, description="traceback kept per failed attempt"
    )
    handler_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=24 * 3600,
        description="cancel a handler running longer (an attempt that fails and is retried); "
        "None: no limit. A handler's own timeout= takes precedence",
    )
    max_snoozes: int = Field(
        default=100,
        ge=0,
        description="snoozes an operation may take before a snooze counts as a failed attempt; "
        "a handler's own max_snoozes= takes precedence",
    )
    audit_checkpoint_minutes: float | None = Field(
        default=None,
        gt=0,
        description="take a signed audit checkpoint every N minutes into audit_checkpoint_dir, "
        "signed with the key in PGOUTBOX_AUDIT_KEY (docs/audit.md); None: never",
    )
    audit_checkpoint_dir: str | None = Field(
        default=None, description="where the checkpoint service writes (with its heads files)"
    )
    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="purge finished operations whose last transition is older (succeeded and "
        "cancelled ones; dead ones too with retention_include_dead), as `pgoutbox ops purge` "
        "does, recorded in purges; their audit rows stay. None: never",
    )
    retention_include_dead: bool = False
    retention_interval_minutes: float = Field(
        default=60, gt=0, description="how often the retention purge runs"
    )

    @field_validator("channel")
    @classmethod
    def _check_channel(cls, value: str) -> str:
        return validate_identifier(value, "channel name")

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Self:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds={self.heartbeat_seconds} must be shorter than "
                f"lease_seconds={self.lease_seconds}, or leases expire between heartbeats"
            )
        return self

    @model_validator(mode="after")
    def _check_audit_checkpoints(self) -> Self:
        if self.audit_checkpoint_minutes is not None and not self.audit_checkpoint_dir:
            raise ValueError(
                "audit_checkpoint_minutes needs audit_checkpoint_dir: the directory the signed "
                "checkpoints are written to"
            )
        return self

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease extensions of in-flight operations."""
        return self.heartbeat_seconds or self.lease_seconds / 3

    @property
    def rescue_interval(self) -> float:
        """Seconds between sweeps for expired leases."""
        return self.rescue_interval_seconds or self.lease_seconds / 3


class Settings(BaseSettings):
    """All pgoutbox settings.

    Usage::

        settings = Settings(database={"host": "localhost", "schema": "pgoutbox"},
                            workflow_system={"channel": "workflow", "n_workers": 5})

    Missing values are read from ``PGOUTBOX_DATABASE__HOST``, ``PGOUTBOX_DATABASE__DSN``,
    ``PGOUTBOX_WORKFLOW_SYSTEM__CHANNEL`` and so on.
    """

    model_config = SettingsConfigDict(
        env_prefix="PGOUTBOX_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    database: DatabaseSettings = DatabaseSettings()  # frozen, so sharing is safe
    workflow_system: WorkflowSystemSettings = WorkflowSystemSettings()
