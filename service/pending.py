"""The durable pending-conversion store: compact in-memory entries and their changelog.

Every request the bridge has accepted but not finished lives in a compacted
changelog topic, keyed by request id, in the same partition number as its
input record (co-partitioned, as Kafka Streams does with state changelogs).
The in-memory :class:`Entry` is the working copy; :meth:`Entry.changelog_value`
is what goes to the changelog at each state change, and a tombstone removes
it when the result or dead letter is published in the same transaction.

Memory matters here (100,000 pending conversions per replica is a normal
day), so an entry keeps the original record as the JSON bytes it is written
as, not as models, and keeps the parsed request only while it may still be
submitted. The changelog value is spliced from a small header and those
bytes; :class:`~service.messages.PendingRecord` is its schema (a test checks
that the two agree).

:func:`entries_from_values` rebuilds the pending entries of a newly assigned
partition from the last changelog value of each request id, which
:mod:`service.restore` reads (never past an open transaction).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from service.intake import Accepted, parse_record
from service.messages import (
    SCHEMA_VERSION,
    DocumentRequest,
    OriginalRecord,
    PendingRecord,
    PendingState,
)

log = structlog.get_logger(__name__)


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
    #: The original input record, serialized once as an OriginalRecord (JSON bytes).
    original_json: bytes
    document_type_code: str
    metadata: dict[str, Any] | None = None
    filename: str | None = None
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
    #: The parsed request, only while a submit is under way (re-read from the original bytes).
    request: DocumentRequest | None = None
    content_type: str | None = None
    #: Hash of the request's canonical content (service.dedupe): re-sends vs id conflicts.
    content_hash: str = ""

    @property
    def key(self) -> tuple[int, str]:
        """The engine's key for this entry."""
        return (self.partition, self.request_id)

    def original(self) -> OriginalRecord:
        """The original record as a model (for dead letters and headers)."""
        return OriginalRecord.model_validate_json(self.original_json)

    def header_tuples(self) -> list[tuple[str, str | bytes | None]]:
        """The original record's headers, to carry onto output records."""
        return self.original().header_tuples()

    def load_request(self, limits: Limits) -> Accepted | None:
        """The parsed request (re-read from the original record if it was dropped)."""
        if self.request is not None:
            return Accepted(self.request, self.content_type)
        verdict = _parse_original(self.original(), limits)
        if verdict is None:
            return None
        self.request = verdict.request
        self.content_type = verdict.content_type
        return verdict

    def changelog_value(self) -> bytes:
        """The changelog record for the current state (a PendingRecord, as JSON)."""
        head = {
            "schema_version": SCHEMA_VERSION,
            "request_id": self.request_id,
            "state": self.state,
            "received_at": _iso(self.received_at),
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "last_error": self.last_error,
            "conversion_id": self.conversion_id,
            "submitted_at": _iso(self.submitted_at),
            "status_calls": self.status_calls,
            "lost_resubmits": self.lost_resubmits,
            "content_hash": self.content_hash or None,
        }
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        return text[:-1] + b',"original":' + self.original_json + b"}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


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

    The parsed request is not kept: a backlog of queued requests would hold
    every request twice (parsed and as bytes). It is parsed again right
    before its submit.
    """
    request = accepted.request
    return Entry(
        partition=partition,
        epoch=epoch,
        request_id=request.request_id,
        state="queued",
        received_at=received_at,
        original_json=original.model_dump_json().encode(),
        document_type_code=request.document_type_code,
        metadata=request.metadata,
        filename=request.filename,
        content_hash=content_hash,
    )


def entry_from_changelog(value: bytes, *, partition: int, epoch: int, limits: Limits) -> Entry:
    """Rebuild an entry from a changelog value (raises ValueError if it is unreadable).

    Requests that may still be submitted are validated again in full (an
    unreadable one must be dead-lettered now, not at its submit); a submitted
    conversion needs just its id, type, metadata, file name and original bytes.
    """
    record = PendingRecord.model_validate_json(value)
    original = record.original
    entry = Entry(
        partition=partition,
        epoch=epoch,
        request_id=record.request_id,
        state=record.state,
        received_at=record.received_at,
        original_json=original.model_dump_json().encode(),
        document_type_code="",
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
    if record.state == "submitted" and record.conversion_id:
        fields = json.loads(original.value.raw()) if original.value is not None else None
        if not isinstance(fields, dict) or not isinstance(fields.get("document_type_code"), str):
            raise ValueError("the stored request has no document_type_code")
        entry.document_type_code = fields["document_type_code"]
        entry.metadata = fields.get("metadata")
        entry.filename = fields.get("filename")
        return entry
    verdict = _parse_original(original, limits)
    if verdict is None:
        raise ValueError("the stored request no longer passes validation")
    entry.document_type_code = verdict.request.document_type_code
    entry.metadata = verdict.request.metadata
    entry.filename = verdict.request.filename
    return entry


def _parse_original(original: OriginalRecord, limits: Limits) -> Accepted | None:
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
    values: dict[str, bytes], *, partition: int, epoch: int, limits: Limits
) -> tuple[list[Entry], list[Unreadable]]:
    """The entries of a partition's last changelog values (read by service.restore).

    Records that cannot be turned into an entry come back as :class:`Unreadable`
    (they are dead-lettered, never dropped). Each value is freed once its entry exists.
    """
    entries: list[Entry] = []
    unreadable: list[Unreadable] = []
    while values:
        rid, value = values.popitem()
        try:
            entries.append(
                entry_from_changelog(value, partition=partition, epoch=epoch, limits=limits)
            )
        except ValueError as exc:
            unreadable.append(Unreadable(rid, value, str(exc).splitlines()[0]))
    return entries, unreadable
