"""Building the bridge's output messages, and deciding what an API error means.

Pure functions: the engine asks :func:`classify_submit_error` and
:func:`classify_status_error` what to do with an error, and builds results and
dead letters with :func:`build_result` and :func:`build_dead_letter`; a dead
letter becomes its Kafka record through :func:`dead_letter_record`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from service.docutray import (
    ConversionLost,
    ConversionStatus,
    DocuTrayError,
    InvalidApiKey,
    QuotaExhausted,
    RateLimited,
    RequestRejected,
    SystemicError,
    TransientError,
)
from service.fetch import FetchError, ForbiddenAddress, InvalidURL, TransientFetchError
from service.messages import (
    ConversionResult,
    ConversionTimings,
    DeadLetter,
    DeadLetterReason,
    EncodedBytes,
    OriginalHeader,
    OriginalRecord,
    utcnow,
)

Action = Literal["dead_letter", "retry", "pause", "resubmit"]
PauseReason = Literal["invalid_api_key", "api_misconfigured", "api_unreachable", "quota_exhausted"]
#: Pause reasons the systemic probe clears when DocuTray answers again.
SYSTEMIC_PAUSES: tuple[PauseReason, ...] = (
    "invalid_api_key",
    "api_misconfigured",
    "api_unreachable",
)

#: Keys of API error bodies that are safe to copy into a dead letter.
_SAFE_BODY_KEYS = frozenset(
    {"error", "message", "errors", "limitType", "limit", "remaining", "resetTime", "retryAfter"}
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do about one failed API call."""

    action: Action
    reason: DeadLetterReason | None = None
    pause: PauseReason | None = None
    retry_after_s: float | None = None
    #: A transport failure (DocuTray unreachable, timeout, 5xx): feeds the unreachable detector.
    transport: bool = False


def _reason(name: str) -> DeadLetterReason:
    try:
        return DeadLetterReason(name)
    except ValueError:
        return DeadLetterReason.INVALID_REQUEST


def classify_submit_error(exc: DocuTrayError | FetchError, *, url_timeouts: int) -> Verdict:
    """Decide the fate of a request whose submit failed with `exc`.

    `url_timeouts` counts DocuTray's earlier 408 "URL download timeout"
    answers for this request: the first two are retried (a download timeout is
    transient), the third dead-letters as ``source_unavailable`` (README,
    "Dead-letter reasons"). A fetch-mode download that failed transiently counts the same.
    """
    if isinstance(exc, TransientFetchError):
        # Timeout, connection error, 408/429/5xx from the document's host.
        if url_timeouts < 2:
            return Verdict("retry")
        return Verdict("dead_letter", DeadLetterReason.SOURCE_UNAVAILABLE)
    if isinstance(exc, ForbiddenAddress):
        return Verdict("dead_letter", DeadLetterReason.FORBIDDEN_SOURCE)
    if isinstance(exc, InvalidURL):
        return Verdict("dead_letter", DeadLetterReason.INVALID_REQUEST)
    if isinstance(exc, FetchError):
        return Verdict("dead_letter", _reason(exc.reason))
    if isinstance(exc, RequestRejected):
        if exc.status_code == 408 and url_timeouts < 2:
            return Verdict("retry")
        return Verdict("dead_letter", _reason(exc.reason))
    if isinstance(exc, SystemicError):
        return _systemic(exc)
    if isinstance(exc, RateLimited):
        return Verdict("retry", retry_after_s=exc.retry_after_s)
    if isinstance(exc, TransientError):
        return Verdict("retry", transport=True)
    if isinstance(exc, ConversionLost):
        return Verdict("retry", transport=True)
    return Verdict("retry", transport=True)


def classify_status_error(exc: DocuTrayError) -> Verdict:
    """Decide what to do when a status call failed with `exc`."""
    if isinstance(exc, ConversionLost):
        return Verdict("resubmit")
    if isinstance(exc, SystemicError):
        return _systemic(exc)
    if isinstance(exc, RateLimited):
        return Verdict("retry", retry_after_s=exc.retry_after_s)
    return Verdict("retry", transport=isinstance(exc, TransientError))


