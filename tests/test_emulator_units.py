"""Unit tests of the emulator's pure parts: no process, no network."""

from __future__ import annotations

import base64
import random
import re
import statistics
from datetime import datetime

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.emulator import doctypes
from service.emulator.config import EmulatorConfig, KnobsPatch
from service.emulator.conversions import (
    GIVE_UP_ERROR,
    Conversion,
    ConversionPlan,
    ConversionStore,
    draw_plan,
    iso_timestamp,
    new_conversion_id,
    plan_rng,
)
from service.emulator.faults import FaultInjector
from service.emulator.formats import (
    Base64Error,
    DocumentTooLarge,
    decode_base64_document,
    size_label,
    sniff_mime_type,
    split_data_uri,
)
from service.emulator.limits import MinuteRateLimiter, rate_limited_body
from service.emulator.stats import EmulatorStats, max_calls_in_window
from service.emulator.uploads import MalformedUpload, MultipartImageReader
from tests.fixtures.emulator import (
    BMP_BYTES,
    GIF_BYTES,
    JPEG_BYTES,
    PDF_BYTES,
    PNG_BYTES,
    WEBP_BYTES,
)

# --- magic bytes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (JPEG_BYTES, "image/jpeg"),
        (PNG_BYTES, "image/png"),
        (GIF_BYTES, "image/gif"),
        (b"GIF87a\x01\x00", "image/gif"),
        (BMP_BYTES, "image/bmp"),
        (WEBP_BYTES, "image/webp"),
        (PDF_BYTES, "application/pdf"),
        (b"hello world, plain text", None),
        (b"", None),
        (b"BMx\x00\x00\x00\x01\x02\x03\x04", None),  # "BM" without the reserved zeros
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),  # RIFF but audio
        (b"PK\x03\x04", None),  # zip / docx
        (b"\x89PNG\r\n", None),  # truncated signature
    ],
)
def test_sniff_mime_type(data: bytes, expected: str | None) -> None:
    assert sniff_mime_type(data[:16]) == expected


def test_size_label_matches_the_api_message_for_the_default_limit() -> None:
    assert size_label(100 * 1024 * 1024) == "100MB"
    assert size_label(2048) == "2KB"
    assert size_label(1000) == "1000B"


# --- base64 and data URIs ----------------------------------------------------


def test_raw_base64_decodes_head_and_size() -> None:
    decoded = decode_base64_document(base64.b64encode(PDF_BYTES).decode(), max_bytes=10_000)
    assert decoded.head == PDF_BYTES[:16]
    assert decoded.size_bytes == len(PDF_BYTES)
    assert decoded.declared_mime_type is None


def test_data_uri_gives_its_mime_type() -> None:
    value = "data:image/png;base64," + base64.b64encode(PNG_BYTES).decode()
    decoded = decode_base64_document(value, max_bytes=10_000)
    assert decoded.declared_mime_type == "image/png"
    assert decoded.size_bytes == len(PNG_BYTES)
    assert sniff_mime_type(decoded.head) == "image/png"


def test_data_uri_with_parameters_and_upper_case() -> None:
    mime, payload = split_data_uri("DATA:application/pdf;name=a.pdf;base64,JVBERi0=")
    assert mime == "application/pdf"
    assert payload == "JVBERi0="


def test_line_wrapped_base64_is_accepted() -> None:
    encoded = base64.encodebytes(PDF_BYTES * 20).decode()  # newline every 76 chars
    assert "\n" in encoded
    assert decode_base64_document(encoded, max_bytes=10_000).size_bytes == len(PDF_BYTES) * 20


@pytest.mark.parametrize(
    "value",
    [
        "not base64!!",
        "QUJD=",  # bad length
        "QQ==QUJD",  # padding in the middle
        "",
        "data:image/png,iVBORw0KGgo=",  # data URI without ;base64
        "data:image/png;base64,",  # empty payload
        "QUJDé===",
    ],
)
def test_invalid_base64_is_rejected(value: str) -> None:
    with pytest.raises(Base64Error):
        decode_base64_document(value, max_bytes=10_000)


