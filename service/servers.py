"""The HTTP servers the bridge embeds (ops: /metrics and probes; webhooks): uvicorn, tamed.

Both run inside the bridge's event loop. uvicorn's own signal handling is off (the
bridge owns SIGTERM/SIGINT and drains before it stops them), and its log config is
not installed, so its lines go through the service's handlers: one JSON stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the bridge owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def embedded_server(app: Any, *, host: str, port: int, **options: Any) -> EmbeddedServer:
    """A server for `app` on host:port (not started); `options` are more uvicorn settings."""
    return EmbeddedServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,  # uvicorn logs through the service's handlers: one JSON stream
            access_log=False,
            lifespan="off",
            **options,
        )
    )
