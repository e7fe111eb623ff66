"""outcomes: what each API or fetch error means, and the messages the bridge publishes."""

from __future__ import annotations

import hashlib
import json
import typing
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.docutray import (
    AccessDenied,
    ApiTimeout,
    ApiUnreachable,
    ConversionLost,
    ConversionStatus,
    DocuTrayError,
    EndpointNotFound,
    InvalidApiKey,
    RateLimited,
    RejectReason,
    RequestRejected,
    ServerError,
    UnexpectedResponse,
    error_from_response,
)
from service.fetch import (
    DocumentTooLarge,
    FetchError,
    ForbiddenAddress,
    InvalidURL,
    SourceUnavailable,
    TransientFetchError,
)
from service.intake import original_record
from service.messages import DeadLetter, DeadLetterReason, EncodedBytes, OriginalRecord
from service.outcomes import (
    DEFAULT_DEAD_LETTER_BYTES,
    Verdict,
    build_dead_letter,
    build_result,
    classify_status_error,
    classify_submit_error,
    dead_letter_bytes,
    dead_letter_record,
    describe_error,
    safe_api_body,
)

API_KEY = "dtk_live_Q1w2E3r4T5y6U7i8O9p0"
T0 = datetime.now(UTC) - timedelta(hours=1)


def rejected(reason: RejectReason, status: int, message: str = "m") -> RequestRejected:
    return RequestRejected(
        f"DocuTray submit HTTP {status}: {message}",
        reason=reason,
        endpoint="submit",
        status_code=status,
        api_message=message,
        body={"message": message},
    )


def rate_limited(retry_after_s: float | None = 7.0) -> RateLimited:
    return RateLimited(
        "DocuTray submit HTTP 429: Rate limit exceeded",
        retry_after_s=retry_after_s,
        endpoint="submit",
        status_code=429,
        api_message="Rate limit exceeded",
    )


def systemic(cls: type[DocuTrayError], status: int) -> DocuTrayError:
    return cls(f"DocuTray submit HTTP {status}", endpoint="submit", status_code=status)


TRANSIENT: list[DocuTrayError] = [
    ServerError("DocuTray submit HTTP 503", endpoint="submit", status_code=503),
    ApiTimeout("DocuTray submit timed out (ReadTimeout)", maybe_processed=True, endpoint="submit"),
    ApiUnreachable(
        "DocuTray submit unreachable (ConnectError)", maybe_processed=False, endpoint="submit"
    ),
    UnexpectedResponse("DocuTray submit HTTP 418", endpoint="submit", status_code=418),
]
SYSTEMIC: list[DocuTrayError] = [
    systemic(InvalidApiKey, 401),
    systemic(AccessDenied, 403),
    systemic(EndpointNotFound, 404),
]


# --------------------------------------------------------------------------- submit errors


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("invalid_request", 400),
        ("unsupported_format", 400),
        ("too_large", 413),
        ("invalid_request", 415),
        ("source_unavailable", 404),
    ],
)
def test_rejected_submit_is_dead_lettered_with_its_reason(
    reason: RejectReason, status: int
) -> None:
    verdict = classify_submit_error(rejected(reason, status), url_timeouts=0)
    assert verdict == Verdict("dead_letter", DeadLetterReason(reason))


def test_every_reject_reason_is_a_dead_letter_reason() -> None:
    for reason in typing.get_args(RejectReason):
        assert DeadLetterReason(reason).value == reason


def test_url_download_timeout_408_is_retried_twice_then_source_unavailable() -> None:
    exc = rejected("source_unavailable", 408, "URL download timeout (30000ms)")
    assert classify_submit_error(exc, url_timeouts=0).action == "retry"
    assert classify_submit_error(exc, url_timeouts=1).action == "retry"
    final = classify_submit_error(exc, url_timeouts=2)
    assert final == Verdict("dead_letter", DeadLetterReason.SOURCE_UNAVAILABLE)


@pytest.mark.parametrize("exc", SYSTEMIC, ids=lambda e: type(e).__name__)
def test_systemic_submit_errors_pause(exc: DocuTrayError) -> None:
    verdict = classify_submit_error(exc, url_timeouts=0)
    assert verdict.action == "pause"
    assert verdict.pause is not None
    assert verdict.reason is None


def test_invalid_api_key_pause_reason() -> None:
    assert classify_submit_error(systemic(InvalidApiKey, 401), url_timeouts=0).pause == (
        "invalid_api_key"
    )