def test_padding_inside_a_long_payload_is_rejected_across_chunks() -> None:
    # Two valid base64 strings glued together: valid per chunk, invalid as a whole.
    first = base64.b64encode(b"x" * (3 * 64 * 1024 + 1)).decode()
    with pytest.raises(Base64Error):
        decode_base64_document(first + first, max_bytes=10**9)


def test_base64_over_the_limit_raises_too_large() -> None:
    with pytest.raises(DocumentTooLarge):
        decode_base64_document(base64.b64encode(b"%PDF-" + b"0" * 2000).decode(), max_bytes=1000)


@given(st.binary(min_size=1, max_size=3000))
def test_base64_round_trip(data: bytes) -> None:
    decoded = decode_base64_document(base64.b64encode(data).decode(), max_bytes=10_000)
    assert decoded.size_bytes == len(data)
    assert decoded.head == data[:16]


# --- plans, durations, outcomes ------------------------------------------------


def _plans(seed: int, count: int, **knobs: float) -> list[ConversionPlan]:
    params = {
        "median_s": 2.0,
        "sigma": 0.5,
        "error_rate": 0.1,
        "enqueued_fraction": 0.2,
        "give_up_s": 3600.0,
    } | knobs
    return [draw_plan(plan_rng(seed, n), **params) for n in range(1, count + 1)]


def test_plans_are_reproducible_from_seed_and_sequence() -> None:
    assert _plans(7, 50) == _plans(7, 50)
    assert _plans(7, 50) != _plans(8, 50)


def test_changing_error_rate_does_not_reshuffle_durations() -> None:
    durations = [p.duration_s for p in _plans(3, 50, error_rate=0.0)]
    assert durations == [p.duration_s for p in _plans(3, 50, error_rate=0.9)]


def test_duration_median_and_error_share_follow_the_knobs() -> None:
    plans = _plans(11, 4000, median_s=2.0, sigma=0.5, error_rate=0.25)
    median = statistics.median(p.duration_s for p in plans)
    assert 1.85 < median < 2.15
    errors = sum(p.outcome == "ERROR" for p in plans) / len(plans)
    assert 0.22 < errors < 0.28
    assert all(p.error for p in plans if p.outcome == "ERROR")
    assert all(p.error is None for p in plans if p.outcome == "SUCCESS")
    assert all(0 <= p.queue_s <= 0.2 * p.duration_s for p in plans)


def test_sigma_zero_gives_the_median_exactly() -> None:
    assert {p.duration_s for p in _plans(1, 20, sigma=0.0, median_s=0.5)} == {0.5}


def test_durations_past_the_give_up_limit_become_the_timeout_error() -> None:
    plans = _plans(5, 20, median_s=10.0, sigma=0.0, give_up_s=3.0, error_rate=0.0)
    assert all(p.outcome == "ERROR" and p.error == GIVE_UP_ERROR for p in plans)
    assert all(p.duration_s == 3.0 for p in plans)


def _conversion(plan: ConversionPlan, *, code: str = "invoice", at_s: float = 1000.0) -> Conversion:
    return Conversion(
        conversion_id=new_conversion_id(now_s=at_s, counter=1),
        sequence=1,
        owner="owner",
        document_type_code=code,
        original_filename="a.pdf",
        submitted_at_s=at_s,
        plan=plan,
    )


def test_state_moves_with_time_and_body_has_the_contract_fields() -> None:
    plan = ConversionPlan(queue_s=1.0, duration_s=3.0, outcome="SUCCESS", error=None, data_seed=1)
    conv = _conversion(plan, at_s=1_700_000_000.0)
    assert conv.state_at(1_700_000_000.5) == "ENQUEUED"
    assert conv.state_at(1_700_000_001.0) == "PROCESSING"
    assert conv.state_at(1_700_000_003.0) == "SUCCESS"
    pending = conv.status_body(1_700_000_002.0)
    assert set(pending) == {
        "conversion_id",
        "status",
        "request_timestamp",
        "document_type_code",
        "original_filename",
    }
    done = conv.status_body(1_700_000_010.0)
    assert done["response_timestamp"] == iso_timestamp(1_700_000_003.0)
    assert done["data"] == conv.status_body(1_700_000_020.0)["data"]
    assert "error" not in done


