"""Reading a partition's state back from Kafka, never past an open transaction.

A replica that takes over a partition rebuilds its state (the pending
changelog and the dedupe window) by reading their co-partitioned topics with
``read_committed``. The trap: under ``read_committed`` the end of a
partition is its *last stable offset* (LSO), the first offset of the oldest
transaction still open. A replica killed in the middle of a commit, and
replaced under another name, leaves its transaction open until
``transaction.timeout.ms``; everything written after that transaction's
first record sits above the LSO. A restore that stops at the LSO misses
state that committed *after* it: finished requests come back as pending
(second outcome), accepted ones have a committed input offset but no state
(no outcome).

So a takeover, per partition (:class:`StateReader` does the Kafka side,
:class:`~service.kafka.ownership.Ownership` the order):

1. fetch the input partition's committed offset first;
2. then read each state topic's high watermark (``read_uncommitted``): every
   record a transaction that committed that offset wrote is below it;
3. wait until the LSO reaches that high watermark (every transaction below
   it has committed or aborted); the partition is paused meanwhile, and a
   log line and ``docutray_bridge_restore_waiting_partitions`` say why;
4. read from the beginning up to that high watermark.

A restarted replica with the same stable id (``BRIDGE_INSTANCE_ID``) aborts
its predecessor's transaction in ``init_transactions``, so step 3 takes
milliseconds; under a new name it takes up to the dead producer's
transaction timeout (60 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

#: Called while a look-up goes on (the caller's liveness heartbeat).
Progress = Callable[[], None] | None
#: (partition, key, value, timestamp ms) of each record read; value None is a tombstone.
OnRecord = Callable[[int, bytes, bytes | None, int], None]


class StateReader:
    """Offsets and records of the state topics (two small consumers, no group membership)."""

    def __init__(self, conf: dict[str, Any]) -> None:
        base = {
            **conf,
            "group.id": "docutray-bridge-restore",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            # Prefetch little: a restore keeps what it reads until it ends anyway.
            "queued.max.messages.kbytes": 8192,
        }
        self._committed = Consumer({**base, "isolation.level": "read_committed"})
        self._uncommitted = Consumer({**base, "isolation.level": "read_uncommitted"})

    def close(self) -> None:
        """Close both consumers."""
        self._committed.close()
        self._uncommitted.close()

    def high_watermarks(
        self, topic: str, parts: Iterable[int], timeout_s: float, progress: Progress = None
    ) -> dict[int, int]:
        """The end of each partition counting records of open transactions."""
        return _ends(self._uncommitted, topic, parts, timeout_s, progress)

    def stable_offsets(
        self, topic: str, parts: Iterable[int], timeout_s: float, progress: Progress = None
    ) -> dict[int, int]:
        """The last stable offset of each partition (the end as read_committed sees it)."""
        return _ends(self._committed, topic, parts, timeout_s, progress)

    def read(
        self,
        topic: str,
        until: dict[int, int],
        on_record: OnRecord,
        *,
        timeout_s: float,
        progress: Callable[[], None] | None = None,
    ) -> None:
        """Read each partition from the beginning to its offset in `until` (read_committed)."""
        todo = {p for p, end in until.items() if end > 0}
        if not todo:
            return
        consumer = self._committed
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(todo)])
        deadline = time.monotonic() + timeout_s
        try:
            while todo:
                if progress is not None:
                    progress()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic} {sorted(todo)} timed out")
                for msg in consumer.consume(num_messages=10_000, timeout=0.2):
                    p = msg.partition()
                    if p is None or p not in todo:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            raise KafkaException(err)
                        if (msg.offset() or 0) >= until[p]:
                            todo.discard(p)
                        continue
                    key = msg.key()
                    if key is not None:
                        on_record(p, key, msg.value(), msg.timestamp()[1])
                    if (msg.offset() or 0) + 1 >= until[p]:
                        todo.discard(p)
        finally:
            consumer.unassign()


def _ends(
    consumer: Consumer, topic: str, parts: Iterable[int], timeout_s: float, progress: Progress
) -> dict[int, int]:
    """One look-up per partition, each bounded by `timeout_s`, with a beat before each."""
    ends = {}
    for p in parts:
        if progress is not None:
            progress()
        tp = TopicPartition(topic, p)
        ends[p] = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)[1]
    return ends
