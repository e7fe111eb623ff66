"""Documents beside the state: the claim-check kept inside Kafka.

A pending request's *state* (queued, submitting, submitted, attempts, the
conversion id) changes several times; its *document* (the original input
record, often megabytes of base64) never does. So the document is written
once, when the request is accepted, to the compacted, co-partitioned topic
``<group>.pending-documents`` (key: request id), in the same transaction as
the request's first state record in the changelog; every state record
carries the document's offset. The document is tombstoned together with the
outcome.

Memory and restores then do not depend on document sizes: a replica keeps
states only, restores states only, and reads a document back by offset when
it needs it (right before a submit, or to put the original record into a
dead letter), holding at most ``BRIDGE_MAX_INFLIGHT_BYTES`` of documents at
once (:class:`ByteBudget`).

Why a topic of its own rather than the input topic's offset: the input
topic's retention belongs to whoever created it, and a request may stay
queued for days (a spent monthly quota), so the bridge keeps its own copy,
compacted, for exactly as long as the request is pending.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from service.errors import BridgeError


class DocumentMissing(BridgeError):
    """The document of a pending request cannot be read back (deleted by hand, or a bug)."""


class DocumentReader:
    """Reads documents back by (partition, offset), off the event loop, a few at a time.

    A small pool of consumers (no group, assigned to one offset per read): a read is a
    fetch round trip, and submits wait for them, so reads run side by side.
    """

    def __init__(
        self, conf: dict[str, Any], topic: str, *, readers: int = 4, timeout_s: float = 30.0
    ) -> None:
        self._topic = topic
        self._timeout_s = timeout_s
        self._consumers = [self._consumer(conf) for _ in range(readers)]
        self._free: asyncio.Queue[Consumer] | None = None

    @staticmethod
    def _consumer(conf: dict[str, Any]) -> Consumer:
        return Consumer(
            {
                **conf,
                "group.id": "docutray-bridge-documents",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                # One record is wanted per read: do not prefetch megabytes of others.
                "queued.max.messages.kbytes": 1024,
                # A read waits for its one record: answer at once, not after the default 500 ms,
                # and do not back off for a second when the (small) prefetch queue is full.
                "fetch.wait.max.ms": 5,
                "fetch.queue.backoff.ms": 5,
                "fetch.max.bytes": 64 * 1024 * 1024,
            }
        )

    def close(self) -> None:
        """Close the consumers (call once no read is under way)."""
        for consumer in self._consumers:
            consumer.close()

    async def read(self, partition: int, offset: int) -> bytes:
        """The document record's value at `offset` of `partition`."""
        if self._free is None:  # made in the event loop that reads
            self._free = asyncio.Queue()
            for consumer in self._consumers:
                self._free.put_nowait(consumer)
        consumer = await self._free.get()
        try:
            return await asyncio.to_thread(self._read, consumer, partition, offset)
        finally:
            self._free.put_nowait(consumer)

    def _read(self, consumer: Consumer, partition: int, offset: int) -> bytes:
        consumer.assign([TopicPartition(self._topic, partition, offset)])
        deadline = time.monotonic() + self._timeout_s
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(err)
                if msg.partition() != partition or (msg.offset() or 0) < offset:
                    continue
                value = msg.value()
                if msg.offset() != offset or value is None:
                    raise DocumentMissing(
                        f"document at {self._topic}[{partition}]@{offset} is gone "
                        f"(found offset {msg.offset()})"
                    )
                return value
        finally:
            consumer.unassign()
        raise DocumentMissing(
            f"document at {self._topic}[{partition}]@{offset} not read within {self._timeout_s:g} s"
        )


class ByteBudget:
    """At most `limit` bytes held at once by the holders (a document's size each).

    A holder bigger than the whole budget still gets in, alone: the budget
    bounds how many documents are held together, never refuses one.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, size: int) -> None:
        """Wait until `size` bytes fit (or nothing else is held)."""
        while self.held and self.held + size > self.limit:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.held += size

    def release(self, size: int) -> None:
        """Give `size` bytes back (wakes every waiter: each checks whether it fits now)."""
        self.held = max(0, self.held - size)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
