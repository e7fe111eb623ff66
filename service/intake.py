"""Judging a raw input record: a new request, a re-send, or a reason to dead-letter it.

No I/O: the Kafka thread calls :func:`judge_record` for every consumed record and
gets a verdict: :class:`New` (the request becomes pending), :class:`Duplicate` (a
re-send of a request that is pending or finished within the dedupe window: nothing
to do) or :class:`Rejected` (a closed reason code and a message that says what to
fix). :func:`parse_record` judges the record alone (value, key, headers); whether
its request id is known comes from the caller (:class:`KnownIds`). Nothing here
raises on hostile input: any bytes, any key, any headers end in a verdict.

Large base64 payloads are judged by their length before anything is decoded,
so a payload that would decode to 150 MB is refused without decoding it. The
record's envelope is judged too: header keys must be UTF-8, and the key and
the headers each stay under ``BRIDGE_MAX_HEADER_BYTES`` (an accepted request
carries both into its changelog record and its outcome).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from service.dedupe import REPLAY_HEADER, Remembered, content_hash, judge_resend
from service.messages import (
    ROUTE_METADATA_KEY,
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
#: Default of BRIDGE_MAX_HEADER_BYTES: the most bytes of header keys and values a request's
#: record may carry, and the most bytes of its key.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024

log = structlog.get_logger(__name__)

#: One header as read from Kafka: the key as text, as bytes (when the client could not decode
#: it), or None (not UTF-8 and its bytes are lost); the value as bytes, text or None.
RawHeader = tuple[str | bytes | None, str | bytes | None]


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


@dataclass(frozen=True, slots=True)
class New:
    """A valid request not seen before (or a replay of a dead-lettered one): it becomes pending."""

    accepted: Accepted
    #: Its content hash (a re-send is recognised by it).
    content_hash: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A re-send of a request that is pending or finished within the dedupe window: ignored."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Judged:
    """A consumed record, captured losslessly, and what becomes of it."""

    original: OriginalRecord
    verdict: New | Duplicate | Rejected


@dataclass(frozen=True, slots=True)
class RecordLimits:
    """The settings a record is judged by (BRIDGE_MAX_*_BYTES, BRIDGE_DEDUPE_WINDOW_S)."""

    max_request_bytes: int
    max_document_bytes: int
    max_header_bytes: int
    dedupe_window_s: float


class KnownIds(Protocol):
    """What the partition's owner knows of a request id."""

    def pending_content(self, request_id: str) -> str | None:
        """The content hash of the pending request with this id ("" if unreadable), or None."""

    def finished(self, request_id: str) -> Remembered | None:
        """What finished under this id within the dedupe window, or None."""


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


def original_header(key: str | bytes | None, value: str | bytes | None) -> OriginalHeader:
    """One header, kept losslessly: a key that is not UTF-8 keeps its bytes in ``key_bytes``."""
    encoded = EncodedBytes.of(value)
    if key is None:
        return OriginalHeader(key="\ufffd", value=encoded, key_lost=True)
    if isinstance(key, str):
        return OriginalHeader(key=key, value=encoded)
    try:
        return OriginalHeader(key=key.decode("utf-8"), value=encoded)
    except UnicodeDecodeError:
        return OriginalHeader(
            key=key.decode("utf-8", errors="replace"), value=encoded, key_bytes=EncodedBytes.of(key)
        )


def original_record(
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | str | None,
    value: bytes | str | None,
    headers: Sequence[RawHeader] | dict[str, str | bytes | None] | None,
) -> OriginalRecord:
    """Capture a consumed record losslessly (bytes that are not UTF-8 are kept as base64).

    Nothing is bounded here: a dead letter bounds its copy when it is built
    (:func:`service.outcomes.build_dead_letter`).
    """
    return OriginalRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms,
        key=EncodedBytes.of(key),
        value=EncodedBytes.of(value),
        headers=[
            original_header(k, v)
            for k, v in (headers.items() if isinstance(headers, dict) else headers or [])
        ],
    )


def _size(raw: str | bytes | None) -> int:
    if raw is None:
        return 0
    return len(raw.encode("utf-8", errors="surrogatepass") if isinstance(raw, str) else raw)


def header_bytes(headers: Sequence[RawHeader]) -> int:
    """Bytes of every header key and value (a lost key counts as nothing)."""
    return sum(_size(k) + _size(v) for k, v in headers)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def envelope_problem(
    key: bytes | str | None,
    headers: Sequence[RawHeader],
    *,
    max_header_bytes: int,
) -> tuple[DeadLetterReason, str] | None:
    """What is wrong with a record's key and headers, if anything (value aside). Never raises.

    A header key must be UTF-8 text (the Kafka protocol says so; clients in other
    languages send bytes anyway); the key and the headers each stay within
    `max_header_bytes`, because an accepted request carries both into its
    changelog record and onto its result.
    """
    unreadable = [
        i
        for i, (k, _) in enumerate(headers)
        if k is None or (isinstance(k, bytes) and not _is_utf8(k))
    ]
    if unreadable:
        first = headers[unreadable[0]][0]
        shown = (
            f"bytes {first[:16].hex(' ')}{' ...' if len(first) > 16 else ''}"
            if isinstance(first, bytes)
            else "its bytes could not be recovered"
        )
        more = f", and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
        return (
            DeadLetterReason.MALFORMED_RECORD,
            f"header key is not UTF-8 (header {unreadable[0] + 1} of {len(headers)}: {shown}"
            f"{more}); Kafka header keys must be UTF-8 text: fix the producer",
        )
    key_size = _size(key)
    if key_size > max_header_bytes:
        return (
            DeadLetterReason.TOO_LARGE,
            f"record key is {key_size} bytes, over BRIDGE_MAX_HEADER_BYTES={max_header_bytes} "
            "(which bounds the key, and the headers together); key requests by their request id",
        )
    size = header_bytes(headers)
    if size > max_header_bytes:
        return (
            DeadLetterReason.TOO_LARGE,
            f"record headers take {size} bytes (keys and values, {len(headers)} in all), over "
            f"BRIDGE_MAX_HEADER_BYTES={max_header_bytes}; put large data in the request or "
            "behind a URL",
        )
    return None


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


