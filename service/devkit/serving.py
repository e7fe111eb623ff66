"""Small HTTP servers on loopback: documents for the ``url`` form, webhook receivers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from service.devkit.ports import HOST


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler], *, name: str) -> Iterator[str]:
    """Run `handler` in a threaded server on a free loopback port for the block; yields the
    base URL (``http://127.0.0.1:<port>``). The server is shut down on the way out."""
    server = ThreadingHTTPServer((HOST, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that writes no access log, with a helper to answer bytes."""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def send_body(self, body: bytes, *, content_type: str = "application/octet-stream") -> None:
        """200 with `body` (a client that hung up is not an error)."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)


@contextlib.contextmanager
def serve_files(files: dict[str, bytes]) -> Iterator[str]:
    """Serve ``files[name]`` at ``/<name>`` (anything else is 404); yields the base URL."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_body(body)

    with serve_http(Handler, name="file-server") as base_url:
        yield base_url