def test_error_body_has_error_and_no_data() -> None:
    plan = ConversionPlan(queue_s=0, duration_s=1.0, outcome="ERROR", error="boom", data_seed=1)
    body = _conversion(plan).status_body(2000.0)
    assert body["status"] == "ERROR"
    assert body["error"] == "boom"
    assert "data" not in body
    assert "response_timestamp" in body


def test_iso_timestamp_has_milliseconds_and_z() -> None:
    assert iso_timestamp(1705314600.0) == "2024-01-15T10:30:00.000Z"
    assert iso_timestamp(1705314600.1239) == "2024-01-15T10:30:00.123Z"
    text = iso_timestamp(1_800_000_000.5)
    assert datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() == 1_800_000_000.5


def test_conversion_ids_are_cuid_like_and_unique() -> None:
    ids = {new_conversion_id(counter=n) for n in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"c[0-9a-z]{24}", i) for i in ids)


def test_store_expires_finished_conversions_after_ttl() -> None:
    store = ConversionStore()
    quick = _conversion(ConversionPlan(0, 1.0, "SUCCESS", None, 1), at_s=100.0)
    slow = _conversion(ConversionPlan(0, 50.0, "SUCCESS", None, 2), at_s=100.0)
    store.add(quick, ttl_s=10.0)
    store.add(slow, ttl_s=10.0)
    assert store.expire(110.9) == 0
    assert store.expire(111.0) == 1  # quick ended at 101, + 10 s
    assert store.get(quick.conversion_id) is None
    assert store.get(slow.conversion_id) is slow
    assert store.expire(160.0) == 1
    assert len(store) == 0


def test_store_clear_forgets_everything() -> None:
    store = ConversionStore()
    conv = _conversion(ConversionPlan(0, 1.0, "SUCCESS", None, 1))
    store.add(conv, ttl_s=10.0)
    assert store.clear() == 1
    assert store.get(conv.conversion_id) is None
    assert store.expire(10**10) == 0


# --- generated data ------------------------------------------------------------


@pytest.mark.parametrize("code", ["invoice", "receipt", "id_card", "other"])
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**64 - 1))
def test_generated_data_validates_against_the_served_schema(code: str, seed: int) -> None:
    doc_type = doctypes.find_by_code(code)
    assert doc_type is not None
    data = doctypes.generate_data(code, random.Random(seed))
    jsonschema.Draft202012Validator(
        doc_type.json_schema, format_checker=jsonschema.FormatChecker()
    ).validate(data)


def test_every_schema_is_a_valid_json_schema() -> None:
    for doc_type in doctypes.DOCUMENT_TYPES:
        jsonschema.Draft202012Validator.check_schema(doc_type.json_schema)


def test_invoice_totals_add_up() -> None:
    data = doctypes.generate_data("invoice", random.Random(3))
    assert data["subtotal"] == pytest.approx(sum(i["amount"] for i in data["line_items"]))
    assert data["total"] == pytest.approx(data["subtotal"] + data["tax"])


def test_data_is_deterministic_from_the_seed() -> None:
    assert doctypes.generate_data("receipt", random.Random(9)) == doctypes.generate_data(
        "receipt", random.Random(9)
    )


def test_catalogue_search_and_paging() -> None:
    items, total = doctypes.search("CARD", page=1, limit=20)
    assert [t.code for t in items] == ["id_card"]
    assert total == 1
    page2, total_all = doctypes.search(None, page=2, limit=3)
    assert total_all == len(doctypes.DOCUMENT_TYPES)
    assert [t.code for t in page2] == ["other"]


