"""The partitions this replica owns, and what it knows of their request ids.

Per assigned partition: an epoch (bumped on every acquire and release, so an effect made
for an earlier owner is stale), the pending request ids with their content hashes and
the bytes their entries hold (duplicates, id conflicts, backpressure), the dedupe window
of finished ids, and the committed offset it resumes from.

Taking a partition over (:meth:`Ownership.acquire`) reads its committed input offset
first, then the state topics' high watermarks, and restores the state only once no
transaction below those watermarks is still open (see :mod:`service.kafka.restore`).
Losing one, or an abort that repeats (:meth:`Ownership.reset`), drops the engine's copy
and rebuilds it from what is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
from confluent_kafka import Consumer, TopicPartition

from service import memory, metrics, outbox
from service.dedupe import DedupeWindow, Outcome, Remembered, parse_dedupe_value
from service.kafka.calls import LOOKUP_TIMEOUT_S, Calls
from service.kafka.effects import Effect, EngineHooks
from service.kafka.pending_ids import PendingIds
from service.kafka.restore import StateReader
from service.kafka.settings import KafkaSettings
from service.pending import COMMON_ENTRY_COST_BYTES, entries_from_values

log = structlog.get_logger(__name__)

#: How long past the transaction timeout a takeover waits for a dead replica's open
#: transaction to be aborted by the broker (its check runs every 10 s by default).
OPEN_TRANSACTION_GRACE_MS = 30_000


@dataclass(slots=True)
class _Restoring:
    """A partition waiting to be restored: the state topics' ends it must read up to."""

    ends: dict[str, int]
    since: float
    reported: float = 0.0


class Known:
    """What the owner knows of one partition's request ids (for judging a re-send)."""

    def __init__(self, owner: Ownership, partition: int) -> None:
        self._owner = owner
        self._partition = partition

    def pending_content(self, request_id: str) -> str | None:
        """The content hash of the pending request with this id ("" if unreadable), or None."""
        pending = self._owner._pending.get(self._partition)
        return pending.content_hash(request_id) if pending is not None else None

    def finished(self, request_id: str) -> Remembered | None:
        """What finished under this id within the dedupe window, or None."""
        window = self._owner._windows.get(self._partition)
        return window.get(request_id, time.time()) if window is not None else None


