"""The anchored audit's commands given bad input: one line naming the value and what to do,
nothing written; exit 2 for what cannot be used (a key, an option, a time), 1 for what does not
check (a checkpoint, a proof) or is not there (an operation the checkpoint does not cover)."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest
from clikit import run_pgoutbox

from pgoutbox.settings import DatabaseSettings


async def _pgoutbox(
    tmp_path: Path, dsn: str, schema: str, *args: str, **env: str
) -> tuple[int, str, str]:
    resolved = [a.replace("TMP", str(tmp_path)) for a in args]
    done = await run_pgoutbox(*resolved, dsn=dsn, schema=schema, **env)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
async def keys(tmp_path: Path, database_dsn: str, db_settings: DatabaseSettings) -> Path:
    code, _, err = await _pgoutbox(
        tmp_path, database_dsn, db_settings.schema_name, "audit", "keygen", "-o", "TMP/k"
    )
    assert code == 0, err
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    return tmp_path


async def test_bad_keys_checkpoints_proofs_and_times_are_named(
    keys: Path, database_dsn: str, db_settings: DatabaseSettings
) -> None:
    s, t = db_settings.schema_name, keys

    async def run(*args: str, **env: str) -> tuple[int, str, str]:
        return await _pgoutbox(t, database_dsn, s, *args, **env)

    code, _, err = await run("audit", "keygen", "-o", "TMP/k")
    assert code == 2
    assert "k.key' exists already: choose another PREFIX (nothing written)" in err

    code, _, err = await run("audit", "checkpoint", "-o", "TMP/cp.json")
    assert code == 2
    assert "no signing key: give --key FILE or set PGOUTBOX_AUDIT_KEY" in err
    assert not (t / "cp.json").exists()

    code, out, err = await run("audit", "checkpoint", "--key", "TMP/k.key", "-o", "TMP/cp.json")
    assert code == 0, err
    assert "0 operations, 0 audit rows" in out

    code, _, err = await run("audit", "verify", "--checkpoint", "TMP/cp.json")
    assert code == 2
    assert "--checkpoint FILE and --public-key KEY go together" in err

    document = json.loads((t / "cp.json").read_text())
    document["size"] = 7
    (t / "forged.json").write_text(json.dumps(document))
    code, _, err = await run(
        "audit", "verify", "--checkpoint", "TMP/forged.json", "--public-key", "TMP/k.pub"
    )
    assert code == 1
    assert "signature does not check: it was altered after signing" in err

    code, _, err = await run("audit", "prove", "1", "--checkpoint", "TMP/cp.json", "-o", "TMP/p")
    assert code == 1
    assert "operation 1 is not covered by the checkpoint" in err
    assert not (t / "p").exists()

    (t / "proof.json").write_text("{not json")
    code, _, err = await run("audit", "check-proof", "TMP/proof.json", "--public-key", "TMP/k.pub")
    assert code == 1
    assert err.startswith("FAILED: ")

    code, _, err = await run("audit", "as-of", "yesterday-ish")
    assert code == 2
    assert "'yesterday-ish' is not an ISO-8601 time: write e.g. 2026-11-30T12:00Z" in err


async def test_verify_rules_checks_meaning_without_a_checkpoint(
    tmp_path: Path, database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    op = await conn.fetchval(
        f'INSERT INTO "{s}".operations (operation_type, channel, payload) '
        "VALUES ('charge', 'workflow', '{}') RETURNING id"
    )
    code, out, err = await _pgoutbox(tmp_path, database_dsn, s, "audit", "verify", "--rules")
    assert (code, out, err) == (0, "OK: 1 audit rows of 1 operations verified\n", "")

    # An edge added, used and removed: no trigger was disabled, every hash holds.
    edge = "('default', 'pending', 'succeed', 'succeeded')"
    await conn.execute(f'INSERT INTO "{s}".lifecycle_transitions VALUES {edge}')
    await conn.execute(
        f"UPDATE \"{s}\".operations SET state = 'succeeded', transition = 'succeed', "
        "transition_actor = 'worker-1' WHERE id = $1",
        op,
    )
    await conn.execute(
        f'DELETE FROM "{s}".lifecycle_transitions '
        f"WHERE (lifecycle, from_state, trigger, to_state) = {edge}"
    )
    code, _, _ = await _pgoutbox(tmp_path, database_dsn, s, "audit", "verify")
    assert code == 0
    code, out, err = await _pgoutbox(tmp_path, database_dsn, s, "audit", "verify", "--rules")
    assert code == 1
    assert err.startswith(
        f"FAILED: operation {op} seq 2: [edge] pending -> succeeded by 'succeed' is not a "
        "transition lifecycle 'default' allowed at "
    )
