"""Anchored audit: signed checkpoints of the audit log, verification against them, inclusion
proofs, and the state of every operation as of any instant (docs/audit.md).

**What a checkpoint covers.** One ``REPEATABLE READ`` snapshot: for every operation with audit
rows visible in it, its chain head there (the seq and hash of its newest visible row, which the
hash chain ties to every earlier row) and, while the operation row exists, the hash of its
recorded intent. The leaves, one per operation in ``operation_id`` order, are hashed into an
RFC 6962 Merkle tree whose root, size and time are signed with Ed25519 (:mod:`pgoutbox_proof`
holds the hashing and the offline checks). Heads, not rows, because rows commit out of id and
``recorded_at`` order: a row in flight when the snapshot was taken is simply not covered, and
the next checkpoint covers it. The leaves go to a heads file next to the signed document, so
verification can name every covered operation that changed.

A checkpoint also records a **horizon**: the earliest start of any transaction open in the
database just before the snapshot. Every audit row recorded before the horizon was committed
(or rolled back) before the snapshot, so it must be covered: a row recorded before the horizon
that the checkpoint does not cover was added afterwards with a back-dated time, or belongs to a
chain fabricated afterwards. (None when it cannot be known: a role that cannot see every
backend's transaction start, ``track_activities`` off, or a prepared transaction pending.)

**Semantic checks** (every walk): each row's transition is one the operation's lifecycle
allowed at that time (the default lifecycle as pgoutbox's code defines it, a custom lifecycle's
version registered before the row), its ``from_state`` is the previous row's ``to_state``,
``recorded_at`` never goes backwards, the attempt number is the number of claims so far, seq 1
is a publish, and an operation no longer in ``operations`` finished and is explained by a
recorded purge.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import asyncpg

import pgoutbox_proof as proof
from pgoutbox.audit import AuditProblem
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE, DEFAULT_NAME, FINISHED_STATES, Lifecycle
from pgoutbox.sql import queries

_PAGE = 5000
HEADS_HEADER = "# pgoutbox heads v1: operation_id,seq,head_hash,intent_hash"
MAX_PROBLEMS = 1000
"""A verification stops collecting problems after this many (it keeps counting rows)."""

# Transitions that never change state and are allowed in any lifecycle: a late result refused by
# fencing is recorded as ``reject``, the deletion of a finished operation as ``purge`` (its last).
_AUDIT_ONLY = frozenset({"reject", "purge"})


class CheckpointError(ValueError):
    """A key, checkpoint or heads file that cannot be used; the message names it."""


# -- keys --------------------------------------------------------------------------------------


def _require_cryptography() -> None:
    try:
        proof.require_cryptography()
    except proof.ProofError as exc:
        raise CheckpointError(str(exc)) from None


def generate_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM)."""
    _require_cryptography()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_private_key(data: str | bytes) -> Any:
    """An Ed25519 private key from PEM (``pgoutbox audit keygen``) or the base64 of its 32 raw
    bytes."""
    _require_cryptography()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    raw = data.encode() if isinstance(data, str) else data
    try:
        if b"-----BEGIN" in raw:
            key = load_pem_private_key(raw, password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(raw.strip(), validate=True))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"not an Ed25519 private key (PEM or base64): {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError("the private key is not an Ed25519 key")
    return key


def private_key_from(path: str | None, env: str = "PGOUTBOX_AUDIT_KEY") -> Any:
    """The signing key from a file, else from the environment variable ``env`` (its PEM or
    base64); :class:`CheckpointError` naming both when neither is given."""
    if path:
        try:
            return load_private_key(Path(path).read_bytes())
        except OSError as exc:
            raise CheckpointError(f"cannot read the private key {path!r}: {exc}") from None
    value = os.environ.get(env)
    if not value:
        raise CheckpointError(
            f"no signing key: give --key FILE or set {env} (create one with "
            "`pgoutbox audit keygen`)"
        )
    return load_private_key(value)


