"""intake.parse_record: every branch, the samples, and the large-payload guard."""

from __future__ import annotations

import base64
import json
import time
import tracemalloc
from typing import Any

import pytest

from service import samples
from service.intake import (
    MAX_JSON_DEPTH,
    Accepted,
    RawHeader,
    Rejected,
    decoded_size_upper_bound,
    envelope_problem,
    header_bytes,
    key_as_request_id,
    original_record,
    parse_record,
    sniff_content_type,
    split_data_uri,
)
from service.messages import DeadLetterReason

MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_DOCUMENT_BYTES = 100 * 1024 * 1024
PDF_B64 = base64.b64encode(samples.pdf()).decode()


def request(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": "req-1",
        "document_type_code": "invoice",
        "source": {"base64": PDF_B64, "content_type": "application/pdf"},
    }
    base.update(overrides)
    return base


def parse(value: bytes | dict[str, Any] | None, **limits: int) -> Accepted | Rejected:
    raw = json.dumps(value).encode() if isinstance(value, dict) else value
    return parse_record(
        raw,
        max_request_bytes=limits.get("max_request_bytes", MAX_REQUEST_BYTES),
        max_document_bytes=limits.get("max_document_bytes", MAX_DOCUMENT_BYTES),
    )


def rejected(value: bytes | dict[str, Any] | None, **limits: int) -> Rejected:
    verdict = parse(value, **limits)
    assert isinstance(verdict, Rejected), verdict
    assert verdict.message
    return verdict


def accepted(value: bytes | dict[str, Any], **limits: int) -> Accepted:
    verdict = parse(value, **limits)
    assert isinstance(verdict, Accepted), verdict
    return verdict


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    ("filename", "content_type", "data"),
    samples.all_samples(),
    ids=[name for name, _, _ in samples.all_samples()],
)
def test_every_sample_is_accepted_with_its_sniffed_type(
    filename: str, content_type: str, data: bytes
) -> None:
    b64 = base64.b64encode(data).decode()
    verdict = accepted(
        request(
            source={"base64": b64, "content_type": content_type},
            filename=filename,
            metadata={"customer": "acme", "n": 1},
        )
    )
    assert verdict.content_type == content_type
    assert verdict.request.filename == filename
    assert verdict.request.metadata == {"customer": "acme", "n": 1}
    assert sniff_content_type(data[:12]) == content_type


def test_sniffed_type_wins_over_a_wrong_declared_one() -> None:
    b64 = base64.b64encode(samples.png()).decode()
    verdict = accepted(request(source={"base64": b64, "content_type": "application/pdf"}))
    assert verdict.content_type == "image/png"


def test_data_uri_without_content_type_is_accepted() -> None:
    verdict = accepted(request(source={"base64": f"data:application/pdf;base64,{PDF_B64}"}))
    assert verdict.content_type == "application/pdf"


def test_url_source_is_accepted_with_declared_type() -> None:
    verdict = accepted(request(source={"url": "https://docs.example.com/a.pdf"}))
    assert verdict.content_type is None
    assert verdict.request.source.url == "https://docs.example.com/a.pdf"
    typed = accepted(
        request(source={"url": "http://docs.example.com/a", "content_type": "image/png"})
    )
    assert typed.content_type == "image/png"


# --------------------------------------------------------------------------- malformed record


def test_no_value() -> None:
    verdict = rejected(None)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert verdict.request_id is None


def test_record_over_max_request_bytes() -> None:
    value = json.dumps(request()).encode()
    verdict = rejected(value, max_request_bytes=len(value) - 1)
    assert verdict.reason is DeadLetterReason.TOO_LARGE
    assert "BRIDGE_MAX_REQUEST_BYTES" in verdict.message
    assert isinstance(parse(value, max_request_bytes=len(value)), Accepted)


def test_invalid_utf8() -> None:
    verdict = rejected(b'{"request_id": "\xff\xfe"}')
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert "UTF-8" in verdict.message


@pytest.mark.parametrize("value", [b"", b"{", b"not json", b'{"a": 1,}', b"\xef\xbb\xbf{}"])
def test_invalid_json(value: bytes) -> None:
    assert rejected(value).reason is DeadLetterReason.MALFORMED_RECORD


@pytest.mark.parametrize("value", [b"[]", b"1", b'"req"', b"null", b"true"])
def test_json_that_is_not_an_object(value: bytes) -> None:
    verdict = rejected(value)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert "expected an object" in verdict.message


def test_nesting_over_the_limit_is_invalid_request_with_ids() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"k": deep}
    verdict = rejected(request(metadata=deep))
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert str(MAX_JSON_DEPTH) in verdict.message
    assert (verdict.request_id, verdict.document_type_code) == ("req-1", "invoice")


