"""The auditor's side of pgoutbox's anchored audit: checkpoints and inclusion proofs, offline.

This package needs nothing of pgoutbox's database stack (no asyncpg, SQLAlchemy, Alembic): only
the standard library, and ``cryptography`` for Ed25519 signatures. An auditor can check a proof
with ``python -m pgoutbox_proof proof.json --public-key key.pub`` on a machine that has never
seen the database.

What is hashed (docs/audit.md says why):

- an audit row: ``sha256(prev_hash || encoding)``, the encoding the database's triggers use
  (:func:`canonical_encoding`);
- an operation's recorded intent: :func:`intent_hash`;
- a checkpoint's leaf, one per operation whose audit rows its snapshot saw, in operation order:
  :func:`head_leaf` (the operation, the seq and hash of its chain's newest row in the snapshot,
  and the intent hash while the operation row exists);
- the tree over the leaves as RFC 6962 does (RFC 9162 section 2.1): a leaf is
  ``sha256(0x00 || data)``, a node ``sha256(0x01 || left || right)``, the split at the largest
  power of two below the size.

A checkpoint is a JSON object signed with Ed25519 over :func:`signing_bytes` (the object without
its ``signature``, as canonical JSON).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

CHECKPOINT_FORMAT = "pgoutbox-checkpoint/1"
PROOF_FORMAT = "pgoutbox-proof/1"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ProofError(ValueError):
    """A checkpoint, heads file or proof that does not check; the message says what failed."""


# -- encodings ---------------------------------------------------------------------------------


def field(value: str | None) -> str:
    """One field of an encoding: ``<length>:<value>|``, or ``~|`` for NULL."""
    return "~|" if value is None else f"{len(value)}:{value}|"


def micros(moment: datetime) -> int:
    """A timestamp as integer microseconds since the Unix epoch (as the database encodes it)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def canonical_encoding(row: Mapping[str, Any]) -> bytes:
    """The bytes an audit row's hash covers after its ``prev_hash``: every field as
    ``<length>:<value>|`` (NULL ``~|``) in the order operation_id, seq, operation_type,
    from_state, to_state, trigger, attempt, actor, detail, then ``recorded_at`` in microseconds
    since the epoch and ``|``, then ``db_role`` when the row has one (rows written before
    revision 0010 have none), then the hex of ``intent_hash`` when it has one (seq 1 from
    revision 0013 on). ``recorded_at`` is a datetime, or ``recorded_at_us`` an int."""
    at = row["recorded_at_us"] if "recorded_at_us" in row else micros(row["recorded_at"])
    db_role = row.get("db_role")
    intent = row.get("intent_hash")
    if isinstance(intent, bytes | bytearray | memoryview):
        intent = bytes(intent).hex()
    values = (
        str(row["operation_id"]),
        str(row["seq"]),
        row["operation_type"],
        row["from_state"],
        row["to_state"],
        row["trigger"],
        str(row["attempt"]),
        row["actor"],
        row["detail"],
    )
    # field() inlined: this runs once per audit row of every verification.
    encoded = "".join(["~|" if v is None else f"{len(v)}:{v}|" for v in values])
    encoded += f"{at}|"
    if db_role is not None:
        encoded += field(db_role)
    if intent is not None:
        encoded += field(intent)
    return encoded.encode()


def row_hash(prev_hash: bytes | None, row: Mapping[str, Any]) -> bytes:
    """The hash an audit row must carry, given its fields and its predecessor's hash."""
    return hashlib.sha256((prev_hash or b"") + canonical_encoding(row)).digest()


INTENT_FIELDS = (
    "operation_type",
    "channel",
    "lifecycle",
    "payload",
    "idempotency_key",
    "created_by",
)


def intent_hash(intent: Mapping[str, Any]) -> bytes:
    """sha256 of an operation's recorded intent: its type, channel, lifecycle, payload (as the
    database prints the jsonb), idempotency key, creator and creation time, encoded as audit rows
    are. ``created_at`` is a datetime, or ``created_at_us`` an int."""
    at = intent["created_at_us"] if "created_at_us" in intent else micros(intent["created_at"])
    encoded = "".join(field(intent[name]) for name in INTENT_FIELDS) + f"{at}|"
    return hashlib.sha256(b"pgoutbox intent v1|" + encoded.encode()).digest()


