"""intake.judge_record: a consumed record becomes New, Duplicate or Rejected, without Kafka.

The Kafka thread hands over the record's parts and what it knows of the partition's request
ids; these tests play that part with two dicts.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from service import samples
from service.dedupe import REPLAY_HEADER, DedupeWindow, Outcome, Remembered, content_hash
from service.intake import (
    Duplicate,
    Judged,
    New,
    RawHeader,
    RecordLimits,
    Rejected,
    judge_record,
)
from service.messages import DeadLetterReason, DocumentRequest

LIMITS = RecordLimits(
    max_request_bytes=16 * 1024 * 1024,
    max_document_bytes=100 * 1024 * 1024,
    max_header_bytes=64 * 1024,
    dedupe_window_s=3600.0,
)
PDF_B64 = base64.b64encode(samples.pdf()).decode()


def request(rid: str = "req-1", **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": rid,
        "document_type_code": "invoice",
        "source": {"base64": PDF_B64, "content_type": "application/pdf"},
    }
    base.update(overrides)
    return base


def hash_of(value: dict[str, Any]) -> str:
    return content_hash(DocumentRequest.model_validate(value).model_dump(mode="json"))


class Known:
    """The partition's pending ids (id -> content hash) and a dedupe window of finished ids."""

    def __init__(
        self,
        pending: dict[str, str] | None = None,
        finished: dict[str, tuple[str, Outcome]] | None = None,
    ) -> None:
        self.pending = pending or {}
        self.window = DedupeWindow(LIMITS.dedupe_window_s)
        for rid, (content, outcome) in (finished or {}).items():
            self.window.remember(rid, content, outcome, time.time())
        self.asked: list[str] = []

    def pending_content(self, request_id: str) -> str | None:
        self.asked.append(request_id)
        return self.pending.get(request_id)

    def finished(self, request_id: str) -> Remembered | None:
        return self.window.get(request_id, time.time())


def judge(
    value: bytes | None,
    known: Known,
    *,
    headers: list[RawHeader] | None = None,
    read_headers: Any = None,
) -> Judged:
    return judge_record(
        topic="in",
        partition=3,
        offset=42,
        timestamp_ms=1_700_000_000_000,
        key=b"req-1",
        value=value,
        read_headers=read_headers or (lambda: headers or []),
        limits=LIMITS,
        known=known,
    )


def encoded(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def test_a_request_never_seen_is_new_with_its_content_hash() -> None:
    judged = judge(encoded(request()), Known())
    assert isinstance(judged.verdict, New)
    assert judged.verdict.content_hash == hash_of(request())
    assert judged.verdict.accepted.request.request_id == "req-1"
    assert (judged.original.partition, judged.original.offset) == (3, 42)


@pytest.mark.parametrize("pending_hash", ["same", ""])
def test_a_resend_of_a_pending_request_is_a_duplicate(pending_hash: str) -> None:
    """Same content, or a pending record whose content is unknown (unreadable state)."""
    known = Known(pending={"req-1": hash_of(request()) if pending_hash else ""})
    judged = judge(encoded(request()), known)
    assert judged.verdict == Duplicate("req-1")


def test_other_content_under_a_pending_id_is_a_conflict_dead_letter() -> None:
    known = Known(pending={"req-1": hash_of(request(metadata={"note": "first"}))})
    verdict = judge(encoded(request()), known).verdict
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.REQUEST_ID_CONFLICT
    assert "BRIDGE_DEDUPE_WINDOW_S=3600 s" in verdict.message
    assert (verdict.request_id, verdict.document_type_code) == ("req-1", "invoice")


def test_finished_within_the_window_same_content_is_a_duplicate_other_a_conflict() -> None:
    known = Known(finished={"req-1": (hash_of(request()), "result")})
    assert judge(encoded(request()), known).verdict == Duplicate("req-1")
    other = judge(encoded(request(metadata={"note": "different"})), known).verdict
    assert isinstance(other, Rejected)
    assert other.reason is DeadLetterReason.REQUEST_ID_CONFLICT


def test_a_replay_of_a_dead_lettered_request_is_new_again() -> None:
    known = Known(finished={"req-1": (hash_of(request()), "dead_letter")})
    replay: list[RawHeader] = [(REPLAY_HEADER, b"dlq:0:7")]
    assert judge(encoded(request()), known).verdict == Duplicate("req-1")
    assert isinstance(judge(encoded(request()), known, headers=replay).verdict, New)


def test_an_invalid_record_is_rejected_without_asking_what_is_known() -> None:
    known = Known()
    verdict = judge(b"not json", known).verdict
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert verdict.request_id == "req-1"  # the key stands in for the unreadable id
    assert known.asked == []


def test_headers_the_client_cannot_read_give_a_dead_letter_not_an_exception() -> None:
    def broken() -> list[RawHeader]:
        raise SystemError("headers() failed")

    judged = judge(encoded(request()), Known(), read_headers=broken)
    verdict = judged.verdict
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.MALFORMED_RECORD
    assert "SystemError: headers() failed" in verdict.message
    assert "headers are left out" in verdict.message
    assert judged.original.headers == []
    assert judged.original.timestamp_ms is None