def test_rate_limited_submit_is_retried_after_the_wait() -> None:
    verdict = classify_submit_error(rate_limited(7.0), url_timeouts=0)
    assert verdict == Verdict("retry", retry_after_s=7.0)
    assert classify_submit_error(rate_limited(None), url_timeouts=0).retry_after_s is None


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_submit_errors_are_retried_as_transport_failures(exc: DocuTrayError) -> None:
    assert classify_submit_error(exc, url_timeouts=0) == Verdict("retry", transport=True)


def test_conversion_lost_on_submit_is_retried() -> None:
    exc = ConversionLost("DocuTray submit HTTP 404", endpoint="submit", status_code=404)
    assert classify_submit_error(exc, url_timeouts=0).action == "retry"


# --------------------------------------------------------------------------- fetch errors


def test_fetch_timeout_is_retried_twice_then_source_unavailable() -> None:
    exc = TransientFetchError("download timed out")
    assert classify_submit_error(exc, url_timeouts=0).action == "retry"
    assert classify_submit_error(exc, url_timeouts=1).action == "retry"
    assert classify_submit_error(exc, url_timeouts=2) == Verdict(
        "dead_letter", DeadLetterReason.SOURCE_UNAVAILABLE
    )


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            SourceUnavailable("source answered HTTP 404", status_code=404),
            DeadLetterReason.SOURCE_UNAVAILABLE,
        ),
        (DocumentTooLarge("document too big"), DeadLetterReason.TOO_LARGE),
        (
            ForbiddenAddress("resolves to 10.0.0.1"),
            DeadLetterReason.FORBIDDEN_SOURCE,
        ),
        (InvalidURL("no host"), DeadLetterReason.INVALID_REQUEST),
    ],
    ids=["http-404", "too-large", "forbidden", "invalid-url"],
)
def test_fetch_errors_that_cannot_heal_are_dead_lettered(
    exc: FetchError, reason: DeadLetterReason
) -> None:
    assert classify_submit_error(exc, url_timeouts=0) == Verdict("dead_letter", reason)


@pytest.mark.parametrize("status", [408, 429, 503])
def test_transient_fetch_http_errors_are_retried(status: int) -> None:
    exc = TransientFetchError(f"source answered HTTP {status}", status_code=status)
    assert classify_submit_error(exc, url_timeouts=0).action == "retry"
    assert classify_submit_error(exc, url_timeouts=2) == Verdict(
        "dead_letter", DeadLetterReason.SOURCE_UNAVAILABLE
    )


def test_permanent_fetch_failure_without_http_answer_is_dead_lettered_at_once() -> None:
    exc = SourceUnavailable("cannot resolve host (Name or service not known)")
    assert classify_submit_error(exc, url_timeouts=0) == Verdict(
        "dead_letter", DeadLetterReason.SOURCE_UNAVAILABLE
    )


# --------------------------------------------------------------------------- status errors


def test_lost_conversion_is_resubmitted() -> None:
    for status in (403, 404):
        exc = ConversionLost(
            f"DocuTray status HTTP {status}", endpoint="status", status_code=status
        )
        assert classify_status_error(exc) == Verdict("resubmit")


@pytest.mark.parametrize("exc", SYSTEMIC, ids=lambda e: type(e).__name__)
def test_systemic_status_errors_pause(exc: DocuTrayError) -> None:
    verdict = classify_status_error(exc)
    assert verdict.action == "pause"
    assert verdict.pause is not None


def test_rate_limited_status_is_retried_after_the_wait() -> None:
    assert classify_status_error(rate_limited(3.5)) == Verdict("retry", retry_after_s=3.5)


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_status_errors_are_retried(exc: DocuTrayError) -> None:
    assert classify_status_error(exc) == Verdict("retry", transport=True)


def test_status_errors_never_dead_letter_directly() -> None:
    every: list[DocuTrayError] = [
        *TRANSIENT,
        *SYSTEMIC,
        rate_limited(),
        rejected("invalid_request", 400),
        ConversionLost("gone", endpoint="status", status_code=404),
    ]
    for exc in every:
        assert classify_status_error(exc).action != "dead_letter"


# --------------------------------------------------------------------------- bodies, letters