def head_leaf(operation_id: int, seq: int, head_hash: bytes, intent: bytes | None) -> bytes:
    """A checkpoint's leaf data for one operation: its id, the seq and hash of the newest audit
    row the snapshot saw, and the hash of its intent (None once the operation row is purged)."""
    encoded = (
        "pgoutbox head v1|"
        + field(str(operation_id))
        + field(str(seq))
        + field(head_hash.hex())
        + field(None if intent is None else intent.hex())
    )
    return encoded.encode()


# -- the Merkle tree (RFC 6962 / RFC 9162 section 2.1) ----------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """``sha256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``sha256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of a tree without leaves (RFC 9162: the hash of the empty string)."""


class TreeBuilder:
    """The root of a tree whose leaf hashes arrive one by one, in O(log n) memory: a stack of
    the roots of complete subtrees, merged when two of the same size meet. Folding the stack
    from the right gives the RFC 6962 root (its split at the largest power of two below n)."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.size = 0

    def add(self, leaf: bytes) -> None:
        """Append a leaf's hash (:func:`leaf_hash` of its data)."""
        size, node = 1, leaf
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            size, node = left_size + size, node_hash(left, node)
        self._stack.append((size, node))
        self.size += 1

    def root(self) -> bytes:
        """The tree's root hash so far."""
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node


def tree_root(leaves: Iterable[bytes]) -> bytes:
    """The root over these leaf hashes."""
    builder = TreeBuilder()
    for leaf in leaves:
        builder.add(leaf)
    return builder.root()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def inclusion_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 6962's audit path of leaf ``index`` in the tree over ``leaves`` (leaf hashes)."""
    if not 0 <= index < len(leaves):
        raise ProofError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(tree_root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(tree_root(leaves[lo : lo + k]))
            lo = lo + k
    path.reverse()  # from the leaf's sibling up to the root's other child
    return path


def path_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges ``[lo, hi)`` whose roots make the audit path of leaf ``index`` in a tree
    of ``size`` leaves, from the leaf's sibling up: disjoint, and with the leaf they cover the
    tree."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo = lo + k
    ranges.reverse()
    return ranges


def inclusion_path_of_stream(leaves: Iterable[bytes], index: int, size: int) -> list[bytes]:
    """:func:`inclusion_path` from leaf hashes streamed in order, in O(log n) memory: each
    leaf goes to the builder of the path range holding it."""
    ranges = path_ranges(index, size)
    builders = [TreeBuilder() for _ in ranges]
    for position, leaf in enumerate(leaves):
        for (lo, hi), builder in zip(ranges, builders, strict=True):
            if lo <= position < hi:
                builder.add(leaf)
                break
    for (lo, hi), builder in zip(ranges, builders, strict=True):
        if builder.size != hi - lo:
            raise ProofError(f"the leaves end before the tree's {size}")
    return [builder.root() for builder in builders]


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root an audit path leads to (RFC 9162 section 2.1.3.2); :class:`ProofError` when the
    path cannot belong to a tree of ``size`` leaves."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            raise ProofError("the audit path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the audit path is shorter than the tree is deep")
    return node


# -- checkpoints and keys ---------------------------------------------------------------------


def signing_bytes(document: Mapping[str, Any]) -> bytes:
    """What a checkpoint's signature covers: the document without ``signature``, as JSON with
    sorted keys and no spaces."""
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def key_id(public_key_raw: bytes) -> str:
    """A public key's short name: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def require_cryptography() -> None:
    """Raise :class:`ProofError` saying what to install when ``cryptography`` is missing."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ProofError(
            "signing and checking checkpoints needs the cryptography package: "
            "pip install 'pgoutbox[audit]' (or pip install cryptography)"
        ) from None