def test_nesting_just_under_the_limit_is_accepted() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH - 3):  # request (1) + metadata (1) + dicts + leaf
        deep = {"k": deep}
    accepted(request(metadata=deep))


def test_deep_arrays_count_too() -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    assert rejected(request(metadata={"a": deep})).reason is DeadLetterReason.INVALID_REQUEST


# --------------------------------------------------------------------------- schema


def test_unknown_field() -> None:
    verdict = rejected(request(priority="high"))
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert "unknown field 'priority'" in verdict.message
    nested = rejected(request(source={"url": "https://x.example/a.pdf", "checksum": "abc"}))
    assert "unknown field 'source.checksum'" in nested.message


@pytest.mark.parametrize("field", ["request_id", "document_type_code", "source"])
def test_missing_field(field: str) -> None:
    value = request()
    del value[field]
    verdict = rejected(value)
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert f"missing field '{field}'" in verdict.message


def test_both_url_and_base64() -> None:
    verdict = rejected(request(source={"url": "https://x.example/a.pdf", "base64": PDF_B64}))
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert "exactly one of 'url' or 'base64'" in verdict.message


def test_neither_url_nor_base64() -> None:
    verdict = rejected(request(source={"content_type": "application/pdf"}))
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert "exactly one" in verdict.message


@pytest.mark.parametrize(
    "url", ["ftp://x.example/a.pdf", "file:///etc/passwd", "javascript:alert(1)", "x.example/a"]
)
def test_bad_url_scheme(url: str) -> None:
    verdict = rejected(request(source={"url": url}))
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert "source.url" in verdict.message


def test_base64_without_content_type() -> None:
    verdict = rejected(request(source={"base64": PDF_B64}))
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert "content_type is required" in verdict.message


@pytest.mark.parametrize("content_type", ["text/plain", "image/tiff", "application/msword"])
def test_unsupported_content_type(content_type: str) -> None:
    verdict = rejected(request(source={"base64": PDF_B64, "content_type": content_type}))
    assert verdict.reason is DeadLetterReason.UNSUPPORTED_FORMAT
    assert "application/pdf" in verdict.message  # lists what is supported


@pytest.mark.parametrize(
    "b64",
    ["not base64!!", "QUJD\nREVG", "QUJDRA", "QUJD=A==", "JVBERi0\u00e9"],
)
def test_invalid_base64(b64: str) -> None:
    verdict = rejected(request(source={"base64": b64, "content_type": "application/pdf"}))
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert "base64" in verdict.message
    assert verdict.request_id == "req-1"


@pytest.mark.parametrize(
    "data", [b"", b"hello world, plain text", b"PK\x03\x04zipfile", b"RIFF\x00\x00\x00\x00WAVE"]
)
def test_bytes_matching_no_magic_are_unsupported(data: bytes) -> None:
    b64 = base64.b64encode(data).decode()
    verdict = rejected(request(source={"base64": b64, "content_type": "image/png"}))
    assert verdict.reason is DeadLetterReason.UNSUPPORTED_FORMAT
    assert "declared image/png" in verdict.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"request_id": "req-9", "document_type_code": "receipt"}, ("req-9", "receipt")),
        ({"request_id": "has space", "document_type_code": 7}, ("has space", None)),
        ({"request_id": "", "document_type_code": ""}, (None, None)),
        ({"request_id": "x" * 257, "document_type_code": "y" * 129}, (None, None)),
        ({"request_id": ["r"], "document_type_code": {"a": 1}}, (None, None)),
    ],
)
def test_ids_are_carried_into_the_rejection_when_present(
    value: dict[str, Any], expected: tuple[str | None, str | None]
) -> None:
    verdict = rejected(value)
    assert (verdict.request_id, verdict.document_type_code) == expected


def test_schema_errors_are_summarised_in_one_message() -> None:
    verdict = rejected({"request_id": 5, "document_type_code": None, "source": 1, "x": 1})
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert verdict.message.startswith("request does not match the schema: ")
    for part in ("request_id", "document_type_code", "source", "unknown field 'x'"):
        assert part in verdict.message


# --------------------------------------------------------------------------- size guard


def test_decoded_size_upper_bound_is_an_upper_bound() -> None:
    for n in range(0, 50):
        data = bytes(range(n))
        b64 = base64.b64encode(data).decode()
        bound = decoded_size_upper_bound(b64)
        assert len(data) <= bound <= len(data) + 2


