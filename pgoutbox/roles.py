"""Least-privilege database roles: what publishing, running workers and auditing need, no more.

Usage::

    await grant_roles(settings.database, publisher="app", worker="pgoutbox_worker",
                      auditor="compliance")

or ``pgoutbox db grant --publisher app --worker pgoutbox_worker --auditor compliance``. Run it
as the schema's owner (the role that ran the migrations), after every upgrade (it is
idempotent). The roles must exist. None of them gets any write privilege on ``audit_log``: the
audit triggers append to it with the owner's rights (revision ``0004_least_privilege``), so no
role granted here can forge, edit or delete an audit row.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from pgoutbox.migrations import VERSION_TABLE, quote_schema
from pgoutbox.settings import DatabaseSettings


class RoleError(ValueError):
    """A role name that cannot be granted to (empty, NUL, too long, or no such role)."""


@dataclass(frozen=True)
class Grants:
    """The statements run for each role kind."""

    publisher: tuple[str, ...]
    worker: tuple[str, ...]
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

    - publisher: insert operations (SELECT too: ``RETURNING id``, ``ON CONFLICT`` on the
      idempotency key, and the check that a repeated key records the same intent);
    - worker: claim, heartbeat, record and rescue operations, register itself in ``workers``,
      read the schema revision and the registered lifecycles at start-up (and Alembic's version
      table, for ``auto_migrate`` at head); it never writes the lifecycle tables (the owner
      registers lifecycles: ``pgoutbox lifecycle register``);
    - auditor: read everything, write nothing.
    """
    s = quote_schema(schema)
    usage = f"GRANT USAGE ON SCHEMA {s} TO {{role}}"
    worker = [
        usage,
        f"GRANT SELECT, UPDATE ON {s}.operations TO {{role}}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.workers TO {{role}}",
        f"GRANT SELECT ON {s}.lifecycle_transitions, {s}.lifecycles, {s}.lifecycle_types, "
        f"{s}.schema_revision TO {{role}}",
    ]
    if with_version_table:
        worker.append(f"GRANT SELECT ON {s}.{VERSION_TABLE} TO {{role}}")
    return Grants(
        publisher=(usage, f"GRANT SELECT, INSERT ON {s}.operations TO {{role}}"),
        worker=tuple(worker),
        auditor=(usage, f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {{role}}"),
    )


async def grant_roles(
    settings: DatabaseSettings,
    *,
    publisher: str | None = None,
    worker: str | None = None,
    auditor: str | None = None,
) -> list[str]:
    """Grant each given role what its kind needs on the configured schema, in one transaction.

    Returns the statements run. Raises :class:`RoleError` (nothing granted) when a role name is
    invalid or no such role exists.
    """
    given = {"publisher": publisher, "worker": worker, "auditor": auditor}
    wanted = {kind: role for kind, role in given.items() if role is not None}
    quoted = {kind: quote_role(role) for kind, role in wanted.items()}
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
        has_version_table = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL",
            f"{quote_schema(settings.schema_name)}.{VERSION_TABLE}",
        )
        grants = grant_statements(settings.schema_name, with_version_table=has_version_table)
        done: list[str] = []
        async with conn.transaction():
            for kind, role in quoted.items():
                for statement in getattr(grants, kind):
                    sql = statement.replace("{role}", role)
                    await conn.execute(sql)
                    done.append(sql)
        return done
    finally:
        await conn.close()