def test_safe_api_body_keeps_only_documented_keys() -> None:
    body = {
        "error": "Rate limit exceeded",
        "message": "m",
        "errors": ["e"],
        "limitType": "minute",
        "limit": 60,
        "remaining": 0,
        "resetTime": 1_700_000_000,
        "retryAfter": 12,
        "image_base64": "JVBERi0x...",
        "apiKey": API_KEY,
        "debug": {"trace": "x"},
    }
    out = safe_api_body(body)
    assert out is not None
    assert set(out) == {
        "error",
        "message",
        "errors",
        "limitType",
        "limit",
        "remaining",
        "resetTime",
        "retryAfter",
    }
    assert safe_api_body(None) is None
    assert safe_api_body({}) is None


def _original(value: bytes = b'{"request_id": "req-1"}') -> Any:
    return original_record(
        topic="docutray.requests",
        partition=2,
        offset=99,
        timestamp_ms=1_700_000_000_123,
        key=b"\x00req-1\xff",
        value=value,
        headers=[("traceparent", b"00-abc-01"), ("bin", b"\xc3\x28"), ("none", None)],
    )


def test_dead_letter_carries_the_original_record_intact() -> None:
    orig = _original(b"\xff\xfenot utf-8 at all")
    letter = build_dead_letter(
        reason=DeadLetterReason.MALFORMED_RECORD,
        message="record value is not UTF-8",
        original=orig,
        request_id=None,
    )
    again = DeadLetter.model_validate_json(letter.model_dump_json())
    assert again.original == orig
    assert again.original.value is not None
    assert again.original.key is not None
    assert again.original.value.raw() == b"\xff\xfenot utf-8 at all"
    assert again.original.key.raw() == b"\x00req-1\xff"
    assert again.original.header_tuples() == [
        ("traceparent", b"00-abc-01"),
        ("bin", b"\xc3\x28"),
        ("none", None),
    ]
    assert (again.original.topic, again.original.partition, again.original.offset) == (
        "docutray.requests",
        2,
        99,
    )
    assert again.http_status is None
    assert again.api_error is None
    assert again.failed_at.tzinfo is not None


def test_dead_letter_from_an_api_error() -> None:
    exc = error_from_response(
        endpoint="submit",
        status_code=400,
        headers={"x-request-id": "api-req-1"},
        content=json.dumps(
            {
                "message": "Validation error",
                "errors": ["document_type_code is unknown"],
                "echo": {"image_url": "https://x.example/a.pdf"},
            }
        ).encode(),
        form="url",
    )
    letter = build_dead_letter(
        reason=DeadLetterReason.INVALID_REQUEST,
        message=f"DocuTray refused the request: {describe_error(exc)}",
        original=_original(),
        request_id="req-1",
        document_type_code="invoice",
        error=exc,
        conversion_id=None,
        attempts=1,
        received_at=T0,
    )
    assert letter.http_status == 400
    assert letter.api_error == {
        "message": "Validation error",
        "errors": ["document_type_code is unknown"],
    }
    assert letter.attempts == 1
    assert letter.received_at == T0
    assert letter.document_type_code == "invoice"


def test_api_key_echoed_by_the_api_never_reaches_a_dead_letter() -> None:
    exc = error_from_response(
        endpoint="submit",
        status_code=400,
        headers={},
        content=json.dumps(
            {"message": f"Bad key {API_KEY}", "errors": [f"key {API_KEY}"], "apiKey": API_KEY}
        ).encode(),
        secrets=[API_KEY],
    )
    letter = build_dead_letter(
        reason=DeadLetterReason.INVALID_REQUEST,
        message=describe_error(exc),
        original=_original(),
        request_id="req-1",
        error=exc,
    )
    text = letter.model_dump_json()
    assert API_KEY not in text
    assert API_KEY not in describe_error(exc)
    assert "Bad key" in text


def test_build_result_from_a_successful_status() -> None:
    done = T0 + timedelta(seconds=9)
    status = ConversionStatus(
        conversion_id="cm5vm9hx30001m5cgh0p9v8qa",
        status="SUCCESS",
        response_timestamp=done,
        original_filename="invoice.pdf",
        data={"invoice_number": "INV-2024-001", "total": 1160},
    )
    result = build_result(
        request_id="req-1",
        status=status,
        document_type_code="invoice",
        metadata={"customer": "acme"},
        filename="invoice.pdf",
        received_at=T0,
        submitted_at=T0 + timedelta(seconds=1),
        status_calls=2,
        submit_attempts=1,
    )
    assert result.conversion_id == "cm5vm9hx30001m5cgh0p9v8qa"
    assert result.data == {"invoice_number": "INV-2024-001", "total": 1160}
    assert result.metadata == {"customer": "acme"}
    assert result.original_filename == "invoice.pdf"
    assert result.timings.completed_at == done
    assert result.timings.status_calls == 2
    assert result.timings.submit_attempts == 1
    assert result.timings.published_at >= result.timings.received_at


