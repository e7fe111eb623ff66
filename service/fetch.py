"""Download a document URL safely, for the bridge's fetch mode.

Fetch mode is for URLs DocuTray cannot reach itself: the bridge downloads
the document and uploads it. A URL in a request is attacker-controlled, so
the download must not become a way into the cluster's private network
(SSRF). What a caller may rely on:

1. Only ``http`` and ``https`` URLs with a host are fetched.
2. Every hop (the first URL and each redirect, followed by hand up to
   ``max_redirects``) is resolved once, and refused when ANY of its
   addresses is private, loopback, link-local, multicast, reserved,
   unspecified or otherwise not globally routable (IPv4 embedded in IPv6
   included), unless ``allow_private``.
3. The connection goes to the very address that was checked (no second DNS
   lookup, so DNS rebinding cannot swap it). For ``http`` the URL's host is
   replaced by the IP and ``Host`` carries the name. For ``https`` the same
   is done and the hostname is passed to httpcore as the ``sni_hostname``
   request extension: TLS sends it as SNI and verifies the certificate
   against it, so certificate checking is as strict as for a normal request.
   Every hop sends ``Connection: close``: the pool keys connections by the
   IP, so a kept-alive TLS connection made for one hostname could otherwise
   be reused for another name pinned to the same IP, skipping its check.
4. The body streams to a temp file; ``Content-Length`` above ``max_bytes``
   is refused before reading, and the download stops as soon as the bytes
   received cross ``max_bytes``. ``timeout_s`` bounds the whole fetch (DNS,
   redirects, body).
5. Proxies from the environment are never used (they would defeat the pin).

Failures raise a ``FetchError`` subclass; its ``reason`` (source_unavailable,
too_large, forbidden_address, invalid_url) is the dead letter's reason code::

    FetchError
    ├── TransientFetchError   a later attempt may succeed (timeout, connection error,
    │                         DNS try-again, 408/425/429/5xx from the source)
    ├── SourceUnavailable     the source failed for good (another 4xx, empty body, ...)
    ├── DocumentTooLarge      above ``max_bytes``
    ├── ForbiddenAddress      refused by the SSRF policy (rule 2)
    └── InvalidURL            not an http(s) URL with a host (rule 1)

The pipeline retries ``TransientFetchError`` and dead-letters the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Literal, Self
from urllib.parse import unquote

import httpx
import structlog

from service import __version__
from service.errors import BridgeError
from service.intake import sniff_content_type

__all__ = [
    "AddressPolicy",
    "DocumentTooLarge",
    "FetchError",
    "FetchReason",
    "FetchedDocument",
    "ForbiddenAddress",
    "IPAddress",
    "InvalidURL",
    "Resolver",
    "SourceUnavailable",
    "TransientFetchError",
    "fetch_document",
    "filename_for",
    "is_forbidden_address",
    "resolve_host",
    "sniff_content_type",
]

log = structlog.get_logger(__name__)

FetchReason = Literal["source_unavailable", "too_large", "forbidden_address", "invalid_url"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
"""``(host, port) -> addresses``; the default asks the system resolver (getaddrinfo)."""
AddressPolicy = Callable[[IPAddress], bool]
"""``ip -> True when the address must not be contacted``."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
_GENERIC_CONTENT_TYPES = frozenset(
    {"", "application/octet-stream", "binary/octet-stream", "application/binary"}
)
_EXTENSIONS = {
    "application/pdf": ".pdf",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/webp": ".webp",
}
_CHUNK_BYTES = 256 * 1024
_MAX_FILENAME_CHARS = 200
_CD_PARAM_RE = re.compile(
    r';\s*(?P<name>filename\*?)\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<token>[^;\s]+))',
    re.IGNORECASE,
)


class FetchError(BridgeError):
    """The document could not be fetched; ``reason`` names the failure for a dead letter."""

    reason: ClassVar[FetchReason] = "source_unavailable"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TransientFetchError(FetchError):
    """A later attempt may succeed: timeout, connection error, DNS try-again, 408/425/429/5xx."""


class SourceUnavailable(FetchError):
    """The source failed for good: another 4xx, an empty body, no address, a redirect loop."""


class DocumentTooLarge(FetchError):
    """The document is larger than ``max_bytes`` (declared or counted while streaming)."""

    reason: ClassVar[FetchReason] = "too_large"


class ForbiddenAddress(FetchError):
    """The host resolves to an address the SSRF policy refuses to contact."""

    reason: ClassVar[FetchReason] = "forbidden_address"


class InvalidURL(FetchError):
    """Not an ``http``/``https`` URL with a host."""

    reason: ClassVar[FetchReason] = "invalid_url"


# --------------------------------------------------------------------------- pure policy


