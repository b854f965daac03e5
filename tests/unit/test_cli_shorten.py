"""How tables (ops list, ops show, the demo) shorten errors and details to fit a column."""

from __future__ import annotations

import pytest

from pgoutbox.cli_ops import shorten

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
