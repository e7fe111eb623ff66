"""The pending-conversion store: compact in-memory entries and their small changelog states.

Every request the bridge has accepted but not finished lives in a compacted
changelog topic, keyed by request id, in the same partition number as its
input record (co-partitioned, as Kafka Streams does with state changelogs).
The in-memory :class:`Entry` is the working copy; :meth:`Entry.changelog_value`
is what goes to the changelog at each state change, and a tombstone removes
it when the result or dead letter is published in the same transaction.

States, not documents: the original input record (with its document) is
written once to ``<group>.pending-documents`` (see :mod:`service.documents`)
and an entry keeps only where it is (:class:`~service.messages.DocumentRef`),
so a pending entry's memory and its changelog records do not grow with the
document: a few hundred bytes for a typical request. What a result needs
without reading the document back (type, file name, small metadata, the
headers to carry) is kept here; metadata over :data:`INLINE_METADATA_BYTES`
is read back from the document when the result is built.

:func:`entries_from_values` rebuilds the pending entries of a newly assigned
partition from the last changelog value of each request id, which
:mod:`service.kafka.restore` reads (never past an open transaction).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, cast

from pydantic import TypeAdapter

from service.intake import Accepted, parse_record
from service.messages import (
    DocumentRef,
    OriginalHeader,
    OriginalRecord,
    PendingRecord,
    PendingState,
)

#: Metadata up to this size (as JSON) is kept in the state; larger is read from the document.
INLINE_METADATA_BYTES = 2048
#: What an entry costs in memory beyond its headers and metadata, as backpressure counts it:
#: the entry (~220 bytes), its strings, its key, its places in the engine's dicts and due
#: queue and in the Kafka thread's ids (~1,000 bytes traced in all), plus the allocator's
#: share. Measured RSS per pending request: ~1,330 bytes at 100,000 restored, more right
#: after a burst of intake (docs/benchmarks.md, scenario 3b).
ENTRY_OVERHEAD_BYTES = 1500
#: What most entries cost: no metadata kept, no headers (see Entry.cost_bytes).
COMMON_ENTRY_COST_BYTES = ENTRY_OVERHEAD_BYTES + len(b"[]")

Headers = list[tuple[str, str | bytes | None]]
_HEADERS = TypeAdapter(list[OriginalHeader])


class DocumentAt(NamedTuple):
    """Where an entry's document is (the in-memory form of DocumentRef: a third of the size).

    A named tuple, not a frozen dataclass: a restore builds 100,000 of them, and a frozen
    dataclass's ``__init__`` costs ten times a tuple's (3.4 µs against 0.3 µs each).
    """

    partition: int
    offset: int
    size_bytes: int

    def ref(self) -> DocumentRef:
        """As the changelog writes it."""
        return DocumentRef(partition=self.partition, offset=self.offset, size_bytes=self.size_bytes)


@dataclass(frozen=True, slots=True)
class Limits:
    """The request size limits a stored request is judged by again when it is re-read."""

    max_request_bytes: int
    max_document_bytes: int


@dataclass(slots=True)
class Entry:
    """One pending request as the engine works on it (the changelog holds its last durable state)."""

    partition: int
    epoch: int
    request_id: str
    state: PendingState
    received_at: datetime
    document_type_code: str
    #: Where the original record is kept (None only for records written before the split).
    document: DocumentAt | None = None
    #: The original record, only for records written before the split (JSON bytes).
    legacy_original: bytes | None = None
    metadata: dict[str, Any] | None = None
    metadata_in_document: bool = False
    filename: str | None = None
    #: The original record's headers (JSON of OriginalHeader objects), carried onto outputs.
    headers_json: bytes = b"[]"
    attempts: int = 0
    status_calls: int = 0
    lost_resubmits: int = 0
    conversion_id: str | None = None
    submitted_at: datetime | None = None
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    #: Restored in state `submitting`: the previous owner may have submitted it already.
    in_doubt: bool = False
    #: monotonic time of the last successful submit (poll scheduling and the deadline).
    submitted_mono: float | None = None
    #: transient URL download failures seen (DocuTray's 408, fetch-mode timeouts).
    url_timeouts: int = 0
    #: Hash of the request's canonical content (service.dedupe): re-sends vs id conflicts.
    content_hash: str = ""
    #: The engine's key for this entry, (partition, request id): one tuple, made once and
    #: shared by every dict and queue that holds the entry (100,000 entries, 5 MB each copy).
    key: tuple[int, str] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.partition, self.request_id)

    @property
    def headers(self) -> list[OriginalHeader]:
        """The original record's headers."""
        return _HEADERS.validate_json(self.headers_json)

    def header_tuples(self) -> Headers:
        """The original record's headers, to carry onto output records."""
        return [(h.key, h.value.raw() if h.value is not None else None) for h in self.headers]

    def cost_bytes(self) -> int:
        """About what this entry holds in memory (backpressure counts it)."""
        held = len(self.headers_json)
        if self.metadata is not None:
            held += 2 * len(json.dumps(self.metadata, default=str))
        return ENTRY_OVERHEAD_BYTES + held

    def changelog_value(self) -> bytes:
        """The changelog record for the current state (a PendingRecord, as JSON)."""
        record = PendingRecord(
            request_id=self.request_id,
            state=self.state,
            received_at=self.received_at,
            document_type_code=self.document_type_code,
            filename=self.filename,
            metadata=self.metadata,
            metadata_in_document=self.metadata_in_document,
            headers=self.headers,
            document=self.document.ref() if self.document is not None else None,
            original=(
                OriginalRecord.model_validate_json(self.legacy_original)
                if self.legacy_original is not None
                else None
            ),
            attempts=self.attempts,
            next_attempt_at=self.next_attempt_at,
            last_error=self.last_error,
            conversion_id=self.conversion_id,
            submitted_at=self.submitted_at,
            status_calls=self.status_calls,
            lost_resubmits=self.lost_resubmits,
            content_hash=self.content_hash or None,
        )
        return record.model_dump_json(exclude_defaults=True).encode()