# -- taking a checkpoint -----------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """One leaf of a checkpoint: an operation's chain head, and its intent's hash (None once
    the operation row was purged)."""

    operation_id: int
    seq: int
    hash: bytes
    intent: bytes | None

    def leaf(self) -> bytes:
        """The leaf's hash in the checkpoint's tree."""
        return proof.leaf_hash(proof.head_leaf(self.operation_id, self.seq, self.hash, self.intent))

    def line(self) -> str:
        """The heads file's line for it."""
        intent = "-" if self.intent is None else self.intent.hex()
        return f"{self.operation_id},{self.seq},{self.hash.hex()},{intent}\n"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    """An ISO-8601 time as written in a checkpoint."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _intent_of(record: Mapping[str, Any]) -> bytes:
    return proof.intent_hash(
        {
            "operation_type": record["operation_type"],
            "channel": record["channel"],
            "lifecycle": record["lifecycle"],
            "payload": record["payload"],
            "idempotency_key": record["idempotency_key"],
            "created_by": record["created_by"],
            "created_at": record["created_at"],
        }
    )


async def _horizon(conn: asyncpg.Connection, schema: str) -> datetime | None:
    row = await queries(schema)["anchor_horizon"].fetchrow(conn)
    assert row is not None
    if row["hidden"] or row["prepared"] or not row["tracked"]:
        return None
    oldest = row["oldest_start"]
    now: datetime = row["now"]
    return now if oldest is None else min(now, oldest)


async def take_checkpoint(
    conn: asyncpg.Connection,
    schema: str,
    private_key: Any,
    heads_path: Path,
    *,
    record: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Take a checkpoint of ``schema``'s audit log: write its leaves to ``heads_path`` (gzip)
    and return the signed document (also recorded in ``audit_checkpoints`` when ``record``,
    if this role may insert there). ``progress`` gets the number of audit rows read so far."""
    q = queries(schema)
    # Read before the snapshot: a transaction open now started at or after the horizon, so any
    # row recorded before it was committed (or rolled back) before the snapshot below.
    horizon = await _horizon(conn, schema)
    builder = proof.TreeBuilder()
    covered_rows = 0
    tmp = heads_path.with_name(heads_path.name + ".tmp")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        info = await q["anchor_snapshot"].fetchrow(conn)
        assert info is not None
        versions = await q["anchor_lifecycle_versions"].fetch(conn)
        with gzip.open(tmp, "wt", encoding="ascii") as out:
            out.write(HEADS_HEADER + "\n")
            after = (0, 0)
            pending: tuple[int, int, bytes] | None = None
            rows_read = 0
            while True:
                page = await q["anchor_chain_rows"].fetch(
                    conn, after_operation_id=after[0], after_seq=after[1], limit=_PAGE
                )
                if not page:
                    break
                heads: list[tuple[int, int, bytes]] = []
                for record_ in page:
                    op_id = record_["operation_id"]
                    if pending is not None and pending[0] != op_id:
                        heads.append(pending)
                    pending = (op_id, record_["seq"], bytes(record_["hash"]))
                rows_read += len(page)
                after = (page[-1]["operation_id"], page[-1]["seq"])
                covered_rows += await _write_heads(conn, q, heads, builder, out)
                if progress:
                    progress(rows_read)
            if pending is not None:
                covered_rows += await _write_heads(conn, q, [pending], builder, out)
    os.replace(tmp, heads_path)
    public = private_key.public_key()
    document: dict[str, Any] = {
        "format": proof.CHECKPOINT_FORMAT,
        "database": info["database"],
        "schema": schema,
        "revision": info["revision"],
        "taken_at": _iso(info["taken_at"]),
        "horizon": None if horizon is None else _iso(horizon),
        "size": builder.size,
        "rows": covered_rows,
        "root": builder.root().hex(),
        "heads_file": heads_path.name,
        "lifecycles": [[v["name"], v["version"], v["digest"]] for v in versions],
        "key_id": proof.key_id(proof.public_key_raw(public)),
    }
    document["signature"] = base64.b64encode(
        private_key.sign(proof.signing_bytes(document))
    ).decode()
    if record:
        await record_checkpoint(conn, schema, document)
    return document


async def _write_heads(
    conn: asyncpg.Connection,
    q: Mapping[str, Any],
    heads: list[tuple[int, int, bytes]],
    builder: proof.TreeBuilder,
    out: TextIO,
) -> int:
    if not heads:
        return 0
    intents = {
        r["id"]: _intent_of(r)
        for r in await q["anchor_intents"].fetch(conn, ids=[h[0] for h in heads])
    }
    rows = 0
    for op_id, seq, head_hash in heads:
        head = Head(op_id, seq, head_hash, intents.get(op_id))
        builder.add(head.leaf())
        out.write(head.line())
        rows += seq
    return rows


async def record_checkpoint(
    conn: asyncpg.Connection, schema: str, document: Mapping[str, Any]
) -> int | None:
    """Keep a copy of ``document`` in ``audit_checkpoints`` (a convenience, never trusted);
    None when this role may not insert there."""
    try:
        value = await queries(schema)["anchor_record_checkpoint"].fetchval(
            conn,
            taken_at=parse_time(document["taken_at"]),
            size=document["size"],
            covered_rows=document["rows"],
            root=bytes.fromhex(document["root"]),
            key_id=document["key_id"],
            document=json.dumps(document),
        )
    except asyncpg.InsufficientPrivilegeError:
        return None
    return int(value)


def write_checkpoint(document: Mapping[str, Any], path: Path) -> None:
    """Write a signed checkpoint as indented JSON."""
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def heads_path_for(checkpoint_path: Path) -> Path:
    """Where a checkpoint's heads file goes: next to it, ``<name>.heads.gz``."""
    name = checkpoint_path.name
    stem = name[: -len(".json")] if name.endswith(".json") else name
    return checkpoint_path.with_name(stem + ".heads.gz")