class Ownership:
    """The assigned partitions' epochs, pending ids, dedupe windows and restores."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        loop: asyncio.AbstractEventLoop,
        hooks: EngineHooks,
        calls: Calls,
        consumer: Callable[[], Consumer],
        beat: Callable[[], None],
        apply_pause: Callable[[], None],
    ) -> None:
        self._s = settings
        self._loop = loop
        self._hooks = hooks
        self._calls = calls
        self._consumer = consumer
        self._beat = beat
        #: Pauses or resumes fetching (a restore starts or ends).
        self._apply_pause = apply_pause
        self.assigned: frozenset[int] = frozenset()
        self._epochs: dict[int, int] = {}
        #: Per partition: pending request ids, their content hashes and the bytes they hold.
        self._pending: dict[int, PendingIds] = {}
        #: Per partition: request ids that finished within the dedupe window.
        self._windows: dict[int, DedupeWindow] = {}
        self._windows_expired = time.monotonic()
        #: Partitions waiting for their state topics to be stable, then restored (see restore.py).
        self._restoring: dict[int, _Restoring] = {}
        self._reader: StateReader | None = None
        self._lso_checked = 0.0
        self._base_offsets: dict[int, int] = {}

    def open(self) -> None:
        """Create the changelog reader (at the thread's start)."""
        self._reader = StateReader(self._s.common)

    def close(self) -> None:
        """Close the changelog reader."""
        if self._reader is not None:
            self._reader.close()

    # ---- what the rest of the thread asks ----

    def pending_count(self) -> int:
        """Pending requests across assigned partitions (as the Kafka thread knows them)."""
        return sum(len(ids) for ids in list(self._pending.values()))

    @property
    def held_bytes(self) -> int:
        """Bytes the pending entries of the assigned partitions hold (backpressure counts it)."""
        return sum(ids.held_bytes for ids in list(self._pending.values()))

    @property
    def restoring(self) -> frozenset[int]:
        """Assigned partitions whose state is not restored yet."""
        return frozenset(self._restoring)

    def is_restoring(self, partition: int) -> bool:
        """Whether `partition` waits for its state (its records are read again afterwards)."""
        return partition in self._restoring

    def epoch(self, partition: int) -> int:
        """The partition's current epoch (0 if never owned)."""
        return self._epochs.get(partition, 0)

    def is_live(self, effect: Effect) -> bool:
        """Whether the effect's partition is still owned in the epoch the effect was made for."""
        return self._epochs.get(effect.partition) == effect.epoch

    def known(self, partition: int) -> Known:
        """What is known of `partition`'s request ids (pending, finished within the window)."""
        return Known(self, partition)

    def admit(self, partition: int, request_id: str, content: str, cost_bytes: int) -> None:
        """A new request is pending (its changelog record is in the next transaction)."""
        self._pending_ids(partition).add(request_id, content, cost_bytes)

    def remember(self, effect: Effect) -> None:
        """A request finishes: move it from pending to the dedupe window, durably too."""
        assert effect.finishes is not None
        rid = effect.finishes
        content, _ = self._pending_ids(effect.partition).pop(rid) or ("", 0)
        window = self._windows.get(effect.partition)
        if not content or window is None:
            return  # unreadable state: nothing to compare a re-send with
        outcome: Outcome = "dead_letter" if effect.dead_letter_reason else "result"
        now_ms = int(time.time() * 1000)
        window.remember(rid, content, outcome, now_ms / 1000)
        metrics.REMEMBERED.inc()
        effect.records.append(
            outbox.finished_mark(
                self._s.dedupe_topic, rid, effect.partition, content, outcome, now_ms
            )
        )

    def expire_windows(self) -> None:
        """Forget finished ids older than the dedupe window (once a minute)."""
        if time.monotonic() - self._windows_expired > 60:
            self._windows_expired = time.monotonic()
            for window in self._windows.values():
                window.expire(time.time())
            metrics.REMEMBERED.set(sum(len(w) for w in self._windows.values()))

    def positions(self) -> list[TopicPartition]:
        """Where every assigned partition resumes: an offset for each (zombie fencing applies)."""
        consumer = self._consumer()
        assignment = consumer.assignment()
        if not assignment:
            return []
        positions = []
        for tp in self._calls.retrying("position", lambda: consumer.position(assignment)):
            if tp.offset < 0:
                tp.offset = self._base_offsets.get(tp.partition, -1)
            if tp.offset >= 0:
                positions.append(tp)
        return positions

    # ---- taking partitions over ----

    def assign(self, parts: list[int]) -> None:
        """Count `parts` as this replica's (the consumer was just given them)."""
        self.assigned = frozenset(self.assigned | set(parts))

    def acquire(self, parts: list[int], *, seek: bool) -> None:
        """Take over `parts`: committed offsets first, then the state up to a stable end.

        The order is the guarantee (see service.kafka.restore): the committed input offsets are
        read before the state topics' high watermarks, and the state is read only once no
        transaction below those watermarks is still open.
        """
        if not parts:
            return
        for p in parts:
            self._epochs[p] = self._epochs.get(p, 0) + 1
            self._pending[p] = PendingIds(COMMON_ENTRY_COST_BYTES)
        consumer = self._consumer()
        tps = [TopicPartition(self._s.input_topic, p) for p in parts]
        # A replica that died in a transaction leaves its offsets pending: the committed
        # offsets are unstable until the broker aborts that transaction, which takes the
        # dead producer's transaction timeout plus up to the broker's check interval
        # (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s by default).
        committed: list[TopicPartition] = self._calls.retrying(
            "committed",
            lambda: consumer.committed(tps, timeout=LOOKUP_TIMEOUT_S),
            limit_ms=self._s.transaction_timeout_ms + OPEN_TRANSACTION_GRACE_MS,
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
        self.advance_restores(force=True)

    def _state_topics(self) -> tuple[str, str]:
        return (self._s.changelog_topic, self._s.dedupe_topic)

    def _state_reader(self) -> StateReader:
        assert self._reader is not None
        return self._reader

    def advance_restores(self, *, force: bool = False) -> None:
        """Restore the partitions whose state topics are stable up to their targets."""
        if not self._restoring:
            return
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
            pending = PendingIds(COMMON_ENTRY_COST_BYTES)
            for e in entries:
                pending.add(e.request_id, e.content_hash, e.cost_bytes())
            for u in unreadable:
                pending.add(u.request_id, "", 0)
            self._pending[p] = pending
            self._loop.call_soon_threadsafe(
                self._hooks.adopt, p, self._epochs[p], entries, unreadable
            )
        # The state records and the Kafka client's fetch buffers are freed now, but glibc
        # keeps them in its free lists: give them back (~35 MB at 100,000 states).
        memory.trim()
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

    # ---- letting partitions go ----

    def _pending_ids(self, p: int) -> PendingIds:
        return self._pending.setdefault(p, PendingIds(COMMON_ENTRY_COST_BYTES))

    def _forget_pending(self, p: int) -> None:
        """Drop partition `p`'s pending ids and the bytes they were counted for."""
        self._pending.pop(p, None)

    def release(self, parts: list[int]) -> None:
        """Forget `parts` (revoked or lost): the engine drops them too."""
        for p in parts:
            self._epochs[p] = self._epochs.get(p, 0) + 1
            self._forget_pending(p)
            self._windows.pop(p, None)
            self._restoring.pop(p, None)
            self._base_offsets.pop(p, None)
            self._loop.call_soon_threadsafe(self._hooks.drop, p)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(str(p))
        self.assigned = frozenset(self.assigned - set(parts))
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))

    def reset(self, parts: list[int]) -> None:
        """Drop and rebuild the state of `parts` from Kafka (after an abort or a loss)."""
        for p in parts:
            self._loop.call_soon_threadsafe(self._hooks.drop, p)
        self.acquire(parts, seek=True)

    def reset_all(self) -> None:
        """Drop and rebuild the state of every assigned partition (an abort that repeats)."""
        self.reset(sorted(self.assigned))
