"""The transactional producer and the batch its next transaction writes (steps 3-5 of the
guarantee in :mod:`service.kafka`).

Each batch is one Kafka transaction: begin, produce every record, send the consumer's
positions with ``send_offsets_to_transaction`` (group metadata included, so a zombie with
a stale generation is fenced), commit. Only after the commit do waiting effects resolve
(:func:`service.kafka.effects.committed`): nothing is submitted before its request is
durable, and no offset moves before its record's fate is. If a transaction must abort,
its effects are written again; an abort that repeats drops all in-memory state of the
assigned partitions and rebuilds it from Kafka (:meth:`Owner.reset_all`): the state can
never run ahead of what is durable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from service import metrics
from service.kafka.calls import Calls
from service.kafka.effects import Effect, OutRecord, committed, fail
from service.kafka.errors import CallHung, FatalKafkaError, StaleEffect
from service.kafka.settings import KafkaErrorLog, KafkaSettings

log = structlog.get_logger(__name__)

#: Aborted transactions whose effects are written again before the state is rebuilt instead.
ABORT_RETRIES = 2


class Owner(Protocol):
    """What a transaction asks of the partitions' owner (:class:`~.ownership.Ownership`)."""

    def positions(self) -> list[TopicPartition]:
        """Where every assigned partition resumes (the offsets this transaction commits)."""

    def is_live(self, effect: Effect) -> bool:
        """Whether the effect's partition is still owned in the epoch the effect was made for."""

    def reset_all(self) -> None:
        """Drop and rebuild the state of every assigned partition from Kafka."""


