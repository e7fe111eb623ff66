"""Every record the bridge writes, built in one place.

Each request ends in exactly one outcome, and the records that carry a
request through its life are few: its document (once, beside the state), its
pending states, then its outcome (a result or a dead letter) together with
the tombstones of its state and document and a mark in the dedupe window.
The transaction that writes them (:mod:`service.kafka.transaction`) makes a
request's outcome and its tombstones durable together; this module only says
what each record is: topic, key (the request id), value, headers, partition.

Records of one request go to the partition its input record came from
(co-partitioned topics), except the outcome topics, which the producer's
partitioner places by key like any other producer would.
"""

from __future__ import annotations

from collections.abc import Callable

from service.dedupe import Outcome, dedupe_value
from service.kafka.effects import OutRecord
from service.messages import ConversionResult, DeadLetter
from service.outcomes import dead_letter_record
from service.pending import Entry


def document(
    topic: str,
    request_id: str,
    partition: int,
    original_json: bytes,
    delivered: Callable[[int], None],
) -> OutRecord:
    """The original input record, once, to ``<group>.pending-documents`` (the claim check).

    `delivered` learns its offset before the first state (which names it) is produced.
    """
    return OutRecord(topic, request_id.encode(), original_json, None, partition, delivered)


def state(topic: str, entry: Entry) -> OutRecord:
    """The entry's current state, to the changelog (a small JSON record, never the document)."""
    return OutRecord(
        topic, entry.request_id.encode(), entry.changelog_value(), None, entry.partition
    )


def tombstones(
    changelog_topic: str, documents_topic: str, request_id: str, partition: int
) -> list[OutRecord]:
    """The pending state and its document end with the outcome, in its transaction."""
    key = request_id.encode()
    return [
        OutRecord(changelog_topic, key, None, None, partition),
        OutRecord(documents_topic, key, None, None, partition),
    ]


def result(topic: str, entry: Entry, value: ConversionResult) -> OutRecord:
    """The result of a finished conversion, with the request's own headers carried over."""
    return OutRecord(
        topic, entry.request_id.encode(), value.model_dump_json().encode(), entry.header_tuples()
    )


def dead_letter(topic: str, letter: DeadLetter) -> OutRecord:
    """The record of `letter` on the dead-letter topic (bounded JSON, whole headers only)."""
    key, value, headers = dead_letter_record(letter)
    return OutRecord(topic, key, value, headers)


def finished_mark(
    topic: str, request_id: str, partition: int, content: str, outcome: Outcome, now_ms: int
) -> OutRecord:
    """The dedupe window's record of a request that just finished (re-sends are judged by it)."""
    return OutRecord(
        topic, request_id.encode(), dedupe_value(content, outcome, now_ms), None, partition
    )
