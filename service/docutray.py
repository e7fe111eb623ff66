"""The DocuTray HTTP client and the error taxonomy the pipeline acts on.

The client speaks the asynchronous conversion API described in
``docs/docutray-api.md``: submit a document in one of three forms (multipart
upload, JSON base64, JSON URL), poll its status, read the month's usage. It
never retries: the
pipeline owns retries because it knows the shared rate limit and the
deadlines. Every failure is mapped once, here, to the most specific class
below, so callers decide with ``isinstance`` and never by parsing strings::

    DocuTrayError                  root; .status_code .api_message .body .request_id .endpoint
    ├── RequestRejected            the request itself is wrong: never retry, dead-letter
    │                              .reason in {invalid_request, unsupported_format,
    │                              too_large, source_unavailable}, .errors (400's list)
    ├── TransientError             retry with backoff (and honour RateLimited's wait)
    │   ├── RateLimited            429; .retry_after_s .reset_at .limit_type .limit
    │   │                          .remaining .long_window (limit_type hour or day)
    │   ├── ServerError            5xx
    │   ├── ApiTimeout             httpx timeout; .maybe_processed
    │   ├── ApiUnreachable         connection-level failure; .maybe_processed
    │   └── UnexpectedResponse     a status or body the contract does not describe, or
    │                              any other failure of the HTTP stack (e.g. a body that
    │                              cannot be decoded): never a raw exception
    ├── SystemicError              nobody's request is at fault: pause everything
    │   ├── InvalidApiKey          401
    │   ├── AccessDenied           403 outside the status endpoint (key lacks a permission)
    │   ├── EndpointNotFound       a 404 that is not the contract's (wrong base URL)
    │   └── QuotaExhausted         402: the monthly quota is spent; .quota .used .reset_at
    └── ConversionLost             status 404 (unknown id) or 403 (not ours)

Status → class, per endpoint (``usage`` maps like ``document_types``):

====== ================================= =============================== ==================
status submit                            status                          document_types
====== ================================= =============================== ==================
400    RequestRejected invalid_request   RequestRejected invalid_request (same)
       (unsupported_format when the
       message/errors say the format or
       file type is not supported)
401    InvalidApiKey                     InvalidApiKey                   InvalidApiKey
402    QuotaExhausted                    QuotaExhausted                  QuotaExhausted
403    AccessDenied                      ConversionLost                  AccessDenied
404    source_unavailable (URL form and  ConversionLost (JSON body) or   EndpointNotFound
       a JSON body), else                EndpointNotFound
       EndpointNotFound
408    source_unavailable (URL form)     UnexpectedResponse              UnexpectedResponse
413    RequestRejected too_large         UnexpectedResponse              UnexpectedResponse
415    RequestRejected invalid_request   (same)                          (same)
       (our client sent a wrong
       Content-Type: not the document's
       fault, but retrying cannot help)
429    RateLimited                       RateLimited                     RateLimited
5xx    ServerError                       ServerError                     ServerError
other  UnexpectedResponse                UnexpectedResponse              UnexpectedResponse
2xx    UnexpectedResponse when the body is not JSON or lacks required fields
====== ================================= =============================== ==================

A 402 is documented only indirectly (``/api/usage`` "is never blocked by
429/402"), so its body is read leniently: ``quota``, ``used`` and
``resetDate`` when present and sensible, None otherwise. DocuTray answers it
to conversion calls; the status and usage endpoints keep working, so a 402
there is mapped the same way but should not happen.

Why ``UnexpectedResponse`` is transient: an unknown status or a garbled 2xx
says more about a proxy or an API change than about the document, so
dead-lettering at once would throw away requests that a retry (bounded by
the pipeline's deadline, after which it dead-letters anyway) may well get
through. A garbled 2xx on submit may have created a conversion: resubmitting
is the at-least-once window the README accepts ("Delivery guarantees").

Secrets: the API key lives only in the pooled client's default headers
(httpx masks ``Authorization`` in its reprs). It never appears in
``repr(client)``, in an error's message, fields or body (any echo of it in a
response is scrubbed), or in logs. Payloads are never logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import math
import mimetypes
import os
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
import structlog
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from service import __version__

__all__ = [
    "AccessDenied",
    "ApiTimeout",
    "ApiUnreachable",
    "ConversionLost",
    "ConversionState",
    "ConversionStatus",
    "DocuTrayClient",
    "DocuTrayError",
    "DocumentType",
    "DocumentTypeCode",
    "DocumentTypePage",
    "Endpoint",
    "EndpointNotFound",
    "InvalidApiKey",
    "QuotaExhausted",
    "RateLimitWindow",
    "RateLimited",
    "RejectReason",
    "RequestRejected",
    "ServerError",
    "Submission",
    "SubmitForm",
    "SystemicError",
    "TransientError",
    "UnexpectedResponse",
    "UploadSizeMismatch",
    "Usage",
    "error_from_exception",
    "error_from_response",
    "error_from_transport",
    "parse_quota",
    "parse_rate_limit",
    "parse_reset_time",
    "parse_retry_after_header",
]

log = structlog.get_logger(__name__)

DocumentTypeCode = str
ConversionState = Literal["ENQUEUED", "PROCESSING", "SUCCESS", "ERROR"]
Endpoint = Literal["submit", "status", "document_types", "usage"]
SubmitForm = Literal["upload", "base64", "url"]
RejectReason = Literal["invalid_request", "unsupported_format", "too_large", "source_unavailable"]
RateLimitWindow = Literal["minute", "hour", "day"]
"""The windows a 429's ``limitType`` names [doc]; other values are kept as sent."""

