"""The Kafka edge: one thread that owns the consumer, the transactional producer and the changelog.

Why a thread: librdkafka's calls block (``commit_transaction`` waits for the
broker), and rebalance callbacks run inside ``consume()``. Keeping every Kafka
call on one thread makes the order of events simple to reason about, while the
asyncio engine does the HTTP work. The two talk through a command queue
(engine → Kafka) and ``loop.call_soon_threadsafe`` (Kafka → engine).

The delivery guarantee, step by step (:meth:`KafkaIO._commit`):

1. Every consumed record is judged at once (pure, no I/O): a valid request
   becomes a ``queued`` changelog record, an invalid one a dead letter, a
   duplicate of a pending request id nothing at all.
2. Effects from the engine (state changes, results and dead letters with the
   tombstone of their pending record) join the same batch.
3. Each batch is one Kafka transaction: begin, produce every record, send the
   consumer's positions with ``send_offsets_to_transaction`` (group metadata
   included, so a zombie with a stale generation is fenced), commit.
4. Only after the commit does the engine learn of new pending entries, and
   only then do waiting effects resolve: nothing is submitted before its
   request is durable, and no offset moves before its record's fate is.
5. If a transaction must abort, all in-memory state of the assigned
   partitions is dropped and rebuilt from Kafka (seek to the committed offsets,
   restore the changelog): the state can never run ahead of what is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from service import metrics
from service.errors import BridgeError
from service.intake import Accepted, original_record, parse_record
from service.messages import utcnow
from service.outcomes import build_dead_letter
from service.pending import Entry, Limits, Unreadable, new_entry, restore_partitions

log = structlog.get_logger(__name__)

#: Headers are carried from the input record to every output record.
Headers = list[tuple[str, str | bytes | None]]


class FatalKafkaError(BridgeError):
    """The producer was fenced or Kafka failed in a way this process cannot recover from."""


class StaleEffect(BridgeError):
    """An effect for a partition this replica no longer owns (or that was reset): dropped."""


@dataclass(slots=True)
class OutRecord:
    """One record to produce inside the next transaction."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None
    partition: int | None = None


@dataclass(slots=True)
class Effect:
    """Records that must become durable together, for one partition's entry."""

    partition: int
    epoch: int
    records: list[OutRecord]
    #: Request id whose pending record this effect tombstones (removes from the dedupe set).
    finishes: str | None = None
    #: Called in the event loop after the commit (metrics, adopting new entries).
    on_commit: Callable[[], None] | None = None
    future: asyncio.Future[None] | None = None
    dead_letter_reason: str | None = None
    result: bool = False


@dataclass(slots=True)
class KafkaSettings:
    """What the Kafka edge needs to know (a slice of service.config.Settings)."""

    common: dict[str, Any]
    group_id: str
    instance_id: str
    input_topic: str
    result_topic: str
    dead_letter_topic: str
    changelog_topic: str
    commit_interval_s: float
    max_pending: int
    max_request_bytes: int
    max_document_bytes: int
    create_topics: bool
    topic_partitions: int
    replication_factor: int
    restore_timeout_s: float = 120.0
    extra_consumer: dict[str, Any] = field(default_factory=dict)
    extra_producer: dict[str, Any] = field(default_factory=dict)


class EngineHooks:
    """What the Kafka thread tells the asyncio engine (each runs in the event loop)."""

    def adopt(
        self,
        partition: int,
        epoch: int,
        entries: list[Entry],
        unreadable: list[Unreadable] | None = None,
    ) -> None:
        """Take over pending entries of a partition (after restore, or newly accepted).

        `unreadable` changelog records must be dead-lettered, never dropped.
        """
        raise NotImplementedError

    def drop(self, partition: int) -> None:
        """Forget everything of a partition (revoked, lost, or being reset)."""
        raise NotImplementedError

    def fatal(self, exc: BaseException) -> None:
        """The Kafka thread stopped on an unrecoverable error."""
        raise NotImplementedError


