"""docs/web.md's mounting example is real: its code block runs as written, the console answers
under the host's mount point, and the example's hook decides who may act."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from webkit import http

from pgoutbox.settings import DatabaseSettings

WEB_MD = Path(__file__).resolve().parents[2] / "docs" / "web.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", WEB_MD.read_text(), re.S)
    assert len(blocks) == 1, "docs/web.md has one Python example"
    return str(blocks[0])


class _SignedIn:
    """The host's authentication, as the example assumes it: a user in the ASGI scope."""

    def __init__(self, app: Any, user: Any) -> None:
        self.app, self.user = app, user

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.user is not None:
            scope = {**scope, "user": self.user}
        await self.app(scope, receive, send)


@pytest.fixture
def example(db_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PGOUTBOX_DATABASE__DSN", db_settings.dsn or "")
    monkeypatch.setenv("PGOUTBOX_DATABASE__SCHEMA", db_settings.schema_name)
    namespace: dict[str, Any] = {}
    exec(compile(_example(), str(WEB_MD), "exec"), namespace)
    return namespace["app"]


def _serve(app: Any, console: Any) -> Any:
    """``app`` on a free port in a thread; the console's pool is closed in the server's loop
    when it stops."""
    import asyncio
    import threading
    import time

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )

    async def main() -> None:
        try:
            await server.serve()
        finally:
            await console.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        assert time.monotonic() < deadline, "the server did not start in 30 s"
        time.sleep(0.02)
    return server, thread


@pytest.mark.parametrize(
    ("user", "shown"),
    [
        (None, "you are not signed in as someone who may act"),
        (SimpleNamespace(email="bob@example.com", is_operator=False), "you are not signed in"),
        (SimpleNamespace(email="ann@example.com", is_operator=True), "acting as"),
    ],
)
def test_the_docs_example_mounts_the_console_and_its_hook_decides_who_acts(
    example: Any, user: Any, shown: str
) -> None:
    console = example.routes[0].app.state.console  # the Mount's app: create_app's
    server, thread = _serve(_SignedIn(example, user), console)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        status, body, _ = http(f"http://127.0.0.1:{port}/outbox/operations")
        assert status == 200
        assert 'href="/outbox/lifecycles"' in body
        assert 'href="/outbox/static/console.css"' in body
        assert shown in body
        if user is not None and user.is_operator:
            assert "ann@example.com" in body
    finally:
        server.should_exit = True
        thread.join(timeout=30)
