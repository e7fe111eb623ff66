"""The durable pending-conversion store: in-memory entries and their changelog.

Every request the bridge has accepted but not finished lives in a compacted
changelog topic, keyed by request id, in the same partition number as its
input record (co-partitioned, as Kafka Streams does with state changelogs).
The in-memory :class:`Entry` is the working copy; :meth:`Entry.to_record`
is what goes to the changelog at each state change, and a tombstone removes
it when the result or dead letter is published in the same transaction.

:func:`restore_partitions` rebuilds the pending set of newly assigned
partitions by reading their changelog with ``read_committed`` to the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from service.intake import Accepted, Rejected, parse_record
from service.messages import DocumentRequest, PendingRecord, PendingState

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Entry:
    """One pending request as the engine works on it (mutable; the changelog holds its last state)."""

    partition: int
    epoch: int
    record: PendingRecord
    request: DocumentRequest
    content_type: str | None
    state: PendingState
    attempts: int
    status_calls: int
    lost_resubmits: int
    conversion_id: str | None
    submitted_at: datetime | None
    last_error: str | None = None
    #: Restored in state `submitting`: the previous owner may have submitted it already.
    in_doubt: bool = False
    #: monotonic time of the last successful submit (for poll scheduling and the deadline).
    submitted_mono: float | None = None
    #: transient URL download timeouts seen (DocuTray's 408).
    url_timeouts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        """The request id (the changelog key)."""
        return self.record.request_id

    @property
    def key(self) -> tuple[int, str]:
        """The engine's key for this entry."""
        return (self.partition, self.record.request_id)

    def to_record(self, *, next_attempt_at: datetime | None = None) -> PendingRecord:
        """The changelog value for the entry's current state."""
        return self.record.model_copy(
            update={
                "state": self.state,
                "attempts": self.attempts,
                "next_attempt_at": next_attempt_at,
                "last_error": self.last_error,
                "conversion_id": self.conversion_id,
                "submitted_at": self.submitted_at,
                "status_calls": self.status_calls,
                "lost_resubmits": self.lost_resubmits,
            }
        )


def entry_from_record(
    record: PendingRecord,
    *,
    partition: int,
    epoch: int,
    max_request_bytes: int,
    max_document_bytes: int,
    parsed: Accepted | None = None,
) -> Entry | None:
    """Rebuild a working entry from its changelog record (None if the stored request is unreadable)."""
    verdict: Accepted | Rejected
    if parsed is not None:
        verdict = parsed
    else:
        raw = record.original.value.raw() if record.original.value is not None else None
        verdict = parse_record(
            raw, max_request_bytes=max_request_bytes, max_document_bytes=max_document_bytes
        )
    if not isinstance(verdict, Accepted):
        return None
    return Entry(
        partition=partition,
        epoch=epoch,
        record=record,
        request=verdict.request,
        content_type=verdict.content_type,
        state=record.state,
        attempts=record.attempts,
        status_calls=record.status_calls,
        lost_resubmits=record.lost_resubmits,
        conversion_id=record.conversion_id,
        submitted_at=record.submitted_at,
        last_error=record.last_error,
        in_doubt=record.state == "submitting",
    )


def restore_partitions(
    conf: dict[str, Any], topic: str, partitions: list[int], *, timeout_s: float
) -> dict[int, dict[str, PendingRecord]]:
    """Read the changelog of `partitions` from the beginning to the end (read_committed).

    Returns, per partition, the last live record of every request id
    (tombstones remove). Raises TimeoutError if the end is not reached in time.
    """
    result: dict[int, dict[str, PendingRecord]] = {p: {} for p in partitions}
    if not partitions:
        return result
    consumer = Consumer(
        {
            **conf,
            "group.id": "docutray-bridge-restore",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        todo: set[int] = set()
        for p in partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
            if high > low:
                todo.add(p)
        if not todo:
            return result
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(todo)])
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"changelog restore of {topic} {sorted(todo)} timed out")
            for msg in consumer.consume(num_messages=10_000, timeout=0.2):
                err = msg.error()
                partition = msg.partition()
                if partition is None:
                    continue
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        todo.discard(partition)
                        continue
                    raise RuntimeError(f"changelog restore failed: {err}")
                key = msg.key()
                if key is None:
                    continue
                rid = key.decode("utf-8", errors="replace")
                part = result[partition]
                value = msg.value()
                if value is None:
                    part.pop(rid, None)
                    continue
                try:
                    part[rid] = PendingRecord.model_validate_json(value)
                except ValueError:
                    log.error(
                        "changelog_record_unreadable",
                        partition=partition,
                        offset=msg.offset(),
                        action="skipped; inspect the changelog record",
                    )
        return result
    finally:
        consumer.close()
