"""Turning a raw input record into a request, or into a reason to dead-letter it.

Pure functions, no I/O: the pipeline calls :func:`parse_record` for every
consumed record and gets either an :class:`Accepted` request or a
:class:`Rejected` verdict with a closed reason code and a message that says
what to fix. Nothing here raises on hostile input: any bytes, any key, any
headers end in one of the two.

Large base64 payloads are judged by their length before anything is decoded,
so a payload that would decode to 150 MB is refused without decoding it.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.messages import (
    SUPPORTED_CONTENT_TYPES,
    DeadLetterReason,
    DocumentRequest,
    EncodedBytes,
    OriginalHeader,
    OriginalRecord,
)

#: (prefix, content type); WebP and BMP need more than a prefix.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
)
#: Enough bytes for the longest magic prefix (WebP: 12 bytes).
_SNIFF_BYTES = 12
#: Deepest JSON nesting accepted in a request (metadata included).
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid request, with the content type the bridge will declare (sniffed when base64)."""

    request: DocumentRequest
    content_type: str | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that can never succeed: dead-letter it with this reason and message."""

    reason: DeadLetterReason
    message: str
    request_id: str | None = None
    document_type_code: str | None = None


def sniff_content_type(head: bytes) -> str | None:
    """The document type from its first bytes (magic numbers), or None if unsupported."""
    for prefix, content_type in _MAGIC:
        if head.startswith(prefix):
            return content_type
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM") and head[6:10] == b"\x00\x00\x00\x00":
        return "image/bmp"  # the BMP header's reserved fields are zero
    return None


def split_data_uri(value: str) -> tuple[str | None, str]:
    """Split a ``data:<mime>;base64,<payload>`` URI into (mime, payload); plain base64 passes."""
    if not value.startswith("data:"):
        return None, value
    header, sep, payload = value.partition(",")
    if not sep or not header.endswith(";base64"):
        return None, value
    mime = header[len("data:") : -len(";base64")] or None
    return mime, payload


def decoded_size_upper_bound(b64: str) -> int:
    """An upper bound of the decoded size of a base64 string, without decoding it."""
    return (len(b64) * 3) // 4


def original_record(
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | str | None,
    value: bytes | str | None,
    headers: list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None,
) -> OriginalRecord:
    """Capture a consumed record losslessly (bytes that are not UTF-8 are kept as base64)."""
    return OriginalRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms,
        key=EncodedBytes.of(key),
        value=EncodedBytes.of(value),
        headers=[
            OriginalHeader(key=k, value=EncodedBytes.of(v))
            for k, v in (headers.items() if isinstance(headers, dict) else headers or [])
        ],
    )


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _describe_validation(exc: ValidationError) -> tuple[DeadLetterReason, str]:
    parts: list[str] = []
    reason = DeadLetterReason.INVALID_REQUEST
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(record)"
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif err.get("type") == "missing":
            parts.append(f"missing field '{loc}'")
        else:
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        if loc.endswith("content_type") and err.get("type") == "literal_error":
            reason = DeadLetterReason.UNSUPPORTED_FORMAT
    message = "; ".join(parts)
    if reason is DeadLetterReason.UNSUPPORTED_FORMAT:
        message += f" (supported: {', '.join(SUPPORTED_CONTENT_TYPES)})"
    return reason, "request does not match the schema: " + message


def key_as_request_id(key: bytes | str | None) -> str | None:
    """The record key, if it can be a request id (producers key requests by request id)."""
    if key is None:
        return None
    text = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key
    if 0 < len(text) <= 256 and all(0x21 <= ord(c) <= 0x7E for c in text):
        return text
    return None


def parse_record(
    value: bytes | None,
    *,
    max_request_bytes: int,
    max_document_bytes: int,
    key: bytes | str | None = None,
) -> Accepted | Rejected:
    """Judge one input record's value. Never raises.

    When the value cannot be read far enough to find its request id, the
    record key stands in for it (if it looks like one), so that the dead
    letter can still be matched to the request.
    """
    key_id = key_as_request_id(key)
    if value is None:
        return Rejected(
            DeadLetterReason.MALFORMED_RECORD,
            "record has no value (a tombstone?); send a JSON document request",
            key_id,
        )
    if len(value) > max_request_bytes:
        return Rejected(
            DeadLetterReason.TOO_LARGE,
            f"record is {len(value)} bytes, over BRIDGE_MAX_REQUEST_BYTES={max_request_bytes}; "
            "send large documents by URL",
            key_id,
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(
            DeadLetterReason.MALFORMED_RECORD,
            f"record value is not UTF-8 (byte {exc.start}); send UTF-8 JSON",
            key_id,
        )
    try:
        raw = json.loads(text)
    except RecursionError:
        return Rejected(
            DeadLetterReason.MALFORMED_RECORD, "record value is nested too deeply", key_id
        )
    except ValueError as exc:
        return Rejected(
            DeadLetterReason.MALFORMED_RECORD, f"record value is not valid JSON: {exc}", key_id
        )
    if not isinstance(raw, dict):
        return Rejected(
            DeadLetterReason.MALFORMED_RECORD,
            f"record value is JSON {type(raw).__name__}, expected an object",
            key_id,
        )
    if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(raw):
        return Rejected(
            DeadLetterReason.MALFORMED_RECORD,
            "record value has a lone UTF-16 surrogate escape (\\udXXX): not valid Unicode text",
            key_id,
        )
    rid = raw.get("request_id")
    request_id = rid if isinstance(rid, str) and 0 < len(rid) <= 256 else key_id
    dtc = raw.get("document_type_code")
    doc_type = dtc if isinstance(dtc, str) and 0 < len(dtc) <= 128 else None
    if _depth_exceeds(raw, MAX_JSON_DEPTH):
        return Rejected(
            DeadLetterReason.INVALID_REQUEST,
            f"request is nested deeper than {MAX_JSON_DEPTH} levels",
            request_id,
            doc_type,
        )
    try:
        request = DocumentRequest.model_validate(raw)
    except ValidationError as exc:
        reason, message = _describe_validation(exc)
        return Rejected(reason, message, request_id, doc_type)

    source = request.source
    if source.base64 is None:
        return Accepted(request, source.content_type)
    declared_uri_type, payload = split_data_uri(source.base64)
    if decoded_size_upper_bound(payload) > max_document_bytes + 3:
        return Rejected(
            DeadLetterReason.TOO_LARGE,
            f"document decodes to about {decoded_size_upper_bound(payload)} bytes, over the "
            f"{max_document_bytes}-byte limit",
            request.request_id,
            request.document_type_code,
        )
    try:
        head = binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)[:_SNIFF_BYTES]
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        return Rejected(
            DeadLetterReason.INVALID_REQUEST,
            f"source.base64 is not valid base64 ({exc})",
            request.request_id,
            request.document_type_code,
        )
    sniffed = sniff_content_type(head)
    if sniffed is None:
        declared = source.content_type or declared_uri_type or "unknown"
        return Rejected(
            DeadLetterReason.UNSUPPORTED_FORMAT,
            f"document bytes are not JPEG, PNG, GIF, BMP, WebP or PDF (declared {declared})",
            request.request_id,
            request.document_type_code,
        )
    return Accepted(request, sniffed)