def is_forbidden_address(ip: IPAddress) -> bool:
    """True for any address that is not a public unicast one (the SSRF policy).

    Unwraps IPv4 carried in IPv6 (``::ffff:a.b.c.d``, 6to4, Teredo) first,
    because Python 3.11 judges ``::ffff:127.0.0.1`` by its IPv6 form.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the socket really talks IPv4 to this address
            return is_forbidden_address(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and is_forbidden_address(embedded):
            return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def _safe_filename(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().strip(".")
    return name[:_MAX_FILENAME_CHARS]


def _disposition_filename(content_disposition: str | None) -> str | None:
    if not content_disposition:
        return None
    plain: str | None = None
    for match in _CD_PARAM_RE.finditer(content_disposition):
        value = match.group("quoted")
        value = re.sub(r"\\(.)", r"\1", value) if value is not None else match.group("token")
        if match.group("name").endswith("*"):
            # RFC 5987: charset'language'percent-encoded; it wins over the plain form.
            charset, _, rest = value.partition("'")
            _, _, encoded = rest.partition("'")
            try:
                return unquote(encoded, encoding=charset or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                continue
        plain = plain or value
    return plain


def filename_for(
    *, content_disposition: str | None, url_path: str, content_type: str | None
) -> str:
    """A safe file name: Content-Disposition, else the URL's last path segment, else
    ``document``; an extension matching ``content_type`` is added when it has none."""
    name = _safe_filename(_disposition_filename(content_disposition) or "")
    if not name:
        name = _safe_filename(unquote(url_path.rstrip("/").rsplit("/", 1)[-1]))
    if not name:
        name = "document"
    extension = _EXTENSIONS.get(content_type or "")
    if extension and "." not in name:
        name += extension
    return name


def _validate_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidURL(f"invalid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidURL(f"unsupported URL scheme {parsed.scheme!r}")
    if not parsed.raw_host:
        raise InvalidURL("URL has no host")
    return parsed


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """All addresses the system resolver gives for ``host`` (TCP), in its order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        # IPv6 scope ids ("fe80::1%eth0") are link-local and refused anyway.
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in seen:
            seen.append(ip)
    return seen


# --------------------------------------------------------------------------- the result


class FetchedDocument:
    """A downloaded document in a temp file that is deleted on :meth:`close`.

    ``content_type`` is the format sniffed from the magic bytes when
    recognised, else the server's declared type (None if neither).
    """

    def __init__(
        self,
        *,
        path: Path,
        file: IO[bytes],
        size_bytes: int,
        content_type: str | None,
        declared_content_type: str | None,
        filename: str,
        final_url: str,
    ) -> None:
        self.path = path
        self._file = file
        self.size_bytes = size_bytes
        self.content_type = content_type
        self.declared_content_type = declared_content_type
        self.filename = filename
        self.final_url = final_url

    @property
    def file(self) -> IO[bytes]:
        """The open temp file, rewound to the start (pass it to ``submit_upload``)."""
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        """Close and delete the temp file; safe to call twice."""
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FetchedDocument(filename={self.filename!r}, size_bytes={self.size_bytes}, "
            f"content_type={self.content_type!r})"
        )


# --------------------------------------------------------------------------- the fetch


async def fetch_document(
    url: str,
    *,
    client: httpx.AsyncClient | None = None,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool = False,
    max_redirects: int = 5,
    temp_dir: str | None = None,
    resolver: Resolver | None = None,
    is_forbidden: AddressPolicy | None = None,
    user_agent: str | None = None,
) -> FetchedDocument:
    """Download ``url`` to a temp file under the rules in the module docstring.

    ``client`` lets a caller share a pool or inject a transport; it must not
    be configured with a proxy, and redirects are always handled here. The
    caller owns the returned document and must ``close()`` it.
    ``resolver``/``is_forbidden`` replace DNS and the address policy (tests
    use them to play "public" and "private" hosts on loopback).
    """
    if max_bytes <= 0 or timeout_s <= 0 or max_redirects < 0:
        raise ValueError("max_bytes and timeout_s must be > 0, max_redirects >= 0")
    first = _validate_url(url)
    own_client = client is None
    http = client or httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s), follow_redirects=False, trust_env=False
    )
    hops = _Hops(
        http=http,
        headers={
            "User-Agent": user_agent or f"docutray-bridge/{__version__}",
            "Accept-Encoding": "identity",
            "Connection": "close",
        },
        resolve=resolver or resolve_host,
        forbidden=None if allow_private else (is_forbidden or is_forbidden_address),
    )
    try:
        with _transport_failures_are_transient(timeout_s=timeout_s):
            async with asyncio.timeout(timeout_s):
                return await hops.follow(
                    first, max_redirects=max_redirects, max_bytes=max_bytes, temp_dir=temp_dir
                )
    finally:
        if own_client:
            await http.aclose()