class KafkaErrorLog:
    """librdkafka's error callback: every client error becomes a structured log event.

    Authentication failures get their own event and say what to fix; the last
    error is kept so that a start-up failure can name its cause.
    """

    def __init__(self, client: str) -> None:
        self.client = client
        self.last: str | None = None
        self.auth_failed = False

    def __call__(self, err: KafkaError) -> None:
        self.last = err.str()
        if err.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            self.auth_failed = True
            log.error(
                "kafka_authentication_failed",
                client=self.client,
                error=err.str(),
                action="Kafka refused the credentials: check KAFKA_SASL_USERNAME / "
                "KAFKA_SASL_PASSWORD (the Secret) and KAFKA_SASL_MECHANISM",
            )
        elif err.fatal():
            log.critical("kafka_fatal_error", client=self.client, error=err.str())
        else:
            log.warning(
                "kafka_client_error",
                client=self.client,
                error=err.str(),
                action="librdkafka retries by itself; check the brokers if it persists",
            )


class KafkaIO:
    """The Kafka thread (see the module docstring for the guarantee it keeps)."""

    def __init__(
        self, settings: KafkaSettings, *, loop: asyncio.AbstractEventLoop, hooks: EngineHooks
    ) -> None:
        self._s = settings
        self._loop = loop
        self._hooks = hooks
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-io", daemon=True)
        self._batch: list[Effect] = []
        self._offsets_dirty = False
        self._last_commit = time.monotonic()
        self._epochs: dict[int, int] = {}
        self._pending_ids: dict[int, set[str]] = {}
        self._base_offsets: dict[int, int] = {}
        self._pause_reasons: set[str] = set()
        self._paused_parts: set[int] = set()
        self._last_reasons: set[str] = set()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self.heartbeat = time.monotonic()
        self.joined = threading.Event()
        self.stopped = threading.Event()
        self.assigned: frozenset[int] = frozenset()
        self.error: BaseException | None = None

    # ---- engine-facing API (thread-safe) ----

    def start(self) -> None:
        """Start the Kafka thread."""
        self._thread.start()

    def submit(self, effect: Effect) -> None:
        """Queue an effect for the next transaction."""
        self._commands.put(("effect", effect))

    def pause(self, reason: str) -> None:
        """Stop fetching input for `reason` (systemic error, shutdown)."""
        self._commands.put(("pause", reason))

    def resume(self, reason: str) -> None:
        """Lift a pause reason; fetching resumes when no reason is left."""
        self._commands.put(("resume", reason))

    def stop(self) -> None:
        """Commit what is pending, leave the group and end the thread."""
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end; True if it did."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def pending_count(self) -> int:
        """Pending requests across assigned partitions (as the Kafka thread knows them)."""
        return sum(len(ids) for ids in list(self._pending_ids.values()))

    # ---- the thread ----

    def _beat(self) -> None:
        """Liveness: the thread is making progress (also during long restores and retries)."""
        self.heartbeat = time.monotonic()

    def _run(self) -> None:
        try:
            self._setup()
            while not self._stop.is_set():
                self._iterate()
            self._shutdown()
        except BaseException as exc:  # the thread must report anything that ends it
            self.error = exc
            log.critical(
                "kafka_thread_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                action="the process exits; it restarts and restores from the changelog",
            )
            self._loop.call_soon_threadsafe(self._hooks.fatal, exc)
        finally:
            self.stopped.set()

    def _setup(self) -> None:
        s = self._s
        self._producer = Producer(
            {
                **s.common,
                "transactional.id": f"{s.group_id}-{s.instance_id}",
                "linger.ms": 5,
                "message.max.bytes": s.max_request_bytes * 2 + 1024 * 1024,
                "transaction.timeout.ms": 60_000,
                "compression.type": "lz4",
                "error_cb": KafkaErrorLog("producer"),
                **s.extra_producer,
            }
        )
        self._producer.init_transactions(30)
        self._consumer = Consumer(
            {
                **s.common,
                "group.id": s.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "statistics.interval.ms": 5000,
                "stats_cb": self._on_stats,
                "error_cb": KafkaErrorLog("consumer"),
                "max.poll.interval.ms": 300_000,
                **s.extra_consumer,
            }
        )
        self._consumer.subscribe(
            [s.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "kafka_ready",
            group_id=s.group_id,
            input_topic=s.input_topic,
            transactional_id=f"{s.group_id}-{s.instance_id}",
        )

    def _iterate(self) -> None:
        assert self._consumer is not None
        self._beat()
        self._drain_commands()
        self._apply_pause()
        due_in = self._s.commit_interval_s - (time.monotonic() - self._last_commit)
        has_work = bool(self._batch) or self._offsets_dirty
        timeout = max(0.0, min(0.05, due_in)) if has_work else 0.05
        for msg in self._consumer.consume(num_messages=500, timeout=timeout):
            self._on_message(msg)
        self._drain_commands()
        if (self._batch or self._offsets_dirty) and (
            time.monotonic() - self._last_commit >= self._s.commit_interval_s
            or len(self._batch) >= 2000
        ):
            self._commit()

    def _shutdown(self) -> None:
        assert self._consumer is not None
        assert self._producer is not None
        self._drain_commands()
        if self._batch or self._offsets_dirty:
            self._commit()
        self._consumer.close()  # runs on_revoke: commits anything left, leaves the group
        self._producer.flush(10)
        log.info("kafka_closed")

    # ---- commands from the engine ----

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "effect":
                self._accept_effect(arg)
            elif kind == "pause":
                self._pause_reasons.add(arg)
            elif kind == "resume":
                self._pause_reasons.discard(arg)

    def _accept_effect(self, effect: Effect) -> None:
        if self._epochs.get(effect.partition) != effect.epoch:
            self._fail(effect, StaleEffect(f"partition {effect.partition} changed owner or reset"))
            return
        if effect.finishes is not None:
            self._pending_ids.get(effect.partition, set()).discard(effect.finishes)
        self._batch.append(effect)

    def _fail(self, effect: Effect, exc: BaseException) -> None:
        fut = effect.future
        if fut is not None:
            self._loop.call_soon_threadsafe(_set_exception, fut, exc)

    # ---- pause / backpressure ----

    def _apply_pause(self) -> None:
        assert self._consumer is not None
        reasons = set(self._pause_reasons)
        if self.pending_count() >= self._s.max_pending:
            reasons.add("backpressure")
        elif (
            "backpressure" in self._last_reasons
            and self.pending_count() > 0.9 * self._s.max_pending
        ):
            reasons.add("backpressure")  # hysteresis: resume below 90 % of the cap
        for reason in metrics.PAUSE_REASONS:
            metrics.CONSUMPTION_PAUSED.labels(reason).set(1 if reason in reasons else 0)
        if reasons != self._last_reasons:
            log.info(
                "consumption_paused" if reasons else "consumption_resumed", reasons=sorted(reasons)
            )
        self._last_reasons = reasons
        want = set(self.assigned) if reasons else set()
        if want == self._paused_parts:
            return
        to_pause = want - self._paused_parts
        to_resume = self._paused_parts - want
        if to_pause:
            self._consumer.pause([TopicPartition(self._s.input_topic, p) for p in to_pause])
        if to_resume:
            self._consumer.resume([TopicPartition(self._s.input_topic, p) for p in to_resume])
        self._paused_parts = want

    # ---- consuming ----

    def _on_message(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.fatal():
                raise FatalKafkaError(f"consumer error: {err.str()}")
            log.warning("consumer_error", error=err.str(), action="librdkafka retries by itself")
            return
        partition = msg.partition()
        offset = msg.offset()
        if partition is None or offset is None:
            return
        self._offsets_dirty = True
        ts_type, ts = msg.timestamp()
        original = original_record(
            topic=msg.topic() or self._s.input_topic,
            partition=partition,
            offset=offset,
            timestamp_ms=ts if ts_type != 0 else None,
            key=msg.key(),
            value=msg.value(),
            headers=msg.headers(),
        )
        headers = original.header_tuples()
        verdict = parse_record(
            msg.value(),
            max_request_bytes=self._s.max_request_bytes,
            max_document_bytes=self._s.max_document_bytes,
            key=msg.key(),
        )
        epoch = self._epochs.get(partition, 0)
        if not isinstance(verdict, Accepted):
            metrics.REQUESTS_CONSUMED.labels("rejected").inc()
            letter = build_dead_letter(
                reason=verdict.reason,
                message=verdict.message,
                original=original,
                request_id=verdict.request_id,
                document_type_code=verdict.document_type_code,
                received_at=utcnow(),
            )
            log.warning(
                "request_rejected",
                request_id=verdict.request_id,
                reason=verdict.reason.value,
                detail=verdict.message,
                partition=partition,
                offset=offset,
                action="dead-lettered; fix the producer and replay with "
                "`docutray-bridge dead-letters replay`",
            )
            key = verdict.request_id.encode() if verdict.request_id else msg.key()
            self._batch.append(
                Effect(
                    partition=partition,
                    epoch=epoch,
                    records=[
                        OutRecord(
                            self._s.dead_letter_topic,
                            key,
                            letter.model_dump_json().encode(),
                            headers,
                        )
                    ],
                    dead_letter_reason=verdict.reason.value,
                )
            )
            return
        rid = verdict.request.request_id
        ids = self._pending_ids.setdefault(partition, set())
        if rid in ids:
            metrics.REQUESTS_CONSUMED.labels("duplicate").inc()
            log.info(
                "duplicate_request_ignored",
                request_id=rid,
                partition=partition,
                offset=offset,
                action="none: the pending request with this id will publish one outcome",
            )
            return
        ids.add(rid)
        metrics.REQUESTS_CONSUMED.labels("accepted").inc()
        entry = new_entry(
            partition=partition,
            epoch=epoch,
            original=original,
            accepted=verdict,
            received_at=utcnow(),
        )
        value = entry.changelog_value()
        hooks = self._hooks

        def adopt(p: int = partition, e: int = epoch, new: Entry = entry) -> None:
            hooks.adopt(p, e, [new])

        self._batch.append(
            Effect(
                partition=partition,
                epoch=epoch,
                records=[OutRecord(self._s.changelog_topic, rid.encode(), value, None, partition)],
                on_commit=adopt,
            )
        )

    # ---- transactions ----

    def _produce(self, rec: OutRecord) -> None:
        assert self._producer is not None
        kwargs: dict[str, Any] = {"key": rec.key, "value": rec.value}
        if rec.headers:
            kwargs["headers"] = rec.headers
        if rec.partition is not None:
            kwargs["partition"] = rec.partition
        while True:
            try:
                self._producer.produce(rec.topic, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)

    def _commit(self) -> None:
        """One transaction: every batched record plus the consumer positions (steps 3-5)."""
        assert self._consumer is not None
        assert self._producer is not None
        batch, self._batch = self._batch, []
        self._offsets_dirty = False
        self._last_commit = time.monotonic()
        producer, consumer = self._producer, self._consumer
        try:
            producer.begin_transaction()
            for eff in batch:
                for rec in eff.records:
                    self._produce(rec)
            assignment = consumer.assignment()
            if assignment:
                positions = []
                for tp in consumer.position(assignment):
                    if tp.offset < 0:
                        tp.offset = self._base_offsets.get(tp.partition, -1)
                    if tp.offset >= 0:
                        positions.append(tp)
                if positions:
                    producer.send_offsets_to_transaction(
                        positions, consumer.consumer_group_metadata(), 30
                    )
            self._commit_with_retry()
        except KafkaException as exc:
            kerr: KafkaError = exc.args[0]
            if kerr.fatal() or not kerr.txn_requires_abort():
                raise FatalKafkaError(f"transaction failed: {kerr.str()}") from None
            metrics.TRANSACTIONS.labels("aborted").inc()
            log.error(
                "transaction_aborted",
                error=kerr.str(),
                effects=len(batch),
                action="state of assigned partitions is rebuilt from Kafka; nothing is lost",
            )
            try:
                producer.abort_transaction(30)
            except KafkaException as abort_exc:
                raise FatalKafkaError(f"abort failed: {abort_exc.args[0].str()}") from None
            for eff in batch:
                self._fail(eff, StaleEffect("transaction aborted"))
            self._reset(sorted(self.assigned))
            return
        metrics.TRANSACTIONS.labels("committed").inc()
        for eff in batch:
            self._loop.call_soon_threadsafe(_committed, eff)

    def _commit_with_retry(self) -> None:
        assert self._producer is not None
        deadline = time.monotonic() + 60
        while True:
            self._beat()
            try:
                self._producer.commit_transaction(30)
                return
            except KafkaException as exc:
                kerr: KafkaError = exc.args[0]
                if kerr.retriable() and time.monotonic() < deadline:
                    log.warning("transaction_commit_retry", error=kerr.str())
                    continue
                raise

    # ---- rebalancing ----

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in partitions)
        self._acquire(parts, seek=False)
        self.assigned = frozenset(self.assigned | set(parts))
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))
        for p in parts:  # a series per partition from the start; statistics fill in the lag
            metrics.CONSUMER_LAG.labels(str(p)).set(0)
        self.joined.set()
        log.info("partitions_assigned", partitions=parts, assigned=sorted(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in partitions)
        self._drain_commands()
        if self._batch or self._offsets_dirty:
            self._commit()
        self._release(parts)
        log.info("partitions_revoked", partitions=parts, assigned=sorted(self.assigned))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in partitions)
        self._drain_commands()
        touched = {eff.partition for eff in self._batch}
        for eff in self._batch:
            self._fail(eff, StaleEffect("partitions lost"))
        self._batch = []
        self._offsets_dirty = False
        self._release(parts)
        log.warning(
            "partitions_lost",
            partitions=parts,
            action="another replica owns them now; uncommitted work is redone there",
        )
        survivors = sorted(touched & self.assigned)
        if survivors:
            self._reset(survivors)

    def _acquire(self, parts: list[int], *, seek: bool) -> None:
        """Restore the changelog of `parts` and hand the pending entries to the engine."""
        started = time.monotonic()
        for p in parts:
            self._epochs[p] = self._epochs.get(p, 0) + 1
        restored = restore_partitions(
            self._s.common,
            self._s.changelog_topic,
            parts,
            epochs=self._epochs,
            limits=Limits(self._s.max_request_bytes, self._s.max_document_bytes),
            timeout_s=self._s.restore_timeout_s,
            progress=self._beat,
        )
        elapsed = time.monotonic() - started
        count = 0
        for p in parts:
            entries, unreadable = restored[p]
            count += len(entries) + len(unreadable)
            self._pending_ids[p] = {e.request_id for e in entries} | {
                u.request_id for u in unreadable
            }
            self._loop.call_soon_threadsafe(
                self._hooks.adopt, p, self._epochs[p], entries, unreadable
            )
        if self._consumer is not None and parts:
            # Where each partition resumes: its committed offset, else the log start. Kept so
            # that every transaction sends an offset for every assigned partition, even one
            # not fetched yet: the group generation check (zombie fencing) then always applies.
            tps = [TopicPartition(self._s.input_topic, p) for p in parts]
            for tp in self._consumer.committed(tps, timeout=30):
                offset = tp.offset
                if offset < 0:
                    offset, _ = self._consumer.get_watermark_offsets(tp, timeout=30)
                self._base_offsets[tp.partition] = offset
                if seek:
                    self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        metrics.RESTORE_DURATION.observe(elapsed)
        metrics.RESTORED_RECORDS.inc(count)
        log.info("changelog_restored", partitions=parts, pending=count, seconds=round(elapsed, 3))

    def _release(self, parts: list[int]) -> None:
        for p in parts:
            self._epochs[p] = self._epochs.get(p, 0) + 1
            self._pending_ids.pop(p, None)
            self._base_offsets.pop(p, None)
            self._paused_parts.discard(p)
            self._loop.call_soon_threadsafe(self._hooks.drop, p)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(str(p))
        self.assigned = frozenset(self.assigned - set(parts))
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))

    def _reset(self, parts: list[int]) -> None:
        """Drop and rebuild the state of `parts` from Kafka (after an abort or a loss)."""
        for p in parts:
            self._loop.call_soon_threadsafe(self._hooks.drop, p)
        self._acquire(parts, seek=True)

    # ---- statistics ----

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
            parts = stats.get("topics", {}).get(self._s.input_topic, {}).get("partitions", {})
            for pid, pstats in parts.items():
                p = int(pid)
                if p < 0 or p not in self.assigned:
                    continue
                lag = pstats.get("consumer_lag", -1)
                if lag is not None and lag >= 0:
                    metrics.CONSUMER_LAG.labels(str(p)).set(lag)
        except (ValueError, TypeError, AttributeError):
            log.warning("kafka_stats_unreadable")


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _committed(effect: Effect) -> None:
    if effect.result:
        metrics.RESULTS.inc()
    if effect.dead_letter_reason is not None:
        metrics.DEAD_LETTERS.labels(effect.dead_letter_reason).inc()
    if effect.on_commit is not None:
        effect.on_commit()
    fut = effect.future
    if fut is not None and not fut.done():
        fut.set_result(None)