# --- rate limiter ----------------------------------------------------------------


def test_sliding_limiter_never_allows_more_than_n_in_any_60s() -> None:
    limiter = MinuteRateLimiter(limit_per_minute=10, algorithm="sliding")
    rng = random.Random(1)
    now = 0.0
    accepted = []
    for _ in range(3000):
        now += rng.expovariate(1.0)
        if limiter.acquire("k", now_s=now).allowed:
            accepted.append(now)
    assert max_calls_in_window(accepted) == 10
    assert len(accepted) > 10 * (now / 60) * 0.8  # and it does let the budget through


def test_sliding_limiter_reports_when_the_oldest_call_leaves_the_window() -> None:
    limiter = MinuteRateLimiter(limit_per_minute=2)
    assert limiter.acquire("k", now_s=100.0).remaining == 1
    assert limiter.acquire("k", now_s=110.0).remaining == 0
    denied = limiter.acquire("k", now_s=120.0)
    assert not denied.allowed
    assert denied.reset_at_s == 160.0
    assert limiter.acquire("k", now_s=160.0).allowed
    assert limiter.acquire("other-key", now_s=120.0).allowed  # budgets are per key


def test_fixed_limiter_resets_at_the_minute_boundary() -> None:
    limiter = MinuteRateLimiter(limit_per_minute=2, algorithm="fixed")
    assert limiter.acquire("k", now_s=119.0).allowed
    assert limiter.acquire("k", now_s=119.5).allowed
    denied = limiter.acquire("k", now_s=119.9)
    assert not denied.allowed
    assert denied.reset_at_s == 120.0
    assert limiter.acquire("k", now_s=120.0).allowed


def test_limit_none_lets_everything_through() -> None:
    limiter = MinuteRateLimiter(limit_per_minute=None)
    assert all(limiter.acquire("k", now_s=float(i) / 1000).allowed for i in range(1000))


def test_429_body_has_every_contract_field() -> None:
    limiter = MinuteRateLimiter(limit_per_minute=1)
    limiter.acquire("k", now_s=1_000.2)
    decision = limiter.acquire("k", now_s=1_010.0)
    body, retry_after_s = rate_limited_body(decision, now_s=1_010.0)
    assert body == {
        "error": "Rate limit exceeded",
        "limitType": "minute",
        "limit": 1,
        "remaining": 0,
        "resetTime": 1061,
        "retryAfter": 51,
    }
    assert retry_after_s == 51


def test_max_calls_in_window_is_half_open() -> None:
    assert max_calls_in_window([0.0, 59.9, 60.0, 60.1]) == 3
    assert max_calls_in_window([]) == 0


# --- faults, stats, config ---------------------------------------------------------


def test_faults_are_reproducible_and_follow_the_rates() -> None:
    def run(seed: int) -> list[tuple[bool, float]]:
        injector = FaultInjector(seed=seed)
        draws = [
            injector.draw(fault_500_rate=0.3, slow_response_rate=0.1, slow_response_s=2.0)
            for _ in range(2000)
        ]
        return [(d.fail_500, d.delay_s) for d in draws]

    first = run(42)
    assert first == run(42)
    assert first != run(43)
    assert 0.26 < sum(f for f, _ in first) / 2000 < 0.34
    assert 0.07 < sum(d == 2.0 for _, d in first) / 2000 < 0.13


def test_stats_snapshot_counts_and_windows() -> None:
    stats = EmulatorStats()
    stats.record_submission(202, request_id="r1")
    stats.record_submission(202, request_id="r1")
    stats.record_submission(400, request_id="r2")
    for t in (0.0, 1.0, 61.5):
        stats.record_counted_call(t)
    snap = stats.snapshot(conversions_live=2, include_timestamps=True)
    assert snap["submissions_accepted"] == 2
    assert snap["submissions_rejected"] == {"400": 1}
    assert snap["conversions_by_request_id"] == {"r1": 2}
    assert snap["max_calls_per_60s"] == 2
    assert snap["counted_call_times_s"] == [0.0, 1.0, 61.5]