def test_build_result_without_data_or_timestamp() -> None:
    status = ConversionStatus(conversion_id="c-2", status="SUCCESS")
    result = build_result(
        request_id="req-2",
        status=status,
        document_type_code="receipt",
        metadata=None,
        filename=None,
        received_at=T0,
        submitted_at=None,
        status_calls=1,
        submit_attempts=1,
    )
    assert result.data == {}
    assert result.timings.completed_at is not None
    assert result.timings.completed_at.tzinfo is not None


# --------------------------------------------------------------------------- describe_error


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            rejected("invalid_request", 400, "Validation error"),
            "RequestRejected: HTTP 400 Validation error",
        ),
        (
            ApiTimeout(
                "DocuTray submit timed out (ReadTimeout)", maybe_processed=True, endpoint="submit"
            ),
            "ApiTimeout: DocuTray submit timed out (ReadTimeout)",
        ),
        (
            ServerError("DocuTray status HTTP 502", endpoint="status", status_code=502),
            "ServerError: HTTP 502 DocuTray status HTTP 502",
        ),
        (
            SourceUnavailable("source answered HTTP 404", status_code=404),
            "SourceUnavailable: HTTP 404 source answered HTTP 404",
        ),
        (ValueError(), "ValueError"),
        (RuntimeError("boom"), "RuntimeError: boom"),
    ],
    ids=["rejected", "timeout", "server", "fetch", "bare", "plain"],
)
def test_describe_error(exc: BaseException, expected: str) -> None:
    assert describe_error(exc) == expected


# --------------------------------------------------------------------------- dead-letter bounds

MiB = 1024 * 1024


def _record(
    *, key: bytes | None = b"k-1", value: bytes | None = b"{}", headers: Any = None
) -> OriginalRecord:
    return original_record(
        topic="docutray.requests",
        partition=0,
        offset=7,
        timestamp_ms=None,
        key=key,
        value=value,
        headers=headers,
    )


def _letter(original: OriginalRecord, **kwargs: Any) -> DeadLetter:
    kwargs.setdefault("request_id", None)
    return build_dead_letter(
        reason=DeadLetterReason.TOO_LARGE, message="too big", original=original, **kwargs
    )


def _whole(kept: EncodedBytes | None, whole: bytes, size: int | None, sha: str | None) -> None:
    assert kept is not None
    assert whole.startswith(kept.raw())
    assert size == len(whole)
    assert sha == hashlib.sha256(whole).hexdigest()


def test_a_small_dead_letter_is_unchanged_and_has_no_truncation_fields() -> None:
    letter = _letter(_record(headers=[("a", b"1")]))
    assert not letter.original.truncated
    wire = json.loads(dead_letter_record(letter)[1])
    assert set(wire["original"]) == {
        "topic",
        "partition",
        "offset",
        "timestamp_ms",
        "key",
        "value",
        "headers",
    }
    assert wire["original"]["headers"] == [
        {"key": "a", "value": {"encoding": "utf-8", "data": "1"}}
    ]


