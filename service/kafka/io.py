"""The Kafka thread: it owns the consumer, the transactional producer and the changelog.

Why a thread: librdkafka's calls block (``commit_transaction`` waits for the
broker), and rebalance callbacks run inside ``consume()``. Keeping every Kafka
call on one thread makes the order of events simple to reason about, while the
asyncio engine does the HTTP work. The two talk through a command queue
(engine → Kafka, :class:`~service.kafka.effects.Channel`) and
``loop.call_soon_threadsafe`` (Kafka → engine,
:class:`~service.kafka.effects.EngineHooks`).

:class:`KafkaIO` runs the loop (consume, take the engine's commands, pause, commit when
due) and answers the rebalance callbacks; it composes the pieces that keep the
guarantee (see :mod:`service.kafka`): the :class:`~service.kafka.transaction.Transaction`
and the :class:`~service.kafka.ownership.Ownership` of the assigned partitions.
"""

from __future__ import annotations

import asyncio
import gc
import json
import operator
import threading
import time
from functools import partial

import structlog
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from service import memory, metrics, outbox
from service.intake import Duplicate, RawHeader, RecordLimits, Rejected, judge_record
from service.kafka.calls import Calls
from service.kafka.effects import Channel, Effect, EngineHooks, OutRecord, fail
from service.kafka.errors import FatalKafkaError, StaleEffect
from service.kafka.ownership import Ownership
from service.kafka.settings import KafkaErrorLog, KafkaSettings
from service.kafka.transaction import Transaction
from service.messages import DeadLetterReason, OriginalRecord, utcnow
from service.outcomes import build_dead_letter
from service.pending import DocumentAt, Entry, new_entry

log = structlog.get_logger(__name__)

#: Seconds without input records after which freed memory is given back (once per burst).
IDLE_TRIM_AFTER_S = 5.0