def test_document_at_the_limit_is_accepted_and_one_byte_over_is_too_large() -> None:
    doc = samples.pdf()
    b64 = base64.b64encode(doc).decode()
    value = request(source={"base64": b64, "content_type": "application/pdf"})
    accepted(value, max_document_bytes=len(doc))
    over = b64 + base64.b64encode(b"\x00" * 6).decode()  # not valid padding, but judged first
    too_big = rejected(
        request(source={"base64": over, "content_type": "application/pdf"}),
        max_document_bytes=len(doc),
    )
    assert too_big.reason is DeadLetterReason.TOO_LARGE
    assert too_big.request_id == "req-1"


def test_150_mb_document_is_refused_without_decoding_it() -> None:
    """A base64 payload that would decode to 150 MB is judged by its length alone.

    One 200 MB record is built. With the default record limit it is refused on its
    size before anything is read; with the record limit raised, parse_record has
    to decode the record to text and parse the JSON (two text copies of the
    record), but must not decode the base64 (another 150 MB).
    """
    decoded_bytes = 150 * 1024 * 1024
    b64_chars = decoded_bytes * 4 // 3
    head = (
        b'{"request_id":"big-1","document_type_code":"invoice",'
        b'"source":{"content_type":"application/pdf","base64":"JVBERi0x'
    )
    value = head + b"A" * (b64_chars - 8) + b'"}}'
    assert len(value) > 200 * 1024 * 1024

    tracemalloc.start()
    try:
        started = time.process_time()  # CPU time: wall time on a shared machine varies
        by_record = parse(value)
        record_s = time.process_time() - started
        _, record_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()

        started = time.process_time()
        by_document = parse(value, max_request_bytes=len(value))
        document_s = time.process_time() - started
        _, document_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert isinstance(by_record, Rejected)
    assert by_record.reason is DeadLetterReason.TOO_LARGE
    assert record_peak < 1024 * 1024
    assert record_s < 0.5

    assert isinstance(by_document, Rejected)
    assert by_document.reason is DeadLetterReason.TOO_LARGE
    assert by_document.request_id == "big-1"
    assert "decodes to about" in by_document.message
    # Two text copies of the record are unavoidable; a decode would add ~150 MB more.
    assert document_peak < 2 * len(value) + 32 * 1024 * 1024, document_peak
    assert document_s < 5


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("data:image/png;base64,AAAA", ("image/png", "AAAA")),
        ("data:;base64,AAAA", (None, "AAAA")),
        ("AAAA", (None, "AAAA")),
        ("data:image/png,AAAA", (None, "data:image/png,AAAA")),
        ("data:image/png;base64", (None, "data:image/png;base64")),
    ],
)
def test_split_data_uri(value: str, expected: tuple[str | None, str]) -> None:
    assert split_data_uri(value) == expected


def test_sniff_webp_needs_the_full_header() -> None:
    assert sniff_content_type(samples.webp()[:12]) == "image/webp"
    assert sniff_content_type(b"RIFF\x00\x00\x00\x00WEB") is None
    assert sniff_content_type(b"") is None


def test_original_record_accepts_list_or_dict_headers() -> None:
    as_list = original_record(
        topic="t",
        partition=1,
        offset=2,
        timestamp_ms=3,
        key=b"k",
        value=b"v",
        headers=[("a", b"1"), ("b", None)],
    )
    as_dict = original_record(
        topic="t",
        partition=1,
        offset=2,
        timestamp_ms=3,
        key=b"k",
        value=b"v",
        headers={"a": b"1", "b": None},
    )
    assert as_list == as_dict
    assert as_list.header_tuples() == [("a", b"1"), ("b", None)]
    empty = original_record(
        topic="t", partition=0, offset=0, timestamp_ms=None, key=None, value=None, headers=None
    )
    assert empty.headers == []
    assert empty.key is None
    assert empty.value is None


def test_bmp_needs_zero_reserved_fields() -> None:
    assert sniff_content_type(samples.bmp()[:12]) == "image/bmp"
    assert sniff_content_type(b"BMW is a car") is None


# --------------------------------------------------------------------------- record key


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"req-7", "req-7"),
        ("req-8", "req-8"),
        (None, None),
        (b"", None),
        (b"has space", None),
        (b"\xff\xfe", None),
        (b"x" * 257, None),
    ],
)
def test_key_stands_in_for_an_unreadable_request_id(
    key: bytes | str | None, expected: str | None
) -> None:
    assert key_as_request_id(key) == expected
    for value in (None, b"\xff", b"not json", b"[]"):
        verdict = parse_record(
            value,
            max_request_bytes=MAX_REQUEST_BYTES,
            max_document_bytes=MAX_DOCUMENT_BYTES,
            key=key,
        )
        assert isinstance(verdict, Rejected)
        assert verdict.request_id == expected