_LONG_WINDOWS: frozenset[str] = frozenset({"hour", "day"})

TERMINAL_STATES: frozenset[ConversionState] = frozenset({"SUCCESS", "ERROR"})
_REDACTED = "[REDACTED]"
_SECRET_KEY_RE = re.compile(r"(api[_-]?key|authorization|token|secret|password)", re.IGNORECASE)
# A 400 whose message or errors say the document's format is not accepted. Deliberately
# narrow: "Invalid document type" (an unknown document_type_code) is NOT a format problem,
# and neither is "Unsupported Content-Type" (the request's, not the document's).
_UNSUPPORTED_FORMAT_RES = (
    re.compile(
        r"\b(unsupported|not supported|not allowed|not accepted)\b[^.;]*"
        r"\b(format|file type|mime type|media type|image type)",
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(format|file type|mime type|media type|image type)\b[^.;]*"
        r"\b(unsupported|not supported|not allowed|not accepted)\b",
        re.IGNORECASE,
    ),
    re.compile(r"\binvalid (file|image) (format|type)\b", re.IGNORECASE),
)
# Above this a resetTime is milliseconds since the epoch, below it seconds.
_RESET_TIME_MS_THRESHOLD = 1e12
# Error bodies kept on exceptions are cut below this nesting depth (scrubbing recurses).
_MAX_BODY_DEPTH = 16
_UPLOAD_CHUNK_BYTES = 256 * 1024
_JSON_CHUNK_CHARS = 1024 * 1024
# Characters that need no JSON escaping and cover base64 and data-URI prefixes.
_JSON_SAFE_B64_RE = re.compile(r"[A-Za-z0-9+/=_\-:;,.]*")


# --------------------------------------------------------------------------- models


class Submission(BaseModel):
    """A conversion the API accepted (HTTP 202): poll ``status_url`` / ``conversion_id``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    conversion_id: str
    status_url: str
    status: ConversionState


class ConversionStatus(BaseModel):
    """One status answer; unknown fields are ignored so API additions never break parsing."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    conversion_id: str
    status: ConversionState
    request_timestamp: datetime | None = None
    response_timestamp: datetime | None = None
    document_type_code: str | None = None
    original_filename: str | None = None
    data: dict[str, Any] | None = None
    error: str | None = None
    pages: int | None = Field(
        default=None, validation_alias=AliasChoices("pages", "page_count", "pageCount")
    )
    """Pages the conversion counted, when the API says so; the contract has no such field
    [inferred], so any of three spellings is read and an odd value is None, never an error."""

    @field_validator("pages", mode="before")
    @classmethod
    def _lenient_pages(cls, value: Any) -> int | None:
        number = _as_float(value)
        if number is None or number < 0 or number != int(number):
            return None
        return int(number)

    @property
    def terminal(self) -> bool:
        """True for SUCCESS and ERROR: no later poll can change the answer."""
        return self.status in TERMINAL_STATES


class Usage(BaseModel):
    """``GET /api/usage``: what the key's organisation consumed in one calendar month [doc]."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    year: int
    month: int = Field(ge=1, le=12)
    successful_pages: int = Field(ge=0)
    successful_conversions: int = Field(ge=0)


class DocumentType(BaseModel):
    """One entry of ``GET /api/document-types``; ``code_type`` is what convert expects."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    id: str
    name: str
    code_type: str
    description: str | None = None
    is_public: bool | None = None
    is_draft: bool | None = None

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> DocumentType:
        """Build from the API's camelCase object."""
        return cls(
            id=str(raw["id"]),
            name=str(raw.get("name", "")),
            code_type=str(raw["codeType"]),
            description=raw.get("description"),
            is_public=raw.get("isPublic"),
            is_draft=raw.get("isDraft"),
        )


