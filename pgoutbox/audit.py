"""Audit verification: recompute every operation's hash chain, independently of the database.

The database writes each audit row and its sha256 (see the ``audit_hash`` SQL function). This
module re-implements the canonical encoding in Python, so a verification does not trust the
database's own function, and checks for every operation that:

- ``seq`` runs 1, 2, 3... without a gap;
- each row's ``prev_hash`` is the previous row's ``hash`` and its ``hash`` matches its fields;
- the chain ends where the operation row says it does (``audit_seq``/``audit_hash``), so a
  deleted last row is noticed too;
- the operation is in the state its last audit row records, so a state changed behind the
  audit trigger's back is noticed.

:func:`verify_audit` (what :func:`verify`, ``Admin.verify`` and ``pgoutbox audit verify`` run)
also checks, in the same snapshot, that the triggers and functions that write the log are still
the ones pgoutbox's migrations installed (:mod:`pgoutbox.integrity`): a chain that holds proves
little once the trigger that builds it has been switched to origin-only or replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

import pgoutbox_proof as proof
from pgoutbox.db import create_pool
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

if TYPE_CHECKING:
    from pgoutbox.integrity import IntegrityProblem

_PAGE = 5000


def canonical_encoding(
    operation_id: int,
    seq: int,
    operation_type: str,
    from_state: str | None,
    to_state: str,
    trigger: str,
    attempt: int,
    actor: str,
    detail: str | None,
    recorded_at: datetime,
    db_role: str | None = None,
    intent_hash: bytes | None = None,
) -> bytes:
    """The bytes an audit row's hash covers (after its ``prev_hash``).

    ``db_role`` (the database role that made the change) is appended when present: rows written
    before revision 0010 have none, and their hashes cover exactly what they did then. So is
    ``intent_hash`` (seq 1 from revision 0013 on). One implementation, shared with the offline
    checker: :func:`pgoutbox_proof.canonical_encoding`.
    """
    return proof.canonical_encoding(
        {
            "operation_id": operation_id,
            "seq": seq,
            "operation_type": operation_type,
            "from_state": from_state,
            "to_state": to_state,
            "trigger": trigger,
            "attempt": attempt,
            "actor": actor,
            "detail": detail,
            "recorded_at": recorded_at,
            "db_role": db_role,
            "intent_hash": intent_hash,
        }
    )


def row_hash(prev_hash: bytes | None, row: dict[str, Any]) -> bytes:
    """The hash an audit row must carry, given its fields and its predecessor's hash."""
    return proof.row_hash(prev_hash, row)


