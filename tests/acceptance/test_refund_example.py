"""examples/refund.py, run as a reader of the documentation runs it: imported and awaited, and as
a script. Three refunds: the small one is paid out and receipted, the large one waits for
alice's approval before it is paid out, the third one's receipt bounces and its payout is
voided. Every side effect at the (fake) provider happens once per idempotency key."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "refund.py"

# idempotency key -> (action, details): every side effect the example should cause, once each.
EXPECTED_CALLS = {
    "refund-order-1001:claimed": ("payout", {"cents": 2_500}),
    "refund-order-1001:charged": ("receipt", {"to": "ada@example.com"}),
    "refund-order-1002:approved": ("payout", {"cents": 120_000}),
    "refund-order-1002:charged": ("receipt", {"to": "grace@example.com"}),
    "refund-order-1003:claimed": ("payout", {"cents": 4_000}),
    "refund-order-1003:compensating": ("void", {"cents": 4_000}),
}


@pytest.fixture
def refund() -> Iterator[ModuleType]:
    """examples/refund.py, imported from its file."""
    spec = importlib.util.spec_from_file_location("refund_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


async def example_schemas(database_dsn: str) -> list[str]:
    conn = await asyncpg.connect(database_dsn)
    try:
        return [
            r["nspname"]
            for r in await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'refund_example_%'"
            )
        ]
    finally:
        await conn.close()


async def test_run_pays_each_refund_once_and_the_large_one_only_after_alices_approval(
    refund: ModuleType,
    database_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Every call the provider receives (not only the first per key, which it keeps), and the
    # moment alice's approval is fired, in the order they happen.
    events: list[tuple[str, str]] = []
    provider_call = refund.FakeProvider.call
    admin_fire = refund.Admin.fire

    async def recording_call(self: Any, idempotency_key: str, action: str, **details: Any) -> None:
        events.append((idempotency_key, action))
        await provider_call(self, idempotency_key, action, **details)

    async def recording_fire(self: Any, operation_id: int, trigger: str, **kw: Any) -> Any:
        # Noted before the call: the fire commits inside it, and the worker (on this same event
        # loop) may pay out before the call returns here.
        events.append(("fired", trigger))
        try:
            return await admin_fire(self, operation_id, trigger, **kw)
        except BaseException:
            events.remove(("fired", trigger))
            raise

    monkeypatch.setattr(refund.FakeProvider, "call", recording_call)
    monkeypatch.setattr(refund.Admin, "fire", recording_fire)

    result = await refund.run(database_dsn)

    small, large, bounced = result["ids"]
    assert result["final"] == {small: "succeeded", large: "succeeded", bounced: "cancelled"}
    assert result["calls"] == EXPECTED_CALLS
    keys = [key for key, _ in events if key != "fired"]
    assert Counter(keys) == dict.fromkeys(EXPECTED_CALLS, 1)  # each side effect once
    # The large refund is paid out only after it was approved, never by its first step.
    assert "refund-order-1002:claimed" not in keys
    assert events.index(("fired", "approve")) < events.index(
        ("refund-order-1002:approved", "payout")
    )

    trail = result["trail"]
    assert [(r.trigger, r.from_state, r.to_state) for r in trail] == [
        ("publish", None, "pending"),
        ("claim", "pending", "claimed"),
        ("request_approval", "claimed", "awaiting_approval"),
        ("approve", "awaiting_approval", "approved"),
        ("claim", "approved", "approved"),
        ("charge", "approved", "charged"),
        ("claim", "charged", "charged"),
        ("send_receipt", "charged", "succeeded"),
    ]
    [approval] = [r for r in trail if r.trigger == "approve"]
    assert (approval.actor, approval.detail) == ("alice", "ticket 4711")

    printed = capsys.readouterr().out
    assert f"refund {large} is waiting for approval; alice approves it" in printed
    for op_id, state in result["final"].items():
        assert f"refund {op_id}: {state}\n" in printed
    # The example cleans up after itself.
    assert await example_schemas(database_dsn) == []


async def test_the_script_prints_the_final_states(database_dsn: str) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PGOUTBOX_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--dsn",
        database_dsn,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    out = stdout.decode()

    assert process.returncode == 0, stderr.decode()
    finals = re.findall(r"^refund (\d+): (\w+)$", out, re.MULTILINE)
    assert [state for _, state in finals] == ["succeeded", "succeeded", "cancelled"]
    large = finals[1][0]
    assert f"refund {large} is waiting for approval; alice approves it" in out
    assert re.search(r"approve\s+awaiting_approval -> approved\s+alice$", out, re.MULTILINE)
    for key, (action, _) in EXPECTED_CALLS.items():
        assert re.search(rf"^\s+{re.escape(key)}\s+{action}\s", out, re.MULTILINE), key
    assert await example_schemas(database_dsn) == []
