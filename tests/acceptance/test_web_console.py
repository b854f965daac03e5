"""The web console in a real browser: Debian's headless chromium, driven by Selenium, against
consoles served by uvicorn on a schema a real worker filled (an operation that died with an
error, refunds parked for approval, one that succeeded, a page's worth of pending ones, and
hostile values everywhere). Each test reads the outcome back from the database: states and
audit rows, with the actor and database role. Screenshots of every page are written to
docs/web/ with PGOUTBOX_UPDATE_DOCS=1 (docs/web.md shows them)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import pytest
from webkit import http, screenshot, serve, start_browser, wait_until

from pgoutbox import (
    DatabaseSessionManager,
    HandlerContext,
    Lifecycle,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    migrations,
    publish_operation,
)
from pgoutbox.settings import DatabaseSettings
from pgoutbox.web.data import PAGE_SIZE

ACTOR = "alice <ops@example.com>"
HOSTILE_PAYLOAD = {
    "note": "<script>window.__pwned = 1</script>",
    "html": '"><img src=x onerror="window.__pwned = 2">',
    "controls": "\x1b[2J\x1b[31mred\x07\x7f\x9b",
}
HOSTILE_ERROR = "<script>window.__pwned = 3</script> \x1b[31mprovider down\x1b[0m"
HOSTILE_TYPE = "<script>window.__pwned = 4</script>\x1b[2J"
APPROVAL = Lifecycle.define(
    "web_approval",
    states=["awaiting_approval", "approved"],
    parking=["awaiting_approval"],
    transitions=[
        {"trigger": "ask", "source": "claimed", "dest": "awaiting_approval"},
        {"trigger": "approve", "source": "awaiting_approval", "dest": "approved"},
        {"trigger": "deny", "source": "awaiting_approval", "dest": "cancelled"},
        {"trigger": "pay", "source": "approved", "dest": "succeeded"},
    ],
)


@dataclass
class World:
    settings: DatabaseSettings
    dead: int  # shop.charge_card, died with HOSTILE_ERROR, payload HOSTILE_PAYLOAD
    parked: list[int]  # shop.refund, awaiting_approval
    succeeded: int
    pending: list[int]  # shop.later on a channel nobody serves, oldest first
    hostile_type: int
    needle: int  # a pending one whose payload holds "needle-4711"


def _router() -> WorkflowRouter:
    router = WorkflowRouter(prefix="shop")

    @router.on("charge_card", max_attempts=1)
    async def charge(ctx: HandlerContext, payload: Any) -> None:
        raise ConnectionError(HOSTILE_ERROR)

    @router.on("refund", lifecycle=APPROVAL)
    async def ask(ctx: HandlerContext, payload: Any) -> str:
        return "ask"

    @router.on("refund", step="approved")
    async def pay(ctx: HandlerContext, payload: Any) -> str:
        return "pay"

    @router.on("send_email")
    async def send(ctx: HandlerContext, payload: Any) -> None:
        return None

    return router


async def _wait_states(conn: asyncpg.Connection, schema: str, wanted: dict[int, str]) -> None:
    for _ in range(600):
        rows = await conn.fetch(
            f'SELECT id, state FROM "{schema}".operations WHERE id = ANY($1)', list(wanted)
        )
        if {r["id"]: r["state"] for r in rows} == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"operations did not reach {wanted}: {[tuple(r) for r in rows]}")


@pytest.fixture(scope="module")
async def world(database_dsn: str) -> AsyncIterator[World]:
    schema = f"web_{uuid.uuid4().hex[:10]}"
    db = DatabaseSettings(dsn=database_dsn, schema=schema)
    await migrations.upgrade(db)
    settings = Settings(
        database=db, workflow_system={"channel": "shop", "poll_interval_seconds": 0.2}
    )
    sm = DatabaseSessionManager(db)
    conn = await asyncpg.connect(database_dsn)
    try:
        async with WorkflowSystem(router=_router(), settings=settings):
            async with sm.session() as session:
                dead = await publish_operation(
                    session, "shop.charge_card", HOSTILE_PAYLOAD, "shop", idempotency_key="k-1"
                )
                parked = [
                    await publish_operation(session, "shop.refund", {"order": n}, "shop")
                    for n in (1, 2)
                ]
                succeeded = await publish_operation(session, "shop.send_email", {}, "shop")
                await session.commit()
            await _wait_states(
                conn,
                schema,
                {
                    dead: "dead",
                    succeeded: "succeeded",
                    **dict.fromkeys(parked, "awaiting_approval"),
                },
            )
        async with sm.session() as session:
            pending = [
                await publish_operation(
                    session,
                    "shop.later",
                    {"n": n, "tag": "needle-4711" if n == 7 else "hay"},
                    "idle",
                    ordering_key="customer-9" if n < 3 else None,
                )
                for n in range(PAGE_SIZE + 10)
            ]
            await session.commit()
        # Publishing checks an operation type's name; a role with raw SQL could still write
        # any text, and the console must show it as text.
        hostile_type = await conn.fetchval(
            f'INSERT INTO "{schema}".operations (operation_type, channel, payload) '
            "VALUES ($1, 'idle', '{}') RETURNING id",
            HOSTILE_TYPE,
        )
        yield World(db, dead, parked, succeeded, pending, hostile_type, pending[7])
    finally:
        await sm.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def acting(world: World) -> Iterator[str]:
    with serve(world.settings, actor=lambda request: ACTOR) as served:
        yield served.url


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _text(browser: Any, css: str) -> str:
    return str(browser.find_element("css selector", css).text)


def _all_text(browser: Any, css: str) -> list[str]:
    return [str(e.text) for e in browser.find_elements("css selector", css)]


def _ids_listed(browser: Any) -> list[int]:
    return [int(t) for t in _all_text(browser, "#operations tbody td:first-child a")]


async def _audit(conn: asyncpg.Connection, world: World, op_id: int) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f'SELECT * FROM "{world.settings.schema_name}".audit_log '
            "WHERE operation_id = $1 ORDER BY seq",
            op_id,
        )
    )


async def _state(conn: asyncpg.Connection, world: World, op_id: int) -> str:
    state: str = await conn.fetchval(
        f'SELECT state FROM "{world.settings.schema_name}".operations WHERE id = $1', op_id
    )
    return state


# -- pages -----------------------------------------------------------------------------------


def test_every_page_loads_and_shows_the_database_as_it_is(
    world: World, browser: Any, acting: str, scratch: Path
) -> None:
    browser.get(f"{acting}/")
    total = len(world.pending) + len(world.parked) + 3
    assert _text(browser, "#total") == str(total)
    by_type = _text(browser, "#by-type")
    assert "shop.charge_card" in by_type
    assert "shop.refund" in by_type
    assert browser.find_elements("css selector", "svg.chart rect.ok")
    assert "none" in _text(browser, "#paused")
    screenshot(browser, "overview", scratch)

    browser.get(f"{acting}/operations")
    listed = _ids_listed(browser)
    assert len(listed) == PAGE_SIZE
    assert listed == sorted(listed, reverse=True)
    assert listed[0] == world.hostile_type
    screenshot(browser, "operations", scratch)

    browser.get(f"{acting}/operations/{world.parked[1]}")
    assert _text(browser, "#state") == "awaiting_approval"
    assert "audit chain verified" in _text(browser, "#chain")
    current = browser.find_element("css selector", "#diagram g.state.current")
    assert current.get_attribute("data-state") == "awaiting_approval"
    visited = {
        e.get_attribute("data-state")
        for e in browser.find_elements("css selector", "#diagram g.state.visited")
    }
    assert visited == {"pending", "claimed", "awaiting_approval"}
    assert _all_text(browser, "#audit tbody td:nth-child(3)") == [
        "publish",
        "claim",
        "ask",
    ]
    screenshot(browser, "operation", scratch)

    browser.get(f"{acting}/lifecycles")
    assert browser.find_elements("css selector", "#lifecycle-default-0 svg.lifecycle")
    approval = browser.find_element("css selector", "#lifecycle-web_approval-1")
    assert "shop.refund" in approval.text
    screenshot(browser, "lifecycles", scratch)

    browser.get(f"{acting}/audit")
    browser.find_element("id", "verify").click()
    status = wait_until(
        lambda: (t := _text(browser, "#verify-status")).startswith(("OK", "FAILED")) and t,
        "verify to finish",
    )
    assert status.startswith("OK: ")
    assert "every hash chain holds" in status
    screenshot(browser, "audit", scratch)


def test_the_audit_report_downloads_every_row_of_a_period(world: World, acting: str) -> None:
    status, body, headers = http(f"{acting}/audit/report?format=json")
    assert status == 200
    assert headers["content-disposition"].startswith('attachment; filename="audit-')
    rows = json.loads(body)
    assert {r["operation_id"] for r in rows} >= {world.dead, world.succeeded, *world.parked}
    status, body, _ = http(f"{acting}/audit/report?format=csv&type=shop.charge_card")
    assert status == 200
    report = list(csv.DictReader(io.StringIO(body)))
    assert [(r["operation_id"], r["trigger"]) for r in report][:3] == [
        (str(world.dead), "publish"),
        (str(world.dead), "claim"),
        (str(world.dead), "give_up"),
    ]
    assert "ConnectionError" in report[2]["detail"]
    status, body, _ = http(f"{acting}/audit/report?since=yesterday-ish")
    assert status == 400
    assert "invalid since 'yesterday-ish'" in body


# -- filtering and paging --------------------------------------------------------------------


def test_filters_narrow_the_list_and_pages_follow_on_without_overlap(
    world: World, browser: Any, acting: str
) -> None:
    browser.get(f"{acting}/operations")
    browser.find_element("name", "type").send_keys("shop.charge*")
    browser.find_element("id", "apply").click()
    wait_until(lambda: "type=shop.charge" in browser.current_url, "the filtered list")
    assert _ids_listed(browser) == [world.dead]

    browser.get(f"{acting}/operations?{urlencode({'channel': 'idle', 'type': 'shop.later'})}")
    first = _ids_listed(browser)
    browser.find_element("id", "older").click()
    wait_until(lambda: "before=" in browser.current_url, "the next page")
    second = _ids_listed(browser)
    assert first + second == sorted(world.pending, reverse=True)
    assert not browser.find_elements("id", "older")

    browser.get(f"{acting}/operations?q=needle-4711")
    assert _ids_listed(browser) == [world.needle]
    browser.get(f"{acting}/operations?key=k-1")
    assert _ids_listed(browser) == [world.dead]
    browser.get(f"{acting}/operations?ordering_key=customer-9")
    assert _ids_listed(browser) == sorted(world.pending[:3], reverse=True)
    browser.get(f"{acting}/operations?state=awaiting_approval")
    assert set(_ids_listed(browser)) >= {world.parked[1]}

    browser.get(f"{acting}/operations?since=tomorrow")
    assert "invalid since 'tomorrow'" in _text(browser, "#error")
    browser.get(f"{acting}/operations?before=99999999999999999999")
    assert "invalid before '99999999999999999999'" in _text(browser, "#error")
    browser.get(f"{acting}/operations/99999999999999999999")
    assert _text(browser, "#error") == "no operation 99999999999999999999"


def test_opening_an_operation_from_the_list_shows_its_error_attempts_and_payload(
    world: World, browser: Any, acting: str
) -> None:
    browser.get(f"{acting}/operations?state=dead")
    browser.find_element("link text", str(world.dead)).click()
    wait_until(lambda: browser.current_url.endswith(f"/operations/{world.dead}"), "the page")
    assert _text(browser, "#state") == "dead"
    assert _text(browser, "#type") == "shop.charge_card"
    attempts = _text(browser, "#attempts")
    assert "give_up" in attempts
    assert "ConnectionError" in attempts
    assert (
        json.loads(browser.find_element("id", "payload").text)["note"] == (HOSTILE_PAYLOAD["note"])
    )


# -- actions ---------------------------------------------------------------------------------


async def test_replaying_a_dead_operation_is_an_audited_transition_by_the_hooks_actor(
    world: World, browser: Any, acting: str, conn: asyncpg.Connection
) -> None:
    before = await _audit(conn, world, world.dead)
    browser.get(f"{acting}/operations/{world.dead}")
    form = browser.find_element("id", "do-replay").find_element("xpath", "..")
    form.find_element("name", "reason").send_keys("provider is back, ticket 12")
    browser.find_element("id", "do-replay").click()
    flash = wait_until(lambda: _text(browser, "#flash"), "the action's result")
    assert flash == f"operation {world.dead}: dead -> pending (replay, by {ACTOR})"
    assert _text(browser, "#state") == "pending"

    assert await _state(conn, world, world.dead) == "pending"
    after = await _audit(conn, world, world.dead)
    assert len(after) == len(before) + 1
    row = after[-1]
    assert (row["trigger"], row["from_state"], row["to_state"]) == ("replay", "dead", "pending")
    assert (row["actor"], row["detail"]) == (ACTOR, "provider is back, ticket 12")
    assert row["db_role"] == await conn.fetchval("SELECT current_user")


async def test_firing_a_parking_trigger_moves_the_operation_on_and_is_audited(
    world: World, browser: Any, acting: str, conn: asyncpg.Connection
) -> None:
    op_id = world.parked[0]
    browser.get(f"{acting}/operations/{op_id}")
    assert {e.text for e in browser.find_elements("css selector", "#actions button")} >= {
        "fire approve",
        "fire deny",
    }
    browser.find_element("id", "fire-approve").click()
    flash = wait_until(lambda: _text(browser, "#flash"), "the action's result")
    assert flash == f"operation {op_id}: awaiting_approval -> approved (approve, by {ACTOR})"
    assert await _state(conn, world, op_id) == "approved"
    row = (await _audit(conn, world, op_id))[-1]
    assert (row["trigger"], row["to_state"], row["actor"]) == ("approve", "approved", ACTOR)


async def test_an_action_the_lifecycle_refuses_changes_nothing_and_says_why(
    world: World, acting: str, conn: asyncpg.Connection
) -> None:
    status, _, headers = http(f"{acting}/operations/{world.succeeded}")
    cookie = headers["set-cookie"].split(";")[0]
    token = cookie.split("=", 1)[1]
    before = await _audit(conn, world, world.succeeded)
    status, _, headers = http(
        f"{acting}/operations/{world.succeeded}/act",
        data=urlencode({"csrf": token, "action": "cancel"}).encode(),
        headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 303
    flash_cookie = headers["set-cookie"].split(";")[0]
    status, body, _ = http(
        f"{acting}/operations/{world.succeeded}", headers={"Cookie": flash_cookie}
    )
    assert f"cannot cancel operation {world.succeeded}: it is succeeded" in body
    assert await _audit(conn, world, world.succeeded) == before


# -- who may act -----------------------------------------------------------------------------


def test_a_read_only_console_and_one_without_a_hook_show_no_actions(
    world: World, browser: Any
) -> None:
    for console in (
        {"actor": lambda request: ACTOR, "read_only": True},
        {"actor": None},
        {"actor": lambda request: None},  # the hook names nobody: a viewer
    ):
        with serve(world.settings, **console) as served:
            browser.get(f"{served.url}/operations/{world.parked[1]}")
            assert browser.find_elements("id", "no-actions")
            assert not browser.find_elements("css selector", "#actions form")
            assert browser.find_elements("id", "read-only")


async def test_forged_posts_are_refused_and_change_nothing(
    world: World, browser: Any, acting: str, conn: asyncpg.Connection
) -> None:
    op_id = world.parked[1]
    before = await _audit(conn, world, op_id)
    target = f"{acting}/operations/{op_id}/act"
    form = "application/x-www-form-urlencoded"

    # A page on another origin that posts the console's form: the browser does not send the
    # SameSite cookie, and the page cannot know a signed token.
    page = (
        f'<form method="post" action="{target}"><input name="action" value="fire">'
        '<input name="trigger" value="deny"><input name="csrf" value="guess"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    browser.get(f"{acting}/operations/{op_id}")  # the browser holds a real token cookie
    browser.get("data:text/html," + quote(page))
    wait_until(lambda: "refused: " in browser.page_source, "the refusal")

    # By hand: no token; a token that is not the cookie's; a cookie and token not signed here.
    _, _, headers = http(f"{acting}/operations/{op_id}")
    cookie = headers["set-cookie"].split(";")[0]
    token = cookie.split("=", 1)[1]
    attempts = [
        ({}, {"action": "fire", "trigger": "deny"}),
        ({"Cookie": cookie}, {"action": "fire", "trigger": "deny"}),
        ({"Cookie": cookie}, {"action": "fire", "trigger": "deny", "csrf": token + "x"}),
        ({"Cookie": "pgoutbox_csrf=a.b"}, {"action": "fire", "trigger": "deny", "csrf": "a.b"}),
        (
            {"Cookie": cookie, "Sec-Fetch-Site": "cross-site"},
            {"action": "fire", "trigger": "deny", "csrf": token},
        ),
    ]
    for extra, fields in attempts:
        status, body, _ = http(
            target, data=urlencode(fields).encode(), headers={"Content-Type": form, **extra}
        )
        assert status == 403, (extra, fields, body)
        assert body.startswith("refused:")

    # A valid token does not make a read-only console act.
    with serve(world.settings, actor=lambda request: ACTOR, read_only=True) as served:
        _, _, headers = http(f"{served.url}/operations/{op_id}")
        cookie = headers["set-cookie"].split(";")[0]
        status, body, _ = http(
            f"{served.url}/operations/{op_id}/act",
            data=urlencode(
                {"action": "fire", "trigger": "deny", "csrf": cookie.split("=", 1)[1]}
            ).encode(),
            headers={"Content-Type": form, "Cookie": cookie},
        )
        assert (status, body) == (403, "refused: read-only console: no actions")
    assert await _state(conn, world, op_id) == "awaiting_approval"
    assert await _audit(conn, world, op_id) == before


# -- hostile values ----------------------------------------------------------------------------


def test_hostile_payloads_types_and_errors_are_shown_as_text(
    world: World, browser: Any, acting: str
) -> None:
    pages = [
        f"/operations/{world.dead}",
        f"/operations/{world.hostile_type}",
        "/operations",
        "/",
    ]
    for page in pages:
        browser.get(acting + page)
        assert browser.execute_script("return window.__pwned === undefined"), page
        assert not browser.find_elements("css selector", "main img"), page
        status, html, headers = http(acting + page)
        assert status == 200
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "<script>window" not in html, page
        assert "<img" not in html, page
        # No control character reaches the page: each is shown as an escape.
        assert not any((ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in html)

    browser.get(f"{acting}/operations/{world.dead}")
    payload = browser.find_element("id", "payload").text
    assert "<script>window.__pwned = 1</script>" in payload
    assert "\\x1b[2J" in payload or "\\u001b[2J" in payload
    errors = browser.find_element("id", "last-error").get_attribute("textContent")
    assert "<script>window.__pwned = 3</script> \\x1b[31mprovider down" in errors

    browser.get(f"{acting}/operations/{world.hostile_type}")
    assert _text(browser, "#type") == "<script>window.__pwned = 4</script>\\x1b[2J"
    browser.get(f"{acting}/operations?{urlencode({'type': HOSTILE_TYPE})}")
    assert _ids_listed(browser) == [world.hostile_type]
