"""SQLAlchemy Core tables: the single description of pgoutbox's schema.

The tables are what the migrations create (``tests/migrations`` checks the two agree). They are
public: query them for compliance reports. Triggers and functions are not described here; they
live in the migrations. Usage::

    from sqlalchemy import select
    from pgoutbox.schema import build_metadata

    tables = build_metadata("pgoutbox").tables
    operations = tables["pgoutbox.operations"]
    stmt = select(operations.c.id, operations.c.state).where(operations.c.state == "dead")

``<schema>.operations`` -- one row per operation (the persisted intent):
    ``id`` (identity), ``operation_type``, ``channel``, ``lifecycle``, ``payload`` (jsonb),
    ``state``, ``attempts``, ``max_attempts``, ``priority``, ``run_at`` (DB clock),
    ``idempotency_key`` (unique where not null), ``created_at``, ``created_by``, ``updated_at``,
    ``last_error``, ``lease_owner``, ``lease_expires_at``, ``version`` (fencing token),
    ``audit_seq`` / ``audit_hash`` (head of the operation's audit chain). ``transition``,
    ``transition_actor`` and ``transition_detail`` are write-only: set in the UPDATE that changes
    state, consumed by the audit trigger, NULL at rest. ``trace_context`` (jsonb) is the W3C
    trace context the operation was published in (NULL outside a span, or without
    ``pgoutbox[otel]``); see docs/observability.md. ``ordering_key`` (operations sharing one
    run one at a time, in publish order) and ``step_attempts`` (attempts of the current step of
    a multi-step lifecycle; ``attempts`` counts them all) arrived with custom lifecycles.
    ``audit_from_state``, ``audit_trigger``, ``audit_actor``, ``audit_detail`` and
    ``audit_prev_hash`` stage the audit row of the transition an UPDATE makes, for the statement
    trigger that appends it; NULL after an UPDATE that makes none.

``<schema>.audit_log`` -- append-only, one row per state change including creation:
    ``operation_id``, ``seq`` (1, 2, 3... per operation; the primary key with ``operation_id``),
    ``operation_type``, ``from_state`` (NULL on creation), ``to_state``, ``trigger``, ``attempt``,
    ``actor``, ``detail``, ``recorded_at`` (DB clock), ``prev_hash``, ``hash``, ``db_role``,
    ``intent_hash`` (seq 1: the recorded intent's sha256). Partitioned by month of
    ``recorded_at`` in UTC (``audit_log_y2026m12``, and ``audit_log_default``).

``<schema>.lifecycle_transitions`` -- the allowed state changes per lifecycle:
    ``lifecycle``, ``from_state``, ``trigger``, ``to_state``.

``<schema>.lifecycles`` -- every registered version of every custom lifecycle: ``name``,
    ``version``, ``digest``, ``definition`` (jsonb), ``registered_at``, ``registered_by``.

``<schema>.lifecycle_types`` -- which lifecycle each operation type runs: ``operation_type``,
    ``lifecycle`` (types not listed run ``default``).

``<schema>.schema_revision`` -- one row: the pgoutbox revision this schema is at (kept by the
    migrations, whether run standalone or inside a host project's Alembic history).

``<schema>.workers`` -- running workers: ``id``, ``hostname``, ``pid``, ``channel``,
    ``operation_types``, ``started_at``, ``heartbeat_at``.

``<schema>.purges`` -- one row per retention purge (``pgoutbox ops purge``; ``chained``: its
    deletions are recorded in each operation's chain, from revision 0014): ``id``, ``actor``,
    ``finished_before``, ``include_dead``, ``batch_size``, ``deleted`` (operations deleted so
    far), ``started_at``, ``finished_at`` (NULL while running or if interrupted).

``<schema>.audit_checkpoints`` -- a copy of each signed audit checkpoint (``pgoutbox audit
    checkpoint``), for convenience only: ``taken_at``, ``size``, ``covered_rows``, ``root``,
    ``key_id``, ``document``, ``recorded_by``, ``recorded_at``.

``<schema>.audit_archives``, ``audit_archive_heads`` -- each ``pgoutbox audit archive``
    (``before``, ``partitions``, ``rows``, ``operations``, a copy of the signed ``checkpoint``),
    and per archived operation its last archived row (``seq``, ``hash``, ``to_state``,
    ``trigger``, ``attempt``, ``recorded_at``) with what its publication recorded
    (``operation_type``, ``created_by``, ``created_at``, ``intent_hash``).

``<schema>.flow_limits``, ``flow_overrides``, ``flow_pauses``, ``flow_buckets`` -- flow control
    (docs/flow-control.md): the limits routers declare, operators' overrides of them (newest per
    limit in force; kept for ever), pauses (open while ``resumed_at`` is NULL; a resume closes
    the row), and each rate limit's per-partition state.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB, TIMESTAMP

from pgoutbox.settings import validate_identifier

DEFAULT_SCHEMA: Final = "pgoutbox"

# Server defaults are written as the migration writes them; Alembic compares them with the
# database's by evaluating both, so the spelling need not match PostgreSQL's.
_NOW = text("now()")
_ZERO = text("0")


def _timestamptz() -> TIMESTAMP:
    return TIMESTAMP(timezone=True)


def build_metadata(schema: str = DEFAULT_SCHEMA) -> MetaData:
    """pgoutbox's tables in ``schema`` (a validated identifier), keyed ``"<schema>.<table>"``."""
    metadata = MetaData(schema=validate_identifier(schema, "schema name"))

    Table(
        "schema_revision",
        metadata,
        Column("revision", Text, nullable=False),
        Column("singleton", Boolean, nullable=False, server_default=text("true")),
        PrimaryKeyConstraint("singleton", name="schema_revision_pkey"),
        CheckConstraint("singleton", name="schema_revision_singleton_check"),
    )

    Table(
        "lifecycle_transitions",
        metadata,
        Column("lifecycle", Text, nullable=False),
        Column("from_state", Text, nullable=False),
        Column("trigger", Text, nullable=False),
        Column("to_state", Text, nullable=False),
        PrimaryKeyConstraint(
            "lifecycle", "from_state", "trigger", "to_state", name="lifecycle_transitions_pkey"
        ),
        comment="Allowed state changes per lifecycle; the audit trigger refuses any other.",
    )

    operations = Table(
        "operations",
        metadata,
        Column("id", BigInteger, Identity(always=True), nullable=False),
        Column("operation_type", Text, nullable=False),
        Column("channel", Text, nullable=False),
        Column("lifecycle", Text, nullable=False, server_default=text("'default'")),
        Column("payload", JSONB, nullable=False),
        Column("state", Text, nullable=False, server_default=text("'pending'")),
        Column("attempts", Integer, nullable=False, server_default=_ZERO),
        Column("max_attempts", Integer, nullable=True),
        Column("priority", Integer, nullable=False, server_default=_ZERO),
        Column("run_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("idempotency_key", Text, nullable=True),
        Column("created_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("created_by", Text, nullable=False, server_default=text("CURRENT_USER")),
        Column("updated_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("last_error", Text, nullable=True),
        Column("lease_owner", Text, nullable=True),
        Column("lease_expires_at", _timestamptz(), nullable=True),
        Column(
            "version",
            BigInteger,
            nullable=False,
            server_default=_ZERO,
            comment="Fencing token: bumped by every transition; a worker records only against "
            "the version it claimed.",
        ),
        Column(
            "audit_seq",
            Integer,
            nullable=False,
            server_default=_ZERO,
            comment="seq of the newest audit_log row of this operation.",
        ),
        Column(
            "audit_hash",
            BYTEA,
            nullable=True,
            comment="hash of the newest audit_log row: anchors the chain.",
        ),
        Column(
            "transition",
            Text,
            nullable=True,
            comment="Write-only: the trigger name of the state change in this UPDATE; consumed "
            "by the audit trigger and always NULL at rest.",
        ),
        Column("transition_actor", Text, nullable=True),
        Column("transition_detail", Text, nullable=True),
        Column(
            "trace_context",
            JSONB,
            nullable=True,
            comment="W3C trace context of the publisher (traceparent, ...); each attempt's span "
            "continues it.",
        ),
        Column(
            "ordering_key",
            Text,
            nullable=True,
            comment="Operations sharing a key run one at a time in publish order; an unfinished "
            "one (dead included) holds back the rest.",
        ),
        Column(
            "step_attempts",
            Integer,
            nullable=False,
            server_default=_ZERO,
            comment="Attempts of the current step; max_attempts applies to it. attempts counts "
            "them all.",
        ),
        Column("audit_from_state", Text, nullable=True),
        Column(
            "audit_trigger",
            Text,
            nullable=True,
            comment="Staged audit entry (with audit_from_state, audit_actor, audit_detail, "
            "audit_prev_hash): set by the audit trigger when an UPDATE makes a transition, "
            "appended to audit_log at the end of that statement, cleared by the next UPDATE "
            "that makes none.",
        ),
        Column("audit_actor", Text, nullable=True),
        Column("audit_detail", Text, nullable=True),
        Column("audit_prev_hash", BYTEA, nullable=True),
        Column(
            "lease_key_hash",
            BYTEA,
            nullable=True,
            comment="sha256 of the key (setting pgoutbox.worker_key) of the session that claimed "
            "the lease: only a session holding it records, releases or extends the lease.",
        ),
        Column("audit_db_role", Text, nullable=True),
        Column("audit_kind", Text, nullable=True),
        Column(
            "snoozes",
            Integer,
            nullable=False,
            server_default=_ZERO,
            comment="Times a handler snoozed the operation (Snooze / Retry-After): each gave its "
            "step the attempt back.",
        ),
        Column("cancel_requested_at", _timestamptz(), nullable=True),
        Column(
            "cancel_requested_by",
            Text,
            nullable=True,
            comment="The operator who asked that the running attempt be cancelled (with "
            "cancel_requested_at, cancel_request_reason, cancel_requested_role and "
            "cancel_request_version, the version of the attempt it is for).",
        ),
        Column("cancel_request_reason", Text, nullable=True),
        Column("cancel_requested_role", Text, nullable=True),
        Column("cancel_request_version", BigInteger, nullable=True),
        PrimaryKeyConstraint("id", name="operations_pkey"),
        CheckConstraint("max_attempts >= 1", name="operations_max_attempts_check"),
    )
    # Unique among operations that have a key; keyless ones take no entry.
    Index(
        "operations_idempotency_key",
        operations.c.idempotency_key,
        unique=True,
        postgresql_where=operations.c.idempotency_key.isnot(None),
    )
    # Claiming scans only claimable rows in claim order.
    Index(
        "operations_claimable",
        operations.c.channel,
        operations.c.priority.desc(),
        operations.c.run_at,
        operations.c.id,
        postgresql_where=operations.c.state.in_(["pending", "failed"]),
    )
    # The rescuer looks for expired leases among running steps only.
    Index(
        "operations_leased",
        operations.c.lease_expires_at,
        postgresql_where=operations.c.lease_owner.isnot(None),
    )
    # Operations resting in a custom lifecycle's own states (between steps, or parked).
    Index(
        "operations_resting",
        operations.c.channel,
        operations.c.priority.desc(),
        operations.c.run_at,
        operations.c.id,
        postgresql_where=text(
            "lease_owner IS NULL AND state NOT IN "
            "('pending', 'claimed', 'failed', 'succeeded', 'dead', 'cancelled')"
        ),
    )
    # The unfinished operations of each ordering key, oldest first.
    Index(
        "operations_ordering",
        operations.c.ordering_key,
        operations.c.id,
        postgresql_where=text(
            "ordering_key IS NOT NULL AND state NOT IN ('succeeded', 'cancelled')"
        ),
    )

    audit_log = Table(
        "audit_log",
        metadata,
        Column("operation_id", BigInteger, nullable=False),
        Column("seq", Integer, nullable=False),
        Column("operation_type", Text, nullable=False),
        Column("from_state", Text, nullable=True),
        Column("to_state", Text, nullable=False),
        Column("trigger", Text, nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("actor", Text, nullable=False),
        Column("detail", Text, nullable=True),
        Column("recorded_at", _timestamptz(), nullable=False),
        Column("prev_hash", BYTEA, nullable=True),
        Column("hash", BYTEA, nullable=False),
        Column(
            "db_role",
            Text,
            nullable=True,
            comment="The database role that made the change (authenticated; part of the hash). "
            "NULL only on rows written before revision 0010.",
        ),
        Column(
            "intent_hash",
            BYTEA,
            nullable=True,
            comment="seq 1 (from revision 0013): sha256 of the operation's recorded intent; "
            "covered by the row's hash.",
        ),
        # The partition key is part of every key of a partitioned table; the triggers write one
        # row per (operation_id, seq), holding the operation's row lock.
        PrimaryKeyConstraint("operation_id", "seq", "recorded_at", name="audit_log_pkey"),
        comment="Append-only: one row per state change, written by trigger, sha256-chained per "
        "operation; partitioned by month of recorded_at (UTC).",
        postgresql_partition_by="RANGE (recorded_at)",
    )
    Index("audit_log_recorded_at", audit_log.c.recorded_at)

    Table(
        "workers",
        metadata,
        Column("id", Text, nullable=False),
        Column("hostname", Text, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("channel", Text, nullable=False),
        Column("operation_types", ARRAY(Text), nullable=False),
        Column("started_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("heartbeat_at", _timestamptz(), nullable=False, server_default=_NOW),
        PrimaryKeyConstraint("id", name="workers_pkey"),
    )

    Table(
        "lifecycles",
        metadata,
        Column("name", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("digest", Text, nullable=False),
        Column("definition", JSONB, nullable=False),
        Column("registered_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("registered_by", Text, nullable=False, server_default=text("CURRENT_USER")),
        PrimaryKeyConstraint("name", "version", name="lifecycles_pkey"),
        CheckConstraint("version >= 1", name="lifecycles_version_check"),
        comment="Every registered version of every custom lifecycle; the newest is in "
        "lifecycle_transitions.",
    )

    Table(
        "lifecycle_types",
        metadata,
        Column("operation_type", Text, nullable=False),
        Column("lifecycle", Text, nullable=False),
        PrimaryKeyConstraint("operation_type", name="lifecycle_types_pkey"),
        comment="The lifecycle each operation type runs; types not listed run the default "
        "lifecycle.",
    )

    Table(
        "role_grants",
        metadata,
        Column("role", Text, nullable=False),
        Column("kind", Text, nullable=False),
        Column("granted_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("granted_by", Text, nullable=False, server_default=text("CURRENT_USER")),
        PrimaryKeyConstraint("role", "kind", name="role_grants_pkey"),
        CheckConstraint(
            "kind IN ('publisher', 'worker', 'operator', 'auditor')", name="role_grants_kind_check"
        ),
        comment="Which database roles act as which kind (pgoutbox db grant); the audit trigger "
        "checks worker and operator transitions against it.",
    )

    Table(
        "purges",
        metadata,
        Column("id", BigInteger, Identity(always=True), nullable=False),
        Column("actor", Text, nullable=False),
        Column("finished_before", _timestamptz(), nullable=False),
        Column("include_dead", Boolean, nullable=False),
        Column("batch_size", Integer, nullable=False),
        Column("deleted", BigInteger, nullable=False, server_default=_ZERO),
        Column("started_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("finished_at", _timestamptz(), nullable=True),
        Column(
            "chained",
            Boolean,
            nullable=False,
            server_default=text("true"),
            comment="Whether each operation this purge deleted got a purge row in its audit "
            "chain (from revision 0014).",
        ),
        PrimaryKeyConstraint("id", name="purges_pkey"),
        CheckConstraint("batch_size >= 1", name="purges_batch_size_check"),
        comment="Retention purges of finished operations; their audit rows are kept.",
    )
    Table(
        "flow_limits",
        metadata,
        Column("name", Text, nullable=False),
        Column("operation_types", ARRAY(Text), nullable=False),
        Column("partition_by", Text, nullable=True),
        Column("concurrency", Integer, nullable=True),
        Column("rate_count", Integer, nullable=True),
        Column("rate_period_seconds", Double, nullable=True),
        Column("burst", Integer, nullable=False, server_default=text("1")),
        Column("declared_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("declared_by", Text, nullable=False, server_default=text("CURRENT_USER")),
        PrimaryKeyConstraint("name", name="flow_limits_pkey"),
        CheckConstraint("concurrency >= 1", name="flow_limits_concurrency_check"),
        CheckConstraint("rate_count >= 1", name="flow_limits_rate_count_check"),
        CheckConstraint("rate_period_seconds > 0", name="flow_limits_rate_period_seconds_check"),
        CheckConstraint("burst >= 1", name="flow_limits_burst_check"),
        CheckConstraint(
            "concurrency IS NOT NULL OR rate_count IS NOT NULL", name="flow_limits_check"
        ),
        CheckConstraint(
            "(rate_count IS NULL) = (rate_period_seconds IS NULL)", name="flow_limits_check1"
        ),
        comment="Concurrency and rate limits as the workers' routers declare them (upserted at "
        "start).",
    )

    flow_overrides = Table(
        "flow_overrides",
        metadata,
        Column("id", BigInteger, Identity(always=True), nullable=False),
        Column("limit_name", Text, nullable=False),
        Column("concurrency", Integer, nullable=True),
        Column("rate_count", Integer, nullable=True),
        Column("rate_period_seconds", Double, nullable=True),
        Column("burst", Integer, nullable=True),
        Column("actor", Text, nullable=False),
        Column("reason", Text, nullable=False),
        Column("db_role", Text, nullable=False, server_default=text("CURRENT_USER")),
        Column("set_at", _timestamptz(), nullable=False, server_default=_NOW),
        PrimaryKeyConstraint("id", name="flow_overrides_pkey"),
        CheckConstraint("concurrency >= 1", name="flow_overrides_concurrency_check"),
        CheckConstraint("rate_count >= 1", name="flow_overrides_rate_count_check"),
        CheckConstraint("rate_period_seconds > 0", name="flow_overrides_rate_period_seconds_check"),
        CheckConstraint("burst >= 1", name="flow_overrides_burst_check"),
        CheckConstraint(
            "(rate_count IS NULL) = (rate_period_seconds IS NULL)", name="flow_overrides_check"
        ),
        comment="Operators' run-time overrides of declared limits; the newest per limit is in "
        "force (all NULL: back to the declaration).",
    )
    Index("flow_overrides_latest", flow_overrides.c.limit_name, flow_overrides.c.id.desc())

    flow_pauses = Table(
        "flow_pauses",
        metadata,
        Column("id", BigInteger, Identity(always=True), nullable=False),
        Column("scope", Text, nullable=False),
        Column("target", Text, nullable=False),
        Column("partition", Text, nullable=True),
        Column("paused_by", Text, nullable=False),
        Column("pause_reason", Text, nullable=False),
        Column("paused_role", Text, nullable=False, server_default=text("CURRENT_USER")),
        Column("paused_at", _timestamptz(), nullable=False, server_default=_NOW),
        Column("resumed_by", Text, nullable=True),
        Column("resume_reason", Text, nullable=True),
        Column("resumed_role", Text, nullable=True),
        Column("resumed_at", _timestamptz(), nullable=True),
        PrimaryKeyConstraint("id", name="flow_pauses_pkey"),
        CheckConstraint("scope IN ('channel', 'type', 'limit')", name="flow_pauses_scope_check"),
        CheckConstraint("partition IS NULL OR scope = 'limit'", name="flow_pauses_check"),
        comment="Pauses of a channel, a type or a limit (or one of its partitions); open while "
        "resumed_at is NULL.",
    )
    # At most one open pause per target.
    Index(
        "flow_pauses_open",
        flow_pauses.c.scope,
        flow_pauses.c.target,
        text("coalesce(partition, '')"),
        unique=True,
        postgresql_where=flow_pauses.c.resumed_at.is_(None),
    )

    Table(
        "flow_buckets",
        metadata,
        Column("limit_name", Text, nullable=False),
        Column("partition", Text, nullable=False, server_default=text("''")),
        Column("tat", _timestamptz(), nullable=False),
        PrimaryKeyConstraint("limit_name", "partition", name="flow_buckets_pkey"),
        comment="Rate limits' state: when each partition's next start conforms (GCRA's "
        "theoretical arrival time).",
    )

    audit_checkpoints = Table(
        "audit_checkpoints",
        metadata,
        Column("id", BigInteger, Identity(always=True), nullable=False),
        Column("taken_at", _timestamptz(), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("covered_rows", BigInteger, nullable=False),
        Column("root", BYTEA, nullable=False),
        Column("key_id", Text, nullable=False),
        Column("document", JSONB, nullable=False),
        Column("recorded_by", Text, nullable=False, server_default=text("CURRENT_USER")),
        Column("recorded_at", _timestamptz(), nullable=False, server_default=_NOW),
        PrimaryKeyConstraint("id", name="audit_checkpoints_pkey"),
        CheckConstraint("size >= 0", name="audit_checkpoints_size_check"),
        CheckConstraint("covered_rows >= 0", name="audit_checkpoints_covered_rows_check"),
        comment="Copies of the signed audit checkpoints, for convenience: never the source of "
        "trust (the signed files are).",
    )
    Index("audit_checkpoints_taken_at", audit_checkpoints.c.taken_at)

    Table(
        "audit_archives",
        metadata,
        Column("id", BigInteger, Identity(always=True), nullable=False),
        Column("before", _timestamptz(), nullable=False),
        Column("partitions", ARRAY(Text), nullable=False),
        Column("rows", BigInteger, nullable=False),
        Column("operations", BigInteger, nullable=False),
        Column("checkpoint", JSONB, nullable=False),
        Column("archived_by", Text, nullable=False, server_default=text("CURRENT_USER")),
        Column(
            "archived_at", _timestamptz(), nullable=False, server_default=text("clock_timestamp()")
        ),
        PrimaryKeyConstraint("id", name="audit_archives_pkey"),
        CheckConstraint("rows >= 0", name="audit_archives_rows_check"),
        CheckConstraint("operations >= 0", name="audit_archives_operations_check"),
        comment="One row per `pgoutbox audit archive`: every audit row recorded before `before` "
        "was exported, verified and dropped.",
    )
    Table(
        "audit_archive_heads",
        metadata,
        Column("operation_id", BigInteger, nullable=False),
        Column("archive_id", BigInteger, nullable=False),
        Column("seq", Integer, nullable=False),
        Column("hash", BYTEA, nullable=False),
        Column("to_state", Text, nullable=False),
        Column("trigger", Text, nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("recorded_at", _timestamptz(), nullable=False),
        Column("operation_type", Text, nullable=False),
        Column("created_by", Text, nullable=False),
        Column("created_at", _timestamptz(), nullable=False),
        Column("intent_hash", BYTEA, nullable=True),
        PrimaryKeyConstraint("operation_id", "archive_id", name="audit_archive_heads_pkey"),
        ForeignKeyConstraint(
            ["archive_id"], ["audit_archives.id"], name="audit_archive_heads_archive_id_fkey"
        ),
        CheckConstraint("seq >= 1", name="audit_archive_heads_seq_check"),
        comment="Per archived operation: its last archived audit row, and what its publication "
        "recorded; where verification of the rows left starts.",
    )
    return metadata


metadata: Final = build_metadata(DEFAULT_SCHEMA)