@dataclass(frozen=True)
class AuditProblem:
    """Where a chain breaks first."""

    operation_id: int
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"operation {self.operation_id} seq {self.seq}: {self.reason}"


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of :func:`verify_chains` (chains only) or :func:`verify_audit` (chains and
    the schema's triggers and functions): the first broken chain, if any, and every
    :class:`~pgoutbox.integrity.IntegrityProblem`."""

    operations: int
    rows: int
    problem: AuditProblem | None
    integrity: tuple[IntegrityProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every chain holds and nothing that enforces the log was weakened."""
        return self.problem is None and not self.integrity

    def failures(self) -> list[str]:
        """Each reason the verification failed, one line each: the first broken chain, then
        every integrity problem (empty when :attr:`ok`)."""
        chain = [] if self.problem is None else [str(self.problem)]
        return chain + [str(problem) for problem in self.integrity]


class _Chain:
    """The state of one operation's chain while its rows stream past."""

    def __init__(self, first: dict[str, Any], *, archived: bool = False) -> None:
        """``first`` is the chain's first row, or with ``archived`` its archive head
        (``archive_starts_page``): the chain goes on from the last row an archive took."""
        self.operation_id: int = first["operation_id"]
        self.head = (first["head_seq"], first["head_hash"]) if first["operation_exists"] else None
        self.current_state: str | None = first["current_state"]
        self.seq = first["seq"] if archived else 0
        self.hash: bytes | None = bytes(first["hash"]) if archived else None
        self.to_state: str | None = first["to_state"] if archived else None

    def add(self, row: dict[str, Any]) -> AuditProblem | None:
        expected_seq = self.seq + 1
        if row["seq"] != expected_seq:
            return self._problem(expected_seq, f"row missing (next row found is seq {row['seq']})")
        if row["prev_hash"] != self.hash:
            return self._problem(row["seq"], "prev_hash does not match the previous row's hash")
        if row_hash(self.hash, row) != row["hash"]:
            return self._problem(row["seq"], "hash does not match the row's contents")
        self.seq, self.hash, self.to_state = row["seq"], row["hash"], row["to_state"]
        return None

    def close(self) -> AuditProblem | None:
        if self.head is None:  # operation purged: the chain alone is all there is
            return None
        head_seq, head_hash = self.head
        if head_seq > self.seq:
            return self._problem(self.seq + 1, f"row missing (the operation records {head_seq})")
        if head_seq < self.seq or head_hash != self.hash:
            return self._problem(self.seq, "chain does not end at the operation's recorded head")
        if self.current_state != self.to_state:
            return self._problem(
                self.seq,
                f"the operation is {self.current_state!r} but its last audit row records "
                f"{self.to_state!r}",
            )
        return None

    def _problem(self, seq: int, reason: str) -> AuditProblem:
        return AuditProblem(self.operation_id, seq, reason)


async def verify_chains(
    conn: asyncpg.Connection,
    schema: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> AuditVerification:
    """Check every audit chain in ``schema``; stop at the first problem. The chains only: use
    :func:`verify_audit` to check the triggers and functions that write them too.

    ``progress`` is called with the number of rows checked so far after each page.
    """
    # One snapshot for the whole walk: rows appended meanwhile must not look like a broken head.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _walk(conn, schema, progress)


async def verify_audit(
    conn: asyncpg.Connection,
    schema: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> AuditVerification:
    """:func:`verify_chains`, and in the same snapshot
    :func:`~pgoutbox.integrity.check_schema_integrity`: the result fails when a chain breaks or
    when a trigger or function that enforces the log differs from what the schema's revision
    installed. Read-only; the auditor role can run it.
    """
    # Imported here, not with the module: `import pgoutbox` loads this module, and
    # `python -m pgoutbox.integrity` must find pgoutbox.integrity not yet imported.
    from pgoutbox.integrity import check_schema_integrity

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        result = await _walk(conn, schema, progress)
        problems = await check_schema_integrity(conn, schema)
    return replace(result, integrity=tuple(problems))


async def _walk(
    conn: asyncpg.Connection, schema: str, progress: Callable[[int], None] | None
) -> AuditVerification:
    from pgoutbox.anchor import archive_starts  # anchor imports this module

    q = queries(schema)
    orphan = await q["operations_without_audit"].fetchval(conn)
    rows = operations = 0
    problem: AuditProblem | None = None
    chain: _Chain | None = None
    # Archived operations' chains go on from their archive heads (pgoutbox/archive.py).
    starts = archive_starts(conn, schema)
    start = await anext(starts, None)

    def begin(first: dict[str, Any], archived: bool) -> AuditProblem | None:
        nonlocal chain, operations
        done = chain.close() if chain else None
        chain = _Chain(first, archived=archived)
        operations += 1
        return done

    after = (0, 0)
    page_query = q["audit_log_page"]
    while problem is None:
        page = await page_query.fetch(
            conn, after_operation_id=after[0], after_seq=after[1], limit=_PAGE
        )
        if not page:
            break
        for record in page:
            row = dict(record)
            while problem is None and start is not None:
                if start["operation_id"] > row["operation_id"]:
                    break
                problem = begin(start, archived=True)
                start = await anext(starts, None)
            if problem is None and (chain is None or chain.operation_id != row["operation_id"]):
                problem = begin(row, archived=False)
            if problem is None:
                assert chain is not None
                problem = chain.add(row)
            if problem:
                break
            rows += 1
        after = (page[-1]["operation_id"], page[-1]["seq"])
        if progress:
            progress(rows)
    while problem is None and start is not None:
        problem = begin(start, archived=True)
        start = await anext(starts, None)
    if problem is None and chain is not None:
        problem = chain.close()
    if orphan is not None and (problem is None or orphan < problem.operation_id):
        problem = AuditProblem(orphan, 1, "operation has no audit rows")
    return AuditVerification(operations, rows, problem)


async def verify_operation_chain(
    conn: asyncpg.Connection, schema: str, operation_id: int
) -> AuditVerification:
    """Check one operation's audit chain as :func:`verify_chains` checks every one (seq, hashes,
    the head the operation row records, its state), in one snapshot. ``operations`` is 0 when
    there is neither the operation nor any audit row of it. Used by the web console's
    operation page; a full ``verify`` also checks the triggers that write the chains.
    """
    q = queries(schema)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        records = await q["web_audit_chain_of_operation"].fetch(conn, operation_id=operation_id)
        start = await q["archive_start_of_operation"].fetchrow(conn, operation_id=operation_id)
        if not records:
            exists = await q["operations_admin_get"].fetchrow(conn, id=operation_id)
    if start is not None:
        chain = _Chain(dict(start), archived=True)
    elif not records:
        if exists is None:
            return AuditVerification(0, 0, None)
        return AuditVerification(1, 0, AuditProblem(operation_id, 1, "operation has no audit rows"))
    else:
        chain = _Chain(dict(records[0]))
    for record in records:
        problem = chain.add(dict(record))
        if problem:
            return AuditVerification(1, record["seq"] - 1, problem)
    return AuditVerification(1, len(records), chain.close())


async def verify(settings: DatabaseSettings) -> AuditVerification:
    """Verify every audit chain of the pgoutbox schema ``settings`` points at, and that its
    triggers and functions are the ones its revision installed (:func:`verify_audit`).

    Usage::

        result = await verify(Settings().database)
        assert result.ok, "; ".join(result.failures())
    """
    pool = await create_pool(settings, max_size=1)
    try:
        async with pool.acquire() as conn:
            return await verify_audit(conn, settings.schema_name)
    finally:
        await pool.close()
