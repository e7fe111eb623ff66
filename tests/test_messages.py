"""The wire models: lossless bytes, strict models, schemas for every published model."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from service import metrics
from service.messages import (
    PUBLISHED_MODELS,
    SUPPORTED_CONTENT_TYPES,
    ConversionResult,
    ConversionTimings,
    DeadLetter,
    DeadLetterReason,
    DocumentRequest,
    DocumentSource,
    EncodedBytes,
    OriginalHeader,
    OriginalRecord,
    PendingRecord,
)

NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def original(**overrides: Any) -> OriginalRecord:
    fields: dict[str, Any] = {
        "topic": "docutray.requests",
        "partition": 3,
        "offset": 42,
        "timestamp_ms": 1_700_000_000_000,
        "key": EncodedBytes.of(b"req-1"),
        "value": EncodedBytes.of(b'{"request_id": "req-1"}'),
        "headers": [OriginalHeader(key="traceparent", value=EncodedBytes.of(b"00-abc-01"))],
    }
    fields.update(overrides)
    return OriginalRecord(**fields)


# --------------------------------------------------------------------------- EncodedBytes


@settings(max_examples=200)
@given(st.binary(max_size=2048))
def test_encoded_bytes_round_trip_any_bytes(raw: bytes) -> None:
    encoded = EncodedBytes.of(raw)
    assert encoded is not None
    assert encoded.raw() == raw
    again = EncodedBytes.model_validate_json(encoded.model_dump_json())
    assert again.raw() == raw


@settings(max_examples=200)
@given(st.text(max_size=512))
def test_encoded_bytes_keeps_utf8_as_text(text: str) -> None:
    encoded = EncodedBytes.of(text.encode())
    assert encoded == EncodedBytes(encoding="utf-8", data=text)
    assert EncodedBytes.of(text) == encoded


def test_encoded_bytes_uses_base64_for_non_utf8() -> None:
    encoded = EncodedBytes.of(b"\xff\x00\xfe")
    assert encoded == EncodedBytes(encoding="base64", data="/wD+")
    assert EncodedBytes.of(None) is None


def test_original_record_header_tuples() -> None:
    rec = original(
        headers=[
            OriginalHeader(key="traceparent", value=EncodedBytes.of(b"00-abc-01")),
            OriginalHeader(key="bin", value=EncodedBytes.of(b"\x80\x81")),
            OriginalHeader(key="empty", value=None),
            OriginalHeader(key="traceparent", value=EncodedBytes.of(b"dup")),
        ]
    )
    assert rec.header_tuples() == [
        ("traceparent", b"00-abc-01"),
        ("bin", b"\x80\x81"),
        ("empty", None),
        ("traceparent", b"dup"),
    ]
    assert original(headers=[]).header_tuples() == []


# --------------------------------------------------------------------------- strictness


def _valid_examples() -> dict[str, BaseModel]:
    timings = ConversionTimings(received_at=NOW, published_at=NOW)
    return {
        "document-request": DocumentRequest(
            request_id="req-1",
            document_type_code="invoice",
            source=DocumentSource(url="https://x.example/a.pdf"),
        ),
        "conversion-result": ConversionResult(
            request_id="req-1",
            conversion_id="c-1",
            document_type_code="invoice",
            data={"total": 1160},
            timings=timings,
        ),
        "dead-letter": DeadLetter(
            reason=DeadLetterReason.TIMEOUT, message="m", failed_at=NOW, original=original()
        ),
        "pending-record": PendingRecord(
            request_id="req-1", state="queued", original=original(), received_at=NOW
        ),
    }


@pytest.mark.parametrize("stem", sorted(PUBLISHED_MODELS))
def test_models_reject_unknown_fields(stem: str) -> None:
    model = PUBLISHED_MODELS[stem]
    data = json.loads(_valid_examples()[stem].model_dump_json())
    model.model_validate(data)
    with pytest.raises(ValidationError) as info:
        model.model_validate({**data, "surprise": 1})
    assert info.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    "model", [EncodedBytes, OriginalHeader, OriginalRecord, ConversionTimings, DocumentSource]
)
def test_nested_models_reject_unknown_fields(model: type[BaseModel]) -> None:
    assert model.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("stem", sorted(PUBLISHED_MODELS))
def test_models_are_frozen(stem: str) -> None:
    example = _valid_examples()[stem]
    first_field = next(iter(type(example).model_fields))
    with pytest.raises(ValidationError):
        setattr(example, first_field, "changed")


@pytest.mark.parametrize(
    "request_id", ["", "has space", "tab\tchar", "ünïcode", "x" * 257, "line\nbreak"]
)
def test_request_id_is_printable_ascii_1_to_256(request_id: str) -> None:
    with pytest.raises(ValidationError):
        DocumentRequest(
            request_id=request_id,
            document_type_code="invoice",
            source=DocumentSource(url="https://x.example/a.pdf"),
        )


def test_request_id_limits_accept_the_edges() -> None:
    for rid in ("a", "~" * 256, "req-2026/11/30#1"):
        DocumentRequest(
            request_id=rid,
            document_type_code="invoice",
            source=DocumentSource(url="https://x.example/a.pdf"),
        )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"url": "https://x.example/a.pdf", "base64": "AAAA", "content_type": "image/png"},
        {"base64": "AAAA"},
    ],
)
def test_document_source_rules(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DocumentSource(**fields)


def test_document_source_accepts_every_supported_type() -> None:
    for content_type in SUPPORTED_CONTENT_TYPES:
        DocumentSource.model_validate({"base64": "AAAA", "content_type": content_type})
    DocumentSource(base64="data:image/png;base64,AAAA")


def test_dead_letter_reasons_match_the_metric_labels() -> None:
    assert tuple(r.value for r in DeadLetterReason) == metrics.DEAD_LETTER_REASONS


def test_dead_letter_reason_serialises_as_its_code() -> None:
    letter = _valid_examples()["dead-letter"]
    assert json.loads(letter.model_dump_json())["reason"] == "timeout"


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("stem", sorted(PUBLISHED_MODELS))
def test_json_schema_generation(stem: str) -> None:
    schema = PUBLISHED_MODELS[stem].model_json_schema()
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"]
    json.dumps(schema)


def test_published_models_cover_every_topic_message() -> None:
    assert set(PUBLISHED_MODELS.values()) == {
        DocumentRequest,
        ConversionResult,
        DeadLetter,
        PendingRecord,
    }


def test_dead_letter_schema_documents_every_reason() -> None:
    schema = DeadLetter.model_json_schema()
    reasons = schema["$defs"]["DeadLetterReason"]["enum"]
    assert reasons == [r.value for r in DeadLetterReason]