def test_request_id_in_the_value_wins_over_the_key() -> None:
    verdict = parse_record(
        json.dumps({"request_id": "from-value", "document_type_code": "x"}).encode(),
        max_request_bytes=MAX_REQUEST_BYTES,
        max_document_bytes=MAX_DOCUMENT_BYTES,
        key=b"from-key",
    )
    assert isinstance(verdict, Rejected)
    assert verdict.request_id == "from-value"
    too_big = parse_record(
        b"{}" * 600, max_request_bytes=1024, max_document_bytes=MAX_DOCUMENT_BYTES, key=b"k-1"
    )
    assert isinstance(too_big, Rejected)
    assert too_big.request_id == "k-1"


# --------------------------------------------------------------------------- the envelope


def judge(
    value: bytes | dict[str, Any] | None,
    *,
    key: bytes | None = None,
    headers: list[RawHeader] | None = None,
    max_header_bytes: int = 1024,
) -> Accepted | Rejected:
    raw = json.dumps(value).encode() if isinstance(value, dict) else value
    return parse_record(
        raw,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_document_bytes=MAX_DOCUMENT_BYTES,
        key=key,
        headers=headers or [],
        max_header_bytes=max_header_bytes,
    )


def test_header_key_that_is_not_utf8_rejects_a_valid_request_with_its_ids() -> None:
    verdict = judge(request(), headers=[("ok", b"1"), (b"\xff\xfe", b"v"), (b"x\xc3", None)])
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert verdict.request_id == "req-1"
    assert verdict.document_type_code == "invoice"
    assert verdict.message.startswith("header key is not UTF-8 (header 2 of 3: bytes ff fe")
    assert "and 1 more" in verdict.message


def test_header_key_whose_bytes_were_lost_is_named_too() -> None:
    verdict = judge(request(), headers=[(None, b"v")])
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert "its bytes could not be recovered" in verdict.message


def test_header_keys_given_as_utf8_bytes_are_fine() -> None:
    assert isinstance(judge(request(), headers=[(b"trace", b"1"), ("caf\u00e9", b"2")]), Accepted)


def test_headers_over_the_cap_are_too_large_and_at_the_cap_accepted() -> None:
    at_cap: list[RawHeader] = [("k", b"v" * 1023)]
    assert isinstance(judge(request(), headers=at_cap), Accepted)
    over: list[RawHeader] = [("k", b"v" * 1023), ("x", None)]
    verdict = judge(request(), headers=over)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.TOO_LARGE
    assert verdict.request_id == "req-1"
    assert "1025 bytes" in verdict.message
    assert "BRIDGE_MAX_HEADER_BYTES=1024" in verdict.message


def test_key_over_the_cap_is_too_large_with_the_request_id_of_the_value() -> None:
    verdict = judge(request(), key=b"k" * 1025)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.TOO_LARGE
    assert verdict.request_id == "req-1"
    assert "record key is 1025 bytes, over BRIDGE_MAX_HEADER_BYTES=1024" in verdict.message
    assert isinstance(judge(request(), key=b"k" * 1024), Accepted)


def test_a_bad_value_keeps_its_reason_and_the_message_names_the_envelope_too() -> None:
    verdict = judge(b"\xff not json", headers=[(b"\xff", b"v")])
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert "not UTF-8 (byte 0)" in verdict.message
    assert "also: header key is not UTF-8" in verdict.message


def test_header_bytes_counts_keys_and_values() -> None:
    assert (
        header_bytes([("ab", b"cde"), (b"\xff", None), (None, b"xy"), ("\u00e9", "\u00e9")]) == 12
    )


def test_envelope_problem_is_none_for_a_plain_record() -> None:
    assert envelope_problem(b"req-1", [("a", b"b")], max_header_bytes=64) is None


def test_original_record_keeps_header_keys_that_are_not_utf8() -> None:
    orig = original_record(
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=None,
        key=None,
        value=b"{}",
        headers=[(b"\xff\xfe", b"v"), (None, b"w"), (b"ok", None)],
    )
    bad, lost, ok = orig.headers
    assert bad.key == "\ufffd\ufffd"
    assert bad.key_bytes is not None
    assert bad.key_bytes.raw() == b"\xff\xfe"
    assert bad.complete
    assert lost.key_lost
    assert not lost.complete
    assert ok.key == "ok"
    assert ok.key_bytes is None
    # A lost key cannot be produced again; the others can (the bad one as replacement text).
    assert orig.header_tuples() == [("\ufffd\ufffd", b"v"), ("ok", None)]
    assert orig.truncated
    wire = json.loads(orig.model_dump_json())
    assert wire["headers"][0]["key_bytes"] == {"encoding": "base64", "data": "//4="}
    assert wire["headers"][1]["key_lost"] is True
    assert "key_bytes" not in wire["headers"][2]
    assert "key_lost" not in wire["headers"][2]
