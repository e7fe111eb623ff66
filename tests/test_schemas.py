"""The JSON Schemas in schemas/: current with the models, and true of every message the bridge writes."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
from click.testing import CliRunner

from service import samples
from service.cli import main
from service.docutray import ConversionStatus, error_from_response
from service.intake import Accepted, Rejected, original_record, parse_record
from service.messages import PUBLISHED_MODELS, DeadLetterReason, PendingRecord
from service.outcomes import build_dead_letter, build_result, describe_error

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
NOW = datetime.now(UTC)


def load_schema(stem: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"{stem}.schema.json").read_text())
    return schema


def validate(stem: str, message: dict[str, Any]) -> None:
    schema = load_schema(stem)
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(message)


def run_schemas(*args: str) -> Any:
    return CliRunner().invoke(main, ["schemas", *args])


# --------------------------------------------------------------------------- freshness


def test_committed_schemas_are_current() -> None:
    result = run_schemas("--check", "--dir", str(SCHEMAS))
    assert result.exit_code == 0, result.output
    assert {p.name for p in SCHEMAS.glob("*.schema.json")} == {
        f"{stem}.schema.json" for stem in PUBLISHED_MODELS
    }


def test_check_fails_naming_a_stale_file(tmp_path: Path) -> None:
    copy = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, copy)
    stale = copy / "dead-letter.schema.json"
    schema = json.loads(stale.read_text())
    schema["properties"].pop("reason")
    stale.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    result = run_schemas("--check", "--dir", str(copy))
    assert result.exit_code == 1
    assert str(stale) in result.stderr
    assert "document-request" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert stale.read_text() == json.dumps(schema, indent=2, sort_keys=True) + "\n"  # untouched


def test_check_fails_on_a_missing_file(tmp_path: Path) -> None:
    copy = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, copy)
    (copy / "pending-record.schema.json").unlink()
    result = run_schemas("--check", "--dir", str(copy))
    assert result.exit_code == 1
    assert "pending-record.schema.json" in result.stderr


def test_writing_then_checking_passes(tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    written = run_schemas("--dir", str(out))
    assert written.exit_code == 0, written.output
    assert written.stdout.count("wrote ") == len(PUBLISHED_MODELS)
    assert run_schemas("--check", "--dir", str(out)).exit_code == 0
    for stem in PUBLISHED_MODELS:
        assert (out / f"{stem}.schema.json").read_bytes() == (
            SCHEMAS / f"{stem}.schema.json"
        ).read_bytes()
    again = run_schemas("--dir", str(out))
    assert again.exit_code == 0
    assert again.stdout == ""


@pytest.mark.parametrize("stem", sorted(PUBLISHED_MODELS))
def test_schema_files_are_valid_json_schema(stem: str) -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema(stem))


# --------------------------------------------------------------------------- examples


def _original(value: bytes | None, key: bytes | None = b"req-1") -> Any:
    return original_record(
        topic="docutray.requests",
        partition=0,
        offset=17,
        timestamp_ms=1_700_000_000_000,
        key=key,
        value=value,
        headers=[("traceparent", b"00-4bf92f3577b34da6-01"), ("bin", b"\xff\x00")],
    )


REJECTED_VALUES: list[bytes | None] = [
    None,
    b"\xff\xfe",
    b"{not json",
    b"[1, 2]",
    json.dumps({"request_id": "req-1", "document_type_code": "invoice", "x": 1}).encode(),
    json.dumps(
        {
            "request_id": "req-1",
            "document_type_code": "invoice",
            "source": {"base64": "aGVsbG8=", "content_type": "text/plain"},
        }
    ).encode(),
]


@pytest.mark.parametrize("value", REJECTED_VALUES)
def test_intake_dead_letters_validate(value: bytes | None) -> None:
    verdict = parse_record(
        value, max_request_bytes=1 << 20, max_document_bytes=1 << 20, key=b"req-1"
    )
    assert isinstance(verdict, Rejected)
    letter = build_dead_letter(
        reason=verdict.reason,
        message=verdict.message,
        original=_original(value),
        request_id=verdict.request_id,
        document_type_code=verdict.document_type_code,
        received_at=NOW,
    )
    validate("dead-letter", letter.model_dump(mode="json"))
    validate("dead-letter", json.loads(letter.model_dump_json()))


def test_api_error_dead_letter_validates() -> None:
    exc = error_from_response(
        endpoint="submit",
        status_code=429,
        headers={"retry-after": "3"},
        content=json.dumps(
            {
                "error": "Rate limit exceeded",
                "limitType": "minute",
                "limit": 60,
                "remaining": 0,
                "resetTime": 1_700_000_060,
                "retryAfter": 3,
            }
        ).encode(),
    )
    letter = build_dead_letter(
        reason=DeadLetterReason.RETRIES_EXHAUSTED,
        message=describe_error(exc),
        original=_original(b'{"request_id": "req-1"}'),
        request_id="req-1",
        document_type_code="invoice",
        error=exc,
        conversion_id="cm5vm9hx30001m5cgh0p9v8qa",
        attempts=9,
        status_calls=0,
        received_at=NOW - timedelta(minutes=15),
    )
    assert letter.http_status == 429
    validate("dead-letter", letter.model_dump(mode="json"))


@pytest.mark.parametrize("reason", list(DeadLetterReason))
def test_every_reason_validates(reason: DeadLetterReason) -> None:
    letter = build_dead_letter(
        reason=reason, message="m", original=_original(b"{}", key=None), request_id=None
    )
    validate("dead-letter", letter.model_dump(mode="json"))


def test_result_validates() -> None:
    status = ConversionStatus(
        conversion_id="cm5vm9hx30001m5cgh0p9v8qa",
        status="SUCCESS",
        request_timestamp=NOW - timedelta(seconds=8),
        response_timestamp=NOW - timedelta(seconds=1),
        document_type_code="invoice",
        original_filename="invoice.pdf",
        data={"invoice_number": "INV-2024-001", "total": 1160, "lines": [{"q": 1}]},
    )
    for metadata in ({"customer": "acme", "tags": ["a"]}, None):
        result = build_result(
            request_id="req-1",
            status=status,
            document_type_code="invoice",
            metadata=metadata,
            filename="invoice.pdf",
            received_at=NOW - timedelta(seconds=10),
            submitted_at=NOW - timedelta(seconds=9),
            status_calls=1,
            submit_attempts=1,
        )
        validate("conversion-result", result.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("filename", "content_type", "data"),
    samples.all_samples(),
    ids=[name for name, _, _ in samples.all_samples()],
)
def test_accepted_requests_and_their_pending_records_validate(
    filename: str, content_type: str, data: bytes
) -> None:
    value = json.dumps(
        {
            "request_id": "req-1",
            "document_type_code": "invoice",
            "source": {"base64": base64.b64encode(data).decode(), "content_type": content_type},
            "metadata": {"customer": "acme"},
            "filename": filename,
        }
    ).encode()
    verdict = parse_record(value, max_request_bytes=1 << 20, max_document_bytes=1 << 20)
    assert isinstance(verdict, Accepted)
    validate("document-request", json.loads(value))
    validate("document-request", verdict.request.model_dump(mode="json", exclude_none=True))
    pending = PendingRecord(
        request_id="req-1", state="queued", original=_original(value), received_at=NOW
    )
    validate("pending-record", pending.model_dump(mode="json"))
    submitted = pending.model_copy(
        update={"state": "submitted", "conversion_id": "c-1", "submitted_at": NOW, "attempts": 1}
    )
    validate("pending-record", submitted.model_dump(mode="json"))


@pytest.mark.parametrize(
    "bad",
    [
        {"request_id": "r", "document_type_code": "x", "source": {"url": "https://a/b"}, "z": 1},
        {"request_id": "r", "document_type_code": "x"},
        {"request_id": "r", "document_type_code": "x", "source": {"url": "ftp://a/b"}},
        {"request_id": "has space", "document_type_code": "x", "source": {"url": "https://a"}},
        {
            "request_id": "r",
            "document_type_code": "x",
            "source": {"base64": "AAAA", "content_type": "text/plain"},
        },
    ],
)
def test_request_schema_rejects_what_the_bridge_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate("document-request", bad)
    verdict = parse_record(
        json.dumps(bad).encode(), max_request_bytes=1 << 20, max_document_bytes=1 << 20
    )
    assert isinstance(verdict, Rejected)
