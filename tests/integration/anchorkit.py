"""Helpers of the anchored audit tests: histories written as the schema's owner, checkpoints,
and the hostile DBA's edits (triggers off, hashes recomputed, triggers back on)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

import pgoutbox_proof as proof
from pgoutbox import anchor

HISTORIES: dict[str, Sequence[tuple[str, str]]] = {
    "succeeded": [("claim", "claimed"), ("succeed", "succeeded")],
    "retried": [
        ("claim", "claimed"),
        ("fail", "failed"),
        ("claim", "claimed"),
        ("succeed", "succeeded"),
    ],
    "dead": [("claim", "claimed"), ("give_up", "dead")],
    "running": [("claim", "claimed")],
    "pending": [],
}


async def publish(
    conn: asyncpg.Connection, s: str, n: int, operation_type: str = "charge"
) -> list[int]:
    """``n`` operations, each with its own payload and idempotency key."""
    rows = await conn.fetch(
        f'INSERT INTO "{s}".operations (operation_type, channel, payload, idempotency_key) '
        "SELECT $1, 'workflow', jsonb_build_object('amount', g), 'key-' || g || '-' || "
        "gen_random_uuid() FROM generate_series(1, $2) g RETURNING id",
        operation_type,
        n,
    )
    return sorted(r["id"] for r in rows)


async def transition(
    conn: asyncpg.Connection, s: str, op_id: int, trigger: str, to_state: str
) -> None:
    """One transition as the owner (who may act as worker and operator)."""
    claim = (
        ", attempts = attempts + 1, step_attempts = step_attempts + 1" if trigger == "claim" else ""
    )
    await conn.execute(
        f'UPDATE "{s}".operations SET state = $2, transition = $3, '
        f"transition_actor = 'worker-1', transition_detail = $4{claim} WHERE id = $1",
        op_id,
        to_state,
        trigger,
        f"{trigger} done",
    )


async def run(conn: asyncpg.Connection, s: str, op_id: int, history: str) -> None:
    for trigger, to_state in HISTORIES[history]:
        await transition(conn, s, op_id, trigger, to_state)


async def shop(conn: asyncpg.Connection, s: str) -> dict[str, int]:
    """One operation of each history, by history name."""
    ids = await publish(conn, s, len(HISTORIES))
    for op_id, history in zip(ids, HISTORIES, strict=True):
        await run(conn, s, op_id, history)
    return dict(zip(HISTORIES, ids, strict=True))


class Signer:
    """A key pair and a directory for checkpoints."""

    def __init__(self, directory: Path) -> None:
        private, public = anchor.generate_key()
        self.key = anchor.load_private_key(private)
        self.public = proof.load_public_key(public)
        self.directory = directory
        self.count = 0

    async def checkpoint(self, conn: asyncpg.Connection, s: str) -> Path:
        self.count += 1
        path = self.directory / f"cp{self.count}.json"
        document = await anchor.take_checkpoint(conn, s, self.key, anchor.heads_path_for(path))
        anchor.write_checkpoint(document, path)
        return path

    async def verify(
        self, conn: asyncpg.Connection, s: str, path: Path | None
    ) -> anchor.AnchoredVerification:
        if path is None:
            return await anchor.verify_against_checkpoint(conn, s, None, None)
        document = anchor.read_checkpoint(path, self.public)
        heads = anchor.read_heads(anchor.heads_path_for(path))
        return await anchor.verify_against_checkpoint(conn, s, document, heads)


@asynccontextmanager
async def triggers_off(conn: asyncpg.Connection, s: str, *tables: str) -> AsyncIterator[None]:
    """As the owner: every trigger of ``tables`` off around an edit, then back ENABLE ALWAYS
    (as the migrations left them), in one transaction."""
    async with conn.transaction():
        names: list[tuple[str, str]] = []
        for table in tables:
            qualified = f'"{s}".{table}'
            for (name,) in await conn.fetch(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
                qualified,
            ):
                names.append((qualified, name))
            await conn.execute(f"ALTER TABLE {qualified} DISABLE TRIGGER ALL")
        yield
        for qualified, name in names:
            await conn.execute(f'ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER "{name}"')


async def chain(conn: asyncpg.Connection, s: str, op_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f'SELECT * FROM "{s}".audit_log WHERE operation_id = $1 ORDER BY seq', op_id
    )
    return [dict(r) for r in rows]


async def rewrite_chain(
    conn: asyncpg.Connection,
    s: str,
    op_id: int,
    rows: list[dict[str, Any]],
    *,
    state: str | None = None,
) -> None:
    """Replace ``op_id``'s audit rows by ``rows`` (their hashes recomputed in order) and move the
    operation's recorded head (and state) to match: what a careful DBA would do. Call inside
    :func:`triggers_off` for audit_log and operations."""
    await conn.execute(f'DELETE FROM "{s}".audit_log WHERE operation_id = $1', op_id)
    prev: bytes | None = None
    for seq, row in enumerate(rows, start=1):
        row = {**row, "operation_id": op_id, "seq": seq, "prev_hash": prev}
        row["hash"] = proof.row_hash(prev, row)
        await conn.execute(
            f'INSERT INTO "{s}".audit_log (operation_id, seq, operation_type, from_state, to_state,'
            " trigger, attempt, actor, detail, recorded_at, prev_hash, hash, db_role, intent_hash)"
            " VALUES"
            " ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            op_id,
            seq,
            row["operation_type"],
            row["from_state"],
            row["to_state"],
            row["trigger"],
            row["attempt"],
            row["actor"],
            row["detail"],
            row["recorded_at"],
            prev,
            row["hash"],
            row["db_role"],
            row.get("intent_hash"),
        )
        prev = row["hash"]
    if rows:
        await conn.execute(
            f'UPDATE "{s}".operations SET audit_seq = $2, audit_hash = $3, '
            "state = coalesce($4, state) WHERE id = $1",
            op_id,
            len(rows),
            prev,
            state,
        )


def a_year_before(moment: datetime) -> datetime:
    return moment - timedelta(days=365)


def named(result: anchor.AnchoredVerification) -> set[tuple[int, int, str]]:
    """(operation, seq, rule) of every problem."""
    found = set()
    for problem in result.problems:
        rule = problem.reason.split("]", 1)[0].lstrip("[")
        found.add((problem.operation_id, problem.seq, rule))
    return found


# Run as a script: refuses to import the database stack (or pgoutbox itself), then runs
# pgoutbox_proof's command line with the arguments given.
OFFLINE = """\
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"asyncpg", "sqlalchemy", "alembic", "pgoutbox", "psycopg"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import pgoutbox_proof
assert not {"asyncpg", "sqlalchemy", "pgoutbox"} & set(sys.modules)
sys.exit(pgoutbox_proof.main(sys.argv[1:]))
"""


def offline_check(
    tmp_path: Path, proof_file: Path, public_key: Path
) -> subprocess.CompletedProcess[str]:
    """``python -m pgoutbox_proof`` as an auditor's machine without the database stack runs it."""
    script = tmp_path / "offline_check.py"
    script.write_text(OFFLINE)
    return subprocess.run(
        [sys.executable, str(script), str(proof_file), "--public-key", str(public_key)],
        capture_output=True,
        text=True,
        check=False,
    )
