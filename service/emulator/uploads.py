"""Reading a submitted document without holding it: multipart, JSON bodies, URLs.

The emulator never needs a document's content, only its first bytes (to
check the format by magic bytes) and its size (to enforce the limit). So
each reader keeps `SNIFF_BYTES` of the document and a byte count, and raises
`DocumentTooLarge` the moment the count passes the limit, before reading on.

Exceptions raised here (all carry what the HTTP answer needs):

    UploadError
     ├── MalformedUpload      -> 400 (bad multipart framing, oversized form field)
     ├── UrlNotReachable      -> 404 "Error accessing URL: <status> <reason>"
     └── UrlDownloadTimeout   -> 408 "URL download timeout (<ms>ms)"
    DocumentTooLarge (formats) -> 413
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

import httpx
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from service.emulator.formats import SNIFF_BYTES, DocumentTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES: Final = 64 * 1024
"""Largest accepted non-file form field (document_type_code, document_metadata)."""

MAX_PARTS: Final = 32
IMAGE_FIELD: Final = "image"


class UploadError(Exception):
    """A document could not be read from the request."""


class MalformedUpload(UploadError):
    """The request body is not a well-formed upload."""


class UrlNotReachable(UploadError):
    """Fetching image_url failed (non-2xx answer or no connection)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UrlDownloadTimeout(UploadError):
    """Fetching image_url took longer than the configured timeout."""


@dataclass(slots=True)
class FilePart:
    """What is kept of an uploaded file: name, declared type, first bytes, size."""

    filename: str | None
    content_type: str | None
    head: bytes = b""
    size_bytes: int = 0


@dataclass(slots=True)
class _Part:
    name: str = ""
    filename: str | None = None
    content_type: str | None = None
    is_file: bool = False
    is_image: bool = False
    data: bytearray = field(default_factory=bytearray)


