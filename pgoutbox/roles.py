"""Least-privilege database roles: what publishing, running workers, operating and auditing
need, no more.

Usage::

    await grant_roles(settings.database, publisher="app", worker="pgoutbox_worker",
                      operator="ops", auditor="compliance")

or ``pgoutbox db grant --publisher app --worker pgoutbox_worker --operator ops --auditor
compliance``. Run it as the schema's owner (the role that ran the migrations), after every
upgrade (it is idempotent). The roles must exist. Each role's kinds are recorded in
``role_grants``, which the audit trigger reads: since revision 0010 the database refuses a
worker transition by a role without the worker kind and an operator transition by a role
without the operator kind. None of them gets any write privilege on ``audit_log``.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from pgoutbox.migrations import VERSION_TABLE, quote_schema
from pgoutbox.schema import build_metadata
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

KINDS = ("publisher", "worker", "operator", "auditor")

# What each kind may write in `operations`, column by column (column privileges: anything else
# is refused by the database before any trigger runs). The triggers check the values.
WORKER_UPDATES = (
    "state", "transition", "transition_actor", "transition_detail", "attempts", "step_attempts",
    "max_attempts", "version", "lease_owner", "lease_expires_at", "run_at", "last_error",
    "snoozes",
)  # fmt: skip
OPERATOR_UPDATES = (
    "state", "transition", "transition_actor", "transition_detail", "step_attempts",
    "max_attempts", "version", "run_at",
    # a request to cancel a running attempt (its trigger stamps time, role and version)
    "cancel_requested_by", "cancel_request_reason",
)  # fmt: skip


class RoleError(ValueError):
    """A role name that cannot be granted to (empty, NUL, too long, or no such role)."""


@dataclass(frozen=True)
class Grants:
    """The statements run for each role kind."""

    publisher: tuple[str, ...]
    worker: tuple[str, ...]
    operator: tuple[str, ...]
    auditor: tuple[str, ...]


def quote_role(role: str) -> str:
    """``role`` as a quoted SQL identifier (any name PostgreSQL accepts, quoted safely)."""
    if not isinstance(role, str) or not role or "\x00" in role or len(role.encode()) > 63:
        raise RoleError(
            f"invalid role name {role!r}: a non-empty name of at most 63 bytes without NUL"
        )
    return '"' + role.replace('"', '""') + '"'


def grant_statements(schema: str, *, with_version_table: bool = True) -> Grants:
    """The GRANT statements for ``schema``, with ``{role}`` left for the quoted role name.

    - publisher: insert operations, every column but ``id`` (the insert trigger refuses, by
      name, a column not at its default); SELECT too (``RETURNING id``, ``ON CONFLICT`` on the
      idempotency key, the same-intent check of a repeated key);
    - worker: claim, heartbeat, record, release, reject and rescue operations (the columns
      those change), register itself in ``workers``, declare its router's limits and move
      the rate buckets (flow control), read the schema revision and the
      registered lifecycles at start-up (and Alembic's version table, for ``auto_migrate`` at
      head); it never writes the lifecycle tables;
    - operator: read everything; retry, cancel, replay and fire (the columns those change);
      purge finished operations; pause and resume, and override limits;
    - auditor: read everything, write nothing.
    """
    s = quote_schema(schema)
    usage = f"GRANT USAGE ON SCHEMA {s} TO {{role}}"
    read_all = f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {{role}}"
    ops = f"{s}.operations"
    inserts = [c.name for c in build_metadata(schema).tables[f"{schema}.operations"].columns]
    inserts.remove("id")  # ids are the database's: an explicit one is refused
    worker = [
        usage,
        f"GRANT SELECT, UPDATE ({', '.join(WORKER_UPDATES)}) ON {ops} TO {{role}}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.workers TO {{role}}",
        f"GRANT SELECT ON {s}.lifecycle_transitions, {s}.lifecycles, {s}.lifecycle_types, "
        f"{s}.schema_revision TO {{role}}",
        # Flow control: declare the router's limits, read overrides and pauses, move the rate
        # buckets. Overrides and pauses are the operator's.
        f"GRANT SELECT, INSERT, UPDATE ON {s}.flow_limits TO {{role}}",
        f"GRANT SELECT ON {s}.flow_overrides, {s}.flow_pauses TO {{role}}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.flow_buckets TO {{role}}",
        # The audit log's monthly partitions, made ahead by each worker (revision 0014).
        f"GRANT EXECUTE ON FUNCTION {s}.audit_log_add_partitions(integer) TO {{role}}",
    ]
    if with_version_table:
        worker.append(f"GRANT SELECT ON {s}.{VERSION_TABLE} TO {{role}}")
    return Grants(
        publisher=(usage, f"GRANT SELECT, INSERT ({', '.join(inserts)}) ON {ops} TO {{role}}"),
        worker=tuple(worker),
        operator=(
            usage,
            read_all,
            f"GRANT UPDATE ({', '.join(OPERATOR_UPDATES)}), DELETE ON {ops} TO {{role}}",
            f"GRANT INSERT, UPDATE ON {s}.purges TO {{role}}",
            f"GRANT INSERT ON {s}.flow_overrides TO {{role}}",
            f"GRANT INSERT, UPDATE (resumed_by, resume_reason) ON {s}.flow_pauses TO {{role}}",
        ),
        auditor=(usage, read_all),
    )


async def grant_roles(
    settings: DatabaseSettings,
    *,
    publisher: str | None = None,
    worker: str | None = None,
    operator: str | None = None,
    auditor: str | None = None,
) -> list[str]:
    """Grant each given role what its kind needs on the configured schema, in one transaction.

    A role's privileges on the schema's tables are first revoked, then granted again for every
    kind it holds (this call's and earlier ones'), so that running it after an upgrade replaces
    an older revision's broader grants. Returns the statements run. Raises :class:`RoleError`
    (nothing granted) when a role name is invalid or no such role exists.
    """
    given = {"publisher": publisher, "worker": worker, "operator": operator, "auditor": auditor}
    wanted = {kind: role for kind, role in given.items() if role is not None}
    for role in wanted.values():
        quote_role(role)
    conn = await asyncpg.connect(**settings.connect_kwargs())
    try:
        known = {
            row["rolname"]
            for row in await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])",
                list(wanted.values()),
            )
        }
        missing = sorted(set(wanted.values()) - known)
        if missing:
            raise RoleError(f"no such role(s): {', '.join(map(repr, missing))}; create them first")
        s = quote_schema(settings.schema_name)
        has_version_table = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"{s}.{VERSION_TABLE}"
        )
        grants = grant_statements(settings.schema_name, with_version_table=has_version_table)
        q = queries(settings.schema_name)
        done: list[str] = []
        async with conn.transaction():
            for kind, role in wanted.items():
                await q["role_grants_add"].execute(conn, role=role, kind=kind)
            for role in sorted(set(wanted.values())):
                kinds = await q["role_grants_kinds"].fetch(conn, role=role)
                statements = [f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {{role}}"]
                for row in kinds:
                    statements += [g for g in getattr(grants, row["kind"]) if g not in statements]
                for statement in statements:
                    sql = statement.replace("{role}", quote_role(role))
                    await conn.execute(sql)
                    done.append(sql)
        return done
    finally:
        await conn.close()
