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
from service.messages import DocumentRef, PendingRecord
from service.pending import (
    INLINE_METADATA_BYTES,
    DocumentAt,
    Entry,
    Limits,
    entry_from_changelog,
    new_entry,
)

LIMITS = Limits(max_request_bytes=1 << 24, max_document_bytes=1 << 26)


def _entry(
    rid: str = "req-1", *, metadata: dict | None = None, png_bytes: bytes | None = None
) -> Entry:
    value = json.dumps(
        {
            "request_id": rid,
            "document_type_code": "invoice",
            "source": {
                "base64": base64.b64encode(png_bytes or samples.png()).decode(),
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


def _stored(entry: Entry, offset: int = 7) -> Entry:
    """The entry once its document has an offset in the documents topic."""
    entry.document = DocumentAt(entry.partition, offset, 1234)
    return entry


def test_changelog_value_is_a_small_valid_pending_record_in_every_state():
    entry = _stored(_entry(metadata={"k": "é"}))
    for state in ("queued", "submitting", "submitted"):
        entry.state = state
        entry.attempts = 2
        entry.conversion_id = "conv-1" if state == "submitted" else None
        entry.submitted_at = datetime.now(UTC) if state == "submitted" else None
        value = entry.changelog_value()
        record = PendingRecord.model_validate_json(value)
        assert record.state == state
        assert record.request_id == "req-1"
        assert record.attempts == 2
        assert record.original is None  # the document stays in its own topic
        assert record.document == DocumentRef(partition=2, offset=7, size_bytes=1234)
        headers = [(h.key, h.value.raw() if h.value else None) for h in record.headers]
        assert headers == [("traceparent", b"00-abc"), ("bin", b"\xff\x00")]
        assert len(value) < 1024, len(value)


def test_state_size_does_not_depend_on_the_document():
    small, big = _entry(), _entry(png_bytes=samples.png() * 4000)
    assert len(_stored(big).changelog_value()) == len(_stored(small).changelog_value())
    assert big.cost_bytes() == small.cost_bytes()


@pytest.mark.parametrize("state", ["queued", "submitting", "submitted"])
def test_entry_round_trips_through_the_changelog(state):
    entry = _stored(_entry(metadata={"customer": "acme"}))
    entry.state = state
    entry.conversion_id = "conv-9" if state == "submitted" else None
    entry.submitted_at = datetime.now(UTC) if state == "submitted" else None
    entry.status_calls = 3
    back = entry_from_changelog(entry.changelog_value(), partition=2, epoch=7)
    assert back.epoch == 7
    assert back.request_id == entry.request_id
    assert back.state == state
    assert back.document_type_code == "invoice"
    assert back.metadata == {"customer": "acme"}
    assert back.filename == "a.png"
    assert back.document == entry.document
    assert back.header_tuples() == entry.header_tuples()
    assert back.in_doubt == (state == "submitting")


def test_large_metadata_is_read_from_the_document():
    entry = _stored(_entry(metadata={"blob": "x" * (INLINE_METADATA_BYTES + 1)}))
    assert entry.metadata is None
    assert entry.metadata_in_document
    back = entry_from_changelog(entry.changelog_value(), partition=2, epoch=1)
    assert back.metadata_in_document


def test_records_written_before_the_split_are_still_read():
    entry = _entry(metadata={"customer": "acme"})
    original = original_record(
        topic="in",
        partition=2,
        offset=41,
        timestamp_ms=None,
        key=b"req-1",
        value=json.dumps(
            {
                "request_id": "req-1",
                "document_type_code": "invoice",
                "source": {"url": "https://example.com/a.pdf"},
                "metadata": {"customer": "acme"},
            }
        ).encode(),
        headers=[("h", b"v")],
    )
    legacy = (
        PendingRecord(
            request_id="req-1",
            state="submitted",
            received_at=entry.received_at,
            original=original,
            conversion_id="conv-1",
        )
        .model_dump_json()
        .encode()
    )
    back = entry_from_changelog(legacy, partition=2, epoch=1)
    assert back.document is None
    assert back.legacy_original is not None
    assert back.document_type_code == "invoice"
    assert back.metadata == {"customer": "acme"}
    assert back.header_tuples() == [("h", b"v")]
    assert PendingRecord.model_validate_json(back.changelog_value()).original == original


def test_unreadable_changelog_values_raise_value_error():
    with pytest.raises(ValueError, match=r"(?i)json"):
        entry_from_changelog(b"{not json", partition=0, epoch=1)
    no_document = _entry().changelog_value()  # no offset yet: never written like this
    with pytest.raises(ValueError, match="no document"):
        entry_from_changelog(no_document, partition=0, epoch=1)


def test_a_submitted_entry_stays_small():
    """100,000 pending conversions must fit a small pod: measure one entry's footprint."""
    gc.collect()
    tracemalloc.start()
    entries = []
    for i in range(2000):
        e = _stored(_entry(f"req-{i:06d}"))
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
