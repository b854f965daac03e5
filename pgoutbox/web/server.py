"""Serving the console on its own: ``pgoutbox web`` and ``pgoutbox demo --web``."""

from __future__ import annotations

from starlette.requests import Request

from pgoutbox.settings import DatabaseSettings
from pgoutbox.web.app import ActorHook, create_app


def actor_hook(actor: str | None, actor_header: str | None) -> ActorHook | None:
    """The hook ``pgoutbox web`` builds from its options: everyone acts as ``actor`` (a console
    on one's own machine), or as the name an authenticating proxy puts in ``actor_header``;
    None (no actions) when neither is given."""
    if actor is not None and actor_header is not None:
        raise ValueError("give --actor or --actor-header, not both")
    if actor is not None:
        if not actor.strip():
            raise ValueError(f"invalid --actor {actor!r}: name who acts")
        return lambda request: actor
    if actor_header is not None:
        header = actor_header.lower()

        def from_header(request: Request) -> str | None:
            return request.headers.get(header) or None

        return from_header
    return None


async def serve(
    settings: DatabaseSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    actor: ActorHook | None = None,
    read_only: bool = False,
) -> None:
    """Serve the console with uvicorn until interrupted (Ctrl-C, SIGTERM)."""
    import uvicorn

    app = create_app(settings, actor=actor, read_only=read_only)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    try:
        await uvicorn.Server(config).serve()
    finally:
        await app.state.console.close()
