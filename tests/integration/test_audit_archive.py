"""Archiving whole months of the partitioned audit log (issue 17, ``pgoutbox audit archive``):
the export matches the checkpoint taken with it, the months are dropped, and verification keeps
working across the boundary from the archive heads, also against a checkpoint taken before the
archive; a rewritten archive head is caught by the signed manifest; bad requests change nothing.

History in past months is made as the schema's owner: operations are published and run now,
then their chains are moved back in time with their hashes and intent recomputed.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from anchorkit import Signer, chain, named, publish, rewrite_chain, run, transition, triggers_off

import pgoutbox_proof as proof
from pgoutbox import anchor, archive
from pgoutbox.audit import verify_chains, verify_operation_chain
from pgoutbox.settings import DatabaseSettings

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"
DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"
BACK = timedelta(days=62)  # two months or a little more: a month before this one


def _shape(line: str) -> str:
    """A line with its numbers, months, paths and how many partitions set aside."""
    return re.sub(r"\S*/\S*|[\d-]+", "N", line).replace(", audit_log_yNmN", "")


def this_month() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


async def move_back(conn: asyncpg.Connection, s: str, ids: list[int], delta: timedelta) -> None:
    """As the owner: ``ids``' whole histories (and creation) ``delta`` earlier, hashes, intent
    and recorded heads recomputed, so they verify as if written then."""
    for op in ids:
        for row in await chain(conn, s, op):
            await conn.execute(
                f'SELECT "{s}".audit_log_add_partition($1)', row["recorded_at"] - delta
            )
    async with triggers_off(conn, s, "audit_log", "operations"):
        for op in ids:
            rows = await chain(conn, s, op)
            rows = [{**r, "recorded_at": r["recorded_at"] - delta} for r in rows]
            await conn.execute(
                f'UPDATE "{s}".operations SET created_at = created_at - CAST($2 AS interval), '
                "updated_at = updated_at - CAST($2 AS interval) WHERE id = $1",
                op,
                delta,
            )
            intent = await conn.fetchrow(
                "SELECT operation_type, channel, lifecycle, CAST(payload AS text) AS payload, "
                f'idempotency_key, created_by, created_at FROM "{s}".operations WHERE id = $1',
                op,
            )
            rows[0]["intent_hash"] = anchor._intent_of(dict(intent))
            await rewrite_chain(conn, s, op, rows)


async def old_history(conn: asyncpg.Connection, s: str) -> dict[str, int]:
    """Operations that ran two months ago, and one published then that goes on now."""
    histories = ["succeeded", "retried", "dead", "pending"]
    ids = await publish(conn, s, len(histories) + 1)
    named_ids = dict(zip([*histories, "ongoing"], ids, strict=True))
    for history in histories:
        await run(conn, s, named_ids[history], history)
    await run(conn, s, named_ids["ongoing"], "running")  # claimed two months ago...
    await move_back(conn, s, ids, BACK)
    ongoing = named_ids["ongoing"]  # ... lost, and run again now
    await transition(conn, s, ongoing, "fail", "failed")
    await transition(conn, s, ongoing, "claim", "claimed")
    await transition(conn, s, ongoing, "succeed", "succeeded")
    return named_ids


async def partition_of(conn: asyncpg.Connection, s: str, moment: datetime) -> str | None:
    name = f"audit_log_y{moment:%Y}m{moment:%m}"
    found: str | None = await conn.fetchval("SELECT to_regclass($1)::text", f'"{s}".{name}')
    return found


async def test_archive_exports_checks_and_drops_and_verification_crosses_the_boundary(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    ids = await old_history(conn, s)
    recent = await publish(conn, s, 2)
    await run(conn, s, recent[0], "succeeded")
    signer = Signer(tmp_path)
    before_archive = await signer.checkpoint(conn, s)
    old_month = (datetime.now(UTC) - BACK).replace(day=1)
    old_rows = await conn.fetchval(
        f'SELECT count(*) FROM "{s}".audit_log WHERE recorded_at < $1', this_month()
    )
    assert old_rows == 3 + 5 + 3 + 1 + 2  # each history with its publication, moved back
    assert await partition_of(conn, s, old_month) is not None

    out = tmp_path / "archive"
    result = await archive.archive(conn, s, this_month(), out, signer.key)

    assert result.rows == old_rows
    assert result.operations == 5
    assert await partition_of(conn, s, old_month) is None
    assert (
        await conn.fetchval(
            f'SELECT count(*) FROM "{s}".audit_log WHERE recorded_at < $1', this_month()
        )
        == 0
    )
    manifest = archive.read_manifest(out, signer.public)
    assert manifest["rows"] == old_rows
    assert manifest["archive_id"] == result.archive_id
    exported = list(archive.read_export(out / f"{result.partitions[0]}.csv"))
    assert {r["operation_id"] for r in exported} == set(ids.values())
    # Each exported row still hashes as the database wrote it.
    assert all(proof.row_hash(r["prev_hash"], r) == r["hash"] for r in exported)

    # Verification goes on from the archive heads: plain, with the rules, against the checkpoint
    # taken before the archive, and against the archive's own.
    assert (await verify_chains(conn, s)).ok
    assert (await signer.verify(conn, s, None)).ok
    across = await signer.verify(conn, s, before_archive)
    assert across.ok, across.failures()
    assert across.covered_operations == 7
    own = out / "checkpoint.json"
    document = anchor.read_checkpoint(own, signer.public)
    heads = anchor.read_heads(anchor.heads_path_for(own))
    assert (await anchor.verify_against_checkpoint(conn, s, document, heads)).ok
    assert await archive.verify_archive_heads(conn, s, manifest) == []
    with pytest.raises(anchor.CheckpointError, match="no longer in the database"):
        await anchor.prove(conn, s, ids["ongoing"], document, anchor.heads_path_for(own))
    one = await verify_operation_chain(conn, s, ids["ongoing"])
    assert one.ok
    assert one.rows == 3

    # The state of every operation now, archived or not, from the log alone.
    now = await conn.fetchval("SELECT clock_timestamp()")
    history = await anchor.as_of(conn, s, now)
    states = {o.operation_id: o.state for o in history.operations}
    assert states == {
        ids["succeeded"]: "succeeded",
        ids["retried"]: "succeeded",
        ids["dead"]: "dead",
        ids["pending"]: "pending",
        ids["ongoing"]: "succeeded",
        recent[0]: "succeeded",
        recent[1]: "pending",
    }
    with pytest.raises(anchor.CheckpointError, match="were archived"):
        await anchor.as_of(conn, s, this_month() - timedelta(days=1))


async def test_a_rewritten_archive_head_or_a_gap_after_it_is_caught(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    ids = await old_history(conn, s)
    other = await publish(conn, s, 1)  # published and claimed then, failed and claimed now
    await run(conn, s, other[0], "running")
    await move_back(conn, s, other, BACK)
    await transition(conn, s, other[0], "fail", "failed")
    await transition(conn, s, other[0], "claim", "claimed")
    signer = Signer(tmp_path)
    out = tmp_path / "archive"
    await archive.archive(conn, s, this_month(), out, signer.key)
    manifest = archive.read_manifest(out, signer.public)
    ongoing = ids["ongoing"]
    live = await chain(conn, s, ongoing)
    first_live = live[0]["seq"]

    # The owner deletes the first row left and moves the archive head over it: the chain from
    # the head verifies, so only the signed manifest can tell.
    async with triggers_off(conn, s, "audit_log", "audit_archive_heads"):
        await conn.execute(
            f'DELETE FROM "{s}".audit_log WHERE operation_id = $1 AND seq = $2', ongoing, first_live
        )
        await conn.execute(
            f'UPDATE "{s}".audit_archive_heads SET seq = $2, hash = $3, to_state = $4, '
            "trigger = $5, attempt = $6, recorded_at = $7 WHERE operation_id = $1",
            ongoing,
            first_live,
            live[0]["hash"],
            live[0]["to_state"],
            live[0]["trigger"],
            live[0]["attempt"],
            live[0]["recorded_at"],
        )
    assert (await verify_chains(conn, s)).ok
    problems = await archive.verify_archive_heads(conn, s, manifest)
    assert len(problems) == 1
    assert "audit_archive_heads was rewritten" in problems[0]

    # A row missing right after an archive head is a gap, named.
    async with triggers_off(conn, s, "audit_log"):
        await conn.execute(
            f'DELETE FROM "{s}".audit_log WHERE operation_id = $1 AND seq = 3', other[0]
        )
    result = await signer.verify(conn, s, None)
    assert (other[0], 3, "chain") in named(result), result.failures()


async def test_an_archive_that_cannot_be_made_changes_nothing(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    signer = Signer(tmp_path)
    await old_history(conn, s)
    rows = await conn.fetchval(f'SELECT count(*) FROM "{s}".audit_log')

    for month in ("2026-13", "26-10", "October", ""):
        with pytest.raises(archive.ArchiveError, match="is not a month: give it as YYYY-MM"):
            archive.parse_month(month)
    with pytest.raises(archive.ArchiveError, match="is not the first instant of a month"):
        await archive.archive(
            conn, s, this_month() + timedelta(hours=1), tmp_path / "x", signer.key
        )
    next_month = (this_month() + timedelta(days=32)).replace(day=1)
    with pytest.raises(archive.ArchiveError, match="rows are still being recorded before"):
        await archive.archive(conn, s, next_month, tmp_path / "x", signer.key)
    with pytest.raises(archive.ArchiveError, match="no month of the audit log ends by 2000-01-01"):
        await archive.archive(
            conn, s, datetime(2000, 1, 1, tzinfo=UTC), tmp_path / "early", signer.key
        )
    assert not (tmp_path / "early").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(archive.ArchiveError, match="is not empty"):
        await archive.archive(conn, s, this_month(), tmp_path / "full", signer.key)
    # Another role than the owner may not drop partitions: refused before anything is written.
    role = f"r_{os.urandom(4).hex()}"
    await conn.execute(f'CREATE ROLE "{role}"')
    await conn.execute(f'GRANT USAGE ON SCHEMA "{s}" TO "{role}"')
    await conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{s}" TO "{role}"')
    try:
        async with conn.transaction():
            await conn.execute(f'SET LOCAL ROLE "{role}"')
            with pytest.raises(archive.ArchiveError, match="run it as the schema's owner"):
                await archive.archive(conn, s, this_month(), tmp_path / "other", signer.key)
    finally:
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')
    assert not (tmp_path / "other").exists()
    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".audit_log') == rows

    await archive.archive(conn, s, this_month(), tmp_path / "a1", signer.key)
    with pytest.raises(archive.ArchiveError, match="already took every row recorded before"):
        await archive.archive(conn, s, this_month(), tmp_path / "a2", signer.key)


def test_the_export_check_names_a_changed_row_and_a_gap() -> None:
    rows: list[dict[str, Any]] = []
    prev: bytes | None = None
    at = datetime(2026, 9, 1, tzinfo=UTC)
    for seq, (frm, trig, to, attempt) in enumerate(
        [(None, "publish", "pending", 0), ("pending", "claim", "claimed", 1),
         ("claimed", "succeed", "succeeded", 1)],
        start=1,
    ):  # fmt: skip
        row = {
            "operation_id": 7, "seq": seq, "operation_type": "charge", "from_state": frm,
            "to_state": to, "trigger": trig, "attempt": attempt, "actor": "w", "detail": "",
            "recorded_at": at + timedelta(seconds=seq), "prev_hash": prev, "db_role": "r",
            "intent_hash": None,
        }  # fmt: skip
        row["hash"] = prev = proof.row_hash(prev, row)
        rows.append(row)
    head = anchor.Head(7, 3, rows[-1]["hash"], None)

    assert archive.check_export(iter(rows), iter([]), iter([head])).problems == []
    changed = [rows[0], {**rows[1], "detail": "x"}, rows[2]]
    found = archive.check_export(iter(changed), iter([]), iter([head])).problems
    assert found == ["operation 7 seq 2: hash does not match its contents"]
    gap = archive.check_export(iter([rows[0], rows[2]]), iter([]), iter([head])).problems
    assert gap == ["operation 7 seq 2: row missing from the export (next found is seq 3)"]


async def test_cli_archive_and_verify_archive(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    s = db_settings.schema_name
    await old_history(conn, s)
    private, public = anchor.generate_key()
    (tmp_path / "audit.key").write_bytes(private)
    (tmp_path / "audit.pub").write_bytes(public)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
    env.update(PGOUTBOX_DATABASE__DSN=database_dsn, PGOUTBOX_DATABASE__SCHEMA=s)

    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            str(PGOUTBOX), *args, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await cli("audit", "archive", "--before", "2026-13", "-o", "x")
    assert code == 2
    assert "'2026-13' is not a month" in err
    month = f"{this_month():%Y-%m}"
    out_dir = tmp_path / "archive"
    code, out, err = await cli(
        "audit", "archive", "--before", month, "-o", str(out_dir), "--key",
        str(tmp_path / "audit.key"),
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("archive 1: 14 audit rows of 5 operations recorded before ")
    # docs/audit.md shows this line (with its own numbers and months).
    documented = next(
        line for line in DOC.read_text().splitlines() if line.startswith("archive 1: ")
    )
    assert _shape(out.strip()) == _shape(documented)
    code, out, err = await cli(
        "audit", "verify", "--archive", str(out_dir), "--public-key", str(tmp_path / "audit.pub")
    )
    assert code == 0, err
    assert out.startswith("OK: ")
    (out_dir / "archive-heads.csv").write_text("tampered\n")
    code, out, err = await cli(
        "audit", "verify", "--archive", str(out_dir), "--public-key", str(tmp_path / "audit.pub")
    )
    assert code == 1
    assert "archive-heads.csv" in err
    assert "not the file the archive wrote" in err