def test_config_patch_changes_only_sent_fields_and_validates() -> None:
    config = EmulatorConfig(api_keys=["secret-key"], rate_limit_per_minute=10, error_rate=0.1)
    patched = config.patched(KnobsPatch.model_validate({"fault_500_rate": 0.5}))
    assert patched.fault_500_rate == 0.5
    assert patched.rate_limit_per_minute == 10
    assert patched.error_rate == 0.1
    assert [k.get_secret_value() for k in patched.api_keys] == ["secret-key"]
    off = config.patched(KnobsPatch.model_validate({"rate_limit_per_minute": None}))
    assert off.rate_limit_per_minute is None
    with pytest.raises(ValueError, match="error_rate"):
        KnobsPatch.model_validate({"error_rate": 2})
    with pytest.raises(ValueError, match="extra"):
        KnobsPatch.model_validate({"api_keys": ["x"]})


def test_config_never_shows_api_keys() -> None:
    config = EmulatorConfig(api_keys=["very-secret"])
    assert "very-secret" not in repr(config)
    assert "very-secret" not in str(config.knobs())


def test_median_override_per_document_type() -> None:
    config = EmulatorConfig(processing_median_s=2.0, processing_median_s_by_type={"invoice": 9})
    assert config.median_for("invoice") == 9
    assert config.median_for("receipt") == 2.0
    with pytest.raises(ValueError, match="median"):
        EmulatorConfig(processing_median_s_by_type={"invoice": 0})


# --- multipart reader ----------------------------------------------------------------


def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/pdf\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _feed(body: bytes, *, max_bytes: int = 10_000, chunk: int = 7) -> MultipartImageReader:
    reader = MultipartImageReader("multipart/form-data; boundary=XyZ", max_image_bytes=max_bytes)
    for start in range(0, len(body), chunk):
        reader.feed(body[start : start + chunk])
    reader.finish()
    return reader


def test_multipart_reader_keeps_fields_head_and_size() -> None:
    body = _multipart(
        [
            ("document_type_code", b"invoice", None),
            ("image", PDF_BYTES, "dir/scan.pdf"),
            ("document_metadata", b'{"request_id": "r"}', None),
        ]
    )
    reader = _feed(body)
    assert reader.fields == {
        "document_type_code": "invoice",
        "document_metadata": '{"request_id": "r"}',
    }
    assert reader.image is not None
    assert reader.image.filename == "scan.pdf"
    assert reader.image.content_type == "application/pdf"
    assert reader.image.head == PDF_BYTES[:16]
    assert reader.image.size_bytes == len(PDF_BYTES)


def test_multipart_reader_raises_as_soon_as_the_image_is_too_large() -> None:
    body = _multipart([("image", b"%PDF-" + b"x" * 5000, "a.pdf")])
    reader = MultipartImageReader("multipart/form-data; boundary=XyZ", max_image_bytes=1000)
    fed = 0
    raised = False
    for start in range(0, len(body), 100):
        fed += 100
        try:
            reader.feed(body[start : start + 100])
        except DocumentTooLarge:
            raised = True
            break
    assert raised
    assert fed < 1300  # stopped right after crossing the limit, not at the end of the body


@pytest.mark.parametrize(
    "body",
    [
        b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue',  # no closing
        b"garbage without boundary",
    ],
)
def test_multipart_reader_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(MalformedUpload):
        _feed(body)


def test_multipart_without_boundary_is_malformed() -> None:
    with pytest.raises(MalformedUpload):
        MultipartImageReader("multipart/form-data", max_image_bytes=10)


def test_multipart_field_size_is_bounded() -> None:
    with pytest.raises(MalformedUpload):
        _feed(_multipart([("document_metadata", b"x" * 70_000, None)]), chunk=4096)
