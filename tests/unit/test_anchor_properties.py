"""Properties of the anchored audit, on generated logs (no database: the walker that verify runs
over the database's pages is fed the same rows directly).

- an untampered log always verifies against any checkpoint of it;
- any single edit of a row a checkpoint covers (rewritten, backdated, reordered, truncated,
  deleted with its operation, intent changed), with every hash and the head recomputed as a
  careful DBA would, is always found and named at its operation;
- inclusion proofs from random positions check offline, and fail once a proven row is changed
  (tests/integration/test_anchored_audit.py runs the checker with the database stack blocked);
- an archive at any instant passes its export check, and what is left verifies from the archive
  heads against the checkpoint taken with it; any single edit of an exported row is found by
  the export check or that walk, before anything is dropped.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgoutbox_proof as proof
from pgoutbox.anchor import Head, Walker, generate_key, load_private_key
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE

START = datetime(2026, 11, 1, tzinfo=UTC)
EDGES = [(f, t, to) for _, f, t, to in DEFAULT_LIFECYCLE.rows()]
KEY = load_private_key(generate_key()[0])
PUBLIC = KEY.public_key()


def _chain_rows(op_id: int, choices: list[int], clock: list[datetime]) -> list[dict[str, Any]]:
    """A history the default lifecycle allows, steered by ``choices``; hashes chained."""
    rows: list[dict[str, Any]] = []
    state, claims = "pending", 0

    def add(from_state: str | None, trigger: str, to_state: str) -> None:
        clock[0] += timedelta(seconds=1)
        rows.append(
            {
                "operation_id": op_id,
                "seq": len(rows) + 1,
                "operation_type": "charge",
                "from_state": from_state,
                "to_state": to_state,
                "trigger": trigger,
                "attempt": claims,
                "actor": "publisher" if trigger == "publish" else "worker-1",
                "detail": None if trigger == "publish" else f"{trigger} #{len(rows)}",
                "recorded_at": clock[0],
                "db_role": "app",
            }
        )

    add(None, "publish", "pending")
    for choice in choices:
        exits = [e for e in EDGES if e[0] == state]
        if not exits:
            break
        _, trigger, to_state = exits[choice % len(exits)]
        if trigger == "claim":
            claims += 1
        add(state, trigger, to_state)
        state = to_state
    _rehash(rows)
    return rows


def _rehash(rows: list[dict[str, Any]]) -> None:
    prev: bytes | None = None
    for seq, row in enumerate(rows, start=1):
        row["seq"], row["prev_hash"] = seq, prev
        row["hash"] = prev = proof.row_hash(prev, row)


def _intent(rows: list[dict[str, Any]], payload: str) -> dict[str, Any]:
    return {
        "operation_type": rows[0]["operation_type"],
        "channel": "workflow",
        "lifecycle": "default",
        "payload": payload,
        "idempotency_key": f"key-{rows[0]['operation_id']}",
        "created_by": rows[0]["actor"],
        "created_at": rows[0]["recorded_at"],
    }


class Log:
    """Operations (their audit rows and intent) as the database would hold them."""

    def __init__(self, chains: list[list[int]]) -> None:
        clock = [START]
        self.rows = {i + 1: _chain_rows(i + 1, c, clock) for i, c in enumerate(chains)}
        self.intents = {op: _intent(rows, f'{{"n": {op}}}') for op, rows in self.rows.items()}

    def stream(self) -> list[dict[str, Any]]:
        out = []
        for op, rows in sorted(self.rows.items()):
            intent = self.intents.get(op)
            for row in rows:
                extra: dict[str, Any] = {"operation_exists": intent is not None}
                if intent is not None:
                    extra.update(
                        head_seq=rows[-1]["seq"],
                        head_hash=rows[-1]["hash"],
                        current_state=rows[-1]["to_state"],
                        current_type=intent["operation_type"],
                        **{k: v for k, v in intent.items() if k != "operation_type"},
                    )
                out.append({**row, **extra})
        return out

    def checkpoint(self, prefixes: dict[int, int]) -> tuple[dict[str, Any], list[Head]]:
        """A checkpoint that saw ``prefixes[op]`` rows of each operation (0: not yet)."""
        heads = []
        uncovered = []
        for op, rows in sorted(self.rows.items()):
            k = prefixes.get(op, len(rows))
            uncovered += [r["recorded_at"] for r in rows[k:]]
            if k:
                intent = proof.intent_hash(self.intents[op])
                heads.append(Head(op, k, rows[k - 1]["hash"], intent))
        horizon = min(uncovered) if uncovered else None
        document = {
            "size": len(heads),
            "root": proof.tree_root(h.leaf() for h in heads).hex(),
            "horizon": None if horizon is None else horizon.isoformat(),
        }
        return document, heads


def _walk(log: Log, document: dict[str, Any], heads: list[Head]) -> Walker:
    walker = Walker(heads=iter(heads), checkpoint=document)
    for row in log.stream():
        walker.feed(row)
    walker.finish()
    return walker


chains = st.lists(st.lists(st.integers(0, 7), max_size=6), min_size=1, max_size=8)


@st.composite
def logs_and_checkpoints(draw: st.DrawFn) -> tuple[Log, dict[int, int]]:
    log = Log(draw(chains))
    prefixes = {
        op: draw(st.integers(0 if op > 1 else 1, len(rows))) for op, rows in log.rows.items()
    }
    return log, prefixes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs_and_checkpoints())
def test_an_untampered_log_verifies_against_any_checkpoint_of_it(
    case: tuple[Log, dict[int, int]],
) -> None:
    log, prefixes = case
    document, heads = log.checkpoint(prefixes)
    walker = _walk(log, document, heads)
    assert walker.problems == []
    assert walker.covered == len(heads)


EDITS = ["detail", "to_state", "actor", "backdate", "swap", "truncate", "delete", "intent"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs_and_checkpoints(), st.sampled_from(EDITS), st.data())
def test_any_single_edit_of_a_covered_row_is_found_at_its_operation(
    case: tuple[Log, dict[int, int]], edit: str, data: st.DataObject
) -> None:
    log, prefixes = case
    document, heads = log.checkpoint(prefixes)
    covered = [op for op, k in prefixes.items() if k]
    op = data.draw(st.sampled_from(covered))
    k = prefixes[op]
    rows = log.rows[op]
    seq = data.draw(st.integers(1, k))
    row = rows[seq - 1]
    if edit == "detail":
        row["detail"] = (row["detail"] or "") + " (edited)"
    elif edit == "to_state":
        row["to_state"] = "dead" if row["to_state"] != "dead" else "succeeded"
    elif edit == "actor":
        row["actor"] += "-forged"
    elif edit == "backdate":
        row["recorded_at"] -= timedelta(days=365)
    elif edit == "swap":
        if len(rows) < 2:
            return
        other = seq if seq < len(rows) else seq - 2
        rows[seq - 1], rows[other] = rows[other], rows[seq - 1]
    elif edit == "truncate":
        del rows[seq - 1 :]
    elif edit == "delete":
        del log.rows[op]
        log.intents.pop(op)
    elif edit == "intent":
        log.intents[op]["payload"] = '{"n": -1}'
    if op in log.rows:
        if rows:
            _rehash(rows)  # the careful DBA recomputes every hash and the head
        else:
            del log.rows[op]
            log.intents.pop(op)

    walker = _walk(log, document, heads)

    assert walker.problems, f"{edit} of operation {op} seq {seq} went unnoticed"
    assert op in {p.operation_id for p in walker.problems}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs_and_checkpoints(), st.data())
def test_proofs_from_random_positions_check_offline(
    case: tuple[Log, dict[int, int]], data: st.DataObject
) -> None:
    log, prefixes = case
    document, heads = log.checkpoint(prefixes)
    document.update(
        format=proof.CHECKPOINT_FORMAT,
        taken_at="2026-12-01T00:00:00Z",
        key_id=proof.key_id(proof.public_key_raw(PUBLIC)),
    )
    document["signature"] = base64.b64encode(KEY.sign(proof.signing_bytes(document))).decode()
    index = data.draw(st.integers(0, len(heads) - 1))
    leaves = [h.leaf() for h in heads]
    path = proof.inclusion_path(leaves, index)
    assert proof.inclusion_path_of_stream(iter(leaves), index, len(leaves)) == path
    head = heads[index]
    rows = log.rows[head.operation_id][: head.seq]
    intent = dict(log.intents[head.operation_id])
    intent["created_at_us"] = proof.micros(intent.pop("created_at"))
    built = {
        "format": proof.PROOF_FORMAT,
        "checkpoint": document,
        "operation_id": head.operation_id,
        "leaf_index": index,
        "path": [h.hex() for h in path],
        "intent": intent,
        "rows": [
            {
                **{k: v for k, v in r.items() if k != "recorded_at"},
                "recorded_at_us": proof.micros(r["recorded_at"]),
                "prev_hash": None if r["prev_hash"] is None else r["prev_hash"].hex(),
                "hash": r["hash"].hex(),
            }
            for r in rows
        ],
    }
    assert proof.check_proof(built, PUBLIC).startswith("OK: ")
    built["rows"][-1]["actor"] = "someone else"
    with pytest.raises(proof.ProofError):
        proof.check_proof(built, PUBLIC)


def test_keys_that_are_not_ed25519_keys_are_named() -> None:
    from pgoutbox.anchor import CheckpointError

    with pytest.raises(CheckpointError, match="not an Ed25519 private key"):
        load_private_key("not a key")
    with pytest.raises(proof.ProofError, match="not an Ed25519 public key"):
        proof.load_public_key("not a key")
    with pytest.raises(proof.ProofError, match=r"not an Ed25519 public key.*public key"):
        proof.load_public_key(generate_key()[0])  # the private half


# -- archives ------------------------------------------------------------------------------------


def _archive(log: Log, cut: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the log at ``cut`` as an archive of the months before it does: (exported rows,
    rows left), both in (operation_id, seq) order."""
    exported, left = [], []
    for _, rows in sorted(log.rows.items()):
        for row in rows:
            (exported if row["recorded_at"] < cut else left).append(row)
    return exported, left


