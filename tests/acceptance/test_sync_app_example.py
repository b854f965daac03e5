"""examples/sync_app.py, run as its reader runs it: a WSGI view publishing on a sync Session, a
worker handling the receipts with a transactional def handler."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sync_app.py"


def test_the_sync_app_sends_a_receipt_per_committed_order_and_none_for_the_failed_one(
    database_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("sync_app_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        result = module.run(database_dsn)
    finally:
        del sys.modules[spec.name]

    assert result["responses"] == [
        "200 order 1 placed",
        "200 order 2 placed",
        "500 the view failed after publishing",
    ]
    assert result["orders"] == [("ada@example.com", True), ("grace@example.com", True)]
    assert [sent.split()[0] for sent in result["sent"]] == ["ada@example.com", "grace@example.com"]
    assert "grace@example.com: receipt sent True" in capsys.readouterr().out
