"""How the operator commands read times and durations, and print durations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pgoutbox.admin import LIVE_WITHIN, STALE_AFTER
from pgoutbox.cli_ops import MAX_DURATION, OutOfRange, format_seconds, parse_duration, parse_when


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


def test_durations_go_up_to_100_years() -> None:
    assert parse_duration("36525d") == MAX_DURATION == timedelta(days=36525)
    assert parse_duration("0s") == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "36525d1s",
        "800000d",
        "99999999999d",  # past timedelta's 999999999 days: an OverflowError before
        "9" * 400 + "s",  # an infinite float: an OverflowError before
        "5218w",
    ],
)
def test_a_longer_duration_is_out_of_range_naming_the_value_and_the_range(text: str) -> None:
    with pytest.raises(OutOfRange) as refused:
        parse_duration(text)
    assert str(refused.value) == (
        f"duration {text!r} is out of range: durations go from 0s to 36525d (100 years)"
    )


@pytest.mark.parametrize("text", ["0s", "0.0000001s"])  # the second is 0 in microseconds
def test_a_positive_duration_must_be_more_than_0s(text: str) -> None:
    assert parse_duration("0.000001s", positive=True) == timedelta(microseconds=1)
    with pytest.raises(OutOfRange) as refused:
        parse_duration(text, positive=True)
    assert str(refused.value) == (
        f"duration {text!r} is out of range: this one must be more than 0s and at most 36525d "
        "(100 years)"
    )


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


TIME_RANGE = (
    "times go from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z (Python's datetime; "
    "PostgreSQL's timestamptz holds all of them)"
)


def test_times_go_from_the_year_1_to_9999_in_utc() -> None:
    assert parse_when("0001-01-01") == datetime(1, 1, 1, tzinfo=UTC)
    assert parse_when("9999-12-31T23:59:59.999999Z") == datetime.max.replace(tzinfo=UTC)
    assert parse_when("36525d") == MAX_DURATION


@pytest.mark.parametrize(
    "text",
    [
        # Valid datetimes whose UTC instant is not: asyncpg's conversion overflowed before.
        "9999-12-31T23:59:59-05:00",
        "0001-01-01T00:00:00+01:00",
        # Years no datetime holds: said to be out of range, not "not ISO-8601".
        "10000-01-01",
        "0000-01-01",
    ],
)
def test_a_time_beyond_that_is_out_of_range_naming_the_value_and_the_range(text: str) -> None:
    with pytest.raises(OutOfRange) as refused:
        parse_when(text)
    assert str(refused.value) == f"time {text!r} is out of range: {TIME_RANGE}"


def test_a_duration_ago_beyond_100_years_is_out_of_range_not_unreadable() -> None:
    with pytest.raises(OutOfRange, match=r"^duration '800000d' is out of range: durations go"):
        parse_when("800000d")


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
