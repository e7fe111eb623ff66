"""Safe URL fetching for fetch mode, against real HTTP(S) servers on loopback.

Loopback is all the tests can reach, so "public" hosts are played by
127.0.0.2 through an injected address policy, and hostnames by an injected
resolver; the real policy is tested on its own as a pure function.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from service.errors import BridgeError
from service.fetch import (
    DocumentTooLarge,
    FetchError,
    ForbiddenAddress,
    InvalidURL,
    IPAddress,
    SourceUnavailable,
    TransientFetchError,
    fetch_document,
    filename_for,
    is_forbidden_address,
    sniff_content_type,
)

PDF = b"%PDF-1.7\n" + b"x" * 5000 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
FAKE_PUBLIC = ipaddress.ip_address("127.0.0.2")


def fake_public_policy(ip: IPAddress) -> bool:
    """The real policy, except that 127.0.0.2 counts as a public address."""
    return ip != FAKE_PUBLIC and is_forbidden_address(ip)


class DocServer:
    """A threaded HTTP server with the routes the tests need; counts hits per path."""

    def __init__(self, host: str, *, tls: ssl.SSLContext | None = None) -> None:
        self.hits: list[str] = []
        self.hosts: list[str] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                owner.hits.append(parts.path)
                owner.hosts.append(self.headers.get("Host", ""))
                route = parts.path
                if route in ("/doc.pdf", "/files/"):
                    self._send(200, PDF, {"Content-Type": "application/pdf"})
                elif route == "/octet":
                    self._send(200, PNG, {"Content-Type": "application/octet-stream"})
                elif route == "/cd":
                    self._send(
                        200,
                        PDF,
                        {
                            "Content-Type": "application/pdf",
                            "Content-Disposition": "attachment; "
                            "filename*=UTF-8''na%C3%AFve%20scan.pdf; "
                            'filename="fallback.pdf"',
                        },
                    )
                elif route == "/host":
                    self._send(
                        200, self.headers.get("Host", "").encode(), {"Content-Type": "text/plain"}
                    )
                elif route == "/big-declared":
                    self._send(
                        200,
                        b"%PDF-",
                        {"Content-Length": "10000000", "Content-Type": "application/pdf"},
                    )
                    self.close_connection = True
                elif route == "/big-streamed":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/pdf")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    try:
                        for _ in range(64):
                            self.wfile.write(b"%PDF-" + b"y" * 65531)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                elif route == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"%PDF-")
                    self.wfile.flush()
                    owner.release.wait(10)
                    self.close_connection = True
                elif route == "/empty":
                    self._send(200, b"", {"Content-Type": "application/pdf"})
                elif route == "/redirect":
                    self._send(302, b"", {"Location": query["to"][0]})
                elif route == "/loop":
                    self._send(302, b"", {"Location": "/loop"})
                elif route == "/no-location":
                    self._send(302, b"", {})
                elif route == "/unavailable":
                    self._send(503, b"busy", {})
                else:
                    self._send(404, b"not here", {"Content-Type": "text/plain"})

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{host}:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[DocServer]:
    srv = DocServer("127.0.0.1")
    yield srv
    srv.close()


@pytest.fixture
def public_server() -> Iterator[DocServer]:
    """A server on 127.0.0.2, which `fake_public_policy` treats as public."""
    srv = DocServer("127.0.0.2")
    yield srv
    srv.close()


def resolver_for(table: dict[str, Sequence[str]], calls: list[str] | None = None) -> Any:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError(f"unknown host {host}")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


async def fetch(url: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_bytes", 1_000_000)
    kwargs.setdefault("timeout_s", 5.0)
    return await fetch_document(url, **kwargs)


# --------------------------------------------------------------------------- pure policy


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("2001:4860:4860::8888", False),
        ("::ffff:8.8.8.8", False),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("10.0.0.1", True),
        ("172.16.5.4", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("192.0.2.1", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("ff02::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("2002:7f00:1::1", True),
        ("2002:a00:1::1", True),
    ],
)
def test_address_policy(address: str, forbidden: bool) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address)) is forbidden


def test_sniffing_and_filenames() -> None:
    assert sniff_content_type(PDF) == "application/pdf"
    assert sniff_content_type(PNG) == "image/png"
    assert sniff_content_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert sniff_content_type(b"GIF89a...") == "image/gif"
    assert sniff_content_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_content_type(b"BM\x00\x00\x00\x00\x00\x00\x00\x00") == "image/bmp"
    assert sniff_content_type(b"<html>") is None
    assert (
        filename_for(
            content_disposition=None, url_path="/a/b/inv%20oice.pdf", content_type="application/pdf"
        )
        == "inv oice.pdf"
    )
    assert filename_for(content_disposition=None, url_path="/", content_type="image/png") == (
        "document.png"
    )
    assert (
        filename_for(
            content_disposition='attachment; filename="../../etc/passwd"',
            url_path="/x",
            content_type=None,
        )
        == "passwd"
    )
    assert (
        filename_for(
            content_disposition="inline; filename=scan.jpg",
            url_path="/x",
            content_type="image/jpeg",
        )
        == "scan.jpg"
    )
    assert (
        filename_for(
            content_disposition="attachment; filename*=UTF-8''%E2%82%AC.pdf",
            url_path="/x",
            content_type=None,
        )
        == "€.pdf"
    )
    assert filename_for(content_disposition=None, url_path="/scan", content_type=None) == "scan"


# --------------------------------------------------------------------------- success


async def test_fetches_to_a_temp_file_in_the_given_dir(server: DocServer, tmp_path: Path) -> None:
    doc = await fetch(f"{server.url}/doc.pdf", allow_private=True, temp_dir=str(tmp_path))
    try:
        assert doc.size_bytes == len(PDF)
        assert doc.content_type == "application/pdf"
        assert doc.filename == "doc.pdf"
        assert doc.path.parent == tmp_path
        assert doc.file.read() == PDF
        assert doc.file.read(4) == b"%PDF"  # .file rewinds each time
    finally:
        doc.close()
    assert not doc.path.exists()
    doc.close()  # idempotent


async def test_generic_content_type_is_sniffed(server: DocServer) -> None:
    with await fetch(f"{server.url}/octet", allow_private=True) as doc:
        assert doc.content_type == "image/png"
        assert doc.declared_content_type == "application/octet-stream"
        assert doc.filename == "octet.png"


async def test_content_disposition_names_the_file(server: DocServer) -> None:
    with await fetch(f"{server.url}/cd", allow_private=True) as doc:
        assert doc.filename == "naïve scan.pdf"


async def test_connects_to_the_checked_address_with_the_original_host(server: DocServer) -> None:
    calls: list[str] = []
    resolve = resolver_for({"docs.test": ["127.0.0.1"]}, calls)
    with await fetch(
        f"http://docs.test:{server.port}/host", allow_private=True, resolver=resolve
    ) as doc:
        assert doc.file.read() == f"docs.test:{server.port}".encode()
        assert doc.final_url == f"http://docs.test:{server.port}/host"
    assert calls == ["docs.test"]


async def test_redirects_are_followed_and_each_hop_resolved(public_server: DocServer) -> None:
    calls: list[str] = []
    resolve = resolver_for({"a.test": ["127.0.0.2"], "b.test": ["127.0.0.2"]}, calls)
    target = f"http://b.test:{public_server.port}/doc.pdf"
    with await fetch(
        f"http://a.test:{public_server.port}/redirect?to={target}",
        resolver=resolve,
        is_forbidden=fake_public_policy,
    ) as doc:
        assert doc.file.read() == PDF
        assert doc.final_url == target
    assert calls == ["a.test", "b.test"]
    assert public_server.hits == ["/redirect", "/doc.pdf"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/doc.pdf",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/doc.pdf",
        "http://[::ffff:127.0.0.1]/doc.pdf",
        "https://0.0.0.0/doc.pdf",
    ],
)
async def test_private_literals_are_refused(url: str) -> None:
    with pytest.raises(ForbiddenAddress) as caught:
        await fetch(url)
    assert caught.value.reason == "forbidden_address"


async def test_loopback_is_refused_without_connecting(server: DocServer) -> None:
    with pytest.raises(ForbiddenAddress):
        await fetch(f"{server.url}/doc.pdf")
    assert server.hits == []


async def test_a_name_resolving_to_any_private_address_is_refused() -> None:
    resolve = resolver_for(
        {"mixed.test": ["127.0.0.2", "10.9.8.7"], "internal.test": ["192.168.0.10"]}
    )
    for host in ("mixed.test", "internal.test"):
        with pytest.raises(ForbiddenAddress):
            await fetch(f"http://{host}/doc.pdf", resolver=resolve, is_forbidden=fake_public_policy)


async def test_public_then_redirect_to_private_is_refused(
    public_server: DocServer, server: DocServer
) -> None:
    resolve = resolver_for({"public.test": ["127.0.0.2"], "sneaky.test": ["127.0.0.1"]})
    for target in (f"{server.url}/doc.pdf", f"http://sneaky.test:{server.port}/doc.pdf"):
        with pytest.raises(ForbiddenAddress):
            await fetch(
                f"http://public.test:{public_server.port}/redirect?to={target}",
                resolver=resolve,
                is_forbidden=fake_public_policy,
            )
    assert public_server.hits == ["/redirect", "/redirect"]
    assert server.hits == []


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.pdf", "file:///etc/passwd", "not a url", "http://", "//x/y"]
)
async def test_invalid_urls(url: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        await fetch(url, allow_private=True)
    assert caught.value.reason == "invalid_url"


async def test_unresolvable_host() -> None:
    with pytest.raises(SourceUnavailable) as caught:
        await fetch("http://nowhere.test/a.pdf", resolver=resolver_for({}))
    assert caught.value.reason == "source_unavailable"


async def test_a_resolver_that_says_try_again_is_transient() -> None:
    async def busy_resolver(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(TransientFetchError) as caught:
        await fetch("http://busy.test/a.pdf", resolver=busy_resolver)
    assert "Temporary failure" in str(caught.value)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TransientFetchError, "source_unavailable"),
        (SourceUnavailable, "source_unavailable"),
        (DocumentTooLarge, "too_large"),
        (ForbiddenAddress, "forbidden_address"),
        (InvalidURL, "invalid_url"),
    ],
)
def test_each_fetch_error_names_its_reason_and_is_a_bridge_error(
    error: type[FetchError], reason: str
) -> None:
    exc = error("x", status_code=500)
    assert isinstance(exc, FetchError)
    assert isinstance(exc, BridgeError)
    assert exc.reason == reason
    assert exc.status_code == 500


# --------------------------------------------------------------------------- failures


def _temp_files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def test_declared_oversize_is_refused_before_reading(
    server: DocServer, tmp_path: Path
) -> None:
    with pytest.raises(DocumentTooLarge) as caught:
        await fetch(
            f"{server.url}/big-declared",
            allow_private=True,
            max_bytes=1_000_000,
            temp_dir=str(tmp_path),
        )
    assert caught.value.reason == "too_large"
    assert _temp_files(tmp_path) == []


async def test_streamed_oversize_stops_at_max_bytes(server: DocServer, tmp_path: Path) -> None:
    with pytest.raises(DocumentTooLarge) as caught:
        await fetch(
            f"{server.url}/big-streamed",
            allow_private=True,
            max_bytes=300_000,
            temp_dir=str(tmp_path),
        )
    assert caught.value.reason == "too_large"
    assert _temp_files(tmp_path) == []


async def test_total_deadline(server: DocServer, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TransientFetchError) as caught:
        await fetch(f"{server.url}/slow", allow_private=True, timeout_s=0.5, temp_dir=str(tmp_path))
    elapsed = time.monotonic() - started
    assert caught.value.reason == "source_unavailable"
    assert 0.4 < elapsed < 3.0
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/missing", 404, SourceUnavailable),
        ("/unavailable", 503, TransientFetchError),
        ("/no-location", 302, SourceUnavailable),
    ],
)
async def test_http_failures(
    server: DocServer, path: str, status: int, error: type[FetchError]
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch(f"{server.url}{path}", allow_private=True)
    assert type(caught.value) is error
    assert caught.value.reason == "source_unavailable"
    assert caught.value.status_code == status


async def test_empty_body_is_unavailable(server: DocServer) -> None:
    with pytest.raises(SourceUnavailable):
        await fetch(f"{server.url}/empty", allow_private=True)


async def test_redirect_limit(server: DocServer) -> None:
    with pytest.raises(SourceUnavailable):
        await fetch(f"{server.url}/loop", allow_private=True, max_redirects=3)
    assert server.hits == ["/loop"] * 4


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientFetchError) as caught:
        await fetch(f"http://127.0.0.1:{port}/doc.pdf", allow_private=True)
    assert caught.value.reason == "source_unavailable"


# --------------------------------------------------------------------------- https pinning


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=docs.test",
            "-addext",
            "subjectAltName=DNS:docs.test",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(tls_files: tuple[Path, Path]) -> Iterator[DocServer]:
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv = DocServer("127.0.0.1", tls=context)
    yield srv
    srv.close()


async def test_https_pins_the_ip_and_still_verifies_the_hostname(
    tls_server: DocServer, tls_files: tuple[Path, Path]
) -> None:
    """SNI and certificate checks use the URL's hostname while TCP goes to the checked IP."""
    trust = ssl.create_default_context(cafile=str(tls_files[0]))
    resolve = resolver_for({"docs.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    async with httpx.AsyncClient(verify=trust, trust_env=False) as client:
        with await fetch(
            f"https://docs.test:{tls_server.port}/doc.pdf",
            client=client,
            allow_private=True,
            resolver=resolve,
        ) as doc:
            assert doc.file.read() == PDF
        assert tls_server.hosts == [f"docs.test:{tls_server.port}"]
        with pytest.raises(FetchError) as caught:  # certificate is not for other.test
            await fetch(
                f"https://other.test:{tls_server.port}/doc.pdf",
                client=client,
                allow_private=True,
                resolver=resolve,
            )
    assert caught.value.reason == "source_unavailable"
    assert tls_server.hosts == [f"docs.test:{tls_server.port}"]
