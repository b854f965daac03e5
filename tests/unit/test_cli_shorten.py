"""How tables (ops list, ops show, the demo) shorten errors and details to fit a column, and show
values from the database with their control characters escaped."""

from __future__ import annotations

import pytest

from pgoutbox.cli_errors import visible
from pgoutbox.cli_ops import csv_cell, shorten

DETAIL = "attempt 1 of 3: ConnectionError: payment provider unreachable (attempt 1)"


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        # Cut at the last whole word that fits, and say it goes on.
        (DETAIL, 50, "attempt 1 of 3: ConnectionError: payment provider…"),
        (DETAIL, 45, "attempt 1 of 3: ConnectionError: payment…"),
        # No comma or colon left dangling before the ellipsis.
        (DETAIL, 34, "attempt 1 of 3: ConnectionError…"),
        ("a, b, c d", 5, "a, b…"),
        # What fits is left alone: exactly the limit, and only the first line of a traceback.
        (DETAIL, len(DETAIL), DETAIL),
        ("ValueError: boom\nTraceback (most recent call last):", 20, "ValueError: boom"),
        # A single word longer than the column is cut inside it: there is no other place.
        ("Traceback_without_spaces_anywhere", 10, "Traceback…"),
    ],
)
def test_shorten_cuts_at_a_word_boundary_and_ends_with_an_ellipsis(
    text: str, limit: int, expected: str
) -> None:
    assert shorten(text, limit) == expected
    assert len(shorten(text, limit)) <= limit


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("a\r\nfake line", "a\\r\\nfake line"),
        ("bell\x07 tab\t nul\x00 del\x7f", "bell\\x07 tab\\t nul\\x00 del\\x7f"),
        ("c1 csi\x9b2J nel\x85", "c1 csi\\x9b2J nel\\x85"),  # C1 controls too
        # What is not a control stays: non-ASCII, emoji, backslashes, U+00A0 (after C1).
        ("é 😀 C:\\temp\\x1b \xa0", "é 😀 C:\\temp\\x1b \xa0"),
    ],
)
def test_visible_escapes_c0_del_and_c1_controls_and_nothing_else(text: str, shown: str) -> None:
    assert visible(text) == shown
    assert visible(shown) == shown  # idempotent: a cell escaped twice reads the same


def test_shorten_escapes_the_first_line_and_counts_the_escapes_in_the_limit() -> None:
    # The first line is cut at the LF; the CR before it is shown, as are the ESC and the BEL.
    assert shorten("\x1b[2Jboom\x07\r\nsecond line", 100) == "\\x1b[2Jboom\\x07\\r"
    # Ten ESCs are 40 characters shown: two of them and the ellipsis fit in 9.
    assert shorten("\x1b" * 10, 9) == "\\x1b\\x1b…"


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil.example")', '\'=HYPERLINK("http://evil.example")'),
        ("+1", "'+1"),
        ("-x", "'-x"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        # Not a formula's start: as it is. NULL is an empty cell.
        ("alice", "alice"),
        ("a=1", "a=1"),
        ("2026-12-03T09:30:57.646334+00:00", "2026-12-03T09:30:57.646334+00:00"),
        (42, "42"),
        (None, ""),
    ],
)
def test_a_csv_cell_that_starts_like_a_formula_gets_a_quote(value: object, cell: str) -> None:
    assert csv_cell(value) == cell
