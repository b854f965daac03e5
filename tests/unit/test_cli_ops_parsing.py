"""How the operator commands read times and durations, and print durations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pgoutbox.admin import LIVE_WITHIN, STALE_AFTER
from pgoutbox.cli_ops import format_seconds, parse_duration, parse_when


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(minutes=90)),
        ("0.5s", timedelta(milliseconds=500)),
    ],
)
def test_durations_are_a_number_and_a_unit(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5", "m5", "5 minutes", "-5m", "5x", "1h-30m"])
def test_anything_else_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid duration {text!r}"):
        parse_duration(text)


def test_the_option_defaults_are_the_api_defaults() -> None:
    assert parse_duration("5m") == STALE_AFTER
    assert parse_duration("30s") == LIVE_WITHIN


def test_a_time_is_now_a_duration_ago_or_iso_8601_in_utc_by_default() -> None:
    assert parse_when("now") == timedelta(0)
    assert parse_when("24h") == timedelta(hours=24)
    assert parse_when("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_when("2026-11-01T12:30:00") == datetime(2026, 11, 1, 12, 30, tzinfo=UTC)
    assert parse_when("2026-11-01T12:30:00+01:00") == datetime(
        2026, 11, 1, 12, 30, tzinfo=timezone(timedelta(hours=1))
    )
    assert parse_when("2026-11-01T12:30:00Z") == datetime(2026, 11, 1, 12, 30, tzinfo=UTC)


def test_an_unreadable_time_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"invalid time 'yesterday': use an ISO-8601"):
        parse_when("yesterday")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.3141, "0.31s"),
        (42.9, "42s"),
        (303, "5m 03s"),
        (7800, "2h 10m"),
        (273600, "3d 4h"),
    ],
)
def test_durations_print_for_people(seconds: float | None, text: str) -> None:
    assert format_seconds(seconds) == text