def judge_record(
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | None,
    value: bytes | None,
    read_headers: Callable[[], Sequence[RawHeader]],
    limits: RecordLimits,
    known: KnownIds,
) -> Judged:
    """Judge one consumed record (step 1 of the guarantee in :mod:`service.kafka`). Never raises.

    `read_headers` is called here, inside the guard: the Kafka client may fail reading
    a record's headers, and no record may end the Kafka thread (it gets a dead letter).
    """
    try:
        headers = read_headers()
        original = original_record(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            key=key,
            value=value,
            headers=headers,
        )
        verdict = parse_record(
            value,
            max_request_bytes=limits.max_request_bytes,
            max_document_bytes=limits.max_document_bytes,
            key=key,
            headers=headers,
            max_header_bytes=limits.max_header_bytes,
        )
    except Exception as exc:  # no record may end the thread: it gets a dead letter instead
        log.exception("record_unreadable", partition=partition, offset=offset)
        original = original_record(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=None,
            key=key,
            value=value,
            headers=None,
        )
        unreadable = Rejected(
            DeadLetterReason.MALFORMED_RECORD,
            f"the bridge could not read this record ({type(exc).__name__}: {exc}); "
            "its headers are left out",
        )
        return Judged(original, unreadable)
    if not isinstance(verdict, Accepted):
        return Judged(original, verdict)
    return Judged(original, _judge_resend(verdict, original, known, limits.dedupe_window_s))


def _judge_resend(
    verdict: Accepted, original: OriginalRecord, known: KnownIds, dedupe_window_s: float
) -> New | Duplicate | Rejected:
    """A valid request: new (to the changelog), a re-send (nothing), or an id conflict."""
    request = verdict.request
    rid = request.request_id
    content = content_hash(request.model_dump(mode="json"))
    decision = judge_resend(
        content,
        pending_content=known.pending_content(rid),
        finished=known.finished(rid),
        replay=any(h.key == REPLAY_HEADER for h in original.headers),
    )
    if decision == "duplicate":
        return Duplicate(rid)
    if decision == "conflict":
        return Rejected(
            DeadLetterReason.REQUEST_ID_CONFLICT,
            f"request id {rid} was used by a different request within "
            f"BRIDGE_DEDUPE_WINDOW_S={dedupe_window_s:g} s; give each request its "
            "own id",
            rid,
            request.document_type_code,
        )
    return New(verdict, content)


def parse_record(
    value: bytes | None,
    *,
    max_request_bytes: int,
    max_document_bytes: int,
    key: bytes | str | None = None,
    headers: Sequence[RawHeader] = (),
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Accepted | Rejected:
    """Judge one input record: its value, key and headers. Never raises.

    When the value cannot be read far enough to find its request id, the
    record key stands in for it (if it looks like one), so that the dead
    letter can still be matched to the request. A valid value in a bad
    envelope (see :func:`envelope_problem`) is rejected with the envelope's
    reason and its request id; when both are bad, the value's reason wins and
    the message names both.
    """
    verdict = _judge_value(
        value, max_request_bytes=max_request_bytes, max_document_bytes=max_document_bytes, key=key
    )
    problem = envelope_problem(key, headers, max_header_bytes=max_header_bytes)
    if problem is None:
        return verdict
    reason, message = problem
    if isinstance(verdict, Accepted):
        request = verdict.request
        return Rejected(reason, message, request.request_id, request.document_type_code)
    return Rejected(
        verdict.reason,
        f"{verdict.message}; also: {message}",
        verdict.request_id,
        verdict.document_type_code,
    )


def _read_object(
    value: bytes | None, *, max_request_bytes: int, key_id: str | None
) -> dict[str, Any] | Rejected:
    """The record value as a JSON object, or why it is not one (size, UTF-8, JSON, type)."""
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
    return raw


def _judge_value(
    value: bytes | None,
    *,
    max_request_bytes: int,
    max_document_bytes: int,
    key: bytes | str | None,
) -> Accepted | Rejected:
    key_id = key_as_request_id(key)
    raw = _read_object(value, max_request_bytes=max_request_bytes, key_id=key_id)
    if isinstance(raw, Rejected):
        return raw
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
    if request.metadata is not None and ROUTE_METADATA_KEY in request.metadata:
        return Rejected(
            DeadLetterReason.INVALID_REQUEST,
            f"metadata key {ROUTE_METADATA_KEY!r} is reserved for the bridge's webhook routing; "
            "rename it",
            request.request_id,
            request.document_type_code,
        )
    return _judge_document(request, max_document_bytes=max_document_bytes)


def _judge_document(request: DocumentRequest, *, max_document_bytes: int) -> Accepted | Rejected:
    """A valid request's inline document: its size (before decoding) and its magic bytes."""
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