@contextlib.contextmanager
def _transport_failures_are_transient(*, timeout_s: float) -> Iterator[None]:
    """Map the deadline and httpx's network errors to `TransientFetchError`."""
    try:
        yield
    except TimeoutError:
        raise TransientFetchError(f"download did not finish within {timeout_s} s") from None
    except httpx.TimeoutException as exc:
        raise TransientFetchError(f"download timed out ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise TransientFetchError(f"source unreachable ({type(exc).__name__})") from None


@dataclass(frozen=True)
class _Hops:
    """What every hop of one fetch shares: the client, headers, resolver and address policy."""

    http: httpx.AsyncClient
    headers: dict[str, str]
    resolve: Resolver
    forbidden: AddressPolicy | None

    async def follow(
        self, url: httpx.URL, *, max_redirects: int, max_bytes: int, temp_dir: str | None
    ) -> FetchedDocument:
        """GET ``url``, following up to ``max_redirects`` redirects by hand, and save the body."""
        current = url
        for _hop in range(max_redirects + 1):
            response = await _open(
                self.http, current, self.headers, resolve=self.resolve, forbidden=self.forbidden
            )
            try:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise SourceUnavailable(
                            f"redirect {response.status_code} without Location",
                            status_code=response.status_code,
                        )
                    current = _validate_url(str(current.join(location)))
                    continue
                return await _save(response, current, max_bytes=max_bytes, temp_dir=temp_dir)
            finally:
                await response.aclose()
        raise SourceUnavailable(f"more than {max_redirects} redirects")


async def _open(
    http: httpx.AsyncClient,
    url: httpx.URL,
    headers: dict[str, str],
    *,
    resolve: Resolver,
    forbidden: AddressPolicy | None,
) -> httpx.Response:
    """Resolve and check ``url``'s host, then send the GET to a checked address."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    literal = _ip_literal(host)
    if literal is not None:
        addresses: Sequence[IPAddress] = [literal]
    else:
        try:
            addresses = await resolve(host, port)
        except OSError as exc:
            try_again = isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN
            error = TransientFetchError if try_again else SourceUnavailable
            raise error(f"cannot resolve host ({exc.strerror or type(exc).__name__})") from None
        if not addresses:
            raise SourceUnavailable("host has no address")
    if forbidden is not None:
        refused = [ip for ip in addresses if forbidden(ip)]
        if refused:
            log.warning("fetch_forbidden_address", host=host, address=str(refused[0]))
            raise ForbiddenAddress(f"host resolves to a forbidden address ({refused[0]})")
    extensions: dict[str, object] = {}
    if url.scheme == "https" and literal is None:
        extensions["sni_hostname"] = host
    hop_headers = {**headers, "Host": url.netloc.decode("ascii")}
    last_error: httpx.ConnectError | None = None
    for ip in addresses:
        pinned = url.copy_with(host=str(ip))
        request = http.build_request("GET", pinned, headers=hop_headers, extensions=extensions)
        try:
            return await http.send(request, stream=True, follow_redirects=False)
        except httpx.ConnectError as exc:
            last_error = exc  # try the next address, as a browser would
    assert last_error is not None
    raise last_error


async def _save(
    response: httpx.Response, url: httpx.URL, *, max_bytes: int, temp_dir: str | None
) -> FetchedDocument:
    """Check the answer and stream its body to a temp file, stopping at ``max_bytes``."""
    status = response.status_code
    if not 200 <= status <= 299:
        transient = status in _TRANSIENT_STATUSES or status >= 500
        error = TransientFetchError if transient else SourceUnavailable
        raise error(f"source answered HTTP {status}", status_code=status)
    declared_length = response.headers.get("content-length")
    if (
        declared_length is not None
        and declared_length.isdigit()
        and int(declared_length) > max_bytes
    ):
        raise DocumentTooLarge(
            f"document is {declared_length} bytes, above {max_bytes}", status_code=status
        )
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - owned by FetchedDocument
        mode="w+b", dir=temp_dir, prefix="docutray-fetch-", delete=False
    )
    path = Path(handle.name)
    try:
        size = 0
        head = b""
        async for chunk in response.aiter_bytes(_CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise DocumentTooLarge(
                    f"document is larger than {max_bytes} bytes", status_code=status
                )
            if len(head) < 16:
                head += chunk[: 16 - len(head)]
            await asyncio.to_thread(handle.write, chunk)
        if size == 0:
            raise SourceUnavailable("source sent an empty body", status_code=status)
        await asyncio.to_thread(handle.flush)
    except BaseException:
        handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    declared = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    content_type = sniff_content_type(head) or (
        declared if declared not in _GENERIC_CONTENT_TYPES else None
    )
    filename = filename_for(
        content_disposition=response.headers.get("content-disposition"),
        url_path=url.path,
        content_type=content_type,
    )
    log.info("document_fetched", host=url.host, size_bytes=size, content_type=content_type)
    return FetchedDocument(
        path=path,
        file=handle,
        size_bytes=size,
        content_type=content_type,
        declared_content_type=declared or None,
        filename=filename,
        final_url=str(url.copy_with(username=None, password=None)),
    )
