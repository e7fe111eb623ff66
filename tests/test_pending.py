"""The compact pending entry and its changelog value (pure; no Kafka)."""

from __future__ import annotations

import base64
import gc
import json
import tracemalloc
from datetime import UTC, datetime

import pytest

from service import samples
from service.intake import Accepted, original_record, parse_record
from service.messages import PendingRecord
from service.pending import Entry, Limits, entry_from_changelog, new_entry

LIMITS = Limits(max_request_bytes=1 << 24, max_document_bytes=1 << 26)


def _entry(rid: str = "req-1", *, metadata: dict | None = None) -> Entry:
    value = json.dumps(
        {
            "request_id": rid,
            "document_type_code": "invoice",
            "source": {
                "base64": base64.b64encode(samples.png()).decode(),
                "content_type": "image/png",
            },
            "metadata": metadata,
            "filename": "a.png",
        }
    ).encode()
    verdict = parse_record(
        value,
        max_request_bytes=LIMITS.max_request_bytes,
        max_document_bytes=LIMITS.max_document_bytes,
    )
    assert isinstance(verdict, Accepted)
    original = original_record(
        topic="in",
        partition=2,
        offset=41,
        timestamp_ms=1_700_000_000_000,
        key=rid.encode(),
        value=value,
        headers=[("traceparent", b"00-abc"), ("bin", b"\xff\x00")],
    )
    return new_entry(
        partition=2, epoch=1, original=original, accepted=verdict, received_at=datetime.now(UTC)
    )


def test_changelog_value_is_a_valid_pending_record_in_every_state():
    entry = _entry(metadata={"k": "é"})
    for state in ("queued", "submitting", "submitted"):
        entry.state = state
        entry.attempts = 2
        entry.conversion_id = "conv-1" if state == "submitted" else None
        entry.submitted_at = datetime.now(UTC) if state == "submitted" else None
        record = PendingRecord.model_validate_json(entry.changelog_value())
        assert record.state == state
        assert record.request_id == "req-1"
        assert record.attempts == 2
        assert record.original.offset == 41
        assert record.original.header_tuples() == [("traceparent", b"00-abc"), ("bin", b"\xff\x00")]


@pytest.mark.parametrize("state", ["queued", "submitting", "submitted"])
def test_entry_round_trips_through_the_changelog(state):
    entry = _entry(metadata={"customer": "acme"})
    entry.state = state
    entry.conversion_id = "conv-9" if state == "submitted" else None
    entry.submitted_at = datetime.now(UTC) if state == "submitted" else None
    entry.status_calls = 3
    back = entry_from_changelog(entry.changelog_value(), partition=2, epoch=7, limits=LIMITS)
    assert back.epoch == 7
    assert back.request_id == entry.request_id
    assert back.state == state
    assert back.document_type_code == "invoice"
    assert back.metadata == {"customer": "acme"}
    assert back.filename == "a.png"
    assert back.original_json == entry.original_json
    assert back.in_doubt == (state == "submitting")
    # A submitted conversion does not keep the parsed request; it is re-read on demand.
    assert back.request is None or state != "submitted"
    accepted = back.load_request(LIMITS)
    assert accepted is not None
    assert accepted.content_type == "image/png"


def test_unreadable_changelog_value_raises_value_error():
    with pytest.raises(ValueError, match=r"(?i)json"):
        entry_from_changelog(b"{not json", partition=0, epoch=1, limits=LIMITS)
    entry = _entry()
    tight = Limits(max_request_bytes=10, max_document_bytes=10)
    with pytest.raises(ValueError, match="no longer passes validation"):
        entry_from_changelog(entry.changelog_value(), partition=0, epoch=1, limits=tight)


def test_a_submitted_entry_stays_small():
    """100,000 pending conversions must fit a small pod: measure one entry's footprint."""
    gc.collect()
    tracemalloc.start()
    entries = []
    for i in range(2000):
        e = _entry(f"req-{i:06d}")
        e.state = "submitted"
        e.conversion_id = f"cmx{i:022d}"
        e.submitted_at = datetime.now(UTC)
        entries.append(e)
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_entry = current / len(entries)
    print(f"submitted entry: {per_entry:.0f} bytes")
    assert per_entry < 2000, per_entry