def new_entry(
    *,
    partition: int,
    epoch: int,
    original: OriginalRecord,
    accepted: Accepted,
    received_at: datetime,
    content_hash: str = "",
) -> Entry:
    """The entry of a request just accepted from the input topic (state `queued`).

    Its document reference is set once the document record has an offset
    (:mod:`service.kafka.transaction` writes it in the same transaction).
    """
    request = accepted.request
    metadata = request.metadata
    inline = metadata is None or len(json.dumps(metadata)) <= INLINE_METADATA_BYTES
    return Entry(
        partition=partition,
        epoch=epoch,
        request_id=request.request_id,
        state="queued",
        received_at=received_at,
        document_type_code=sys.intern(request.document_type_code),
        metadata=metadata if inline else None,
        metadata_in_document=not inline,
        filename=request.filename,
        headers_json=_headers_json(original.headers),
        content_hash=content_hash,
    )


def entry_from_changelog(value: bytes, *, partition: int, epoch: int) -> Entry:
    """Rebuild an entry from a changelog value (raises ValueError if it is unreadable).

    Only the state is read: a request's document is validated again right
    before its submit, when it is read back.
    """
    record = PendingRecord.model_validate_json(value)
    entry = Entry(
        partition=partition,
        epoch=epoch,
        request_id=record.request_id,
        # A few distinct values across all entries: one shared string each, not one per entry.
        state=cast(PendingState, sys.intern(record.state)),
        received_at=record.received_at,
        document_type_code=sys.intern(record.document_type_code),
        document=(
            DocumentAt(
                record.document.partition, record.document.offset, record.document.size_bytes
            )
            if record.document is not None
            else None
        ),
        metadata=record.metadata,
        metadata_in_document=record.metadata_in_document,
        filename=record.filename,
        headers_json=_headers_json(record.headers),
        attempts=record.attempts,
        status_calls=record.status_calls,
        lost_resubmits=record.lost_resubmits,
        conversion_id=record.conversion_id,
        submitted_at=record.submitted_at,
        next_attempt_at=record.next_attempt_at,
        last_error=record.last_error,
        in_doubt=record.state == "submitting",
        content_hash=record.content_hash or "",
    )
    if record.original is not None:  # written before documents moved beside the state
        entry.legacy_original = record.original.model_dump_json().encode()
        entry.headers_json = _headers_json(record.original.headers)
        fields = _request_fields(record.original)
        entry.document_type_code = str(fields.get("document_type_code") or "")
        entry.metadata = fields.get("metadata")
        entry.filename = fields.get("filename")
    if not entry.document_type_code or (entry.document is None and entry.legacy_original is None):
        raise ValueError("the pending state names no document type or no document")
    return entry


def _headers_json(headers: list[OriginalHeader]) -> bytes:
    return _HEADERS.dump_json(headers) if headers else b"[]"


def _request_fields(original: OriginalRecord) -> dict[str, Any]:
    try:
        fields = json.loads(original.value.raw()) if original.value is not None else None
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def parse_original(original: OriginalRecord, limits: Limits) -> Accepted | None:
    """The request in a stored original record, judged again (None if it no longer passes)."""
    value = original.value
    verdict = parse_record(
        value.raw() if value is not None else None,
        max_request_bytes=limits.max_request_bytes,
        max_document_bytes=limits.max_document_bytes,
    )
    return verdict if isinstance(verdict, Accepted) else None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A changelog record that cannot be turned into an entry: it is dead-lettered, not dropped."""

    request_id: str
    value: bytes
    error: str


def entries_from_values(
    values: dict[str, bytes], *, partition: int, epoch: int
) -> tuple[list[Entry], list[Unreadable]]:
    """The entries of a partition's last changelog values (read by service.kafka.restore).

    Records that cannot be turned into an entry come back as :class:`Unreadable`
    (they are dead-lettered, never dropped). Each value is freed once its entry exists.
    """
    entries: list[Entry] = []
    unreadable: list[Unreadable] = []
    while values:
        rid, value = values.popitem()
        try:
            entries.append(entry_from_changelog(value, partition=partition, epoch=epoch))
        except ValueError as exc:
            unreadable.append(Unreadable(rid, value, str(exc).splitlines()[0]))
    return entries, unreadable
