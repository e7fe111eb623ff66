"""Hostile input (issue 7 item 3, issue 11 item 3): any bytes, keys and headers end in a verdict,
never a crash, and a dead letter keeps the original record bit for bit, or, when it cannot fit
its topic, a prefix of each part with the whole part's size and SHA-256."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service import samples
from service.intake import Accepted, Rejected, original_record, parse_record
from service.messages import DeadLetter, DeadLetterReason, OriginalRecord, PendingRecord, utcnow
from service.outcomes import DEFAULT_DEAD_LETTER_BYTES, build_dead_letter, dead_letter_bytes

MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_DOCUMENT_BYTES = 100 * 1024 * 1024

Header = tuple[str, bytes | None]

# --------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
b64_payloads = st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from([s for _, _, s in samples.all_samples()]).map(
        lambda b: base64.b64encode(b).decode()
    ),
    st.text(max_size=40),
)
sources = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "url": st.one_of(st.text(max_size=30), st.just("https://x.example/a.pdf")),
            "base64": st.one_of(
                b64_payloads, b64_payloads.map(lambda p: f"data:application/pdf;base64,{p}")
            ),
            "content_type": st.one_of(
                st.sampled_from(["application/pdf", "image/png", "text/plain"]),
                st.text(max_size=10),
            ),
        },
    ),
    json_values,
)
requestish = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.one_of(st.text(min_size=1, max_size=20), json_values),
        "document_type_code": st.one_of(st.text(max_size=20), json_values),
        "source": sources,
        "metadata": json_values,
        "filename": st.one_of(st.text(max_size=20), json_values),
        "extra": json_values,
    },
)

valid_requests = st.fixed_dictionaries(
    {
        "request_id": st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True),
        "document_type_code": st.text(min_size=1, max_size=20),
        "source": st.one_of(
            st.builds(lambda u: {"url": f"https://docs.example.com/{u}"}, st.text(max_size=20)),
            st.sampled_from(samples.all_samples()).map(
                lambda s: {"base64": base64.b64encode(s[2]).decode(), "content_type": s[1]}
            ),
        ),
    },
    optional={
        "metadata": st.dictionaries(st.text(max_size=12), json_values, max_size=4),
        "filename": st.text(max_size=30),
    },
)


@st.composite
def json_documents(draw: st.DrawFn) -> bytes:
    doc = draw(st.one_of(valid_requests, requestish, json_values))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8")
    if raw and draw(st.booleans()):  # damage it: flip, cut or splice in junk
        at = draw(st.integers(0, len(raw) - 1))
        junk = draw(st.binary(min_size=0, max_size=4))
        raw = raw[:at] + junk + raw[at + draw(st.integers(0, 3)) :]
    return raw


record_values = st.one_of(st.none(), st.binary(max_size=512), json_documents())
record_keys = st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=20).map(str.encode))
header_lists = st.lists(
    st.tuples(st.text(max_size=16), st.one_of(st.none(), st.binary(max_size=48))), max_size=6
)


# --------------------------------------------------------------------------- helpers


def capture(key: bytes | None, value: bytes | None, headers: list[Header]) -> OriginalRecord:
    return original_record(
        topic="docutray.requests",
        partition=5,
        offset=12345,
        timestamp_ms=1_700_000_000_000,
        key=key,
        value=value,
        headers=list(headers),
    )


def assert_bit_for_bit(
    orig: OriginalRecord, key: bytes | None, value: bytes | None, headers: list[Header]
) -> None:
    assert (orig.key.raw() if orig.key is not None else None) == key
    assert (orig.value.raw() if orig.value is not None else None) == value
    assert orig.header_tuples() == headers


def assert_prefix_of(kept: bytes, whole: bytes, size: int | None, sha256: str | None) -> None:
    """A cut part: a prefix of the whole, with the whole's size and SHA-256."""
    assert whole.startswith(kept)
    assert len(kept) < len(whole)
    assert size == len(whole)
    assert sha256 == hashlib.sha256(whole).hexdigest()


def assert_kept(
    orig: OriginalRecord, key: bytes | None, value: bytes | None, headers: list[Header]
) -> None:
    """Bit for bit where the dead letter kept a part whole; a described prefix where it cut it."""
    if not orig.truncated:
        assert_bit_for_bit(orig, key, value, headers)
        return
    assert (orig.value is not None and value is not None) or orig.value is value is None
    if orig.value is not None and value is not None:
        if orig.value_truncated:
            assert_prefix_of(orig.value.raw(), value, orig.value_size, orig.value_sha256)
        else:
            assert orig.value.raw() == value
    if orig.key is not None and key is not None:
        if orig.key_truncated:
            assert_prefix_of(orig.key.raw(), key, orig.key_size, orig.key_sha256)
        else:
            assert orig.key.raw() == key
    if orig.headers_truncated:
        assert orig.headers_count == len(headers)
    for got, (name, raw) in zip(orig.headers, headers, strict=False):
        assert got.key == name
        if got.value_truncated:
            assert got.value is not None
            assert raw is not None
            assert_prefix_of(got.value.raw(), raw, got.value_size, got.value_sha256)
        else:
            assert (got.value.raw() if got.value is not None else None) == raw