def _systemic(exc: SystemicError) -> Verdict:
    """401 is a bad key; 402 a spent monthly quota (submissions pause on every replica, status
    calls go on); 403 on submit or an unexplained 404 mean a wrong base URL or plan."""
    if isinstance(exc, QuotaExhausted):
        return Verdict("pause", pause="quota_exhausted")
    if isinstance(exc, InvalidApiKey):
        return Verdict("pause", pause="invalid_api_key")
    return Verdict("pause", pause="api_misconfigured")


def safe_api_body(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of an API error body that may be published (no echo of our request)."""
    if not body:
        return None
    return {k: v for k, v in body.items() if k in _SAFE_BODY_KEYS}


def build_result(
    *,
    request_id: str,
    status: ConversionStatus,
    document_type_code: str,
    metadata: dict[str, Any] | None,
    filename: str | None,
    received_at: datetime,
    submitted_at: datetime | None,
    status_calls: int,
    submit_attempts: int,
) -> ConversionResult:
    """The result message for a conversion that ended in SUCCESS."""
    return ConversionResult(
        request_id=request_id,
        conversion_id=status.conversion_id,
        document_type_code=document_type_code,
        data=status.data or {},
        metadata=metadata,
        filename=filename,
        original_filename=status.original_filename,
        pages=status.pages,
        timings=ConversionTimings(
            received_at=received_at,
            submitted_at=submitted_at,
            completed_at=status.response_timestamp or utcnow(),
            published_at=utcnow(),
            status_calls=status_calls,
            submit_attempts=submit_attempts,
        ),
    )


#: Default bound of a dead-letter record (key, value and headers, uncompressed): under
#: Kafka's default topic limit (1 MiB, ``max.message.bytes`` 1,048,588) with room for framing.
DEFAULT_DEAD_LETTER_BYTES = 900 * 1024
#: The original key becomes the dead letter's Kafka key only up to this size (else None).
DEAD_LETTER_KEY_BYTES = 256
#: A dead letter that must be cut also bounds its message and DocuTray's error body.
_MESSAGE_CHARS = 4000
_API_ERROR_BYTES = 8 * 1024
#: JSON around an EncodedBytes' data: ``{"encoding":"base64","data":""}``.
_ENCODED_OVERHEAD = 40
#: Shares of the room left for the original's parts when they must be cut.
_KEY_SHARE = 16
_HEADERS_SHARE = 4

Headers = list[tuple[str, str | bytes | None]]


def build_dead_letter(
    *,
    reason: DeadLetterReason,
    message: str,
    original: OriginalRecord,
    request_id: str | None,
    document_type_code: str | None = None,
    error: DocuTrayError | None = None,
    conversion_id: str | None = None,
    attempts: int = 0,
    status_calls: int = 0,
    received_at: datetime | None = None,
    max_bytes: int = DEFAULT_DEAD_LETTER_BYTES,
) -> DeadLetter:
    """A dead letter that explains itself and carries the original record, within `max_bytes`.

    `max_bytes` bounds the whole dead-letter record as :func:`dead_letter_record`
    makes it (key, JSON value, and the original headers it carries), so pass the
    dead-letter topic's record limit. The original is kept bit for bit when it
    fits. When it does not, bounded prefixes of its value, key and headers are
    kept instead, each cut part flagged ``*_truncated`` with its whole size and
    SHA-256 (see :class:`~service.messages.OriginalRecord`), and the message and
    the API error body are bounded too. Only a `max_bytes` below a few KiB can be
    too small for the rest of the dead letter.
    """
    http_status = getattr(error, "status_code", None) if error is not None else None
    body = getattr(error, "body", None) if error is not None else None
    letter = DeadLetter(
        request_id=request_id,
        reason=reason,
        message=message,
        http_status=http_status,
        api_error=safe_api_body(body),
        conversion_id=conversion_id,
        document_type_code=document_type_code,
        attempts=attempts,
        status_calls=status_calls,
        received_at=received_at,
        failed_at=utcnow(),
        original=original,
    )
    if _surely_too_big(letter.original, max_bytes) or dead_letter_bytes(letter) > max_bytes:
        return _bounded(letter, max_bytes)
    return letter


def dead_letter_record(letter: DeadLetter) -> tuple[bytes | None, bytes, Headers]:
    """The dead letter's Kafka record: (key, value, headers).

    The key is the request id, else the original key when it is small (never a
    hostile megabyte), else None. The headers are the original headers kept whole.
    """
    key: bytes | None = None
    if letter.request_id is not None:
        key = letter.request_id.encode("utf-8", errors="replace")
    elif letter.original.key is not None and not letter.original.key_truncated:
        raw = letter.original.key.raw()
        key = raw if len(raw) <= DEAD_LETTER_KEY_BYTES else None
    return key, letter.model_dump_json().encode(), letter.original.header_tuples()


def dead_letter_bytes(letter: DeadLetter) -> int:
    """Size of the dead letter's Kafka record: key, value, header keys and values."""
    key, value, headers = dead_letter_record(letter)
    return len(key or b"") + len(value) + sum(_size(k) + _size(v) for k, v in headers)


def _size(raw: str | bytes | None) -> int:
    if raw is None:
        return 0
    return len(raw.encode("utf-8", errors="replace") if isinstance(raw, str) else raw)


def _surely_too_big(orig: OriginalRecord, max_bytes: int) -> bool:
    """The original alone is over `max_bytes` (JSON never makes text shorter), found cheaply."""
    chars = sum(len(e.data) for e in (orig.key, orig.value) if e is not None)
    chars += sum(len(h.key) + (len(h.value.data) if h.value else 0) for h in orig.headers)
    return chars > max_bytes


def _json_len(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", errors="replace"))


def _encoded_len(part: EncodedBytes | None, budget: int) -> int:
    """JSON bytes of `part`, or more than `budget` when it surely takes more (not measured)."""
    if part is None:
        return 4
    if len(part.data) > budget:
        return budget + 1
    return _json_len(part.data) + _ENCODED_OVERHEAD


def _cut(part: EncodedBytes, budget: int) -> EncodedBytes:
    """The longest prefix of `part` (near enough) whose JSON takes at most `budget` bytes.

    Text stays text, cut at a character boundary, when its escaping allows;
    otherwise the prefix goes as base64, whose size is exact.
    """
    room = budget - _ENCODED_OVERHEAD
    if room <= 0:
        return EncodedBytes(encoding=part.encoding, data="")
    raw = part.raw()
    if part.encoding == "utf-8":
        n = min(len(raw), room)
        for _ in range(4):
            text = raw[:n].decode("utf-8", errors="ignore")  # drops only a split last char
            cost = _json_len(text)
            if cost <= room:
                return EncodedBytes(encoding="utf-8", data=text)
            n = max(0, n * room // cost - 8)
    n = max(0, room // 4 * 3)
    return EncodedBytes(encoding="base64", data=base64.b64encode(raw[:n]).decode("ascii"))


def _whole(part: EncodedBytes, size: int | None, sha256: str | None) -> tuple[int, str]:
    """Size and SHA-256 of the whole part (kept from an earlier cut, else measured)."""
    if size is not None and sha256 is not None:
        return size, sha256
    raw = part.raw()
    return len(raw), hashlib.sha256(raw).hexdigest()


def _cut_headers(
    headers: list[OriginalHeader], budget: int
) -> tuple[list[OriginalHeader], int, bool]:
    """Headers in order while `budget` lasts (whole ones count twice: JSON and Kafka header);
    the first that does not fit keeps a prefix of its value when there is room. Returns
    (headers kept, bytes used, whether any was left out or cut)."""
    kept: list[OriginalHeader] = []
    used = 0
    cut = False
    for h in headers:
        key_cost = _json_len(h.key) + _encoded_len(h.key_bytes, budget) + 64
        value_cost = _encoded_len(h.value, budget)
        whole = key_cost + value_cost
        if h.complete:
            whole += _size(h.key) + (len(h.value.raw()) if h.value is not None else 0)
        if used + whole <= budget:
            kept.append(h)
            used += whole
            continue
        cut = True
        room = budget - used - key_cost - 160  # the size and SHA-256 fields
        if h.value is None or room < 256:
            break
        size, sha256 = _whole(h.value, h.value_size, h.value_sha256)
        prefix = _cut(h.value, room)
        kept.append(
            h.model_copy(
                update={
                    "value": prefix,
                    "value_truncated": True,
                    "value_size": size,
                    "value_sha256": sha256,
                }
            )
        )
        used += key_cost + _encoded_len(prefix, room) + 160
        break
    return kept, used, cut


def _header_key_size(header: OriginalHeader) -> int:
    """Bytes of a header's key as consumed (a lost key's are unknown: counted as none)."""
    if header.key_lost:
        return 0
    return _size(header.key_bytes.raw() if header.key_bytes is not None else header.key)


def _bounded(letter: DeadLetter, max_bytes: int) -> DeadLetter:
    """`letter` cut to fit `max_bytes` (see :func:`build_dead_letter`)."""
    message = letter.message
    if len(message) > _MESSAGE_CHARS:
        message = message[:_MESSAGE_CHARS] + f"... ({len(letter.message)} characters in all)"
    api_error = letter.api_error
    if api_error is not None:
        size = len(json.dumps(api_error, default=str))
        if size > _API_ERROR_BYTES:
            api_error = None
            message += f" (DocuTray's error body, {size} bytes, is left out)"
    orig = letter.original
    # The skeleton: everything but the original's parts, with every truncation field set.
    value_size = value_sha = key_size = key_sha = None
    if orig.value is not None:
        value_size, value_sha = _whole(orig.value, orig.value_size, orig.value_sha256)
    if orig.key is not None:
        key_size, key_sha = _whole(orig.key, orig.key_size, orig.key_sha256)
    headers_count = orig.headers_count if orig.headers_truncated else len(orig.headers)
    headers_size = (
        orig.headers_size
        if orig.headers_truncated
        else sum(
            _header_key_size(h)
            + (_whole(h.value, h.value_size, h.value_sha256)[0] if h.value is not None else 0)
            for h in orig.headers
        )
    )
    empty = EncodedBytes(encoding="utf-8", data="")
    skeleton = orig.model_copy(
        update={
            "value": empty if orig.value is not None else None,
            "key": empty if orig.key is not None else None,
            "headers": [],
            "value_truncated": orig.value is not None,
            "value_size": value_size,
            "value_sha256": value_sha,
            "key_truncated": orig.key is not None,
            "key_size": key_size,
            "key_sha256": key_sha,
            "headers_truncated": bool(orig.headers) or orig.headers_truncated,
            "headers_count": headers_count,
            "headers_size": headers_size,
        }
    )
    bare = letter.model_copy(update={"message": message, "api_error": api_error})
    fixed = dead_letter_bytes(bare.model_copy(update={"original": skeleton}))
    room = max(0, max_bytes - fixed - 256)

    key, key_cut = orig.key, False
    if key is not None and _encoded_len(key, room // _KEY_SHARE) > room // _KEY_SHARE:
        key, key_cut = _cut(key, room // _KEY_SHARE), True
    used = _encoded_len(key, room)
    if key is not None and not key_cut and len(key.data) <= DEAD_LETTER_KEY_BYTES:
        used += _size(key.data)  # may become the Kafka key too
    headers, headers_used, headers_cut = _cut_headers(list(orig.headers), room // _HEADERS_SHARE)
    used += headers_used
    value, value_cut = orig.value, False
    if value is not None and _encoded_len(value, room - used) > room - used:
        value, value_cut = _cut(value, room - used), True
    update: dict[str, Any] = {
        "key": key,
        "value": value,
        "headers": headers,
        "value_truncated": value_cut or orig.value_truncated,
        "value_size": value_size if value_cut or orig.value_truncated else None,
        "value_sha256": value_sha if value_cut or orig.value_truncated else None,
        "key_truncated": key_cut or orig.key_truncated,
        "key_size": key_size if key_cut or orig.key_truncated else None,
        "key_sha256": key_sha if key_cut or orig.key_truncated else None,
        "headers_truncated": headers_cut or orig.headers_truncated,
        "headers_count": headers_count if headers_cut or orig.headers_truncated else None,
        "headers_size": headers_size if headers_cut or orig.headers_truncated else None,
    }
    bounded = bare.model_copy(update={"original": orig.model_copy(update=update)})
    if dead_letter_bytes(bounded) <= max_bytes:
        return bounded
    # Estimates fell short (they should not): keep only what cannot be cut.
    return bare.model_copy(update={"original": skeleton})


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of an API or fetch error."""
    api_message = getattr(exc, "api_message", None)
    status = getattr(exc, "status_code", None)
    kind = type(exc).__name__
    parts = [kind]
    if status is not None:
        parts.append(f"HTTP {status}")
    if api_message:
        parts.append(str(api_message))
    elif str(exc):
        parts.append(str(exc))
    return ": ".join([parts[0], " ".join(parts[1:])]) if len(parts) > 1 else parts[0]
