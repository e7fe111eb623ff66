"""Pure checks on uploaded documents: format by magic bytes, base64 and data URIs.

The emulator, like the real service, decides the format from the file's first
bytes, not from the declared Content-Type alone. Nothing here does I/O.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Final, Literal

MimeType = Literal[
    "image/jpeg", "image/png", "image/gif", "image/bmp", "image/webp", "application/pdf"
]

SUPPORTED_MIME_TYPES: Final[tuple[MimeType, ...]] = (
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/bmp",
    "image/webp",
    "application/pdf",
)

EXTENSION_BY_MIME: Final[dict[MimeType, str]] = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/webp": "webp",
    "application/pdf": "pdf",
}

SNIFF_BYTES: Final = 16
"""How many leading bytes `sniff_mime_type` needs; callers keep at least this many."""


def sniff_mime_type(head: bytes) -> MimeType | None:
    """The supported format whose signature starts `head`, or None if none does."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"BM") and head[6:10] == b"\x00\x00\x00\x00":
        # Bytes 6-9 of a BITMAPFILEHEADER are reserved zeros: "BM" alone is too weak.
        return "image/bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    return None


def normalise_mime_type(declared: str) -> str:
    """`image/JPEG; charset=x` -> `image/jpeg`, and the common alias image/jpg."""
    base = declared.split(";", 1)[0].strip().lower()
    return "image/jpeg" if base in ("image/jpg", "image/pjpeg") else base


def is_supported_mime_type(declared: str) -> bool:
    """Whether a declared Content-Type names one of the accepted formats."""
    return normalise_mime_type(declared) in SUPPORTED_MIME_TYPES


class Base64Error(ValueError):
    """The image_base64 value is not valid base64 or not a valid data URI."""


@dataclass(frozen=True, slots=True)
class DecodedBase64:
    """What the emulator needs of a base64 document, without keeping all of it."""

    head: bytes
    size_bytes: int
    declared_mime_type: str | None


_DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*?);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_CHUNK_CHARS: Final = 4 * 64 * 1024


def split_data_uri(value: str) -> tuple[str | None, str]:
    """Split `data:<mime>;base64,<payload>` into (mime or None, payload).

    A value without the `data:` prefix is returned unchanged as raw base64.
    A `data:` URI that is not base64-encoded is an error: the API takes base64 only.
    """
    if value[:5].lower() != "data:":
        return None, value
    match = _DATA_URI.match(value)
    if match is None:
        raise Base64Error("image_base64 data URI must have the form data:<mime>;base64,<data>")
    mime = match.group("mime").strip() or None
    return mime, value[match.end() :]


def decode_base64_document(value: str, *, max_bytes: int) -> DecodedBase64:
    """Validate raw base64 or a data URI, returning its first bytes and decoded size.

    Decodes in chunks so a large document is never held decoded all at once.
    Whitespace (line-wrapped base64) is tolerated; any other non-alphabet
    character, bad padding or an empty payload raises `Base64Error`.
    Raises `DocumentTooLarge` as soon as the decoded size passes `max_bytes`.
    """
    declared, payload = split_data_uri(value)
    if _WHITESPACE.search(payload):
        payload = _WHITESPACE.sub("", payload)
    if not payload:
        raise Base64Error("image_base64 is empty")
    if len(payload) % 4:
        raise Base64Error("image_base64 is not valid base64 (length is not a multiple of 4)")
    head = b""
    size_bytes = 0
    last_start = len(payload) - _CHUNK_CHARS
    for start in range(0, len(payload), _CHUNK_CHARS):
        chunk = payload[start : start + _CHUNK_CHARS]
        if start < last_start and "=" in chunk:
            raise Base64Error("image_base64 is not valid base64 (padding inside the data)")
        try:
            decoded = binascii.a2b_base64(chunk, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise Base64Error(f"image_base64 is not valid base64 ({exc})") from exc
        if len(head) < SNIFF_BYTES:
            head += decoded[: SNIFF_BYTES - len(head)]
        size_bytes += len(decoded)
        if size_bytes > max_bytes:
            raise DocumentTooLarge(max_bytes=max_bytes)
    return DecodedBase64(head=head, size_bytes=size_bytes, declared_mime_type=declared)


class DocumentTooLarge(Exception):
    """The document passed the configured maximum size."""

    def __init__(self, *, max_bytes: int) -> None:
        super().__init__(f"document exceeds {max_bytes} bytes")
        self.max_bytes = max_bytes


def size_label(max_bytes: int) -> str:
    """`104857600` -> `100MB`, as in the API's 413 message; smaller limits in KB or B."""
    mib, kib = 1024 * 1024, 1024
    if max_bytes % mib == 0:
        return f"{max_bytes // mib}MB"
    if max_bytes % kib == 0:
        return f"{max_bytes // kib}KB"
    return f"{max_bytes}B"