def load_public_key(text: str | bytes) -> Any:
    """An Ed25519 public key from PEM (what ``pgoutbox audit keygen`` writes) or from the
    base64 of its 32 raw bytes."""
    require_cryptography()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = text.encode() if isinstance(text, str) else text
    try:
        if b"-----BEGIN" in data:
            key = load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except ValueError as exc:
        raise ProofError(f"not an Ed25519 public key (PEM or base64): {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ProofError("the public key is not an Ed25519 key")
    return key


def public_key_raw(public_key: Any) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw: bytes = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return raw


def public_key_pem(public_key: Any) -> bytes:
    """An Ed25519 public key as PEM (what ``pgoutbox audit keygen`` writes)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pem: bytes = public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return pem


def check_checkpoint(document: Mapping[str, Any], public_key: Any) -> None:
    """Raise :class:`ProofError` unless ``document`` is a checkpoint signed by ``public_key``."""
    require_cryptography()
    from cryptography.exceptions import InvalidSignature

    if document.get("format") != CHECKPOINT_FORMAT:
        raise ProofError(f"not a pgoutbox checkpoint (format {document.get('format')!r})")
    expected = key_id(public_key_raw(public_key))
    if document.get("key_id") != expected:
        raise ProofError(
            f"the checkpoint was signed by key {document.get('key_id')!r}, not by this public "
            f"key ({expected})"
        )
    try:
        signature = base64.b64decode(str(document.get("signature", "")), validate=True)
        public_key.verify(signature, signing_bytes(document))
    except (InvalidSignature, ValueError):
        raise ProofError(
            "the checkpoint's signature does not check: it was altered after signing"
        ) from None


# -- inclusion proofs -------------------------------------------------------------------------


def check_proof(proof: Mapping[str, Any], public_key: Any) -> str:
    """Check an inclusion proof (``pgoutbox audit prove``) offline: the checkpoint's signature,
    every row's hash chain from seq 1 to the covered head, the intent, and the audit path from
    the operation's leaf to the signed root. Returns a one-line summary; raises
    :class:`ProofError` naming what failed."""
    if proof.get("format") != PROOF_FORMAT:
        raise ProofError(f"not a pgoutbox proof (format {proof.get('format')!r})")
    checkpoint = proof["checkpoint"]
    check_checkpoint(checkpoint, public_key)
    operation_id = int(proof["operation_id"])
    rows = proof["rows"]
    prev: bytes | None = None
    for number, row in enumerate(rows, start=1):
        if row.get("operation_id") != operation_id or row.get("seq") != number:
            raise ProofError(
                f"operation {operation_id} seq {number}: the proof's rows are not the "
                "operation's seq 1, 2, 3..."
            )
        if (bytes.fromhex(row["prev_hash"]) if row["prev_hash"] else None) != prev:
            raise ProofError(f"operation {operation_id} seq {number}: prev_hash does not chain")
        prev = row_hash(prev, row)
        if prev.hex() != row["hash"]:
            raise ProofError(
                f"operation {operation_id} seq {number}: hash does not match the row's contents"
            )
    if prev is None:
        raise ProofError(f"operation {operation_id}: the proof holds no audit rows")
    intent = proof.get("intent")
    intent_digest = None if intent is None else intent_hash(intent)
    leaf = leaf_hash(head_leaf(operation_id, len(rows), prev, intent_digest))
    path = [bytes.fromhex(h) for h in proof["path"]]
    root = root_from_path(leaf, int(proof["leaf_index"]), int(checkpoint["size"]), path)
    if root.hex() != checkpoint["root"]:
        raise ProofError(
            f"operation {operation_id}: its rows (seq 1 to {len(rows)}) and intent do not lead "
            "to the checkpoint's signed root: they are not what the checkpoint covered"
        )
    return (
        f"OK: operation {operation_id}, audit rows 1 to {len(rows)}, is covered by the "
        f"checkpoint of {checkpoint['taken_at']} (root {checkpoint['root'][:16]}…, "
        f"{checkpoint['size']} operations) signed by key {checkpoint['key_id']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pgoutbox_proof PROOF.json --public-key KEY``: exit 0 and print a summary
    when the proof checks, exit 1 naming what failed."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pgoutbox_proof", description=main.__doc__)
    parser.add_argument("proof", help="a proof written by `pgoutbox audit prove`")
    parser.add_argument("--public-key", required=True, help="the checkpoint key's public half")
    args = parser.parse_args(argv)
    try:
        with open(args.proof, encoding="utf-8") as f:
            proof = json.load(f)
        with open(args.public_key, "rb") as f:
            key = load_public_key(f.read())
        print(check_proof(proof, key))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0