def read_checkpoint(path: Path, public_key: Any) -> dict[str, Any]:
    """A checkpoint file whose signature checks with ``public_key``."""
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the checkpoint {str(path)!r}: {exc}") from None
    try:
        proof.check_checkpoint(document, public_key)
    except proof.ProofError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from None
    return document


def read_heads(path: Path) -> Iterator[Head]:
    """Stream a heads file's leaves (in operation order); the file is opened and its header
    checked now, so a missing or foreign file fails before any walk starts."""
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            header = f.readline().rstrip("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the heads file {str(path)!r}: {exc}") from None
    if header != HEADS_HEADER:
        raise CheckpointError(f"{str(path)!r} is not a pgoutbox heads file")
    return _heads_of(path)


def _heads_of(path: Path) -> Iterator[Head]:
    with gzip.open(path, "rt", encoding="ascii") as f:
        f.readline()
        for number, line in enumerate(f, start=2):
            try:
                op_id, seq, head_hash, intent = line.rstrip("\n").split(",")
                head = Head(
                    int(op_id),
                    int(seq),
                    bytes.fromhex(head_hash),
                    None if intent == "-" else bytes.fromhex(intent),
                )
            except ValueError:
                raise CheckpointError(
                    f"heads file {str(path)!r} line {number} is not a head"
                ) from None
            yield head


# -- lifecycle rules ---------------------------------------------------------------------------


@dataclass
class LifecycleRules:
    """Which transitions each lifecycle allowed when: the default lifecycle as pgoutbox's code
    defines it (never read from the database, where its owner could change it), and every
    registered version of each custom lifecycle with the time it was registered."""

    versions: dict[str, list[tuple[datetime, frozenset[tuple[str, str, str]]]]] = field(
        default_factory=dict
    )
    types: dict[str, str] = field(default_factory=dict)

    default: frozenset[tuple[str, str, str]] = frozenset(
        (f, t, to) for _, f, t, to in DEFAULT_LIFECYCLE.rows()
    )

    @classmethod
    def from_rows(
        cls, versions: Sequence[Mapping[str, Any]], types: Sequence[Mapping[str, Any]]
    ) -> LifecycleRules:
        """From ``anchor_lifecycle_versions`` and ``anchor_lifecycle_types`` rows."""
        rules = cls()
        for v in versions:
            lifecycle = Lifecycle.from_definition(json.loads(v["definition"]))
            edges = frozenset((f, t, to) for _, f, t, to in lifecycle.rows())
            rules.versions.setdefault(v["name"], []).append((v["registered_at"], edges))
        rules.types = {t["operation_type"]: t["lifecycle"] for t in types}
        return rules

    def allowed(self, lifecycle: str, at: datetime, edge: tuple[str, str, str]) -> bool:
        """Whether ``edge`` (from, trigger, to) was allowed by ``lifecycle`` at ``at``: by the
        version in force then, or the one before it (a registration's transaction commits after
        its ``registered_at``, so rows a little later may still have run under the previous)."""
        if lifecycle == DEFAULT_NAME:
            return edge in self.default
        versions = self.versions.get(lifecycle, [])
        in_force = [edges for registered, edges in versions if registered <= at]
        candidates = in_force[-2:] if in_force else versions[:1]
        return any(edge in edges for edges in candidates)


# -- the walk ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Purge:
    """A recorded retention purge (``purges``). From revision 0014 on (``chained``), each
    operation a purge deletes gets a ``purge`` row in its own chain, and only that explains
    its absence; an older purge explains operations finished before its cut-off."""

    finished_before: datetime
    include_dead: bool
    deleted: int
    chained: bool = False


