"""Archiving whole months of the audit log: export, verify against a checkpoint, then drop
(``pgoutbox audit archive --before MONTH -o DIR``; docs/audit.md).

``audit_log`` is partitioned by month of ``recorded_at`` (revision 0014). An archive, run as
the schema's owner:

1. takes a signed checkpoint (``checkpoint.json`` and its heads file) and requires its horizon
   to be past ``before``: then no transaction that could still add a row before ``before`` is
   open, and every row the archive takes is covered;
2. exports each month's partition before ``before`` to ``audit_log_yYYYYmMM.csv`` (PostgreSQL's
   CSV, header line; ``recorded_at`` in UTC, its microseconds since the epoch as
   ``recorded_at_us``, bytea as ``\\x`` hex), sorted by operation and seq; ``COPY ... FROM ...
   CSV HEADER`` loads one back;
3. checks the export: every row's hash recomputes from its contents and its predecessor's
   hash; each chain starts at seq 1, or where the previous archive left it; where the
   checkpoint's head of an operation is an archived row, that row's hash is the head's;
4. records the archive and each archived operation's last archived row (``audit_archives``,
   ``audit_archive_heads``, also written to ``archive-heads.csv``) and, in the same
   transaction, walks the rows left (recorded at or after ``before``) from those heads against
   the checkpoint, as ``audit verify --checkpoint`` will after the drop; only when all of that
   holds does it detach and drop the partitions, and commit;
5. writes ``archive.json``: the files with their sha256 and row counts, signed with the same
   key, so ``audit verify --archive DIR`` can later prove that the database's archive heads
   (where verification starts) are the ones exported.

Nothing is dropped unless every check passed; a failure leaves the database as it was and
says why. The files are the only copy of the archived rows afterwards: store them (and the
signed documents) where the database's owner cannot write.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import heapq
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

import pgoutbox_proof as proof
from pgoutbox.anchor import (
    CheckpointError,
    Head,
    archive_starts,
    heads_path_for,
    read_heads,
    take_checkpoint,
    walk,
    write_checkpoint,
)
from pgoutbox.migrations import quote_schema
from pgoutbox.sql import queries

ARCHIVE_FORMAT = "pgoutbox-archive/1"
LOCK_TIMEOUT = "5s"
"""How long dropping the partitions waits for its lock on audit_log before giving up."""

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_PARTITION = re.compile(r"^audit_log_y(\d{4})m(\d{2})$")
EXPORT_COLUMNS = (
    "operation_id", "seq", "operation_type", "from_state", "to_state", "trigger", "attempt",
    "actor", "detail", "recorded_at", "recorded_at_us", "prev_hash", "hash", "db_role",
    "intent_hash",
)  # fmt: skip
HEAD_COLUMNS = (
    "operation_id", "seq", "hash", "to_state", "trigger", "attempt", "recorded_at",
    "operation_type", "created_by", "created_at", "intent_hash",
)  # fmt: skip


class ArchiveError(ValueError):
    """An archive that cannot be made; the message says why and what to do. Nothing was
    dropped."""


def parse_month(value: str) -> datetime:
    """``YYYY-MM`` as the first instant of that month in UTC."""
    match = _MONTH.match(value.strip())
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise ArchiveError(f"{value!r} is not a month: give it as YYYY-MM, e.g. 2026-10")
    return datetime(int(match.group(1)), int(match.group(2)), 1, tzinfo=UTC)


def _month_of(partition: str) -> datetime | None:
    match = _PARTITION.match(partition)
    return None if match is None else datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)


def _next_month(month: datetime) -> datetime:
    return (month + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True)
class ArchiveResult:
    """What one archive took."""

    archive_id: int
    before: datetime
    partitions: list[str]
    rows: int
    operations: int
    directory: Path


# -- reading the export back -------------------------------------------------------------------

# One field of PostgreSQL's CSV: quoted (a NULL is never quoted, an empty string always is).
_FIELD = re.compile(r'"((?:[^"]|"")*)"|([^,]*)')


def _csv_fields(line: str) -> list[str | None]:
    fields: list[str | None] = []
    pos = 0
    while True:
        match = _FIELD.match(line, pos)
        assert match is not None  # the pattern matches the empty string
        quoted, plain = match.groups()
        fields.append(quoted.replace('""', '"') if quoted is not None else (plain or None))
        pos = match.end()
        if pos >= len(line):
            return fields
        pos += 1  # the comma
        if pos == len(line):
            fields.append(None)
            return fields


def _records(path: Path) -> Iterator[list[str | None]]:
    """The records of a CSV file PostgreSQL wrote, after its header; a quoted field may hold
    newlines."""
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline()
        if header.rstrip("\r\n").split(",") != list(EXPORT_COLUMNS):
            raise ArchiveError(f"{str(path)!r} is not a pgoutbox audit export (its header)")
        pending = ""
        for line in f:
            pending += line
            if pending.count('"') % 2:  # inside a quoted field: the record goes on
                continue
            yield _csv_fields(pending.rstrip("\r\n") if pending.endswith("\n") else pending)
            pending = ""
        if pending:
            raise ArchiveError(f"{str(path)!r} ends inside a quoted field: it is truncated")


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value[2:])


def read_export(path: Path) -> Iterator[dict[str, Any]]:
    """The audit rows of one exported partition, as :func:`pgoutbox_proof.row_hash` takes
    them."""
    for number, fields in enumerate(_records(path), start=2):
        if len(fields) != len(EXPORT_COLUMNS):
            raise ArchiveError(f"{str(path)!r} record {number} has {len(fields)} fields")
        row: dict[str, Any] = dict(zip(EXPORT_COLUMNS, fields, strict=True))
        try:
            for name in ("operation_id", "seq", "attempt", "recorded_at_us"):
                row[name] = int(row[name])
            for name in ("prev_hash", "hash", "intent_hash"):
                row[name] = _bytes(row[name])
        except (TypeError, ValueError):
            raise ArchiveError(f"{str(path)!r} record {number} is not an audit row") from None
        row["recorded_at"] = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
            microseconds=row["recorded_at_us"]
        )
        yield row


# -- checking the export -----------------------------------------------------------------------


@dataclass
class ExportCheck:
    """:func:`check_export`'s findings: problems (each naming operation and seq) and, per
    archived operation in order, its new archive head."""

    problems: list[str]
    heads: list[dict[str, Any]]
    rows: int = 0


def check_export(
    rows: Iterator[Mapping[str, Any]],
    previous: Iterator[Mapping[str, Any]],
    checkpoint_heads: Iterator[Head],
) -> ExportCheck:
    """Check exported audit rows, in (operation_id, seq) order, against the previous archive's
    heads (``previous``, in operation order: where those chains went on) and the heads of the
    checkpoint taken before the export. Pure, so property tests drive it directly."""
    result = ExportCheck([], [])
    prev_start = next(previous, None)
    head = next(checkpoint_heads, None)
    chain: dict[str, Any] | None = None

    def close() -> None:
        nonlocal head
        if chain is None:
            return
        op = chain["operation_id"]
        while head is not None and head.operation_id < op:
            head = next(checkpoint_heads, None)
        if head is not None and head.operation_id == op:
            if head.seq < chain["seq"]:
                result.problems.append(
                    f"operation {op} seq {head.seq + 1}: exported, but the checkpoint taken "
                    f"before the export ends the chain at seq {head.seq} (added since, with a "
                    "time in an archived month)"
                )
            elif head.seq == chain["seq"] and head.hash != chain["hash"]:
                result.problems.append(
                    f"operation {op} seq {head.seq}: the exported row differs from the "
                    "checkpoint's head"
                )
        elif head is None or head.operation_id > op:
            result.problems.append(
                f"operation {op}: exported, but the checkpoint taken before the export does "
                "not cover it"
            )
        result.heads.append({k: chain[k] for k in HEAD_COLUMNS})

    for row in rows:
        result.rows += 1
        op, seq = row["operation_id"], row["seq"]
        if chain is None or op != chain["operation_id"]:
            if chain is not None and op < chain["operation_id"]:
                result.problems.append(f"operation {op} seq {seq}: the export is out of order")
                break
            close()
            while prev_start is not None and prev_start["operation_id"] < op:
                prev_start = next(previous, None)
            start = prev_start if prev_start and prev_start["operation_id"] == op else None
            chain = {
                "operation_id": op,
                "seq": start["seq"] if start else 0,
                "hash": bytes(start["hash"]) if start else None,
                "operation_type": start["operation_type"] if start else row["operation_type"],
                "created_by": start["created_by"] if start else row["actor"],
                "created_at": start["created_at"] if start else row["recorded_at"],
                "intent_hash": start["intent_hash"] if start else row.get("intent_hash"),
            }
        if seq != chain["seq"] + 1:
            result.problems.append(
                f"operation {op} seq {chain['seq'] + 1}: row missing from the export (next "
                f"found is seq {seq})"
            )
        elif row["prev_hash"] != chain["hash"]:
            result.problems.append(
                f"operation {op} seq {seq}: prev_hash does not match the previous row's hash"
            )
        elif proof.row_hash(chain["hash"], row) != row["hash"]:
            result.problems.append(f"operation {op} seq {seq}: hash does not match its contents")
        if result.problems:
            break
        chain.update(
            seq=seq,
            hash=row["hash"],
            to_state=row["to_state"],
            trigger=row["trigger"],
            attempt=row["attempt"],
            recorded_at=row["recorded_at"],
        )
    if not result.problems:
        close()
    return result


# -- the archive -------------------------------------------------------------------------------


async def _partitions_before(conn: asyncpg.Connection, schema: str, before: datetime) -> list[str]:
    names = [r["name"] for r in await queries(schema)["archive_partitions"].fetch(conn)]
    months = {name: _month_of(name) for name in names}
    chosen = sorted(
        (n for n, m in months.items() if m is not None and _next_month(m) <= before),
        key=lambda n: months[n] or before,
    )
    if not chosen:
        oldest = min((m for m in months.values() if m is not None), default=None)
        held = f"the oldest partition holds {oldest:%Y-%m}" if oldest else "there is none"
        raise ArchiveError(
            f"no month of the audit log ends by {before:%Y-%m-%d} ({held}): nothing to archive"
        )
    return chosen


async def archive(
    conn: asyncpg.Connection,
    schema: str,
    before: datetime,
    directory: Path,
    private_key: Any,
    *,
    progress: Callable[[str], None] | None = None,
) -> ArchiveResult:
    """Archive every month of ``schema``'s audit log that ends by ``before`` (a month's first
    instant) into ``directory`` (created; must be empty), as the module describes. Raises
    :class:`ArchiveError` (nothing dropped) when it cannot."""
    q = queries(schema)
    s = quote_schema(schema)
    say = progress or (lambda _: None)
    if before != parse_month(f"{before.astimezone(UTC):%Y-%m}"):
        raise ArchiveError(f"{before.isoformat()} is not the first instant of a month in UTC")
    checks = await q["archive_preconditions"].fetchrow(conn, before=before)
    assert checks is not None
    now: datetime = checks["now"]
    if before > now:
        raise ArchiveError(
            f"rows are still being recorded before {before:%Y-%m-%d}: give a month up to "
            f"{now.astimezone(UTC):%Y-%m} (the current one takes every month before it)"
        )
    latest = await q["archive_latest"].fetchrow(conn)
    if latest is not None and before <= latest["before"]:
        raise ArchiveError(
            f"archive {latest['id']} already took every row recorded before "
            f"{latest['before']:%Y-%m-%d}: give a later month"
        )
    if not checks["owner"]:
        raise ArchiveError(
            "an archive drops partitions of audit_log: run it as the schema's owner (the role "
            "that ran the migrations)"
        )
    partitions = await _partitions_before(conn, schema, before)
    stray = checks["stray"]
    if stray:
        raise ArchiveError(
            f"audit_log_default holds {stray} rows recorded before {before:%Y-%m-%d}, in "
            "months with no partition of their own: they cannot be archived by month"
        )
    _prepare(directory)

    say("taking a checkpoint")
    checkpoint_path = directory / "checkpoint.json"
    heads_path = heads_path_for(checkpoint_path)
    document = await take_checkpoint(conn, schema, private_key, heads_path)
    write_checkpoint(document, checkpoint_path)
    horizon = document["horizon"]
    if horizon is None or datetime.fromisoformat(horizon.replace("Z", "+00:00")) <= before:
        raise ArchiveError(
            "a transaction open since before "
            f"{before:%Y-%m-%d} (or one this role cannot see) may still add rows there: let it "
            "end, then run the archive again"
        )

    say(f"exporting {len(partitions)} partitions")
    files: dict[str, dict[str, Any]] = {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        export = q["archive_export"]
        for name in partitions:
            path = directory / f"{name}.csv"
            month = _month_of(name)
            assert month is not None  # _partitions_before keeps months only
            await conn.copy_from_query(
                export.asyncpg_sql,
                *export.args(month_start=month, month_end=_next_month(month)),
                output=str(path),
                format="csv",
                header=True,
            )
            files[path.name] = {"sha256": _sha256(path)}

    say("checking the export against the checkpoint")
    readers = [read_export(directory / name) for name in files]
    merged = heapq.merge(*readers, key=lambda r: (r["operation_id"], r["seq"]))
    previous = [start async for start in archive_starts(conn, schema)]
    for start in previous:  # the previous archive's view of where each chain started
        start["created_by"], start["created_at"] = start["published_by"], start["published_at"]
    checked = check_export(merged, iter(previous), read_heads(heads_path))
    if checked.problems:
        raise ArchiveError(
            "the export does not match the audit log as the checkpoint covers it; nothing was "
            "dropped:\n  " + "\n  ".join(checked.problems[:20])
        )
    heads_csv = directory / "archive-heads.csv"
    _write_heads(checked.heads, heads_csv)

    say("recording the archive and verifying what is left")
    async with conn.transaction(isolation="repeatable_read"):
        archive_id: int = await q["archive_record"].fetchval(
            conn,
            before=before,
            partitions=partitions,
            rows=checked.rows,
            operations=len(checked.heads),
            checkpoint=json.dumps(document),
        )
        await conn.copy_records_to_table(
            "audit_archive_heads",
            schema_name=schema,
            columns=("archive_id", *HEAD_COLUMNS),
            records=[(archive_id, *(h[c] for c in HEAD_COLUMNS)) for h in checked.heads],
        )
        walker = await walk(conn, schema, document, read_heads(heads_path), since=before)
        if walker.problems:
            raise ArchiveError(
                "the audit log left after the archive would not verify against the checkpoint; "
                "nothing was dropped:\n  " + "\n  ".join(str(p) for p in walker.problems[:20])
            )
        manifest = _manifest(
            schema, archive_id, before, partitions, files, checked, heads_csv, private_key
        )
        (directory / "archive.json").write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        say("dropping the archived partitions")
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        try:
            for name in partitions:
                await conn.execute(f"ALTER TABLE {s}.audit_log DETACH PARTITION {s}.{name}")
                await conn.execute(f"DROP TABLE {s}.{name}")
        except asyncpg.LockNotAvailableError:
            (directory / "archive.json").unlink()
            raise ArchiveError(
                f"audit_log stayed locked by other sessions for {LOCK_TIMEOUT} (a long "
                "verification or report?): nothing was dropped; run the archive again"
            ) from None
    return ArchiveResult(
        archive_id, before, partitions, checked.rows, len(checked.heads), directory
    )


def _prepare(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        raise ArchiveError(f"{str(directory)!r} is not empty: give a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _head_line(head: Mapping[str, Any]) -> list[str]:
    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).hex()
        if isinstance(value, datetime):
            return str(proof.micros(value))
        return str(value)

    return [text(head[c]) for c in HEAD_COLUMNS]


def _write_heads(heads: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(HEAD_COLUMNS)
        out.writerows(_head_line(h) for h in heads)


def heads_digest(heads: Iterator[Mapping[str, Any]]) -> str:
    """sha256 over archive heads as ``archive-heads.csv`` lists them (times in microseconds,
    bytes in hex): what the signed manifest holds of them."""
    digest = hashlib.sha256()
    for head in heads:
        digest.update((",".join(_head_line(head)) + "\n").encode())
    return digest.hexdigest()


def _manifest(
    schema: str,
    archive_id: int,
    before: datetime,
    partitions: list[str],
    files: dict[str, dict[str, Any]],
    checked: ExportCheck,
    heads_csv: Path,
    private_key: Any,
) -> dict[str, Any]:
    public = private_key.public_key()
    document: dict[str, Any] = {
        "format": ARCHIVE_FORMAT,
        "schema": schema,
        "archive_id": archive_id,
        "before": before.isoformat().replace("+00:00", "Z"),
        "partitions": partitions,
        "files": files,
        "rows": checked.rows,
        "operations": len(checked.heads),
        "heads_file": {"name": heads_csv.name, "sha256": _sha256(heads_csv)},
        "heads_digest": heads_digest(iter(checked.heads)),
        "checkpoint_file": "checkpoint.json",
        "key_id": proof.key_id(proof.public_key_raw(public)),
    }
    document["signature"] = base64.b64encode(
        private_key.sign(proof.signing_bytes(document))
    ).decode()
    return document


def read_manifest(directory: Path, public_key: Any) -> dict[str, Any]:
    """An archive directory's ``archive.json``, its signature checked, and every file it lists
    still as exported. Raises :class:`CheckpointError` naming what does not check."""
    from cryptography.exceptions import InvalidSignature

    path = directory / "archive.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the archive manifest {str(path)!r}: {exc}") from None
    if manifest.get("format") != ARCHIVE_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a pgoutbox archive manifest")
    try:
        public_key.verify(
            base64.b64decode(manifest.get("signature", "")), proof.signing_bytes(manifest)
        )
    except (InvalidSignature, ValueError):
        raise CheckpointError(
            f"{str(path)!r}: the signature does not check with this public key"
        ) from None
    listed = {**manifest["files"], manifest["heads_file"]["name"]: manifest["heads_file"]}
    for name, entry in listed.items():
        file = directory / name
        if not file.exists() or _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{str(file)!r} is missing or not the file the archive wrote")
    return manifest


async def verify_archive_heads(
    conn: asyncpg.Connection, schema: str, manifest: Mapping[str, Any]
) -> list[str]:
    """Problems with the database's record of a (signed, checked) archive: its heads, where
    verification of the rows left starts, must be the ones the archive exported."""
    rows = await queries(schema)["archive_heads_of"].fetch(conn, archive_id=manifest["archive_id"])
    if (
        len(rows) != manifest["operations"]
        or heads_digest(iter(dict(r) for r in rows)) != manifest["heads_digest"]
    ):
        return [
            f"archive {manifest['archive_id']}: the database's archive heads "
            f"({len(rows)} operations) are not the {manifest['operations']} the archive "
            "exported (audit_archive_heads was rewritten): verification would start from "
            "false places"
        ]
    return []
