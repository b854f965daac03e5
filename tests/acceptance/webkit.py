"""The web console's browser tests' kit: the console served by uvicorn in a thread, Debian's
headless chromium driven by Selenium through Debian's chromedriver (nothing is downloaded),
screenshots for docs/web.md, and plain HTTP requests for what a browser would not send."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pgoutbox.settings import DatabaseSettings
from pgoutbox.web import ActorHook, create_app

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "web"
INSTALL_CHROMIUM = (
    "the web console's browser tests need Debian's headless chromium and its driver: "
    "apt-get install -y chromium chromium-driver (.ci/run installs them)"
)


class Served:
    """A console listening on 127.0.0.1 at ``url`` (ends with no slash)."""

    def __init__(self, url: str, stop: Callable[[], None]) -> None:
        self.url = url
        self.stop = stop


@contextmanager
def serve(
    settings: DatabaseSettings, *, actor: ActorHook | None = None, read_only: bool = False
) -> Iterator[Served]:
    """The console on a free port, in a thread with its own event loop, until the block ends."""
    import uvicorn

    app = create_app(settings, actor=actor, read_only=read_only)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)

    async def main() -> None:
        try:
            await server.serve()
        finally:
            await app.state.console.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the console's server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)

    try:
        yield Served(f"http://127.0.0.1:{port}", stop)
    finally:
        stop()


def chromium_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver; the test fails (not skips) without them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail(f"no chromium or chromedriver on PATH: {INSTALL_CHROMIUM}", pytrace=False)
    return browser, driver


def start_browser() -> Any:
    """Headless chromium under Selenium, offline: the driver's path is given, so Selenium
    Manager (which would download one) never runs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    os.environ["SE_OFFLINE"] = "true"  # and should it run anyway, it must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,860",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def screenshot(browser: Any, name: str, scratch: Path) -> Path:
    """The page as docs/web/NAME.png when PGOUTBOX_UPDATE_DOCS=1, else in a scratch folder."""
    folder = DOCS_SCREENSHOTS if os.environ.get("PGOUTBOX_UPDATE_DOCS") == "1" else scratch
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert browser.save_screenshot(str(path)), f"no screenshot of {name}"
    return path


def wait_until(condition: Callable[[], Any], what: str, within: float = 30) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + within
    while True:
        try:
            found = condition()
        except Exception:  # a page half loaded: try again
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


def http(
    url: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, str]]:
    """A plain request (no redirects followed): status, body and headers (names lower-case)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode(), _lower(response.headers.items())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), _lower(error.headers.items())


def _lower(items: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in items}