class KafkaIO:
    """The Kafka thread (see :mod:`service.kafka` for the guarantee it keeps)."""

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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-io", daemon=True)
        calls = Calls(retry_limit_ms=settings.transaction_timeout_ms, beat=self._beat)
        self._own = Ownership(
            settings,
            loop=loop,
            hooks=hooks,
            calls=calls,
            consumer=self._consumer_,
            beat=self._beat,
            apply_pause=self._apply_pause,
        )
        self._txn = Transaction(
            settings,
            loop=loop,
            calls=calls,
            owner=self._own,
            consumer=self._consumer_,
            beat=self._beat,
        )
        self._limits = RecordLimits(
            max_request_bytes=settings.max_request_bytes,
            max_document_bytes=settings.max_document_bytes,
            max_header_bytes=settings.max_header_bytes,
            dedupe_window_s=settings.dedupe_window_s,
        )
        #: Moving average of consumed record sizes (how many records one consume may take).
        self._record_bytes = 1024.0
        #: When the last input record arrived, and when memory was last given back after one.
        self._last_record_at = 0.0
        self._trimmed_at = 0.0
        self._pause_reasons: set[str] = set()
        self._paused_parts: set[int] = set()
        self._last_reasons: set[str] = set()
        self._consumer: Consumer | None = None
        self.heartbeat = time.monotonic()
        self.joined = threading.Event()
        self.stopped = threading.Event()
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
        return self._own.pending_count()

    @property
    def assigned(self) -> frozenset[int]:
        """The partitions this replica owns."""
        return self._own.assigned

    @property
    def restoring(self) -> frozenset[int]:
        """Assigned partitions whose state is not restored yet (not ready meanwhile)."""
        return self._own.restoring

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
            cause = self._txn.fatal_cause()
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

    def _setup(self) -> None:
        s = self._s
        self._txn.open()
        self._own.open()
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

    def _consumer_(self) -> Consumer:
        assert self._consumer is not None
        return self._consumer

    def _iterate(self) -> None:
        consumer = self._consumer_()
        txn = self._txn
        self._beat()
        self._own.advance_restores()
        self._own.expire_windows()
        self._drain_commands()
        self._apply_pause()
        due_in = self._s.commit_interval_s - (time.monotonic() - txn.last_commit)
        timeout = max(0.0, min(0.05, due_in)) if txn.has_work() else 0.05
        # Memory: a batch of megabyte records is held until its commit, so take only as many
        # records as fit the batch's byte budget (positions move with every record returned).
        count = max(1, min(500, int(self._s.max_batch_bytes / max(1.0, self._record_bytes))))
        msgs = consumer.consume(num_messages=count, timeout=timeout)
        for msg in msgs:
            self._record_bytes += 0.2 * (len(msg.value() or b"") - self._record_bytes)
            self._on_message(msg)
        self._drain_commands()
        if txn.due():
            txn.commit()
        self._trim_when_idle(bool(msgs))

    def _trim_when_idle(self, busy: bool) -> None:
        """Once intake has been quiet for a few seconds, give freed memory back to the system.

        Taking a burst of requests leaves the parsed records, documents and Kafka buffers
        freed but kept by glibc, interleaved with the entries that stay: RSS stays up by
        ~1.7 KB per request taken (20,000 small requests: 164 MB, 129 MB after a trim).
        """
        now = time.monotonic()
        if busy:
            self._last_record_at = now
        elif self._trimmed_at < self._last_record_at < now - IDLE_TRIM_AFTER_S:
            self._trimmed_at = now
            memory.trim()

    def _shutdown(self) -> None:
        consumer = self._consumer_()
        self._drain_commands()
        if self._txn.has_work():
            self._txn.commit()
        consumer.close()  # runs on_revoke: commits anything left, leaves the group
        self._txn.close()
        self._own.close()
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
        if not self._own.is_live(effect):
            fail(
                self._loop,
                effect,
                StaleEffect(f"partition {effect.partition} changed owner or reset"),
            )
            return
        if effect.finishes is not None:
            self._own.remember(effect)
        self._txn.add(effect)

    # ---- pause / backpressure ----

    def _apply_pause(self) -> None:
        consumer = self._consumer_()
        reasons = set(self._pause_reasons)
        restoring = set(self._own.restoring)
        count, held = self._own.pending_count(), self._own.held_bytes
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
            consumer.pause([TopicPartition(self._s.input_topic, p) for p in to_pause])
        if to_resume:
            consumer.resume([TopicPartition(self._s.input_topic, p) for p in to_resume])
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
        if self._own.is_restoring(partition):
            # Fetched before the pause took effect: read it again once the state is restored.
            self._consumer_().seek(TopicPartition(msg.topic() or "", partition, offset))
            return
        self._txn.offsets_dirty = True
        epoch = self._own.epoch(partition)
        ts_type, ts = msg.timestamp()
        judged = judge_record(
            topic=msg.topic() or self._s.input_topic,
            partition=partition,
            offset=offset,
            timestamp_ms=ts if ts_type != 0 else None,
            key=msg.key(),
            value=msg.value(),
            read_headers=partial(self._read_headers, msg),
            limits=self._limits,
            known=self._own.known(partition),
        )
        original, verdict = judged.original, judged.verdict
        if isinstance(verdict, Duplicate):
            metrics.REQUESTS_CONSUMED.labels("duplicate").inc()
            log.info(
                "duplicate_request_ignored",
                request_id=verdict.request_id,
                partition=partition,
                offset=offset,
                action="none: this request id has (or will have) exactly one outcome",
            )
            return
        if isinstance(verdict, Rejected):
            self._reject(
                verdict,
                original,
                partition,
                offset,
                epoch,
                action="dead-lettered; the first request with this id keeps its one outcome"
                if verdict.reason is DeadLetterReason.REQUEST_ID_CONFLICT
                else "dead-lettered; fix the producer and replay with "
                "`docutray-bridge dead-letters replay`",
            )
            return
        metrics.REQUESTS_CONSUMED.labels("accepted").inc()
        entry = new_entry(
            partition=partition,
            epoch=epoch,
            original=original,
            accepted=verdict.accepted,
            received_at=utcnow(),
            content_hash=verdict.content_hash,
        )
        self._own.admit(partition, entry.request_id, verdict.content_hash, entry.cost_bytes())
        self._txn.add(self._accept(entry, original), weigh=True)

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

    def _accept(self, entry: Entry, original: OriginalRecord) -> Effect:
        """The document once to its topic, then the first state naming the document's offset."""
        document = original.model_dump_json().encode()
        partition, size = entry.partition, len(document)
        hooks = self._hooks

        def delivered(offset: int) -> None:
            entry.document = DocumentAt(partition, offset, size)

        def state() -> list[OutRecord]:
            return [outbox.state(self._s.changelog_topic, entry)]

        def adopt() -> None:
            hooks.adopt(partition, entry.epoch, [entry])

        return Effect(
            partition=partition,
            epoch=entry.epoch,
            records=[
                outbox.document(
                    self._s.documents_topic, entry.request_id, partition, document, delivered
                )
            ],
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
        record = outbox.dead_letter(self._s.dead_letter_topic, letter)
        self._txn.add(Effect(partition, epoch, [record], dead_letter_reason=verdict.reason.value))

    # ---- rebalancing ----

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in partitions)
        # Assign here (not after the callback) so that the partitions can be paused until
        # their state is restored.
        consumer.incremental_assign(partitions)
        self._own.assign(parts)
        self._own.acquire(parts, seek=False)
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))
        for p in parts:  # a series per partition from the start; statistics fill in the lag
            metrics.CONSUMER_LAG.labels(str(p)).set(0)
        self.joined.set()
        log.info("partitions_assigned", partitions=parts, assigned=sorted(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in partitions)
        self._quiesce(parts)
        self._drain_commands()
        if self._txn.has_work():
            self._txn.commit()
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
            txn = self._txn
            if txn.batch and time.monotonic() - txn.last_commit >= self._s.commit_interval_s:
                txn.commit()
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
        touched = self._txn.discard("partitions lost")
        self._release(parts)
        log.warning(
            "partitions_lost",
            partitions=parts,
            action="another replica owns them now; uncommitted work is redone there",
        )
        survivors = sorted(touched & self.assigned)
        if survivors:
            self._own.reset(survivors)

    def _release(self, parts: list[int]) -> None:
        self._own.release(parts)
        self._paused_parts -= set(parts)

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
