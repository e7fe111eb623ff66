"""Building the bridge's output messages, and deciding what an API error means.

Pure functions: the engine asks :func:`classify_submit_error` and
:func:`classify_status_error` what to do with an error, and builds results and
dead letters with :func:`build_result` and :func:`build_dead_letter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from service.docutray import (
    ConversionLost,
    ConversionStatus,
    DocuTrayError,
    InvalidApiKey,
    RateLimited,
    RequestRejected,
    SystemicError,
    TransientError,
)
from service.fetch import FetchError
from service.messages import (
    ConversionResult,
    ConversionTimings,
    DeadLetter,
    DeadLetterReason,
    OriginalRecord,
    utcnow,
)

Action = Literal["dead_letter", "retry", "pause", "resubmit"]
PauseReason = Literal["invalid_api_key", "api_misconfigured", "api_unreachable"]
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
    answers for this request: the first two are retried (the design lists a
    download timeout as transient), the third dead-letters as
    ``source_unavailable``.
    """
    if isinstance(exc, FetchError):
        if exc.transient:
            # Timeout, connection error, 408/429/5xx from the document's host.
            if url_timeouts < 2:
                return Verdict("retry")
            return Verdict("dead_letter", DeadLetterReason.SOURCE_UNAVAILABLE)
        if exc.reason == "forbidden_address":
            return Verdict("dead_letter", DeadLetterReason.FORBIDDEN_SOURCE)
        if exc.reason == "invalid_url":
            return Verdict("dead_letter", DeadLetterReason.INVALID_REQUEST)
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
    """401 is a bad key; 403 on submit or an unexplained 404 mean a wrong base URL or plan."""
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
        timings=ConversionTimings(
            received_at=received_at,
            submitted_at=submitted_at,
            completed_at=status.response_timestamp or utcnow(),
            published_at=utcnow(),
            status_calls=status_calls,
            submit_attempts=submit_attempts,
        ),
    )


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
) -> DeadLetter:
    """A dead letter that explains itself and carries the original record in full."""
    http_status = getattr(error, "status_code", None) if error is not None else None
    body = getattr(error, "body", None) if error is not None else None
    return DeadLetter(
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