def test_6_mib_of_control_bytes_fits_the_default_bound_with_a_described_prefix() -> None:
    value = bytes(range(32)) * (6 * MiB // 32)  # valid UTF-8; JSON escapes it about 6-fold
    letter = _letter(_record(value=value))
    size = dead_letter_bytes(letter)
    assert size <= DEFAULT_DEAD_LETTER_BYTES
    assert size > DEFAULT_DEAD_LETTER_BYTES * 0.9  # what fits is kept
    orig = DeadLetter.model_validate_json(dead_letter_record(letter)[1]).original
    assert orig.value_truncated
    assert orig.value is not None
    assert orig.value.encoding == "utf-8"
    _whole(orig.value, value, orig.value_size, orig.value_sha256)
    assert not orig.key_truncated
    assert orig.key is not None
    assert orig.key.raw() == b"k-1"


@pytest.mark.parametrize("max_bytes", [8 * 1024, 100 * 1024, MiB, 3 * MiB])
def test_the_bound_is_a_parameter(max_bytes: int) -> None:
    value = b"\xff" + bytes(range(256)) * (8 * MiB // 256)  # not UTF-8: base64
    letter = _letter(_record(value=value), max_bytes=max_bytes)
    assert max_bytes * 0.75 < dead_letter_bytes(letter) <= max_bytes
    _whole(letter.original.value, value, letter.original.value_size, letter.original.value_sha256)


def test_a_1_mb_key_never_becomes_the_dead_letters_kafka_key() -> None:
    big_key = b"k" * 1_000_000
    letter = _letter(_record(key=big_key))
    key, _, _ = dead_letter_record(letter)
    assert key is None
    assert letter.original.key_truncated
    _whole(letter.original.key, big_key, letter.original.key_size, letter.original.key_sha256)
    assert dead_letter_bytes(letter) <= DEFAULT_DEAD_LETTER_BYTES
    with_id = _letter(_record(key=big_key), request_id="req-9")
    assert dead_letter_record(with_id)[0] == b"req-9"
    small = _letter(_record(key=b"k" * 256))
    assert dead_letter_record(small)[0] == b"k" * 256
    assert dead_letter_record(_letter(_record(key=b"k" * 257)))[0] is None


def test_a_4_mib_header_is_cut_and_left_out_of_the_kafka_headers() -> None:
    headers = [("first", b"1"), ("big", b"\x00" * (4 * MiB)), ("after", b"2")]
    letter = _letter(_record(headers=headers))
    assert dead_letter_bytes(letter) <= DEFAULT_DEAD_LETTER_BYTES
    orig = letter.original
    assert orig.headers_truncated
    assert orig.headers_count == 3
    assert orig.headers_size == 5 + 1 + 3 + 4 * MiB + 5 + 1
    first, big = orig.headers  # "after" does not fit any more
    assert first.complete
    assert big.value_truncated
    _whole(big.value, b"\x00" * (4 * MiB), big.value_size, big.value_sha256)
    # Only headers kept whole travel as Kafka headers of the dead letter.
    assert dead_letter_record(letter)[2] == [("first", b"1")]


def test_everything_hostile_at_once_still_fits() -> None:
    headers = [(f"h{i}", b"\x01" * 100_000) for i in range(40)]
    original = _record(key=b"\xff" * 1_000_000, value=b"\x00" * (6 * MiB), headers=headers)
    letter = _letter(original)
    assert dead_letter_bytes(letter) <= DEFAULT_DEAD_LETTER_BYTES
    orig = letter.original
    assert orig.value_truncated
    assert orig.key_truncated
    assert orig.headers_truncated
    assert orig.truncated


def test_cutting_a_cut_letter_again_keeps_the_whole_sizes() -> None:
    value = b"x" * (3 * MiB)
    first = _letter(_record(value=value), max_bytes=MiB)
    again = _letter(first.original, max_bytes=64 * 1024)
    assert dead_letter_bytes(again) <= 64 * 1024
    _whole(again.original.value, value, again.original.value_size, again.original.value_sha256)


def test_a_long_message_and_api_error_are_bounded_when_the_letter_is_cut() -> None:
    exc = rejected("invalid_request", 400, message="m" * 50_000)
    exc.body = {"message": "m" * 50_000, "errors": ["e" * 100] * 200}
    letter = build_dead_letter(
        reason=DeadLetterReason.INVALID_REQUEST,
        message="x" * 100_000,
        original=_record(value=b"v" * (2 * MiB)),
        request_id="req-1",
        error=exc,
        max_bytes=64 * 1024,
    )
    assert dead_letter_bytes(letter) <= 64 * 1024
    assert letter.message.endswith(
        "(100000 characters in all) (DocuTray's error body, "
        f"{len(json.dumps(safe_api_body(exc.body)))} bytes, is left out)"
    )
    assert letter.api_error is None


def test_headers_size_counts_key_bytes_as_consumed() -> None:
    headers = [(b"\xff\xfe", b"v" * 10), (None, b"w" * 10), ("ok", b"\x00" * MiB)]
    letter = _letter(_record(headers=headers), max_bytes=64 * 1024)
    assert dead_letter_bytes(letter) <= 64 * 1024
    # ff fe (2) + 10, the lost key (unknown: 0) + 10, "ok" (2) + 1 MiB
    assert letter.original.headers_size == 2 + 10 + 10 + 2 + MiB
    assert letter.original.headers_count == 3
