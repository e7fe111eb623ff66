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
import gc
import json
import operator
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
from service.dedupe import (
    REPLAY_HEADER,
    DedupeWindow,
    Outcome,
    content_hash,
    dedupe_value,
    judge_resend,
    parse_dedupe_value,
)
from service.intake import (
    Accepted,
    RawHeader,
    Rejected,
    original_record,
    parse_record,
)
from service.kafka.calls import LOOKUP_TIMEOUT_S, Calls
from service.kafka.effects import (
    Channel,
    Effect,
    EngineHooks,
    OutRecord,
    committed,
    dead_letter_out,
    fail,
)
from service.kafka.errors import CallHung, FatalKafkaError, StaleEffect
from service.kafka.restore import StateReader
from service.kafka.settings import KafkaErrorLog, KafkaSettings
from service.messages import (
    DeadLetterReason,
    OriginalRecord,
    utcnow,
)
from service.outcomes import build_dead_letter
from service.pending import DocumentAt, Entry, entries_from_values, new_entry

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Restoring:
    """A partition waiting to be restored: the state topics' ends it must read up to."""

    ends: dict[str, int]
    since: float
    reported: float = 0.0


class KafkaIO:
    """The Kafka thread (see the module docstring for the guarantee it keeps)."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        loop: asyncio.AbstractEventLoop,
        hooks: EngineHooks,
        channel: Channel,
    ) -> None:
        self._s = settings
        self._loop = loop
        self._hooks = hooks
        self._channel = channel
        self._calls = Calls(retry_limit_ms=settings.transaction_timeout_ms, beat=self._beat)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-io", daemon=True)
        self._batch: list[Effect] = []
        self._offsets_dirty = False
        self._last_commit = time.monotonic()
        self._epochs: dict[int, int] = {}
        #: Per partition: pending request id -> content hash (duplicates and id conflicts).
        #: Per partition: pending request id -> (content hash, bytes its entry holds).
        self._pending: dict[int, dict[str, tuple[str, int]]] = {}
        self._held_bytes = 0
        #: Per partition: request ids that finished within the dedupe window.
        self._windows: dict[int, DedupeWindow] = {}
        #: Partitions waiting for their state topics to be stable, then restored (see restore.py).
        self._restoring: dict[int, _Restoring] = {}
        self._reader: StateReader | None = None
        self._lso_checked = 0.0
        self._delivery_errors: list[KafkaError] = []
        self._batch_bytes = 0
        self._aborts_in_a_row = 0
        #: Moving average of consumed record sizes (how many records one consume may take).
        self._record_bytes = 1024.0
        self._windows_expired = time.monotonic()
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

    def stop(self) -> None:
        """Commit what is pending, leave the group and end the thread."""
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end; True if it did."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def pending_count(self) -> int:
        """Pending requests across assigned partitions (as the Kafka thread knows them)."""
        return sum(len(ids) for ids in list(self._pending.values()))

    @property
    def restoring(self) -> frozenset[int]:
        """Assigned partitions whose state is not restored yet (not ready meanwhile)."""
        return frozenset(self._restoring)

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
            cause = self._fatal_cause()
            if cause is not None and not isinstance(exc, FatalKafkaError):
                exc = FatalKafkaError(f"Kafka producer failed: {cause}")
            self.error = exc
            fenced = "fenced" in str(exc).lower()
            log.critical(
                "kafka_thread_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                action=(
                    "another process runs with this BRIDGE_INSTANCE_ID and took over: give "
                    "each replica its own id; do not restart this one while the other runs"
                    if fenced
                    else "the process exits; it restarts and restores from the changelog"
                ),
            )
            self._loop.call_soon_threadsafe(self._hooks.fatal, exc)
        finally:
            self.stopped.set()

    def _fatal_cause(self) -> str | None:
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

    def _new_producer(self) -> None:
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
        self._new_producer()  # the old one stays with its blocked thread; it cannot be closed

    def _setup(self) -> None:
        s = self._s
        self._new_producer()
        self._reader = StateReader(s.common)
        static = {"group.instance.id": s.instance_id} if s.static_membership else {}
        self._consumer = Consumer(
            {
                **s.common,
                "group.id": s.group_id,
                # Static membership (KIP-345): a replica restarted under the same id gets its
                # partitions back without a rebalance and without waiting for its old session.
                **static,
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
        if self._restoring:
            self._advance_restores()
        if time.monotonic() - self._windows_expired > 60:
            self._windows_expired = time.monotonic()
            for window in self._windows.values():
                window.expire(time.time())
            metrics.REMEMBERED.set(sum(len(w) for w in self._windows.values()))
        self._drain_commands()
        self._apply_pause()
        due_in = self._s.commit_interval_s - (time.monotonic() - self._last_commit)
        has_work = bool(self._batch) or self._offsets_dirty
        timeout = max(0.0, min(0.05, due_in)) if has_work else 0.05
        # Memory: a batch of megabyte records is held until its commit, so take only as many
        # records as fit the batch's byte budget (positions move with every record returned).
        count = max(1, min(500, int(self._s.max_batch_bytes / max(1.0, self._record_bytes))))
        for msg in self._consumer.consume(num_messages=count, timeout=timeout):
            self._record_bytes += 0.2 * (len(msg.value() or b"") - self._record_bytes)
            self._on_message(msg)
        self._drain_commands()
        if (self._batch or self._offsets_dirty) and (
            time.monotonic() - self._last_commit >= self._s.commit_interval_s
            or len(self._batch) >= 2000
            or self._batch_bytes >= self._s.max_batch_bytes
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
        if self._reader is not None:
            self._reader.close()
        log.info("kafka_closed")

    # ---- commands from the engine ----

    def _drain_commands(self) -> None:
        while (command := self._channel.take()) is not None:
            kind, arg = command
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
            self._remember(effect)
        self._batch.append(effect)

    def _remember(self, effect: Effect) -> None:
        """A request finishes: move it from pending to the dedupe window, durably too."""
        assert effect.finishes is not None
        rid = effect.finishes
        content, cost = self._pending.get(effect.partition, {}).pop(rid, ("", 0))
        self._held_bytes -= cost
        window = self._windows.get(effect.partition)
        if not content or window is None:
            return  # unreadable state: nothing to compare a re-send with
        outcome: Outcome = "dead_letter" if effect.dead_letter_reason else "result"
        now_ms = int(time.time() * 1000)
        window.remember(rid, content, outcome, now_ms / 1000)
        metrics.REMEMBERED.inc()
        effect.records.append(
            OutRecord(
                self._s.dedupe_topic,
                rid.encode(),
                dedupe_value(content, outcome, now_ms),
                None,
                effect.partition,
            )
        )

    def _fail(self, effect: Effect, exc: BaseException) -> None:
        fail(self._loop, effect, exc)

    # ---- pause / backpressure ----

    def _apply_pause(self) -> None:
        assert self._consumer is not None
        reasons = set(self._pause_reasons)
        restoring = set(self._restoring)
        count, held = self.pending_count(), self._held_bytes
        metrics.MEMORY_HELD.labels("pending").set(held)
        if count >= self._s.max_pending or held >= self._s.max_pending_bytes:
            reasons.add("backpressure")
        elif "backpressure" in self._last_reasons and (
            count > 0.9 * self._s.max_pending or held > 0.9 * self._s.max_pending_bytes
        ):
            reasons.add("backpressure")  # hysteresis: resume below 90 % of the caps
        for reason in metrics.PAUSE_REASONS:
            metrics.CONSUMPTION_PAUSED.labels(reason).set(1 if reason in reasons else 0)
        if reasons != self._last_reasons:
            log.info(
                "consumption_paused" if reasons else "consumption_resumed", reasons=sorted(reasons)
            )
        self._last_reasons = reasons
        want = (set(self.assigned) if reasons else set()) | restoring
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
        if partition in self._restoring:
            # Fetched before the pause took effect: read it again once the state is restored.
            self._consumer_().seek(TopicPartition(msg.topic() or "", partition, offset))
            return
        self._offsets_dirty = True
        epoch = self._epochs.get(partition, 0)
        ts_type, ts = msg.timestamp()
        topic = msg.topic() or self._s.input_topic
        max_header_bytes = self._s.max_header_bytes
        try:
            headers = self._read_headers(msg)
            original = original_record(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp_ms=ts if ts_type != 0 else None,
                key=msg.key(),
                value=msg.value(),
                headers=headers,
            )
            verdict: Accepted | Rejected = parse_record(
                msg.value(),
                max_request_bytes=self._s.max_request_bytes,
                max_document_bytes=self._s.max_document_bytes,
                key=msg.key(),
                headers=headers,
                max_header_bytes=max_header_bytes,
            )
        except Exception as exc:  # no record may end the thread: it gets a dead letter instead
            log.exception("record_unreadable", partition=partition, offset=offset)
            original = original_record(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp_ms=None,
                key=msg.key(),
                value=msg.value(),
                headers=None,
            )
            verdict = Rejected(
                DeadLetterReason.MALFORMED_RECORD,
                f"the bridge could not read this record ({type(exc).__name__}: {exc}); "
                "its headers are left out",
            )
        if not isinstance(verdict, Accepted):
            self._reject(
                verdict,
                original,
                partition,
                offset,
                epoch,
                action="dead-lettered; fix the producer and replay with "
                "`docutray-bridge dead-letters replay`",
            )
            return
        self._judge_accepted(verdict, original, partition, offset, epoch)

    @staticmethod
    def _read_headers(msg: Message) -> list[RawHeader]:
        """The record's headers, also when confluent-kafka cannot decode a header key.

        confluent-kafka (2.16 and earlier, ``c_headers_to_py``) decodes each key
        with ``PyUnicode_FromString`` and ignores a failure: a key that is not
        UTF-8 makes ``headers()`` raise SystemError after caching a list in which
        that header's tuple has an empty key slot (reading the slot crashes the
        interpreter). No API gives the raw header bytes. So every tuple is read
        only through what the garbage collector sees (never an empty slot), and
        the first bad key's bytes come from the UnicodeDecodeError behind the
        SystemError. Later bad keys failed while that error was pending, so their
        bytes are lost: their key is None.

        The call goes through ``operator.methodcaller``: once CPython has
        specialised a plain ``msg.headers()`` call site (after a few calls), it no
        longer checks the result, the half-built list comes back with the error
        still pending, and some later, unrelated call raises (seen on Python 3.11).
        """
        first_bad: bytes | None = None
        try:
            read = operator.methodcaller("headers")(msg)
        except SystemError as exc:
            seen: set[int] = set()
            cause: BaseException | None = exc
            while cause is not None and id(cause) not in seen:  # the deepest failed first
                seen.add(id(cause))
                if isinstance(cause, UnicodeDecodeError):
                    first_bad = bytes(cause.object)
                cause = cause.__cause__ or cause.__context__
            try:
                read = operator.methodcaller("headers")(msg)  # the list the failed call cached
            except SystemError:
                read = None
            if not read:
                return [(None, None)]  # nothing readable: judged as an unreadable header key
        if isinstance(read, dict):
            return list(read.items())
        headers: list[RawHeader] = []
        for pair in read or []:
            slots = gc.get_referents(pair)  # skips an empty slot, unlike pair[0]
            if len(slots) == 2:
                headers.append((pair[0], pair[1]))
            else:  # the key slot is empty: the one slot left is the value
                value = slots[0] if slots and not isinstance(slots[0], str) else None
                headers.append((first_bad, value))
                first_bad = None
        return headers

    def _judge_accepted(
        self, verdict: Accepted, original: OriginalRecord, partition: int, offset: int, epoch: int
    ) -> None:
        """A valid request: new (to the changelog), a re-send (nothing), or an id conflict."""
        request = verdict.request
        rid = request.request_id
        content = content_hash(request.model_dump(mode="json"))
        pending = self._pending.setdefault(partition, {})
        window = self._windows.get(partition)
        decision = judge_resend(
            content,
            pending_content=pending[rid][0] if rid in pending else None,
            finished=window.get(rid, time.time()) if window is not None else None,
            replay=any(h.key == REPLAY_HEADER for h in original.headers),
        )
        if decision == "duplicate":
            metrics.REQUESTS_CONSUMED.labels("duplicate").inc()
            log.info(
                "duplicate_request_ignored",
                request_id=rid,
                partition=partition,
                offset=offset,
                action="none: this request id has (or will have) exactly one outcome",
            )
            return
        if decision == "conflict":
            conflict = Rejected(
                DeadLetterReason.REQUEST_ID_CONFLICT,
                f"request id {rid} was used by a different request within "
                f"BRIDGE_DEDUPE_WINDOW_S={self._s.dedupe_window_s:g} s; give each request its "
                "own id",
                rid,
                request.document_type_code,
            )
            self._reject(
                conflict,
                original,
                partition,
                offset,
                epoch,
                action="dead-lettered; the first request with this id keeps its one outcome",
            )
            return
        metrics.REQUESTS_CONSUMED.labels("accepted").inc()
        entry = new_entry(
            partition=partition,
            epoch=epoch,
            original=original,
            accepted=verdict,
            received_at=utcnow(),
            content_hash=content,
        )
        pending[rid] = (content, entry.cost_bytes())
        self._held_bytes += pending[rid][1]
        effect = self._accept(entry, original)
        self._batch_bytes += sum(len(r.value or b"") for r in effect.records)
        self._batch.append(effect)

    def _accept(self, entry: Entry, original: OriginalRecord) -> Effect:
        """The document once to its topic, then the first state naming the document's offset."""
        document = original.model_dump_json().encode()
        rid, partition, size = entry.request_id.encode(), entry.partition, len(document)
        hooks = self._hooks

        def delivered(offset: int) -> None:
            entry.document = DocumentAt(partition, offset, size)

        def state() -> list[OutRecord]:
            value = entry.changelog_value()
            return [OutRecord(self._s.changelog_topic, rid, value, None, partition)]

        def adopt() -> None:
            hooks.adopt(partition, entry.epoch, [entry])

        return Effect(
            partition=partition,
            epoch=entry.epoch,
            records=[OutRecord(self._s.documents_topic, rid, document, None, partition, delivered)],
            late=state,
            on_commit=adopt,
        )

    def _reject(
        self,
        verdict: Rejected,
        original: OriginalRecord,
        partition: int,
        offset: int,
        epoch: int,
        *,
        action: str,
    ) -> None:
        """A record that can never succeed: its dead letter, committed with its offset."""
        metrics.REQUESTS_CONSUMED.labels("rejected").inc()
        letter = build_dead_letter(
            reason=verdict.reason,
            message=verdict.message,
            original=original,
            request_id=verdict.request_id,
            document_type_code=verdict.document_type_code,
            received_at=utcnow(),
            max_bytes=self._s.dead_letter_max_bytes,
        )
        log.warning(
            "request_rejected",
            request_id=verdict.request_id,
            reason=verdict.reason.value,
            detail=verdict.message[:1000],
            partition=partition,
            offset=offset,
            truncated=letter.original.truncated,
            action=action,
        )
        record = dead_letter_out(self._s.dead_letter_topic, letter)
        self._batch.append(
            Effect(partition, epoch, [record], dead_letter_reason=verdict.reason.value)
        )

    # ---- transactions ----

    def _produce(self, rec: OutRecord) -> None:
        assert self._producer is not None
        kwargs: dict[str, Any] = {"key": rec.key, "value": rec.value}
        if rec.headers:
            kwargs["headers"] = rec.headers
        if rec.partition is not None:
            kwargs["partition"] = rec.partition
        if rec.delivered is not None:
            kwargs["on_delivery"] = partial(self._on_delivery, rec.delivered)
        while True:
            try:
                self._producer.produce(rec.topic, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)

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

    def _producer_(self) -> Producer:
        assert self._producer is not None
        return self._producer

    def _commit(self) -> None:
        """One transaction: every batched record plus the consumer positions (steps 3-5)."""
        batch, self._batch = self._batch, []
        self._batch_bytes = 0
        self._offsets_dirty = False
        self._last_commit = time.monotonic()
        producer = self._producer_()
        try:
            self._calls.retrying("begin_transaction", producer.begin_transaction)
            for eff in batch:
                for rec in eff.records:
                    self._produce(rec)
            self._produce_late(batch)
            positions = self._positions()
            if positions:
                assert self._consumer is not None
                group = self._consumer.consumer_group_metadata()
                self._calls.retrying(
                    "send_offsets_to_transaction",
                    lambda: self._calls.bounded(
                        "send_offsets_to_transaction",
                        lambda: producer.send_offsets_to_transaction(positions, group, 30),
                    ),
                )
            # Not bounded like the offsets: a commit given up on might still complete, and
            # writing its effects again would publish them twice. A stuck commit is left to
            # the watchdog (the process restarts and restores from Kafka).
            self._calls.retrying("commit_transaction", lambda: producer.commit_transaction(30))
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

    def _positions(self) -> list[TopicPartition]:
        """Where every assigned partition resumes: an offset for each (zombie fencing applies)."""
        assert self._consumer is not None
        assignment = self._consumer.assignment()
        if not assignment:
            return []
        positions = []
        for tp in self._calls.retrying("position", lambda: self._consumer_().position(assignment)):
            if tp.offset < 0:
                tp.offset = self._base_offsets.get(tp.partition, -1)
            if tp.offset >= 0:
                positions.append(tp)
        return positions

    def _consumer_(self) -> Consumer:
        assert self._consumer is not None
        return self._consumer

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
        live = [eff for eff in batch if self._epochs.get(eff.partition) == eff.epoch]
        for eff in batch:
            if eff not in live:
                self._fail(eff, StaleEffect("partition revoked before its commit"))
        self._aborts_in_a_row += 1
        if self._aborts_in_a_row <= _ABORT_RETRIES:
            log.warning(
                "transaction_aborted",
                error=error,
                effects=len(batch),
                retried=len(live),
                action="none: the effects of partitions still owned are written again",
            )
            self._batch = live + self._batch
            self._offsets_dirty = True
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
            self._fail(eff, StaleEffect("transaction aborted"))
        self._reset(sorted(self.assigned))

    # ---- rebalancing ----

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in partitions)
        # Assign here (not after the callback) so that the partitions can be paused until
        # their state is restored.
        consumer.incremental_assign(partitions)
        self.assigned = frozenset(self.assigned | set(parts))
        self._acquire(parts, seek=False)
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))
        for p in parts:  # a series per partition from the start; statistics fill in the lag
            metrics.CONSUMER_LAG.labels(str(p)).set(0)
        self.joined.set()
        log.info("partitions_assigned", partitions=parts, assigned=sorted(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in partitions)
        self._quiesce(parts)
        self._drain_commands()
        if self._batch or self._offsets_dirty:
            self._commit()
        self._release(parts)
        log.info("partitions_revoked", partitions=parts, assigned=sorted(self.assigned))

    def _quiesce(self, parts: list[int]) -> None:
        """Let submits in flight on `parts` finish and commit before the partitions go."""
        done = threading.Event()
        self._loop.call_soon_threadsafe(self._hooks.quiesce, parts, done)
        deadline = time.monotonic() + self._s.revoke_grace_s
        while not done.wait(0.05):
            self._beat()
            self._drain_commands()
            if self._batch and time.monotonic() - self._last_commit >= self._s.commit_interval_s:
                self._commit()
            if time.monotonic() > deadline:
                log.warning(
                    "revoke_grace_exceeded",
                    partitions=parts,
                    action="submits still in flight are resubmitted by the next owner (counted)",
                )
                return

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
        """Take over `parts`: committed offsets first, then the state up to a stable end.

        The order is the guarantee (see service.kafka.restore): the committed input offsets are
        read before the state topics' high watermarks, and the state is read only once no
        transaction below those watermarks is still open.
        """
        if not parts:
            return
        for p in parts:
            self._epochs[p] = self._epochs.get(p, 0) + 1
            self._forget_pending(p)
            self._pending[p] = {}
        consumer = self._consumer_()
        tps = [TopicPartition(self._s.input_topic, p) for p in parts]
        committed: list[TopicPartition] = self._calls.retrying(
            "committed", lambda: consumer.committed(tps, timeout=LOOKUP_TIMEOUT_S)
        )
        for tp in committed:
            offset = tp.offset
            if offset < 0:
                low: int = self._calls.retrying(
                    "get_watermark_offsets",
                    partial(
                        lambda t: consumer.get_watermark_offsets(t, timeout=LOOKUP_TIMEOUT_S)[0],
                        tp,
                    ),
                )
                offset = low
            # Kept so that every transaction sends an offset for every assigned partition,
            # even one not fetched yet: the generation check (zombie fencing) always applies.
            self._base_offsets[tp.partition] = offset
            if seek:
                consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        reader = self._state_reader()
        ends: dict[str, dict[int, int]] = {
            topic: self._calls.retrying(
                "high_watermarks",
                partial(reader.high_watermarks, topic, parts, LOOKUP_TIMEOUT_S, self._beat),
            )
            for topic in self._state_topics()
        }
        now = time.monotonic()
        for p in parts:
            self._restoring[p] = _Restoring({t: ends[t][p] for t in ends}, now)
        self._apply_pause()
        self._advance_restores(force=True)

    def _state_topics(self) -> tuple[str, str]:
        return (self._s.changelog_topic, self._s.dedupe_topic)

    def _state_reader(self) -> StateReader:
        assert self._reader is not None
        return self._reader

    def _advance_restores(self, *, force: bool = False) -> None:
        """Restore the partitions whose state topics are stable up to their targets."""
        now = time.monotonic()
        if not force and now - self._lso_checked < 0.2:
            return
        self._lso_checked = now
        waiting = sorted(self._restoring)
        reader = self._state_reader()
        stable: dict[str, dict[int, int]] = {
            topic: self._calls.retrying(
                "stable_offsets",
                partial(reader.stable_offsets, topic, waiting, LOOKUP_TIMEOUT_S, self._beat),
            )
            for topic in self._state_topics()
        }
        ready = [
            p
            for p in waiting
            if all(stable[t][p] >= end for t, end in self._restoring[p].ends.items())
        ]
        if ready:
            self._restore(ready)
        blocked = [p for p in waiting if p in self._restoring]
        metrics.RESTORE_WAITING.set(len(blocked))
        for p in blocked:
            self._report_blocked(p, now, stable)
        if not self._restoring:
            self._apply_pause()

    def _report_blocked(self, p: int, now: float, stable: dict[str, dict[int, int]]) -> None:
        job = self._restoring[p]
        waited = now - job.since
        if waited < 2.0 or now - job.reported < 10.0:
            return
        job.reported = now
        stuck = waited > self._s.restore_timeout_s
        (log.error if stuck else log.warning)(
            "restore_waiting_for_open_transaction",
            partition=p,
            waited_s=round(waited),
            stable={t: stable[t][p] for t in stable},
            needed=job.ends,
            action=(
                "a producer keeps a transaction open on the state topics: find it with "
                "kafka-transactions.sh --describe-producers and abort it"
                if stuck
                else "none: a replica died mid-commit; Kafka aborts its transaction after "
                "transaction.timeout.ms, then the partition is restored"
            ),
        )

    def _restore(self, parts: list[int]) -> None:
        started = time.monotonic()
        reader = self._state_reader()
        latest: dict[int, dict[str, bytes]] = {p: {} for p in parts}
        windows = {p: DedupeWindow(self._s.dedupe_window_s) for p in parts}

        def on_state(p: int, key: bytes, value: bytes | None, _ts: int) -> None:
            rid = key.decode("utf-8", errors="replace")
            if value is None:
                latest[p].pop(rid, None)
            else:
                latest[p][rid] = value

        def on_done(p: int, key: bytes, value: bytes | None, _ts: int) -> None:
            parsed = parse_dedupe_value(value) if value is not None else None
            if parsed is not None:
                content, outcome, finished_ms = parsed
                windows[p].remember(
                    key.decode("utf-8", "replace"), content, outcome, finished_ms / 1000
                )

        for topic, on_record in (
            (self._s.changelog_topic, on_state),
            (self._s.dedupe_topic, on_done),
        ):
            until = {p: self._restoring[p].ends[topic] for p in parts}
            reader.read(
                topic,
                until,
                on_record,
                timeout_s=self._s.restore_timeout_s * 10,
                progress=self._beat,
            )
        count = 0
        for p in parts:
            del self._restoring[p]
            windows[p].expire(time.time())
            self._windows[p] = windows[p]
            entries, unreadable = entries_from_values(
                latest.pop(p), partition=p, epoch=self._epochs[p]
            )
            count += len(entries) + len(unreadable)
            pending = {e.request_id: (e.content_hash, e.cost_bytes()) for e in entries}
            pending.update((u.request_id, ("", 0)) for u in unreadable)
            self._pending[p] = pending
            self._held_bytes += sum(cost for _, cost in pending.values())
            self._loop.call_soon_threadsafe(
                self._hooks.adopt, p, self._epochs[p], entries, unreadable
            )
        elapsed = time.monotonic() - started
        metrics.RESTORE_DURATION.observe(elapsed)
        metrics.RESTORED_RECORDS.inc(count)
        log.info(
            "state_restored",
            partitions=parts,
            pending=count,
            remembered=sum(len(self._windows[p]) for p in parts),
            seconds=round(elapsed, 3),
        )
        metrics.REMEMBERED.set(sum(len(w) for w in self._windows.values()))

    def _forget_pending(self, p: int) -> None:
        """Drop partition `p`'s pending ids and the bytes they were counted for."""
        self._held_bytes -= sum(cost for _, cost in self._pending.pop(p, {}).values())

    def _release(self, parts: list[int]) -> None:
        for p in parts:
            self._epochs[p] = self._epochs.get(p, 0) + 1
            self._forget_pending(p)
            self._windows.pop(p, None)
            self._restoring.pop(p, None)
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


#: Aborted transactions whose effects are written again before the state is rebuilt instead.
_ABORT_RETRIES = 2
