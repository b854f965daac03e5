"""Operation types' lifecycles, registered in the database.

The database enforces a custom lifecycle exactly as it enforces the default: its transitions
are rows of ``lifecycle_transitions``, and the insert trigger gives each new operation the
lifecycle ``lifecycle_types`` names for its type. Registering is idempotent (a lifecycle whose
digest is already the newest version changes nothing) and versioned (every change is a new row
of ``lifecycles``). A change that would strand operations is refused, naming them:

- a new version that drops states some of its operations sit in;
- moving a type to another lifecycle while it has unfinished operations under the old one
  (``dead`` counts as unfinished: it may be replayed).

``WorkflowSystem.start()`` registers its router's lifecycles when ``auto_migrate`` is on (the
role that migrates may also register) and otherwise only checks them, so a least-privilege
worker role never needs to write the lifecycle tables: ``pgoutbox lifecycle register APP``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from pgoutbox.lifecycle import DEFAULT_LIFECYCLE, DEFAULT_NAME, Lifecycle
from pgoutbox.router import HandlerSpec
from pgoutbox.sql import Query


class LifecycleRegistryError(RuntimeError):
    """The database's lifecycles do not match the router's and could not be made to."""


class LifecycleChangeRefused(LifecycleRegistryError):
    """Registering would strand operations; the message lists them. Nothing was changed."""


class LifecycleNotRegistered(LifecycleRegistryError):
    """A lifecycle the router declares is not (or not in this version) in the database."""


@dataclass(frozen=True)
class Registered:
    """What :func:`register` changed: new lifecycle versions and re-assigned types."""

    versions: dict[str, int]
    types: dict[str, str]


def lifecycles_of(handlers: Mapping[str, HandlerSpec]) -> dict[str, str]:
    """Operation type -> lifecycle name, for these handlers."""
    return {t: spec.lifecycle.name for t, spec in handlers.items()}


def _custom(handlers: Mapping[str, HandlerSpec]) -> dict[str, Lifecycle]:
    return {s.lifecycle.name: s.lifecycle for s in handlers.values() if s.lifecycle.custom}


async def mismatches(
    conn: asyncpg.Connection, q: Mapping[str, Query], handlers: Mapping[str, HandlerSpec]
) -> tuple[dict[str, Lifecycle], dict[str, str]]:
    """The lifecycles whose newest registered version differs from the handlers', and the
    types registered to another lifecycle than theirs (type -> wanted lifecycle)."""
    custom = _custom(handlers)
    latest = {
        row["name"]: row["digest"]
        for row in await q["lifecycles_latest"].fetch(conn, names=sorted(custom))
    }
    changed = {name: lc for name, lc in custom.items() if latest.get(name) != lc.digest}
    wanted = lifecycles_of(handlers)
    current = {
        row["operation_type"]: row["lifecycle"]
        for row in await q["lifecycle_types_get"].fetch(conn, operation_types=sorted(wanted))
    }
    moved = {t: name for t, name in wanted.items() if current.get(t, DEFAULT_NAME) != name}
    return changed, moved


async def check(
    conn: asyncpg.Connection, q: Mapping[str, Query], handlers: Mapping[str, HandlerSpec]
) -> None:
    """Raise :class:`LifecycleNotRegistered` unless the database has the handlers' lifecycles."""
    changed, moved = await mismatches(conn, q, handlers)
    if changed or moved:
        what = [f"lifecycle {name!r} (digest {lc.digest[:12]})" for name, lc in changed.items()]
        what += [f"type {t!r} -> lifecycle {name!r}" for t, name in sorted(moved.items())]
        raise LifecycleNotRegistered(
            f"the database does not have {', '.join(what)}; register them as the schema owner "
            "with `pgoutbox lifecycle register APP` (or start with workflow_system.auto_migrate)"
        )