def _walk_from_archive(
    log: Log, heads: list[dict[str, Any]], left: list[dict[str, Any]], checkpoint: Any
) -> Walker:
    """What verify does after the archive: each archived chain from its archive head (with the
    operation row), then the rows left, merged in operation order."""
    document, covered = checkpoint
    stream = {(r["operation_id"], r["seq"]): r for r in log.stream()}
    walker = Walker(heads=iter(covered), checkpoint=document)
    starts = []
    for head in heads:
        op = head["operation_id"]
        operation = {k: v for k, v in stream[(op, 1)].items() if k not in proof_fields}
        starts.append(
            {
                **operation,
                **head,
                "published_by": head["created_by"],
                "published_at": head["created_at"],
                "created_by": operation.get("created_by"),
                "created_at": operation.get("created_at"),
            }
        )
    pending = iter(starts)
    start = next(pending, None)
    for row in left:
        full = stream[(row["operation_id"], row["seq"])]
        while start is not None and start["operation_id"] <= row["operation_id"]:
            walker.start_from(start)
            start = next(pending, None)
        walker.feed(full)
    while start is not None:
        walker.start_from(start)
        start = next(pending, None)
    walker.finish()
    return walker


proof_fields = {
    "seq", "operation_type", "from_state", "to_state", "trigger", "attempt", "actor", "detail",
    "recorded_at", "prev_hash", "hash", "db_role", "intent_hash",
}  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains, st.data())
def test_an_archive_at_any_instant_checks_and_what_is_left_verifies_from_its_heads(
    chain_choices: list[list[int]], data: st.DataObject
) -> None:
    from pgoutbox.archive import check_export

    log = Log(chain_choices)
    times = sorted(r["recorded_at"] for rows in log.rows.values() for r in rows)
    cut = data.draw(st.sampled_from(times)) + timedelta(microseconds=1)
    checkpoint = log.checkpoint({})  # taken with the archive: covers every row
    exported, left = _archive(log, cut)

    checked = check_export(iter(exported), iter([]), iter(checkpoint[1]))

    assert checked.problems == []
    assert checked.rows == len(exported)
    assert [h["operation_id"] for h in checked.heads] == sorted(
        {r["operation_id"] for r in exported}
    )
    walker = _walk_from_archive(log, checked.heads, left, checkpoint)
    assert walker.problems == [], [str(p) for p in walker.problems]
    assert walker.covered == len(checkpoint[1])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains, st.sampled_from(["detail", "actor", "drop", "swap", "backdate"]), st.data())