@dataclass
class AnchoredVerification:
    """The outcome of :func:`verify_against_checkpoint` (or a walk without a checkpoint):
    every problem found (up to :data:`MAX_PROBLEMS`), each naming operation, seq and rule."""

    operations: int
    rows: int
    problems: list[AuditProblem]
    checkpoint: Mapping[str, Any] | None = None
    covered_operations: int = 0
    integrity: tuple[Any, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.problems and not self.integrity

    def failures(self) -> list[str]:
        """One line per problem."""
        return [str(p) for p in self.problems] + [str(p) for p in self.integrity]


class Walker:
    """Checks audit rows streamed in (operation_id, seq) order against a checkpoint's heads
    (optional) and the semantic rules; pure Python, so the property tests drive it directly.

    Each row is a mapping with the audit row's columns and, per operation, ``operation_exists``,
    ``head_seq``, ``head_hash``, ``current_state`` and (for the intent check) ``lifecycle``,
    ``channel``, ``payload``, ``idempotency_key``, ``created_by``, ``created_at``,
    ``current_type``.
    """

    def __init__(
        self,
        *,
        heads: Iterator[Head] | None = None,
        checkpoint: Mapping[str, Any] | None = None,
        rules: LifecycleRules | None = None,
        purges: list[Purge] | None = None,
    ) -> None:
        self._heads = heads
        self._checkpoint = checkpoint
        self._horizon = (
            parse_time(checkpoint["horizon"])
            if checkpoint is not None and checkpoint.get("horizon")
            else None
        )
        self._next_head: Head | None = None
        self._heads_done = heads is None
        self._tree = proof.TreeBuilder()
        self._rules = rules or LifecycleRules()
        self._purges = purges or []
        self.problems: list[AuditProblem] = []
        self.rows = 0
        self.operations = 0
        self.covered = 0
        self._op: int | None = None
        self._advance_head()

    # heads ---------------------------------------------------------------------------------

    def _advance_head(self) -> None:
        if self._heads is None:
            return
        self._next_head = next(self._heads, None)
        if self._next_head is not None:
            self._tree.add(self._next_head.leaf())

    def _take_head(self, operation_id: int) -> Head | None:
        """The checkpoint's head of ``operation_id``; heads of smaller ids vanished."""
        while self._next_head is not None and self._next_head.operation_id < operation_id:
            gone = self._next_head
            self.problem(
                gone.operation_id,
                1,
                "checkpoint",
                f"the operation's audit rows (seq 1 to {gone.seq}, covered by the checkpoint) "
                "are gone: deleted",
            )
            self._advance_head()
        if self._next_head is not None and self._next_head.operation_id == operation_id:
            head = self._next_head
            self._advance_head()
            self.covered += 1
            return head
        return None

    # rows ----------------------------------------------------------------------------------

    def problem(self, operation_id: int, seq: int, rule: str, reason: str) -> None:
        """Record a problem (up to :data:`MAX_PROBLEMS`)."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(AuditProblem(operation_id, seq, f"[{rule}] {reason}"))

    def feed(self, row: Mapping[str, Any]) -> None:
        """The next audit row."""
        self.rows += 1
        if row["operation_id"] != self._op:
            self._close()
            self._open(row)
        if self._broken:
            return
        self._check_row(row)

    def _open(self, row: Mapping[str, Any]) -> None:
        self.operations += 1
        self._op = row["operation_id"]
        self._first = row
        self._head = self._take_head(row["operation_id"]) if self._heads is not None else None
        self._seq = 0
        self._hash: bytes | None = None
        self._prev: Mapping[str, Any] | None = None
        self._claims = 0
        self._broken = False
        self._matched_head = False

    def start_from(self, start: Mapping[str, Any]) -> None:
        """An archived operation: its chain continues after ``start``, the last row an archive
        took (``archive_starts_page``: seq, hash, state, trigger, attempt, time, and what the
        publication recorded), with the operation row as seq 1 would carry it. The rows that
        follow, if any, are fed as usual."""
        self._close()
        published = {
            "operation_type": start["operation_type"],
            "actor": start["published_by"],
            "recorded_at": start["published_at"],
            "intent_hash": start["intent_hash"],
        }
        self._open({**start, **published})
        seq, start_hash = start["seq"], bytes(start["hash"])
        self._seq, self._hash, self._claims = seq, start_hash, start["attempt"]
        self._prev = {
            "seq": seq,
            "to_state": start["to_state"],
            "trigger": start["trigger"],
            "recorded_at": start["recorded_at"],
        }
        op_id, head = start["operation_id"], self._head
        if head is not None and head.seq <= seq:
            # Covered by the archive; the head itself is checkable when it is the last row.
            if head.seq == seq and head.hash != start_hash:
                self.problem(
                    op_id,
                    seq,
                    "checkpoint",
                    f"the archive's last row of this operation (seq {seq}) differs from the "
                    "checkpoint's head: the archive's record was rewritten",
                )
                self._broken = True
            self._matched_head = True

    def _check_row(self, row: Mapping[str, Any]) -> None:
        op_id, seq = row["operation_id"], row["seq"]
        prev = self._prev
        if seq != self._seq + 1:
            self.problem(
                op_id, self._seq + 1, "chain", f"row missing (next row found is seq {seq})"
            )
            self._broken = True
            return
        prev_hash = None if row["prev_hash"] is None else bytes(row["prev_hash"])
        if prev_hash != self._hash:
            self.problem(op_id, seq, "chain", "prev_hash does not match the previous row's hash")
            self._broken = True
            return
        computed = proof.row_hash(self._hash, row)
        if computed != bytes(row["hash"]):
            self.problem(op_id, seq, "chain", "hash does not match the row's contents")
            self._broken = True
            return
        head = self._head
        if head is not None and seq == head.seq:
            if computed != head.hash:
                self.problem(
                    op_id,
                    seq,
                    "checkpoint",
                    "the chain up to this row (the checkpoint's head of this operation) differs "
                    "from the checkpoint: a row at or before this seq was rewritten, reordered "
                    "or backdated",
                )
                self._broken = True
                return
            self._matched_head = True
        elif (
            self._horizon is not None
            and (head is None or seq > head.seq)
            and row["recorded_at"] < self._horizon
        ):
            self.problem(
                op_id,
                seq,
                "checkpoint",
                f"recorded at {_iso(row['recorded_at'])}, before the checkpoint's horizon "
                f"{_iso(self._horizon)}, yet not covered by it: added afterwards with an earlier "
                "time (backdated or fabricated)",
            )
        self._semantics(row, prev)
        self._seq, self._hash, self._prev = seq, computed, row

    def _semantics(self, row: Mapping[str, Any], prev: Mapping[str, Any] | None) -> None:
        op_id, seq = row["operation_id"], row["seq"]
        trigger, from_state, to_state = row["trigger"], row["from_state"], row["to_state"]
        if trigger == "claim":
            self._claims += 1
        if row["operation_type"] != self._first["operation_type"]:
            self.problem(
                op_id,
                seq,
                "intent",
                f"operation_type {row['operation_type']!r} differs from seq 1's "
                f"{self._first['operation_type']!r}",
            )
        if prev is None:
            if (from_state, trigger, to_state, row["attempt"]) != (None, "publish", "pending", 0):
                self.problem(
                    op_id,
                    seq,
                    "publish",
                    "seq 1 must record the publication (NULL -> pending, publish, attempt 0), "
                    f"not {from_state} -> {to_state} ({trigger}, attempt {row['attempt']})",
                )
            return
        if from_state != prev["to_state"]:
            self.problem(
                op_id,
                seq,
                "from_state",
                f"from_state {from_state!r} is not the previous row's to_state "
                f"{prev['to_state']!r}",
            )
        if row["recorded_at"] < prev["recorded_at"]:
            self.problem(
                op_id,
                seq,
                "time",
                f"recorded_at {_iso(row['recorded_at'])} is before seq {prev['seq']}'s "
                f"{_iso(prev['recorded_at'])}",
            )
        if row["attempt"] != self._claims:
            self.problem(
                op_id,
                seq,
                "attempt",
                f"attempt {row['attempt']} but {self._claims} claims so far",
            )
        if prev.get("trigger") == "purge":
            self.problem(
                op_id, seq, "purge", f"recorded after the operation's purge (seq {prev['seq']})"
            )
        if trigger in _AUDIT_ONLY:
            if from_state != to_state:
                self.problem(op_id, seq, "edge", f"{trigger!r} cannot change the state")
            elif trigger == "purge" and to_state not in FINISHED_STATES:
                self.problem(
                    op_id, seq, "purge", f"a purge of an unfinished operation ({to_state!r})"
                )
            return
        lifecycle = self._lifecycle_of(row)
        edge = (from_state, trigger, to_state)
        if not self._rules.allowed(lifecycle, row["recorded_at"], edge):
            self.problem(
                op_id,
                seq,
                "edge",
                f"{from_state} -> {to_state} by {trigger!r} is not a transition lifecycle "
                f"{lifecycle!r} allowed at {_iso(row['recorded_at'])}",
            )

    def _lifecycle_of(self, row: Mapping[str, Any]) -> str:
        first = self._first
        if first.get("operation_exists") and first.get("lifecycle"):
            return str(first["lifecycle"])
        # Purged: the lifecycle its type runs now (types move only once their operations finish).
        return self._rules.types.get(row["operation_type"], DEFAULT_NAME)

    def _close(self) -> None:
        if self._op is None:
            return
        first, head, op_id = self._first, self._head, self._op
        if head is not None and not self._broken and not self._matched_head:
            self.problem(
                op_id,
                self._seq + 1,
                "checkpoint",
                f"row missing: the checkpoint covers seq 1 to {head.seq}, the chain now ends at "
                f"seq {self._seq} (truncated)",
            )
        if self._broken:
            return
        exists = first.get("operation_exists")
        if exists:
            head_seq, head_hash = first["head_seq"], first["head_hash"]
            if head_seq > self._seq:
                self.problem(
                    op_id, self._seq + 1, "chain", f"row missing (the operation records {head_seq})"
                )
            elif head_seq < self._seq or bytes(head_hash) != self._hash:
                self.problem(
                    op_id, self._seq, "chain", "chain does not end at the operation's recorded head"
                )
            elif self._prev is not None and self._prev.get("trigger") == "purge":
                self.problem(
                    op_id,
                    self._seq,
                    "purge",
                    "the chain records the operation's purge, yet the operation row exists",
                )
            elif self._prev is not None and first["current_state"] != self._prev["to_state"]:
                self.problem(
                    op_id,
                    self._seq,
                    "chain",
                    f"the operation is {first['current_state']!r} but its last audit row records "
                    f"{self._prev['to_state']!r}",
                )
            self._check_intent_against_publish(op_id, first)
            if head is not None and head.intent is not None and "payload" in first:
                current = _intent_of({**first, "operation_type": first["current_type"]})
                if current != head.intent:
                    self.problem(
                        op_id,
                        1,
                        "intent",
                        "the operation's recorded intent (type, channel, lifecycle, payload, "
                        "idempotency key, creator or creation time) differs from the checkpoint",
                    )
        elif self._prev is not None:
            self._check_purged(op_id, self._prev)

    def _check_intent_against_publish(self, op_id: int, first: Mapping[str, Any]) -> None:
        """What the operation row says of its creation must be what seq 1 recorded: the type
        (every row carries it), the creator (seq 1's actor) and the creation time."""
        if "current_type" not in first:
            return
        if first.get("intent_hash") is not None and first.get("payload") is not None:
            intent_now = _intent_of({**first, "operation_type": first["current_type"]})
            if intent_now != bytes(first["intent_hash"]):
                self.problem(
                    op_id,
                    1,
                    "intent",
                    "the operation row's recorded intent (type, channel, lifecycle, payload, "
                    "idempotency key, creator or creation time) is not what its publication "
                    "(seq 1) hashed",
                )
        recorded = (first["operation_type"], first["actor"], first["recorded_at"])
        current = (first["current_type"], first["created_by"], first["created_at"])
        names = ("type", "creator", "creation time")
        changed = [n for n, a, b in zip(names, recorded, current, strict=True) if a != b]
        if changed:
            self.problem(
                op_id,
                1,
                "intent",
                f"the operation row's {', '.join(changed)} differ from what its publication "
                f"(seq 1) recorded: {recorded[0]!r} by {recorded[1]!r} at {_iso(recorded[2])}",
            )

    def _check_purged(self, op_id: int, last: Mapping[str, Any]) -> None:
        if last.get("trigger") == "purge":
            return  # its deletion is recorded in its own chain (checked like any row)
        state = last["to_state"]
        if state not in FINISHED_STATES:
            self.problem(
                op_id,
                last["seq"],
                "purge",
                f"the operation is gone from operations, but its chain ends in {state!r}, not a "
                "finished state: no purge deletes it",
            )
            return
        explained = any(
            not p.chained
            and p.deleted > 0
            and p.finished_before > last["recorded_at"]
            and (state != "dead" or p.include_dead)
            for p in self._purges
        )
        if not explained:
            self.problem(
                op_id,
                last["seq"],
                "purge",
                f"the operation is gone from operations, but its chain does not record its "
                f"purge, and no purge before revision 0014 deleted operations finished when it "
                f"was ({_iso(last['recorded_at'])}, {state})",
            )

    def finish(self) -> None:
        """After the last row: close the last chain, and account for every remaining head."""
        self._close()
        self._op = None
        if self._heads is None:
            return
        self._take_head(2**63)  # every head left names an operation whose rows are gone
        checkpoint = self._checkpoint
        if checkpoint is not None and (
            self._tree.size != checkpoint["size"] or self._tree.root().hex() != checkpoint["root"]
        ):
            self.problem(
                0,
                0,
                "checkpoint",
                f"the heads file ({self._tree.size} heads) does not hash to the checkpoint's "
                f"signed root ({checkpoint['size']} heads): it is not the one written with it",
            )


# -- verification against the database ---------------------------------------------------------


async def _rules_and_purges(
    conn: asyncpg.Connection, schema: str
) -> tuple[LifecycleRules, list[Purge], list[dict[str, Any]]]:
    q = queries(schema)
    versions = [dict(r) for r in await q["anchor_lifecycle_versions"].fetch(conn)]
    rules = LifecycleRules.from_rows(
        versions, [dict(r) for r in await q["anchor_lifecycle_types"].fetch(conn)]
    )
    purges = [
        Purge(r["finished_before"], r["include_dead"], r["deleted"], r["chained"])
        for r in await q["anchor_purges"].fetch(conn)
    ]
    return rules, purges, versions


async def verify_against_checkpoint(
    conn: asyncpg.Connection,
    schema: str,
    checkpoint: Mapping[str, Any] | None,
    heads: Iterator[Head] | None,
    *,
    progress: Callable[[int], None] | None = None,
) -> AnchoredVerification:
    """Walk every audit chain of ``schema`` in one snapshot, in pages (constant memory): the
    hash chains, the semantic rules and, given a checkpoint (whose signature the caller has
    checked) and its heads, that everything it covers is still there unchanged. Also checks the
    schema's triggers and functions (:mod:`pgoutbox.integrity`)."""
    from pgoutbox.integrity import check_schema_integrity

    if checkpoint is not None and checkpoint.get("schema") != schema:
        raise CheckpointError(
            f"the checkpoint is of schema {checkpoint.get('schema')!r}, not {schema!r}: give "
            "--schema to verify the schema it was taken of"
        )
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        walker = await walk(conn, schema, checkpoint, heads, progress=progress)
        integrity = tuple(await check_schema_integrity(conn, schema))
    return AnchoredVerification(
        walker.operations,
        walker.rows,
        walker.problems,
        checkpoint,
        walker.covered,
        integrity,
    )


async def archive_starts(conn: asyncpg.Connection, schema: str) -> AsyncIterator[dict[str, Any]]:
    """Every archived operation's newest archive head (``archive_starts_page``), in operation
    order, a page at a time."""
    after = 0
    while True:
        page = await queries(schema)["archive_starts_page"].fetch(
            conn, after_operation_id=after, limit=_PAGE
        )
        for record in page:
            yield dict(record)
        if len(page) < _PAGE:
            return
        after = page[-1]["operation_id"]


async def walk(
    conn: asyncpg.Connection,
    schema: str,
    checkpoint: Mapping[str, Any] | None,
    heads: Iterator[Head] | None,
    *,
    since: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> Walker:
    """Feed a :class:`Walker` every audit chain in the current transaction's snapshot: each
    archived operation from its archive head on, the rows recorded at or after ``since`` (all
    when None) in (operation_id, seq) order. Returns it finished, its problems sorted."""
    q = queries(schema)
    rules, purges, versions = await _rules_and_purges(conn, schema)
    walker = Walker(heads=heads, checkpoint=checkpoint, rules=rules, purges=purges)
    if checkpoint is not None:
        _check_lifecycle_versions(walker, checkpoint, versions)
    orphan = await q["operations_without_audit"].fetchval(conn)
    starts = archive_starts(conn, schema)
    start = await anext(starts, None)
    after = (0, 0)
    while True:
        page = await q["anchor_audit_page"].fetch(
            conn,
            after_operation_id=after[0],
            after_seq=after[1],
            since=since or datetime.min.replace(tzinfo=UTC),
            limit=_PAGE,
        )
        if not page:
            break
        for record in page:
            while start is not None and start["operation_id"] <= record["operation_id"]:
                walker.start_from(start)
                start = await anext(starts, None)
            walker.feed(dict(record))
        after = (page[-1]["operation_id"], page[-1]["seq"])
        if progress:
            progress(walker.rows)
    while start is not None:
        walker.start_from(start)
        start = await anext(starts, None)
    walker.finish()
    if orphan is not None:
        walker.problems.append(AuditProblem(orphan, 1, "[chain] operation has no audit rows"))
    walker.problems.sort(key=lambda p: (p.operation_id, p.seq))
    return walker


def _check_lifecycle_versions(
    walker: Walker, checkpoint: Mapping[str, Any], versions: list[dict[str, Any]]
) -> None:
    """Every custom lifecycle version the checkpoint saw is still there with its digest, and
    none was added with a registration time before the checkpoint's horizon (a backdated
    version would make transitions look allowed that were not). Reported as operation 0."""
    now = {(v["name"], v["version"]): v for v in versions}
    seen = {(name, version): digest for name, version, digest in checkpoint["lifecycles"]}
    for (name, version), digest in sorted(seen.items()):
        current = now.get((name, version))
        if current is None or current["digest"] != digest:
            what = "is gone" if current is None else "has another definition now"
            walker.problem(
                0, 0, "lifecycle", f"lifecycle {name!r} version {version} (checkpointed) {what}"
            )
    horizon = checkpoint.get("horizon")
    for (name, version), v in sorted(now.items()):
        if (name, version) not in seen and horizon and v["registered_at"] < parse_time(horizon):
            walker.problem(
                0,
                0,
                "lifecycle",
                f"lifecycle {name!r} version {version} is registered at "
                f"{_iso(v['registered_at'])}, before the checkpoint's horizon, yet the "
                "checkpoint did not see it: added afterwards with an earlier time",
            )


async def prove(
    conn: asyncpg.Connection,
    schema: str,
    operation_id: int,
    checkpoint: Mapping[str, Any],
    heads_path: Path,
) -> dict[str, Any]:
    """An inclusion proof of ``operation_id``'s audit rows covered by ``checkpoint`` (whose
    heads file is ``heads_path``): the rows up to the covered seq, the intent, and the audit
    path. Two passes over the heads file in O(log n) memory: one finds the operation's leaf and
    checks the file against the signed root, one builds the path."""
    index: int | None = None
    target: Head | None = None
    tree = proof.TreeBuilder()
    for position, head in enumerate(read_heads(heads_path)):
        if head.operation_id == operation_id:
            index, target = position, head
        tree.add(head.leaf())
    if tree.size != checkpoint["size"] or tree.root().hex() != checkpoint["root"]:
        raise CheckpointError("the heads file does not hash to the checkpoint's signed root")
    if index is None or target is None:
        raise CheckpointError(
            f"operation {operation_id} is not covered by the checkpoint of "
            f"{checkpoint['taken_at']} (it had no audit rows in its snapshot)"
        )
    path = proof.inclusion_path_of_stream(
        (head.leaf() for head in read_heads(heads_path)), index, tree.size
    )
    q = queries(schema)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await q["anchor_operation_rows"].fetch(
            conn, operation_id=operation_id, seq=target.seq
        )
        intents = await q["anchor_intents"].fetch(conn, ids=[operation_id])
    if not rows or rows[0]["seq"] != 1:
        raise CheckpointError(
            f"operation {operation_id}'s audit rows from seq 1 are no longer in the database "
            "(archived: `pgoutbox audit archive`); its proof is the archive's files with the "
            "checkpoint taken with them"
        )
    intent: dict[str, Any] | None = None
    if target.intent is not None:
        if not intents:
            raise CheckpointError(
                f"operation {operation_id} was purged since the checkpoint: its intent, which "
                "the checkpoint covers, is gone (a later checkpoint covers the chain alone)"
            )
        i = intents[0]
        intent = {name: i[name] for name in proof.INTENT_FIELDS}
        intent["created_at_us"] = proof.micros(i["created_at"])
    return {
        "format": proof.PROOF_FORMAT,
        "checkpoint": dict(checkpoint),
        "operation_id": operation_id,
        "leaf_index": index,
        "path": [h.hex() for h in path],
        "intent": intent,
        "rows": [
            {
                "operation_id": r["operation_id"],
                "seq": r["seq"],
                "operation_type": r["operation_type"],
                "from_state": r["from_state"],
                "to_state": r["to_state"],
                "trigger": r["trigger"],
                "attempt": r["attempt"],
                "actor": r["actor"],
                "db_role": r["db_role"],
                "detail": r["detail"],
                "recorded_at": _iso(r["recorded_at"]),
                "recorded_at_us": proof.micros(r["recorded_at"]),
                "prev_hash": None if r["prev_hash"] is None else bytes(r["prev_hash"]).hex(),
                "hash": bytes(r["hash"]).hex(),
                "intent_hash": None if r["intent_hash"] is None else bytes(r["intent_hash"]).hex(),
            }
            for r in rows
        ],
    }


# -- history as of an instant ------------------------------------------------------------------


@dataclass(frozen=True)
class StateAt:
    """One operation's state at an instant, from its newest audit row recorded by then."""

    operation_id: int
    operation_type: str
    state: str
    seq: int
    trigger: str
    attempt: int
    since: datetime


@dataclass(frozen=True)
class HistoryAsOf:
    """Every operation's state at ``at`` (those published by then), and counts by state."""

    at: datetime
    operations: list[StateAt]

    @property
    def counts(self) -> dict[str, int]:
        """How many operations were in each state."""
        counts: dict[str, int] = {}
        for op in self.operations:
            counts[op.state] = counts.get(op.state, 0) + 1
        return dict(sorted(counts.items()))


async def as_of(
    conn: asyncpg.Connection,
    schema: str,
    at: datetime,
    *,
    types: list[str] | None = None,
) -> HistoryAsOf:
    """The state of every operation (of ``types``, default all) at ``at``, from the audit log
    alone: each operation's newest row recorded at or before ``at``. Purged operations are
    there too (their rows are kept); an operation published after ``at`` is not.

    A row counts from its ``recorded_at`` (the database's clock when the change was made); its
    transaction committed a moment later, so for an instant within a transaction's lifetime the
    answer is what that transaction did, not what other sessions could see yet."""
    q = queries(schema)
    found: list[StateAt] = []
    before = 2**63 - 1
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        archived = await q["archive_latest"].fetchrow(conn)
        if archived is not None and at < archived["before"]:
            raise CheckpointError(
                f"the audit rows recorded before {_iso(archived['before'])} were archived "
                f"(archive {archived['id']}), so the log no longer holds every operation's state "
                f"at {_iso(at)}: give an instant at or after {_iso(archived['before'])}, or "
                "load the archive's CSV files into a scratch table and ask them"
            )
        while True:
            page = await q["anchor_as_of"].fetch(
                conn, before_operation_id=before, at=at, types=types or [], limit=_PAGE
            )
            if not page:
                break
            found.extend(
                StateAt(
                    r["operation_id"],
                    r["operation_type"],
                    r["to_state"],
                    r["seq"],
                    r["trigger"],
                    r["attempt"],
                    r["recorded_at"],
                )
                for r in page
            )
            before = page[-1]["operation_id"]
        if archived is not None:
            # An operation whose every row by then was archived: its archive head's state.
            seen = {state.operation_id for state in found}
            async for start in archive_starts(conn, schema):
                if start["operation_id"] not in seen and (
                    not types or start["operation_type"] in types
                ):
                    found.append(
                        StateAt(
                            start["operation_id"],
                            start["operation_type"],
                            start["to_state"],
                            start["seq"],
                            start["trigger"],
                            start["attempt"],
                            start["recorded_at"],
                        )
                    )
    found.sort(key=lambda state: state.operation_id)
    return HistoryAsOf(at, found)