async def register(
    conn: asyncpg.Connection,
    q: Mapping[str, Query],
    schema: str,
    handlers: Mapping[str, HandlerSpec],
) -> Registered:
    """Make the database's lifecycles the handlers', in one transaction; refuse (changing
    nothing) if that would strand operations. Writes nothing when they already match."""
    changed, moved = await mismatches(conn, q, handlers)
    if not changed and not moved:
        return Registered({}, {})
    async with conn.transaction():
        lock = q["lifecycles_lock"]
        await lock.execute(conn, schema=schema)
        changed, moved = await mismatches(conn, q, handlers)  # another worker may have done it
        versions: dict[str, int] = {}
        for name, lifecycle in sorted(changed.items()):
            versions[name] = await _register_version(conn, q, lifecycle)
        for operation_type, name in sorted(moved.items()):
            stranded = await q["operations_unfinished_in_other_lifecycle"].fetch(
                conn,
                operation_type=operation_type,
                lifecycle=name,
            )
            if stranded:
                listed = ", ".join(f"{r['id']} ({r['lifecycle']}: {r['state']})" for r in stranded)
                raise LifecycleChangeRefused(
                    f"operation type {operation_type!r} cannot move to lifecycle {name!r}: "
                    f"{stranded[0]['total']} of its operations are unfinished under another "
                    f"lifecycle: {listed}; let them finish, or cancel (or purge) them first"
                )
            query = "lifecycle_types_unset" if name == DEFAULT_NAME else "lifecycle_types_set"
            params = {"operation_type": operation_type}
            if name != DEFAULT_NAME:
                params["lifecycle"] = name
            await q[query].execute(conn, **params)
    return Registered(versions, moved)


async def _register_version(
    conn: asyncpg.Connection, q: Mapping[str, Query], lifecycle: Lifecycle
) -> int:
    [previous] = await q["lifecycles_latest"].fetch(conn, names=[lifecycle.name]) or [None]
    if previous is not None:
        before = Lifecycle.from_definition(json.loads(previous["definition"]))
        removed = sorted(set(before.states) - set(lifecycle.states))
        stranded = await q["operations_in_removed_states"].fetch(
            conn, lifecycle=lifecycle.name, states=removed
        )
        if stranded:
            listed = ", ".join(f"{r['id']} ({r['state']})" for r in stranded)
            raise LifecycleChangeRefused(
                f"lifecycle {lifecycle.name!r}: the new version removes states "
                f"{', '.join(removed)}, where {stranded[0]['total']} operations still are: "
                f"{listed}; move them on (pgoutbox ops fire / cancel) or keep those states"
            )
    [row] = await q["lifecycles_register_version"].fetch(
        conn,
        lifecycle=lifecycle.name,
        digest=lifecycle.digest,
        definition=json.dumps(lifecycle.definition()),
    )
    await q["lifecycle_transitions_clear"].execute(conn, lifecycle=lifecycle.name)
    rows = lifecycle.rows()
    query = q["lifecycle_transitions_add"]
    await query.execute(
        conn,
        lifecycle=lifecycle.name,
        from_states=[r[1] for r in rows],
        triggers=[r[2] for r in rows],
        to_states=[r[3] for r in rows],
    )
    return int(row["version"])


async def lifecycle_of_type(
    conn: asyncpg.Connection, q: Mapping[str, Query], operation_type: str
) -> tuple[Lifecycle, int | None]:
    """The lifecycle the database has for ``operation_type`` and its version (None: default)."""
    rows = await q["lifecycle_types_get"].fetch(conn, operation_types=[operation_type])
    if not rows:
        return DEFAULT_LIFECYCLE, None
    name = rows[0]["lifecycle"]
    latest = await q["lifecycles_latest"].fetch(conn, names=[name])
    if not latest:
        raise LifecycleNotRegistered(
            f"operation type {operation_type!r} names lifecycle {name!r}, which has no "
            "registered version"
        )
    return Lifecycle.from_definition(json.loads(latest[0]["definition"])), latest[0]["version"]