class MultipartImageReader:
    """Incremental multipart/form-data parser that keeps fields and the image's head.

    Feed chunks with `feed`, then call `finish`. Fields are decoded as UTF-8;
    only the first file part named `image` is measured against
    `max_image_bytes`; any other file part is skipped but counted against the
    same limit, so a request cannot smuggle an unbounded body.
    """

    def __init__(self, content_type_header: str, *, max_image_bytes: int) -> None:
        _, params = parse_options_header(content_type_header)
        boundary = params.get(b"boundary")
        if not boundary:
            raise MalformedUpload("multipart/form-data body has no boundary")
        self.fields: dict[str, str] = {}
        self.image: FilePart | None = None
        self._max_image_bytes = max_image_bytes
        self._other_file_bytes = 0
        self._parts = 0
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk; raises MalformedUpload or DocumentTooLarge."""
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise MalformedUpload(f"malformed multipart body: {exc}") from exc

    def finish(self) -> None:
        """Check the body ended properly; raises MalformedUpload otherwise."""
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise MalformedUpload(f"malformed multipart body: {exc}") from exc
        if self._parser.state != MultipartState.END:
            raise MalformedUpload("malformed multipart body: missing closing boundary")

    # python-multipart callbacks -------------------------------------------

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise MalformedUpload(f"too many multipart parts (max {MAX_PARTS})")
        self._part = _Part()
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = b""
        self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in options:
            raise MalformedUpload("multipart part without a Content-Disposition name")
        part = self._part
        part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            part.is_file = True
            raw_name = options[b"filename"].decode("utf-8", "replace")
            part.filename = posixpath.basename(raw_name.replace("\\", "/")) or None
            declared = self._headers.get(b"content-type")
            part.content_type = declared.decode("latin-1") if declared else None
            if part.name == IMAGE_FIELD and self.image is None:
                part.is_image = True
                self.image = FilePart(filename=part.filename, content_type=part.content_type)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        length = end - start
        if not part.is_file:
            if len(part.data) + length > MAX_FIELD_BYTES:
                raise MalformedUpload(f"form field {part.name!r} exceeds {MAX_FIELD_BYTES} bytes")
            part.data += data[start:end]
            return
        image = self.image
        if part.is_image and image is not None:
            if len(image.head) < SNIFF_BYTES:
                image.head += data[start : start + SNIFF_BYTES - len(image.head)]
            image.size_bytes += length
            if image.size_bytes > self._max_image_bytes:
                raise DocumentTooLarge(max_bytes=self._max_image_bytes)
        else:
            self._other_file_bytes += length
            if self._other_file_bytes > self._max_image_bytes:
                raise DocumentTooLarge(max_bytes=self._max_image_bytes)

    def _on_part_end(self) -> None:
        part = self._part
        if not part.is_file and part.name not in self.fields:
            self.fields[part.name] = part.data.decode("utf-8", "replace")


async def consume_body(
    stream: AsyncIterator[bytes],
    feed: Callable[[bytes], None],
    *,
    drain_limit_bytes: int,
) -> None:
    """Feed a request body to `feed`; on its first error, stop feeding and drain.

    Draining (reading and discarding, at most `drain_limit_bytes` more) lets
    the client finish sending, so it reads our 413/400 instead of seeing the
    connection reset under its upload. The first error is re-raised at the end.
    """
    error: Exception | None = None
    drained = 0
    async for chunk in stream:
        if error is None:
            try:
                feed(chunk)
            except (DocumentTooLarge, MalformedUpload) as exc:
                error = exc
        else:
            drained += len(chunk)
            if drained > drain_limit_bytes:
                break
    if error is not None:
        raise error


class BoundedBody:
    """Accumulates a body (a JSON request) up to `max_bytes`, else DocumentTooLarge."""

    def __init__(self, *, max_bytes: int, document_max_bytes: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._max_bytes = max_bytes
        self._document_max_bytes = document_max_bytes

    def feed(self, chunk: bytes) -> None:
        """Keep `chunk`; raises DocumentTooLarge (with the document limit) when over."""
        self._size += len(chunk)
        if self._size > self._max_bytes:
            self._chunks.clear()
            raise DocumentTooLarge(max_bytes=self._document_max_bytes)
        self._chunks.append(chunk)

    def value(self) -> bytes:
        """The whole body."""
        return b"".join(self._chunks)


def json_body_limit(document_max_bytes: int) -> int:
    """Largest JSON body worth reading: the document in base64 plus 1 MiB of fields."""
    return (document_max_bytes + 2) // 3 * 4 + 1024 * 1024


@dataclass(frozen=True, slots=True)
class FetchedDocument:
    """What is kept of a downloaded image_url."""

    filename: str | None
    head: bytes
    size_bytes: int


class UrlFetcher:
    """Downloads image_url documents through one shared httpx client.

    Redirects are followed. The whole download (connect to last byte) must
    finish within `timeout_s`; the body is counted, not kept.
    """

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(
            follow_redirects=True,
            headers={"User-Agent": "docutray-emulator"},
            trust_env=False,
        )

    async def fetch(self, url: str, *, timeout_s: float, max_bytes: int) -> FetchedDocument:
        """Download `url`, keeping its first bytes and size.

        Raises UrlNotReachable, UrlDownloadTimeout or DocumentTooLarge.
        """
        try:
            async with asyncio.timeout(timeout_s):
                return await self._fetch(url, timeout_s=timeout_s, max_bytes=max_bytes)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise UrlDownloadTimeout(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise UrlNotReachable(type(exc).__name__) from exc

    async def _fetch(self, url: str, *, timeout_s: float, max_bytes: int) -> FetchedDocument:
        async with self._client.stream("GET", url, timeout=timeout_s) as response:
            if not response.is_success:
                raise UrlNotReachable(f"{response.status_code} {response.reason_phrase}".strip())
            head = b""
            size_bytes = 0
            async for chunk in response.aiter_bytes():
                if len(head) < SNIFF_BYTES:
                    head += chunk[: SNIFF_BYTES - len(head)]
                size_bytes += len(chunk)
                if size_bytes > max_bytes:
                    raise DocumentTooLarge(max_bytes=max_bytes)
            name = posixpath.basename(unquote(urlsplit(str(response.url)).path)) or None
            return FetchedDocument(filename=name, head=head, size_bytes=size_bytes)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