def dead_letter_round_trip(
    verdict: Rejected,
    key: bytes | None,
    value: bytes | None,
    headers: list[Header],
    *,
    max_bytes: int = DEFAULT_DEAD_LETTER_BYTES,
) -> DeadLetter:
    letter = build_dead_letter(
        reason=verdict.reason,
        message=verdict.message,
        original=capture(key, value, headers),
        request_id=verdict.request_id,
        document_type_code=verdict.document_type_code,
        received_at=utcnow(),
        max_bytes=max_bytes,
    )
    assert dead_letter_bytes(letter) <= max_bytes
    wire = letter.model_dump_json().encode("utf-8")
    back = DeadLetter.model_validate_json(wire)
    assert back.reason is verdict.reason
    assert back.request_id == verdict.request_id
    assert_kept(back.original, key, value, headers)
    return back


def judge(value: bytes | None, key: bytes | None = None, **limits: int) -> Accepted | Rejected:
    return parse_record(
        value,
        max_request_bytes=limits.get("max_request_bytes", MAX_REQUEST_BYTES),
        max_document_bytes=limits.get("max_document_bytes", MAX_DOCUMENT_BYTES),
        key=key,
    )


# --------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=record_values, key=record_keys, headers=header_lists)
def test_any_record_ends_in_a_verdict_and_keeps_its_bytes(
    value: bytes | None, key: bytes | None, headers: list[Header]
) -> None:
    verdict = judge(value, key)
    assert isinstance(verdict, Accepted | Rejected)
    event(type(verdict).__name__)
    if isinstance(verdict, Rejected):
        assert isinstance(verdict.reason, DeadLetterReason)
        assert verdict.message
        dead_letter_round_trip(verdict, key, value, headers)
    else:
        # Accepted: the pending record carries the same original, and the request re-serialises.
        record = PendingRecord(
            request_id=verdict.request.request_id,
            state="queued",
            original=capture(key, value, headers),
            received_at=utcnow(),
        )
        back = PendingRecord.model_validate_json(record.model_dump_json())
        assert_bit_for_bit(back.original, key, value, headers)
        verdict.request.model_dump_json()


@settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=2048), key=st.binary(max_size=64), headers=header_lists)
def test_arbitrary_bytes_are_rejected_with_bytes_intact(
    value: bytes, key: bytes, headers: list[Header]
) -> None:
    verdict = judge(value, key)
    assert isinstance(verdict, Rejected)  # random bytes are never a valid request
    dead_letter_round_trip(verdict, key, value, headers)


@settings(max_examples=100, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=32).filter(lambda b: not _is_utf8(b)),
    header_value=st.binary(min_size=1, max_size=32).filter(lambda b: not _is_utf8(b)),
)
def test_invalid_utf8_in_key_and_headers_survives(key: bytes, header_value: bytes) -> None:
    value = json.dumps({"request_id": "req-1"}).encode()
    headers: list[Header] = [("traceparent", header_value), ("plain", b"ok"), ("none", None)]
    verdict = judge(value, key)
    assert isinstance(verdict, Rejected)
    back = dead_letter_round_trip(verdict, key, value, headers)
    assert back.original.key is not None
    assert back.original.key.encoding == "base64"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------- big records


def _pdf_of(size: int) -> bytes:
    head = samples.pdf()
    return head + os.urandom(size - len(head))


def test_10_mb_record_with_a_valid_pdf_is_accepted() -> None:
    pdf = _pdf_of(7_500_000)
    value = json.dumps(
        {
            "request_id": "big-ok",
            "document_type_code": "invoice",
            "source": {"base64": base64.b64encode(pdf).decode(), "content_type": "image/png"},
        }
    ).encode()
    assert 10_000_000 <= len(value) <= MAX_REQUEST_BYTES
    verdict = judge(value, b"big-ok")
    assert isinstance(verdict, Accepted)
    assert verdict.content_type == "application/pdf"
    record = PendingRecord(
        request_id="big-ok",
        state="queued",
        original=capture(b"big-ok", value, []),
        received_at=utcnow(),
    )
    back = PendingRecord.model_validate_json(record.model_dump_json())
    assert back.original.value is not None
    assert back.original.value.raw() == value