class DocumentTypePage(BaseModel):
    """One page of document types with the API's pagination counters."""

    model_config = ConfigDict(frozen=True)

    items: list[DocumentType]
    total: int
    page: int
    limit: int


# --------------------------------------------------------------------------- errors


class DocuTrayError(Exception):
    """Root of every failure talking to DocuTray."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: Endpoint,
        status_code: int | None = None,
        api_message: str | None = None,
        body: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint: Endpoint = endpoint
        self.status_code = status_code
        self.api_message = api_message
        self.body = body
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.args[0]!r}, endpoint={self.endpoint!r}, "
            f"status_code={self.status_code!r}, request_id={self.request_id!r})"
        )


class RequestRejected(DocuTrayError):
    """The request itself is wrong (400/413/415, URL unreachable): never retry."""

    def __init__(
        self,
        message: str,
        *,
        reason: RejectReason,
        errors: Sequence[str] = (),
        **fields: Any,
    ) -> None:
        super().__init__(message, **fields)
        self.reason: RejectReason = reason
        self.errors: list[str] = list(errors)


class TransientError(DocuTrayError):
    """A failure a later attempt may not meet: retry with backoff."""


class RateLimited(TransientError):
    """HTTP 429: wait at least ``retry_after_s`` (when known) before the next call.

    ``limit_type`` is the window that is spent, lower-cased: ``minute``,
    ``hour`` or ``day`` [doc] (another value is kept as sent, None when
    absent). ``reset_at`` is when that window frees up (the body's
    ``resetTime``). An hour or day window (``long_window``) is spent for
    every caller with the same key until ``reset_at``, not for a minute.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reset_at: datetime | None = None,
        limit_type: str | None = None,
        limit: int | None = None,
        remaining: int | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, **fields)
        self.retry_after_s = retry_after_s
        self.reset_at = reset_at
        self.limit_type = limit_type
        self.limit = limit
        self.remaining = remaining

    @property
    def long_window(self) -> bool:
        """True for an hour or day window: wait until ``reset_at``, on every replica."""
        return self.limit_type in _LONG_WINDOWS


class ServerError(TransientError):
    """HTTP 5xx from the API."""