def test_any_single_edit_of_an_exported_row_is_found_before_anything_is_dropped(
    chain_choices: list[list[int]], edit: str, data: st.DataObject
) -> None:
    from pgoutbox.archive import check_export

    log = Log(chain_choices)
    times = sorted(r["recorded_at"] for rows in log.rows.values() for r in rows)
    cut = data.draw(st.sampled_from(times)) + timedelta(microseconds=1)
    checkpoint = log.checkpoint({})
    exported, left = _archive(log, cut)
    index = data.draw(st.integers(0, len(exported) - 1))
    row = dict(exported[index])
    if edit == "detail":
        row["detail"] = (row["detail"] or "") + " (edited)"
    elif edit == "actor":
        row["actor"] += "-forged"
    elif edit == "backdate":
        row["recorded_at"] -= timedelta(days=1)
    exported = [*exported[:index], row, *exported[index + 1 :]]
    if edit == "drop":
        del exported[index]
    elif edit == "swap":
        if index + 1 >= len(exported) or exported[index + 1]["operation_id"] != row["operation_id"]:
            return
        exported[index], exported[index + 1] = exported[index + 1], exported[index]

    # An archive checks its export, then walks what is left from the heads it would record
    # (a chain dropped whole from the export is only missed there).
    checked = check_export(iter(exported), iter([]), iter(checkpoint[1]))
    if checked.problems:
        assert f"operation {row['operation_id']} " in checked.problems[0]
        return
    walker = _walk_from_archive(log, checked.heads, left, checkpoint)
    assert walker.problems, f"{edit} of exported row {index} went unnoticed"
    assert row["operation_id"] in {p.operation_id for p in walker.problems}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains, st.data())
def test_two_archives_in_turn_check_and_what_is_left_verifies_from_the_newest_heads(
    chain_choices: list[list[int]], data: st.DataObject
) -> None:
    from pgoutbox.archive import check_export

    log = Log(chain_choices)
    times = sorted(r["recorded_at"] for rows in log.rows.values() for r in rows)
    first, second = sorted(data.draw(st.lists(st.sampled_from(times), min_size=2, max_size=2)))
    first += timedelta(microseconds=1)
    second += timedelta(microseconds=2)
    checkpoint = log.checkpoint({})
    older, _ = _archive(log, first)
    upto_second, left = _archive(log, second)
    newer = [r for r in upto_second if r["recorded_at"] >= first]

    one = check_export(iter(older), iter([]), iter(checkpoint[1]))
    two = check_export(iter(newer), iter(one.heads), iter(checkpoint[1]))

    assert one.problems == two.problems == []
    newest = {h["operation_id"]: h for h in one.heads} | {h["operation_id"]: h for h in two.heads}
    heads = [newest[op] for op in sorted(newest)]
    walker = _walk_from_archive(log, heads, left, checkpoint)
    assert walker.problems == [], [str(p) for p in walker.problems]