class Transaction:
    """The producer, and the effects and offsets that its next transaction makes durable."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        loop: asyncio.AbstractEventLoop,
        calls: Calls,
        owner: Owner,
        consumer: Callable[[], Consumer],
        beat: Callable[[], None],
    ) -> None:
        self._s = settings
        self._loop = loop
        self._calls = calls
        self._owner = owner
        self._consumer = consumer
        self._beat = beat
        self._producer: Producer | None = None
        #: Effects for the next transaction, in the order they came.
        self.batch: list[Effect] = []
        #: Bytes of the batch's new documents (a commit is due at max_batch_bytes: memory).
        self.batch_bytes = 0
        #: Records were consumed since the last commit: their offsets must be committed.
        self.offsets_dirty = False
        self.last_commit = time.monotonic()
        self._aborts_in_a_row = 0
        self._delivery_errors: list[KafkaError] = []

    # ---- the producer ----

    def open(self) -> None:
        """The transactional producer, ready for its first transaction.

        Same transactional id as this replica's previous life (or a stuck producer of this
        process): init_transactions fences that producer and aborts its open transaction at
        once, so a restore need not wait for the transaction timeout.
        """
        s = self._s
        self._producer = Producer(
            {
                **s.common,
                "transactional.id": f"{s.group_id}-{s.instance_id}",
                "linger.ms": 5,
                "message.max.bytes": s.producer_max_bytes,
                "transaction.timeout.ms": s.transaction_timeout_ms,
                "compression.type": "zstd",
                "error_cb": KafkaErrorLog("producer"),
                **s.extra_producer,
            }
        )
        producer = self._producer
        self._calls.retrying(
            "init_transactions",
            lambda: self._calls.bounded(
                "init_transactions", lambda: producer.init_transactions(30)
            ),
        )

    def _replace_producer(self, reason: str) -> None:
        """Leave a stuck producer behind and carry on with a new one (same transactional id)."""
        metrics.KAFKA_RETRIES.labels("producer_replaced").inc()
        log.error(
            "kafka_producer_replaced",
            reason=reason,
            action="none: a new producer with the same transactional id fences the stuck one "
            "and aborts its transaction; the effects are written again",
        )
        self.open()  # the old one stays with its blocked thread; it cannot be closed

    def close(self) -> None:
        """Deliver what the producer still holds (at shutdown, after the last commit)."""
        self._producer_().flush(10)

    def fatal_cause(self) -> str | None:
        """The producer's own fatal error (a fence), if it has one.

        confluent-kafka sometimes surfaces a fatal producer error only as a SystemError
        from a callback; asking the producer for a new transaction names the real cause.
        """
        if self._producer is None:
            return None
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            kerr: KafkaError = exc.args[0]
            return kerr.str() if kerr.fatal() else None
        except Exception:  # a diagnosis only: the original error is reported
            return None
        return None

    def _producer_(self) -> Producer:
        assert self._producer is not None
        return self._producer

    # ---- the batch ----

    def add(self, effect: Effect, *, weigh: bool = False) -> None:
        """Write `effect` in the next transaction (`weigh`: count its bytes towards a commit)."""
        if weigh:
            self.batch_bytes += sum(len(r.value or b"") for r in effect.records)
        self.batch.append(effect)

    def has_work(self) -> bool:
        """Effects or consumed offsets wait for a commit."""
        return bool(self.batch) or self.offsets_dirty

    def due(self) -> bool:
        """There is work, and the commit interval passed or the batch is full."""
        return self.has_work() and (
            time.monotonic() - self.last_commit >= self._s.commit_interval_s
            or len(self.batch) >= 2000
            or self.batch_bytes >= self._s.max_batch_bytes
        )

    def discard(self, reason: str) -> set[int]:
        """Fail every batched effect (StaleEffect) and forget the offsets; their partitions."""
        touched = {eff.partition for eff in self.batch}
        for eff in self.batch:
            fail(self._loop, eff, StaleEffect(reason))
        self.batch = []
        self.offsets_dirty = False
        return touched

    # ---- one transaction ----

    def _produce(self, rec: OutRecord) -> None:
        producer = self._producer_()
        kwargs: dict[str, Any] = {"key": rec.key, "value": rec.value}
        if rec.headers:
            kwargs["headers"] = rec.headers
        if rec.partition is not None:
            kwargs["partition"] = rec.partition
        if rec.delivered is not None:
            kwargs["on_delivery"] = partial(self._on_delivery, rec.delivered)
        while True:
            try:
                producer.produce(rec.topic, **kwargs)
                return
            except BufferError:
                producer.poll(0.05)

    def _on_delivery(
        self, delivered: Callable[[int], None], err: KafkaError | None, msg: Message
    ) -> None:
        if err is not None:
            self._delivery_errors.append(err)
        else:
            delivered(msg.offset() or 0)

    def _produce_late(self, batch: list[Effect]) -> None:
        """Records that name other records' offsets: wait for those offsets, then produce."""
        late = [eff for eff in batch if eff.late is not None]
        if not late:
            return
        self._delivery_errors = []
        while self._producer_().flush(1.0) > 0:
            self._beat()
        if self._delivery_errors:
            raise KafkaException(self._delivery_errors[0])
        for eff in late:
            assert eff.late is not None
            for rec in eff.late():
                self._produce(rec)

    def commit(self) -> None:
        """One transaction: every batched record plus the consumer positions (steps 3-5)."""
        batch, self.batch = self.batch, []
        self.batch_bytes = 0
        self.offsets_dirty = False
        self.last_commit = time.monotonic()
        producer = self._producer_()
        calls = self._calls
        try:
            calls.retrying("begin_transaction", producer.begin_transaction)
            for eff in batch:
                for rec in eff.records:
                    self._produce(rec)
            self._produce_late(batch)
            positions = self._owner.positions()
            if positions:
                group = self._consumer().consumer_group_metadata()
                calls.retrying(
                    "send_offsets_to_transaction",
                    lambda: calls.bounded(
                        "send_offsets_to_transaction",
                        lambda: producer.send_offsets_to_transaction(positions, group, 30),
                    ),
                )
            # Not bounded like the offsets: a commit given up on might still complete, and
            # writing its effects again would publish them twice. A stuck commit is left to
            # the watchdog (the process restarts and restores from Kafka).
            calls.retrying("commit_transaction", lambda: producer.commit_transaction(30))
        except KafkaException as exc:
            kerr: KafkaError = exc.args[0]
            if kerr.fatal():
                raise FatalKafkaError(f"transaction failed: {kerr.str()}") from None
            self._abort(batch, kerr.str())  # anything else: abort and rebuild from Kafka
            return
        except CallHung as hung:
            self._replace_producer(str(hung))
            self._retry_or_reset(batch, str(hung))
            return
        metrics.TRANSACTIONS.labels("committed").inc()
        self._aborts_in_a_row = 0
        for eff in batch:
            self._loop.call_soon_threadsafe(committed, eff)

    def _abort(self, batch: list[Effect], error: str) -> None:
        """Abort; try the same effects once more, then rebuild the partitions from Kafka.

        Most aborts pass: a rebalance bumped the group generation under the commit, a
        broker moved. The effects of partitions still owned are simply written again in the
        next transaction (the engine's state, ahead of Kafka, then matches it again), so
        calls under way elsewhere are not cancelled. Only an abort that repeats rebuilds
        the state of every assigned partition from what is durable.
        """
        try:
            self._calls.retrying(
                "abort_transaction", lambda: self._producer_().abort_transaction(30)
            )
        except KafkaException as abort_exc:
            raise FatalKafkaError(f"abort failed: {abort_exc.args[0].str()}") from None
        self._retry_or_reset(batch, error)

    def _retry_or_reset(self, batch: list[Effect], error: str) -> None:
        """After an abort: the live effects go into the next transaction, twice at most."""
        metrics.TRANSACTIONS.labels("aborted").inc()
        live = [eff for eff in batch if self._owner.is_live(eff)]
        for eff in batch:
            if eff not in live:
                fail(self._loop, eff, StaleEffect("partition revoked before its commit"))
        self._aborts_in_a_row += 1
        if self._aborts_in_a_row <= ABORT_RETRIES:
            log.warning(
                "transaction_aborted",
                error=error,
                effects=len(batch),
                retried=len(live),
                action="none: the effects of partitions still owned are written again",
            )
            self.batch = live + self.batch
            self.offsets_dirty = True
            return
        self._aborts_in_a_row = 0
        log.error(
            "transaction_aborted",
            error=error,
            effects=len(batch),
            action="aborted again: state of assigned partitions is rebuilt from Kafka; "
            "nothing is lost",
        )
        for eff in live:
            fail(self._loop, eff, StaleEffect("transaction aborted"))
        self._owner.reset_all()