class ApiTimeout(TransientError):
    """The call timed out; ``maybe_processed`` says whether the API may have acted on it."""

    def __init__(self, message: str, *, maybe_processed: bool, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.maybe_processed = maybe_processed


class ApiUnreachable(TransientError):
    """Connection-level failure; ``maybe_processed`` says whether the request got out."""

    def __init__(self, message: str, *, maybe_processed: bool, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.maybe_processed = maybe_processed


class UnexpectedResponse(TransientError):
    """A status or body outside the contract (e.g. 418, or a 2xx that is not JSON)."""


class SystemicError(DocuTrayError):
    """Nobody's request is at fault (credentials, configuration): pause all traffic."""


class InvalidApiKey(SystemicError):
    """HTTP 401: the configured API key is wrong or revoked."""


class AccessDenied(SystemicError):
    """HTTP 403 outside the status endpoint: the key lacks a permission."""


class EndpointNotFound(SystemicError):
    """A 404 the contract does not explain: the base URL or API path is wrong."""


class QuotaExhausted(SystemicError):
    """HTTP 402: the organisation's monthly quota is spent; no conversion call succeeds
    until ``reset_at`` (when known) or until the plan changes. Status and usage calls
    keep working [doc]. ``quota``/``used``/``reset_at`` come from the body when present
    (its shape is [inferred]) and are None otherwise."""

    def __init__(
        self,
        message: str,
        *,
        quota: int | None = None,
        used: int | None = None,
        reset_at: datetime | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, **fields)
        self.quota = quota
        self.used = used
        self.reset_at = reset_at


class ConversionLost(DocuTrayError):
    """Status 404 (unknown conversion) or 403 (not ours): resubmit or dead-letter."""


# --------------------------------------------------------------------------- pure mapping


def _scrub(value: Any, secrets: Sequence[str], _depth: int = 0) -> Any:
    """Return ``value`` with secret-looking keys and any occurrence of ``secrets`` redacted.

    Containers nested deeper than ``_MAX_BODY_DEPTH`` are replaced by a marker,
    so a hostile body can neither exhaust the stack nor be kept whole.
    """
    if isinstance(value, str):
        for secret in secrets:
            if secret:
                value = value.replace(secret, _REDACTED)
        return value
    if isinstance(value, Mapping | list) and _depth >= _MAX_BODY_DEPTH:
        return "[TOO DEEP]"
    if isinstance(value, Mapping):
        return {
            str(k): (_REDACTED if _SECRET_KEY_RE.search(str(k)) else _scrub(v, secrets, _depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, secrets, _depth + 1) for v in value]
    return value


def _parse_json_object(content: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is empty, not JSON, or not an object."""
    if not content:
        return None
    try:
        parsed = json.loads(content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


def parse_retry_after_header(value: str | None, *, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if value is None or not value.strip():
        return None
    seconds = _as_float(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_s)


def parse_reset_time(value: Any) -> datetime | None:
    """A ``resetTime``/``resetDate`` as an aware datetime, or None when absent or odd.

    Numbers (or numeric strings) are Unix time: values above 10^12 are
    milliseconds, the rest seconds, and <= 0 is unknown. Other strings are
    read as ISO 8601 (``2026-05-01T00:00:00.000Z``, ``2026-05-01``); a time
    without a zone is taken as UTC.
    """
    number = _as_float(value)
    if number is not None:
        if number <= 0:
            return None
        if number > _RESET_TIME_MS_THRESHOLD:
            number /= 1000.0
        try:
            return datetime.fromtimestamp(number, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _as_count(value: Any) -> int | None:
    """A non-negative whole number from a JSON value, else None."""
    number = _as_float(value)
    if number is None or number < 0 or number != int(number):
        return None
    return int(number)


def parse_rate_limit(
    body: Mapping[str, Any] | None, headers: Mapping[str, str], *, now_s: float
) -> dict[str, Any]:
    """The 429 fields: the wait is the largest of retryAfter, Retry-After and resetTime - now."""
    body = body or {}
    waits: list[float] = []
    body_wait = _as_float(body.get("retryAfter"))
    if body_wait is not None:
        waits.append(max(0.0, body_wait))
    header_wait = parse_retry_after_header(headers.get("retry-after"), now_s=now_s)
    if header_wait is not None:
        waits.append(header_wait)
    reset_at = parse_reset_time(body.get("resetTime"))
    if reset_at is not None:
        waits.append(max(0.0, reset_at.timestamp() - now_s))
    limit_type = body.get("limitType")
    return {
        "retry_after_s": max(waits) if waits else None,
        "reset_at": reset_at,
        "limit_type": (
            str(limit_type).strip().lower() or None
            if isinstance(limit_type, str | int | float) and not isinstance(limit_type, bool)
            else None
        ),
        "limit": _as_count(body.get("limit")),
        "remaining": _as_count(body.get("remaining")),
    }


def parse_quota(body: Mapping[str, Any] | None) -> dict[str, Any]:
    """The 402 fields: ``quota``, ``used`` and ``resetDate`` when present and sensible.

    The body's shape is [inferred] (the SDK's ``QuotaExceededInfo`` names these
    three keys, ``resetDate`` as ISO 8601); anything missing or odd is None.
    """
    body = body or {}
    return {
        "quota": _as_count(body.get("quota")),
        "used": _as_count(body.get("used")),
        "reset_at": parse_reset_time(body.get("resetDate")),
    }


def _says_unsupported_format(api_message: str | None, errors: Sequence[str]) -> bool:
    texts = (api_message or "", *errors)
    return any(pattern.search(text) for pattern in _UNSUPPORTED_FORMAT_RES for text in texts)


def error_from_response(
    *,
    endpoint: Endpoint,
    status_code: int,
    headers: Mapping[str, str],
    content: bytes,
    form: SubmitForm | None = None,
    now_s: float | None = None,
    secrets: Sequence[str] = (),
) -> DocuTrayError:
    """Map one non-success HTTP answer to the most specific error (see the module table).

    ``headers`` must look up case-insensitively (``httpx.Headers`` does) or
    use lower-case keys. ``form`` is the submit form, needed because a 404/408
    means "the URL could not be fetched" only for the URL form. ``secrets``
    are scrubbed from every text kept on the error.
    """
    now = time.time() if now_s is None else now_s
    raw = _parse_json_object(content)
    body: dict[str, Any] | None = _scrub(raw, secrets) if raw is not None else None
    api_message: str | None = None
    errors: list[str] = []
    if body is not None:
        message = body.get("error") or body.get("message")
        api_message = str(message) if message is not None else None
        raw_errors = body.get("errors")
        if isinstance(raw_errors, list):
            errors = [str(e) if isinstance(e, str) else json.dumps(e) for e in raw_errors]
        elif isinstance(raw_errors, str):
            errors = [raw_errors]
    request_id = headers.get("x-request-id")
    fields: dict[str, Any] = {
        "endpoint": endpoint,
        "status_code": status_code,
        "api_message": api_message,
        "body": body,
        "request_id": request_id,
    }
    text = f"DocuTray {endpoint} HTTP {status_code}" + (f": {api_message}" if api_message else "")

    if status_code == 400:
        reason: RejectReason = (
            "unsupported_format"
            if _says_unsupported_format(api_message, errors)
            else "invalid_request"
        )
        return RequestRejected(text, reason=reason, errors=errors, **fields)
    if status_code == 401:
        return InvalidApiKey(text, **fields)
    if status_code == 402:
        return QuotaExhausted(text, **parse_quota(body), **fields)
    if status_code == 403:
        if endpoint == "status":
            return ConversionLost(text, **fields)
        return AccessDenied(text, **fields)
    if status_code == 404:
        if endpoint == "submit" and form == "url" and body is not None:
            return RequestRejected(text, reason="source_unavailable", errors=errors, **fields)
        if endpoint == "status" and body is not None:
            return ConversionLost(text, **fields)
        return EndpointNotFound(text, **fields)
    if status_code == 408 and endpoint == "submit" and form == "url":
        return RequestRejected(text, reason="source_unavailable", errors=errors, **fields)
    if status_code == 413 and endpoint == "submit":
        return RequestRejected(text, reason="too_large", errors=errors, **fields)
    if status_code == 415:
        return RequestRejected(text, reason="invalid_request", errors=errors, **fields)
    if status_code == 429:
        return RateLimited(text, **parse_rate_limit(body, headers, now_s=now), **fields)
    if 500 <= status_code <= 599:
        return ServerError(text, **fields)
    return UnexpectedResponse(text, **fields)


def error_from_transport(
    exc: httpx.TransportError, *, endpoint: Endpoint
) -> ApiTimeout | ApiUnreachable:
    """Map an httpx transport failure; says whether the API may have received the request."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        # Connect and pool timeouts fail before a byte leaves this process.
        sent = not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
        return ApiTimeout(
            f"DocuTray {endpoint} timed out ({name})", maybe_processed=sent, endpoint=endpoint
        )
    sent = not isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol)
    return ApiUnreachable(
        f"DocuTray {endpoint} unreachable ({name})", maybe_processed=sent, endpoint=endpoint
    )


def error_from_exception(exc: Exception, *, endpoint: Endpoint) -> UnexpectedResponse:
    """Map any other failure of the HTTP stack (not a ``TransportError``) to a transient error.

    Examples: ``httpx.DecodingError`` (a body whose Content-Encoding does not
    decode), ``httpx.TooManyRedirects``, ``httpx.StreamError``, or an
    exception a custom transport raises. The answer may have been produced, so
    a submit that fails this way may have created a conversion (the
    at-least-once window of the README's "Delivery guarantees"). The message names only the
    exception's type: its text may quote a URL or a header.
    """
    return UnexpectedResponse(
        f"DocuTray {endpoint} failed in the HTTP client ({type(exc).__name__})",
        endpoint=endpoint,
    )


# --------------------------------------------------------------------------- request bodies


def _form_param(name: str, value: str) -> bytes:
    """``name="value"`` with HTML5 form escaping (as browsers and httpx do)."""
    escaped = value.replace("\\", "\\\\").replace('"', "%22")
    escaped = re.sub(r"[\x00-\x1a\x1c-\x1f]", lambda m: f"%{ord(m.group(0)):02X}", escaped)
    return f'{name}="{escaped}"'.encode()


def _file_size(file: BinaryIO) -> int | None:
    """Bytes from the current position to the end, when knowable without reading."""
    try:
        position = file.tell()
        file.seek(0, io.SEEK_END)
        end = file.tell()
        file.seek(position)
    except (OSError, AttributeError, ValueError):
        try:
            return os.fstat(file.fileno()).st_size
        except (OSError, AttributeError, ValueError):
            return None
    return end - position


class UploadSizeMismatch(ValueError):
    """The upload produced more or fewer bytes than ``size_bytes`` declared."""


class MultipartUpload:
    """A streamed ``multipart/form-data`` body: the file is read chunk by chunk, never whole.

    httpx's own multipart also streams file objects, but it reads them on the
    event loop thread and cannot take an async iterator; this body takes all
    three sources, reads files in a worker thread, and declares
    ``Content-Length`` whenever the file size is known (chunked otherwise).
    """

    def __init__(
        self,
        *,
        fields: Sequence[tuple[str, str]],
        file_field: str,
        file: BinaryIO | AsyncIterable[bytes] | bytes,
        filename: str,
        content_type: str,
        size_bytes: int | None = None,
        boundary: str | None = None,
    ) -> None:
        self.boundary = boundary or os.urandom(16).hex()
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        b = self.boundary.encode("ascii")
        head = bytearray()
        for name, value in fields:
            head += b"--" + b + b"\r\nContent-Disposition: form-data; " + _form_param("name", name)
            head += b"\r\n\r\n" + value.encode("utf-8") + b"\r\n"
        head += (
            b"--" + b + b"\r\nContent-Disposition: form-data; " + _form_param("name", file_field)
        )
        head += b"; " + _form_param("filename", filename)
        head += b"\r\nContent-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
        self._head = bytes(head)
        self._tail = b"\r\n--" + b + b"--\r\n"
        self._file = file
        if isinstance(file, bytes | bytearray | memoryview):
            size_bytes = len(file)
        elif size_bytes is None and not isinstance(file, AsyncIterable):
            size_bytes = _file_size(file)
        self.file_size_bytes = size_bytes

    @property
    def content_length(self) -> int | None:
        """Total body length, or None when the file size is unknown (chunked upload)."""
        if self.file_size_bytes is None:
            return None
        return len(self._head) + self.file_size_bytes + len(self._tail)

    def headers(self) -> dict[str, str]:
        """Content-Type with the boundary, and Content-Length when known."""
        headers = {"Content-Type": self.content_type}
        if self.content_length is not None:
            headers["Content-Length"] = str(self.content_length)
        return headers

    async def _file_chunks(self) -> AsyncIterator[bytes]:
        file = self._file
        if isinstance(file, bytes | bytearray | memoryview):
            view = memoryview(file)
            for start in range(0, len(view), _UPLOAD_CHUNK_BYTES):
                yield bytes(view[start : start + _UPLOAD_CHUNK_BYTES])
        elif isinstance(file, AsyncIterable):
            async for chunk in file:
                if chunk:
                    yield bytes(chunk)
        else:
            while chunk := await asyncio.to_thread(file.read, _UPLOAD_CHUNK_BYTES):
                yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._head
        sent = 0
        expected = self.file_size_bytes
        async for chunk in self._file_chunks():
            sent += len(chunk)
            if expected is not None and sent > expected:
                raise UploadSizeMismatch(f"upload is larger than size_bytes={expected}")
            yield chunk
        if expected is not None and sent != expected:
            raise UploadSizeMismatch(f"upload has {sent} bytes, size_bytes={expected}")
        yield self._tail


class _JsonWithLargeString:
    """A JSON object body whose one large base64 string is streamed in slices.

    ``json.dumps`` of a 130 MB base64 string would hold the string, its
    escaped copy and the encoded bytes at once; base64 needs no escaping, so
    the slices are encoded one at a time instead.
    """

    def __init__(self, *, small: Mapping[str, Any], large_key: str, large_value: str) -> None:
        prefix = json.dumps(dict(small), ensure_ascii=False, separators=(",", ":"))
        sep = "," if small else ""
        self._head = (prefix[:-1] + sep + json.dumps(large_key) + ':"').encode()
        self._value = large_value
        self._tail = b'"}'
        self.content_length = len(self._head) + len(large_value) + len(self._tail)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._head
        for start in range(0, len(self._value), _JSON_CHUNK_CHARS):
            yield self._value[start : start + _JSON_CHUNK_CHARS].encode("ascii")
        yield self._tail


# --------------------------------------------------------------------------- the client

ResponseHook = Callable[[Endpoint, int | None, float], None]
_M = TypeVar("_M", bound=BaseModel)


class DocuTrayClient:
    """Async client for the conversion API: one pooled connection set, no hidden retries.

    Safe to share between tasks. Construct it once, use it as an async
    context manager (or call :meth:`aclose`). The constructor does no I/O.
    ``on_response(endpoint, status_code_or_None, duration_s)`` is called
    after every call (status None on transport failure) so the caller can
    feed metrics without this module importing them.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        write_timeout_s: float = 60.0,
        pool_timeout_s: float = 10.0,
        max_connections: int = 100,
        max_keepalive_connections: int | None = None,
        keepalive_expiry_s: float = 30.0,
        user_agent: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_response: ResponseHook | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._base_url = base_url.rstrip("/")
        self._api_key = _Secret(api_key)
        self._on_response = on_response
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=(
                max_connections if max_keepalive_connections is None else max_keepalive_connections
            ),
            keepalive_expiry=keepalive_expiry_s,
        )
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": user_agent or f"docutray-bridge/{__version__}",
                "Accept": "application/json",
            },
            timeout=httpx.Timeout(
                connect=connect_timeout_s,
                read=read_timeout_s,
                write=write_timeout_s,
                pool=pool_timeout_s,
            ),
            limits=limits,
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"DocuTrayClient(base_url={self._base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        await self._client.aclose()

    # ----------------------------------------------------------------- submit

    async def submit_url(
        self,
        *,
        url: str,
        document_type_code: str,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Submission:
        """Ask DocuTray to download ``url`` itself (404/408 from it → source_unavailable)."""
        payload = _json_fields(document_type_code, content_type, metadata)
        payload["image_url"] = url
        content = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return await self._submit(
            form="url",
            content=content,
            headers={"Content-Type": "application/json"},
        )

    async def submit_base64(
        self,
        *,
        data_b64: str,
        document_type_code: str,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Submission:
        """Submit inline base64; a ``data:<mime>;base64,`` URI goes as-is (the API takes both)."""
        small = _json_fields(document_type_code, content_type, metadata)
        content: bytes | _JsonWithLargeString
        if _JSON_SAFE_B64_RE.fullmatch(data_b64):
            content = _JsonWithLargeString(
                small=small, large_key="image_base64", large_value=data_b64
            )
            headers = {
                "Content-Type": "application/json",
                "Content-Length": str(content.content_length),
            }
        else:  # whitespace or odd characters: let json escape them
            small["image_base64"] = data_b64
            content = json.dumps(small, ensure_ascii=False, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json"}
        return await self._submit(form="base64", content=content, headers=headers)

    async def submit_upload(
        self,
        *,
        file: BinaryIO | AsyncIterable[bytes] | bytes,
        filename: str,
        document_type_code: str,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        size_bytes: int | None = None,
    ) -> Submission:
        """Stream ``file`` as the multipart ``image`` part; memory stays at one chunk.

        A file object is read from its current position in a worker thread;
        give ``size_bytes`` for an async iterator so the body has a
        Content-Length (otherwise it is sent chunked). A source that yields a
        different number of bytes than declared raises ``UploadSizeMismatch``
        (a ValueError: a caller bug, not an API error). The file is not
        closed.
        """
        fields: list[tuple[str, str]] = [("document_type_code", document_type_code)]
        if metadata is not None:
            fields.append(
                (
                    "document_metadata",
                    json.dumps(metadata, ensure_ascii=False, separators=(",", ":")),
                )
            )
        part_type = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        body = MultipartUpload(
            fields=fields,
            file_field="image",
            file=file,
            filename=filename,
            content_type=part_type,
            size_bytes=size_bytes,
        )
        return await self._submit(form="upload", content=body, headers=body.headers())

    async def _submit(
        self,
        *,
        form: SubmitForm,
        content: bytes | AsyncIterable[bytes],
        headers: dict[str, str],
    ) -> Submission:
        response = await self._send(
            "submit", "POST", "/api/convert-async", content=content, headers=headers, form=form
        )
        submission = self._parse(response, Submission, endpoint="submit")
        log.debug(
            "docutray_submitted",
            form=form,
            conversion_id=submission.conversion_id,
            request_id=response.headers.get("x-request-id"),
        )
        return submission

    # ----------------------------------------------------------------- status

    async def get_status(self, conversion_id: str) -> ConversionStatus:
        """The conversion's current status; ``ConversionLost`` when the API no longer has it."""
        if not conversion_id:
            raise ValueError("conversion_id must not be empty")
        path = f"/api/convert-async/status/{quote(conversion_id, safe='')}"
        response = await self._send("status", "GET", path)
        return self._parse(response, ConversionStatus, endpoint="status")

    async def list_document_types(
        self, *, search: str | None = None, page: int = 1, limit: int = 20
    ) -> DocumentTypePage:
        """One page of the document types the key can convert to (codes are ``code_type``)."""
        params: dict[str, str | int] = {"page": page, "limit": limit}
        if search:
            params["search"] = search
        response = await self._send("document_types", "GET", "/api/document-types", params=params)
        body = _parse_json_object(response.content)
        try:
            if body is None or not isinstance(body.get("data"), list):
                raise ValueError("no data list")
            pagination = body.get("pagination") or {}
            items = [DocumentType.from_api(raw) for raw in body["data"]]
            return DocumentTypePage(
                items=items,
                total=int(pagination.get("total", len(items))),
                page=int(pagination.get("page", page)),
                limit=int(pagination.get("limit", limit)),
            )
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise self._unexpected(response, "document_types", exc) from None

    async def get_usage(self, *, year: int | None = None, month: int | None = None) -> Usage:
        """The organisation's successful conversions and pages in one month [doc].

        Without arguments DocuTray answers for the current month. ``year`` and
        ``month`` go together (both or neither). DocuTray never answers this
        endpoint with 429 or 402 [doc], so it is safe to call while the quota
        is spent; it does spend a call of whatever budget the plan counts it in
        [unknown].
        """
        params: dict[str, str | int] | None = None
        if (year is None) != (month is None):
            raise ValueError("year and month go together: give both or neither")
        if year is not None and month is not None:
            if not 1 <= month <= 12:
                raise ValueError(f"month must be 1..12, got {month}")
            params = {"year": year, "month": month}
        response = await self._send("usage", "GET", "/api/usage", params=params)
        return self._parse(response, Usage, endpoint="usage")

    # ----------------------------------------------------------------- plumbing

    async def _send(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        *,
        content: bytes | AsyncIterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str | int] | None = None,
        form: SubmitForm | None = None,
    ) -> httpx.Response:
        started = time.monotonic()
        try:
            response = await self._client.request(
                method, path, content=content, headers=headers, params=params
            )
        except httpx.TransportError as exc:
            self._report(endpoint, None, started)
            error = error_from_transport(exc, endpoint=endpoint)
            log.warning(
                "docutray_transport_error",
                endpoint=endpoint,
                error=type(exc).__name__,
                maybe_processed=error.maybe_processed,
            )
            raise error from exc
        except UploadSizeMismatch:
            raise  # the caller's bug, not an API failure
        except Exception as exc:  # mapped once, here: never leaked raw
            self._report(endpoint, None, started)
            log.warning("docutray_client_error", endpoint=endpoint, error=type(exc).__name__)
            raise error_from_exception(exc, endpoint=endpoint) from exc
        self._report(endpoint, response.status_code, started)
        if 200 <= response.status_code <= 299:
            return response
        failure = error_from_response(
            endpoint=endpoint,
            status_code=response.status_code,
            headers=response.headers,
            content=response.content,
            form=form,
            secrets=(self._api_key.value,),
        )
        log.info(
            "docutray_error_response",
            endpoint=endpoint,
            status_code=response.status_code,
            error=type(failure).__name__,
            request_id=failure.request_id,
        )
        raise failure

    def _report(self, endpoint: Endpoint, status_code: int | None, started: float) -> None:
        if self._on_response is not None:
            self._on_response(endpoint, status_code, time.monotonic() - started)

    def _parse(self, response: httpx.Response, model: type[_M], *, endpoint: Endpoint) -> _M:
        body = _parse_json_object(response.content)
        if body is None:
            raise self._unexpected(response, endpoint, "body is not a JSON object")
        try:
            return model.model_validate(body)
        except (ValidationError, ValueError, TypeError, RecursionError) as exc:
            raise self._unexpected(response, endpoint, exc) from None

    def _unexpected(
        self, response: httpx.Response, endpoint: Endpoint, why: object
    ) -> UnexpectedResponse:
        raw = _parse_json_object(response.content)
        detail = (
            f"{why.error_count()} invalid field(s)"
            if isinstance(why, ValidationError)
            else str(why)
        )
        return UnexpectedResponse(
            f"DocuTray {endpoint} HTTP {response.status_code}: unexpected body ({detail})",
            endpoint=endpoint,
            status_code=response.status_code,
            body=_scrub(raw, (self._api_key.value,)) if raw is not None else None,
            request_id=response.headers.get("x-request-id"),
        )


class _Secret:
    """Holds a secret so that no repr, vars() dump or traceback-with-locals shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "_Secret('**********')"


def _json_fields(
    document_type_code: str, content_type: str | None, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {"document_type_code": document_type_code}
    if content_type is not None:
        payload["image_content_type"] = content_type
    if metadata is not None:
        payload["document_metadata"] = metadata
    return payload