def test_10_mb_record_over_the_record_limit_is_too_large_with_a_described_prefix() -> None:
    value = b"\xff" + os.urandom(10 * 1024 * 1024)  # not UTF-8 either: kept as base64
    verdict = judge(value, b"big-no", max_request_bytes=8 * 1024 * 1024)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.TOO_LARGE
    assert verdict.request_id == "big-no"
    back = dead_letter_round_trip(verdict, b"big-no", value, [("traceparent", b"00-1-01")])
    assert back.original.value_truncated
    assert back.original.value is not None
    assert back.original.value.encoding == "base64"
    assert not back.original.key_truncated
    assert not back.original.headers_truncated


def test_10_mb_record_is_kept_whole_when_the_topic_takes_it() -> None:
    value = b"\xff" + os.urandom(10 * 1024 * 1024)
    verdict = judge(value, b"big-no", max_request_bytes=8 * 1024 * 1024)
    assert isinstance(verdict, Rejected)
    back = dead_letter_round_trip(
        verdict, b"big-no", value, [("traceparent", b"00-1-01")], max_bytes=32 * 1024 * 1024
    )
    assert not back.original.truncated


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.one_of(st.none(), st.binary(max_size=6000), st.text(max_size=3000).map(str.encode)),
    key=st.one_of(st.none(), st.binary(max_size=3000)),
    headers=st.lists(
        st.tuples(st.text(max_size=40), st.one_of(st.none(), st.binary(max_size=3000))),
        max_size=8,
    ),
    max_bytes=st.integers(min_value=4096, max_value=12_000),
)
def test_any_record_fits_any_dead_letter_bound(
    value: bytes | None, key: bytes | None, headers: list[Header], max_bytes: int
) -> None:
    verdict = judge(value, key)
    if isinstance(verdict, Rejected):
        dead_letter_round_trip(verdict, key, value, headers, max_bytes=max_bytes)


def test_10_mb_document_over_the_document_limit_is_too_large() -> None:
    pdf = _pdf_of(7_500_000)
    value = json.dumps(
        {
            "request_id": "big-doc",
            "document_type_code": "invoice",
            "source": {"base64": base64.b64encode(pdf).decode(), "content_type": "application/pdf"},
        }
    ).encode()
    verdict = judge(value, max_document_bytes=5_000_000)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.TOO_LARGE
    assert verdict.request_id == "big-doc"


# --------------------------------------------------------------------------- deep nesting


@pytest.mark.parametrize("levels", [100, 900, 10_000, 200_000])
def test_deeply_nested_metadata_is_rejected_without_recursion_error(levels: int) -> None:
    assert levels < 1000 or levels > sys.getrecursionlimit()
    metadata = '{"a":' * levels + "1" + "}" * levels
    value = (
        '{"request_id": "deep-1", "document_type_code": "invoice", '
        '"source": {"url": "https://x.example/a.pdf"}, "metadata": ' + metadata + "}"
    ).encode()
    verdict = judge(value, b"deep-1")
    assert isinstance(verdict, Rejected)
    assert verdict.reason in {DeadLetterReason.INVALID_REQUEST, DeadLetterReason.MALFORMED_RECORD}
    assert "nested" in verdict.message
    assert verdict.request_id == "deep-1"
    dead_letter_round_trip(verdict, b"deep-1", value, [])


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_top_level_value_is_rejected(opener: str) -> None:
    value = (opener * 10_000).encode()
    verdict = judge(value)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD


# --------------------------------------------------------------------------- surrogates


@pytest.mark.parametrize("field", ["request_id", "document_type_code"])
def test_lone_surrogate_in_ids_still_makes_a_dead_letter(field: str) -> None:
    doc: dict[str, Any] = {"request_id": "req-1", "document_type_code": "invoice", "source": {}}
    doc[field] = "bad\ud800id"
    value = json.dumps(doc).encode()  # valid UTF-8, valid JSON: the escape is ASCII
    verdict = judge(value, b"req-1")
    assert isinstance(verdict, Rejected)
    dead_letter_round_trip(verdict, b"req-1", value, [])


def test_lone_surrogate_in_metadata_is_rejected_or_serialisable() -> None:
    value = json.dumps(
        {
            "request_id": "req-1",
            "document_type_code": "invoice",
            "source": {"url": "https://x.example/a.pdf"},
            "metadata": {"note": "x\udc80y"},
        }
    ).encode()
    verdict = judge(value)
    if isinstance(verdict, Accepted):
        verdict.request.model_dump_json()
    else:
        dead_letter_round_trip(verdict, None, value, [])
