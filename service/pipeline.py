"""The engine: submit, poll and finish pending conversions, with nothing lost.

The :class:`Engine` runs in the asyncio event loop. It holds the working copy
of every pending request of the partitions this replica owns (handed over by
the Kafka thread after restore or after a new request is durable), and two
due-time queues: requests due for a submit (first try or retry) and
conversions due for a status call. A dispatcher pops due work into bounded
pools of tasks; each task spends one permit of the shared rate limit, calls
DocuTray, and turns the answer into an effect for the Kafka thread's next
transaction.

A submit, step by step (:meth:`Engine._submit`):

1. Take a permit from the shared limiter (bounded wait).
2. Record the state ``submitting`` in the changelog and wait for the commit:
   if this replica dies during the HTTP call, the next owner sees
   ``submitting`` and knows DocuTray may already have the conversion, so the
   resubmission is counted (``docutray_bridge_resubmissions_total{reason="recovery"}``).
   The at-least-once window is exactly the HTTP call plus one commit interval.
3. Call DocuTray.
4. Record the outcome: ``submitted`` with the conversion id (then poll), a
   dead letter with a tombstone (the request is at fault), ``queued`` with a
   retry time (transient), or ``queued`` plus a pause of all consumption
   (systemic: invalid API key, DocuTray unreachable).

The loop wires parts together and holds no business rules: what an error
means is decided in :mod:`service.outcomes`, when to poll in
:mod:`service.scheduler`, how fast to call in :mod:`service.ratelimit`, and
what a systemic pause or a held submit gate does (probe, quota, time not
counted against a request's retry deadline) in :mod:`service.systemic`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Literal, cast

import structlog

from service import metrics, outbox
from service.config import Settings
from service.documents import ByteBudget, DocumentMissing, DocumentReader
from service.docutray import (
    ConversionStatus,
    DocuTrayClient,
    DocuTrayError,
    Submission,
)
from service.fetch import FetchError, TransientFetchError, fetch_document
from service.intake import Accepted, original_record
from service.kafka.effects import Effect, EngineHooks, KafkaEdge, OutRecord
from service.kafka.errors import StaleEffect
from service.kafka.topics import documents_topic, record_bytes
from service.messages import DeadLetterReason, OriginalRecord, PendingRecord, utcnow
from service.outcomes import (
    DEFAULT_DEAD_LETTER_BYTES,
    Verdict,
    build_dead_letter,
    build_result,
    classify_status_error,
    classify_submit_error,
    describe_error,
)
from service.pending import Entry, Limits, Unreadable, parse_original
from service.ratelimit import Budget, LimiterTimeout, RateLimiter
from service.scheduler import DueQueue, PollPolicy, retry_delay_s
from service.systemic import Systemic, SystemicSettings
from service.webhooks import routed_metadata

log = structlog.get_logger(__name__)

Key = tuple[int, str]

#: The longest a task waits for a rate-limit permit before giving its slot back.
_MAX_PERMIT_WAIT_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    """The slice of :class:`service.config.Settings` the engine uses (see the README's
    settings table for each one's meaning)."""

    input_topic: str
    result_topic: str
    dead_letter_topic: str
    #: The pending-state changelog and the documents topic (both co-partitioned with input).
    changelog: str
    documents_topic: str
    max_request_bytes: int
    max_document_bytes: int
    inflight_bytes_cap: int
    max_inflight_submits: int
    max_inflight_polls: int
    docutray_max_connections: int
    retry_deadline_s: float
    retry_base_s: float
    retry_cap_s: float
    conversion_deadline_s: float
    max_lost_resubmits: int
    shutdown_grace_s: float
    fetch_mode: bool
    fetch_timeout_s: float
    fetch_allow_private: bool
    webhooks_enabled: bool
    systemic: SystemicSettings

    @classmethod
    def from_settings(cls, s: Settings) -> EngineSettings:
        """Take the engine's slice of the service's settings."""
        return cls(
            input_topic=s.input_topic,
            result_topic=s.result_topic,
            dead_letter_topic=s.dead_letter_topic,
            changelog=s.changelog,
            documents_topic=documents_topic(s),
            max_request_bytes=s.max_request_bytes,
            max_document_bytes=s.max_document_bytes,
            inflight_bytes_cap=s.inflight_bytes_cap,
            max_inflight_submits=s.max_inflight_submits,
            max_inflight_polls=s.max_inflight_polls,
            docutray_max_connections=s.docutray_max_connections,
            retry_deadline_s=s.retry_deadline_s,
            retry_base_s=s.retry_base_s,
            retry_cap_s=s.retry_cap_s,
            conversion_deadline_s=s.conversion_deadline_s,
            max_lost_resubmits=s.max_lost_resubmits,
            shutdown_grace_s=s.shutdown_grace_s,
            fetch_mode=s.fetch_mode,
            fetch_timeout_s=s.fetch_timeout_s,
            fetch_allow_private=s.fetch_allow_private,
            webhooks_enabled=s.webhooks_enabled,
            systemic=SystemicSettings(
                unreachable_pause_after_s=s.unreachable_pause_after_s,
                systemic_probe_interval_s=s.systemic_probe_interval_s,
                quota_probe_interval_s=s.quota_probe_interval_s,
            ),
        )


def _connection_slots(max_connections: int) -> dict[Budget, asyncio.Semaphore]:
    """At most one HTTP call per pooled connection: requests queued inside httpx's pool make
    every call scan the whole queue (quadratic CPU); waiting here costs nothing. Submits and
    status calls each have half, and a task takes its slot *before* its permit, so a permit
    is spent the moment it is granted (no bunching past the provider's window) and neither
    kind can hold every connection while waiting for its budget."""
    submit_slots = max(1, max_connections // 2)
    return {
        "submit": asyncio.Semaphore(submit_slots),
        "status": asyncio.Semaphore(max(1, max_connections - submit_slots)),
    }


class Engine(EngineHooks):
    """Pending conversions of this replica, and the tasks that move them forward."""

    def __init__(
        self,
        *,
        settings: EngineSettings,
        client: DocuTrayClient,
        limiter: RateLimiter,
        policy: PollPolicy,
        kafka: KafkaEdge,
        documents: DocumentReader | None = None,
        output_limits: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._s = settings
        self._documents = documents
        #: Documents read back and held at once (submits, dead letters).
        self._inflight = ByteBudget(settings.inflight_bytes_cap)
        #: The largest record each output topic takes (results over it: result_too_large).
        self._output_limits = dict(output_limits or {})
        self._client = client
        self._limiter = limiter
        self._policy = policy
        self._rng = rng or random.Random()
        self.kafka = kafka
        self._entries: dict[Key, Entry] = {}
        self._submit_due: DueQueue[Key] = DueQueue()
        self._poll_due: DueQueue[Key] = DueQueue()
        self._submit_tasks: set[asyncio.Task[None]] = set()
        self._poll_tasks: set[asyncio.Task[None]] = set()
        self._tasks_by_key: dict[Key, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._slots = _connection_slots(settings.docutray_max_connections)
        #: Tasks whose HTTP call is under way: a drain or revoke lets these finish.
        self._in_call: set[Key] = set()
        #: Partitions being revoked: no new call starts there.
        self._revoking: set[int] = set()
        self._limits = Limits(settings.max_request_bytes, settings.max_document_bytes)
        #: Pauses and holds for reasons no request caused (see service.systemic).
        self._systemic = Systemic(
            settings.systemic,
            client=client,
            limiter=limiter,
            kafka=kafka,
            wake=self._wake.set,
            waiting_to_submit=self._waiting_to_submit,
        )
        self._stopping = False
        self._fatal: BaseException | None = None
        self._done = asyncio.Event()
        self.heartbeat = time.monotonic()
        self._gauges_dirty = True
        self._gauges_at = 0.0
        self._oldest_at = 0.0

    # ---- hooks from the Kafka thread (run in the event loop) ----

    def adopt(
        self,
        partition: int,
        epoch: int,
        entries: list[Entry],
        unreadable: list[Unreadable] | None = None,
    ) -> None:
        """Take over pending entries: schedule each by its state."""
        now_mono = time.monotonic()
        now = utcnow()
        for entry in entries:
            self._entries[entry.key] = entry
            if entry.state == "submitted" and entry.conversion_id:
                # Restored: poll when the previous owner would have, spread so it is no burst.
                elapsed = (now - entry.submitted_at).total_seconds() if entry.submitted_at else 0.0
                elapsed = max(0.0, elapsed)
                entry.submitted_mono = now_mono - elapsed
                delay = self._policy.next_delay_s(
                    entry.document_type_code,
                    elapsed_s=elapsed,
                    polls_done=entry.status_calls,
                    remaining_s=max(0.0, self._s.conversion_deadline_s - elapsed),
                    rng=self._rng,
                )
                self._poll_due.schedule(entry.key, now_mono + delay * self._rng.uniform(0.1, 1.0))
            else:
                wait = 0.0
                if entry.next_attempt_at is not None:
                    wait = max(0.0, (entry.next_attempt_at - now).total_seconds())
                self._submit_due.schedule(entry.key, now_mono + wait)
        for bad in unreadable or ():
            self._dead_letter_unreadable(partition, epoch, bad)
        self._update_gauges()
        self._wake.set()

    def drop(self, partition: int) -> None:
        """Forget a partition: its owner (maybe us again, after a reset) restores it from Kafka."""
        self._revoking.discard(partition)
        for key in [k for k in self._entries if k[0] == partition]:
            del self._entries[key]
            self._submit_due.cancel(key)
            self._poll_due.cancel(key)
            task = self._tasks_by_key.pop(key, None)
            if task is not None:
                # Its work belongs to the partition's next owner now: waiting for a permit or an
                # answer here would only spend this replica's share of the budget for nothing.
                task.cancel()
        self._update_gauges()

    def fatal(self, exc: BaseException) -> None:
        """The Kafka thread died: stop the engine (the process exits non-zero)."""
        self._fatal = exc
        self._stopping = True
        self._systemic.stop()
        self._done.set()
        self._wake.set()

    # ---- state for health and metrics ----

    @property
    def paused_reasons(self) -> frozenset[str]:
        """Why the engine does not call DocuTray right now (empty when it does)."""
        return self._systemic.paused

    @property
    def hold_reasons(self) -> frozenset[str]:
        """Readiness reasons from the plan: ``quota_exhausted`` while the monthly quota is
        spent (this replica got the 402, or the shared gate says so)."""
        return self._systemic.hold_reasons

    async def watch_submit_hold(self, *, every_s: float = 2.0) -> None:
        """Keep this replica's view of the shared submit gate fresh (see
        :meth:`service.systemic.Systemic.watch_submit_hold`); runs until cancelled."""
        await self._systemic.watch_submit_hold(every_s=every_s)

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the engine, if any."""
        return self._fatal

    async def wait_failed(self) -> None:
        """Return when the engine stopped on a fatal error."""
        await self._done.wait()

    def counts(self) -> dict[str, int]:
        """Pending entries by state."""
        out = dict.fromkeys(metrics.PENDING_STATES, 0)
        for entry in self._entries.values():
            out[entry.state] += 1
        return out

    def _update_gauges(self) -> None:
        """Mark the pending gauges stale; the dispatcher refreshes them at most twice a second."""
        self._gauges_dirty = True

    def _refresh_gauges(self, now: float) -> None:
        if now - self._oldest_at >= 5.0:
            self._oldest_at = now
            oldest = min((e.received_at for e in self._entries.values()), default=None)
            age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
            metrics.OLDEST_PENDING_AGE.set(max(0.0, age))
        # Counting walks every entry: with 100,000 pending, twice a second was 30 % of the CPU.
        every_s = min(5.0, 0.5 + len(self._entries) / 20_000)
        if self._gauges_dirty and now - self._gauges_at >= every_s:
            self._gauges_dirty = False
            self._gauges_at = now
            for state, n in self.counts().items():
                metrics.PENDING.labels(state).set(n)

    # ---- the dispatcher ----

    async def run(self) -> None:
        """Dispatch due submits and polls until stopped."""
        while not self._stopping:
            self._wake.clear()
            now = time.monotonic()
            self.heartbeat = now
            metrics.HEARTBEAT.set(time.time())
            self._refresh_gauges(now)
            self._systemic.tick()
            if not self._systemic.paused:
                free = self._s.max_inflight_submits - len(self._submit_tasks)
                if self._systemic.probing_quota:
                    # The first submit after a 402 is the probe: one at a time until one is
                    # accepted, so a spent quota costs one 402 per probe, not a burst.
                    free = min(free, 1 - len(self._submit_tasks))
                if free > 0 and not self._systemic.submits_held:
                    for key in self._submit_due.pop_due(now, limit=free):
                        if key[0] in self._revoking:
                            continue  # the partition's next owner submits it
                        self._spawn(self._submit_tasks, key, self._submit(key))
                free = self._s.max_inflight_polls - len(self._poll_tasks)
                if free > 0:
                    for key in self._poll_due.pop_due(now, limit=free):
                        self._spawn(self._poll_tasks, key, self._poll(key))
            nexts = [t for t in (self._submit_due.next_due_at(), self._poll_due.next_due_at()) if t]
            timeout = min([1.0, *[max(0.0, t - time.monotonic()) for t in nexts]])
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel
                # that lands as the wake-up fires, and the engine would then never stop.
                async with asyncio.timeout(max(timeout, 0.002)):
                    await self._wake.wait()

    def _spawn(self, pool: set[asyncio.Task[None]], key: Key, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        pool.add(task)
        self._tasks_by_key[key] = task

        def done(t: asyncio.Task[None]) -> None:
            pool.discard(t)
            if self._tasks_by_key.get(key) is t:
                del self._tasks_by_key[key]
            self._wake.set()
            if not t.cancelled() and t.exception() is not None:
                log.error(
                    "task_failed",
                    error=repr(t.exception()),
                    action="bug: the entry is retried after a restart; report it",
                )

        task.add_done_callback(done)

    async def drain(self, *, grace_s: float) -> None:
        """Graceful stop: no new call; calls under way finish and commit; nothing else waits.

        A submit waiting for its HTTP slot or permit goes back to ``queued`` (so the next owner
        does not count a resubmission); one whose call is under way gets `grace_s` to record
        its outcome. Polls are cancelled: the next owner polls again.
        """
        self._stopping = True
        self._wake.set()
        await self._settle(lambda key: True, grace_s=grace_s)
        self._systemic.stop()

    def quiesce(self, partitions: list[int], done: threading.Event) -> None:
        """A revoke: start no call on `partitions`; set `done` once their calls have finished."""
        parts = set(partitions)
        self._revoking |= parts

        async def settle() -> None:
            try:
                await self._settle(lambda key: key[0] in parts, grace_s=self._s.shutdown_grace_s)
            finally:
                done.set()

        asyncio.get_running_loop().create_task(settle())

    async def _settle(self, selected: Callable[[Key], bool], *, grace_s: float) -> None:
        """Cancel the selected keys' tasks that are not in a call; wait for the others."""
        for key, task in list(self._tasks_by_key.items()):
            if selected(key) and (key not in self._in_call or task in self._poll_tasks):
                task.cancel()
        busy = [t for k, t in self._tasks_by_key.items() if selected(k)]
        if busy:
            _, still = await asyncio.wait(busy, timeout=grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)

    # ---- effects ----

    async def _write(self, effect: Effect, *, wait: bool) -> bool:
        """Hand an effect to the Kafka thread; with `wait`, until it is committed (False if stale)."""
        if wait:
            effect.future = asyncio.get_running_loop().create_future()
        self.kafka.submit(effect)
        if not wait:
            return True
        assert effect.future is not None
        try:
            await effect.future
        except StaleEffect:
            return False
        return True

    def _changelog(self, entry: Entry, *, next_attempt_at: datetime | None = None) -> OutRecord:
        entry.next_attempt_at = next_attempt_at
        return outbox.state(self._s.changelog, entry)

    def _owned(self, entry: Entry) -> bool:
        return self._entries.get(entry.key) is entry

    async def _finish(
        self, entry: Entry, record: OutRecord, *, dead_letter: str | None = None
    ) -> None:
        """Publish a result or dead letter and tombstone the pending record, in one transaction.

        The end-to-end latency is observed when that transaction commits, so an outcome
        written again after a failed commit (the partition rebuilt from Kafka) counts once.
        """
        self._entries.pop(entry.key, None)
        self._update_gauges()
        outcome, received_at = ("dead_letter" if dead_letter else "result"), entry.received_at

        def committed() -> None:
            metrics.END_TO_END.labels(outcome).observe((utcnow() - received_at).total_seconds())

        await self._write(
            Effect(
                partition=entry.partition,
                epoch=entry.epoch,
                records=[
                    record,
                    *outbox.tombstones(
                        self._s.changelog,
                        self._s.documents_topic,
                        entry.request_id,
                        entry.partition,
                    ),
                ],
                finishes=entry.request_id,
                dead_letter_reason=dead_letter,
                result=dead_letter is None,
                on_commit=committed,
            ),
            wait=False,
        )

    @contextlib.asynccontextmanager
    async def _holding(self, entry: Entry) -> AsyncIterator[None]:
        """Room for the entry's document in the in-flight byte budget, while it is used."""
        size = entry.document.size_bytes if entry.document else len(entry.legacy_original or b"")
        await self._inflight.acquire(size)
        metrics.MEMORY_HELD.labels("documents").set(self._inflight.held)
        try:
            yield
        finally:
            self._inflight.release(size)
            metrics.MEMORY_HELD.labels("documents").set(self._inflight.held)

    async def _read_original(self, entry: Entry) -> OriginalRecord:
        """The entry's original input record, read back from the documents topic."""
        if entry.legacy_original is not None:
            return OriginalRecord.model_validate_json(entry.legacy_original)
        if entry.document is None or self._documents is None:
            raise DocumentMissing(f"pending request {entry.request_id} names no document")
        value = await self._documents.read(entry.document.partition, entry.document.offset)
        return OriginalRecord.model_validate_json(value)

    async def _original_for_letter(self, entry: Entry) -> tuple[OriginalRecord, str]:
        """The original record for a dead letter, or what is known of it if it is gone."""
        try:
            async with self._holding(entry):
                return await self._read_original(entry), ""
        except (DocumentMissing, ValueError) as exc:
            stub = OriginalRecord(
                topic=self._s.input_topic,
                partition=entry.partition,
                offset=-1,
                headers=entry.headers,
            )
            return stub, f" (the original record could not be read back: {exc})"

    def _letter_limit(self) -> int:
        """The largest dead letter its topic takes."""
        return self._output_limits.get(self._s.dead_letter_topic, DEFAULT_DEAD_LETTER_BYTES)

    async def _dead_letter(
        self,
        entry: Entry,
        reason: DeadLetterReason,
        message: str,
        *,
        error: DocuTrayError | None = None,
        original: OriginalRecord | None = None,
    ) -> None:
        if original is None:
            original, missing = await self._original_for_letter(entry)
            message += missing
        letter = build_dead_letter(
            reason=reason,
            message=message,
            original=original,
            request_id=entry.request_id,
            document_type_code=entry.document_type_code,
            error=error,
            conversion_id=entry.conversion_id,
            attempts=entry.attempts,
            status_calls=entry.status_calls,
            received_at=entry.received_at,
            max_bytes=self._letter_limit(),
        )
        log.warning(
            "request_dead_lettered",
            request_id=entry.request_id,
            conversion_id=entry.conversion_id,
            reason=reason.value,
            detail=message,
            action="see the dead letter; fix the cause and replay with "
            "`docutray-bridge dead-letters replay`",
        )
        await self._finish(
            entry,
            outbox.dead_letter(self._s.dead_letter_topic, letter),
            dead_letter=reason.value,
        )

    def _dead_letter_unreadable(self, partition: int, epoch: int, bad: Unreadable) -> None:
        """A changelog record that can no longer be worked on: dead-letter it, never drop it."""
        try:
            record = PendingRecord.model_validate_json(bad.value)
            original = record.original or OriginalRecord(
                topic=self._s.input_topic, partition=partition, offset=-1, headers=record.headers
            )
            received_at, attempts = record.received_at, record.attempts
        except ValueError:
            original = original_record(
                topic=self._s.changelog,
                partition=partition,
                offset=-1,
                timestamp_ms=None,
                key=bad.request_id.encode(),
                value=bad.value,
                headers=None,
            )
            received_at, attempts = None, 0
        letter = build_dead_letter(
            reason=DeadLetterReason.INVALID_REQUEST,
            message=f"pending request can no longer be read ({bad.error}); changed limits?",
            original=original,
            request_id=bad.request_id,
            received_at=received_at,
            attempts=attempts,
            max_bytes=self._letter_limit(),
        )
        log.error(
            "pending_record_unreadable",
            request_id=bad.request_id,
            error=bad.error,
            action="dead-lettered with the stored record; fix and replay",
        )
        self.kafka.submit(
            Effect(
                partition=partition,
                epoch=epoch,
                records=[
                    outbox.dead_letter(self._s.dead_letter_topic, letter),
                    *outbox.tombstones(
                        self._s.changelog, self._s.documents_topic, bad.request_id, partition
                    ),
                ],
                finishes=bad.request_id,
                dead_letter_reason=DeadLetterReason.INVALID_REQUEST.value,
            )
        )

    # ---- submitting ----

    async def _submit(self, key: Key) -> None:
        """One submit attempt; whatever goes wrong, the entry keeps a next step (item 7)."""
        try:
            await self._submit_once(key)
        except Exception as exc:  # a bug or an unknown failure must not strand the entry
            entry = self._entries.get(key)
            if entry is not None and self._owned(entry):
                await self._unexpected(entry, "submit", exc)

    async def _submit_once(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        age_s = (utcnow() - entry.received_at).total_seconds()
        late = entry.attempts > 0 and age_s > self._s.retry_deadline_s and not entry.in_doubt
        # Time paused for a systemic reason (quota, hour/day window, DocuTray unreachable)
        # is not the request's fault: it does not count against its retry deadline.
        paused_s = self._systemic.paused_s(since=entry.received_at.timestamp()) if late else 0.0
        if late and age_s - paused_s > self._s.retry_deadline_s:
            await self._dead_letter(
                entry,
                DeadLetterReason.RETRIES_EXHAUSTED,
                f"gave up after {entry.attempts} submit attempts over {age_s:.0f} s "
                f"({paused_s:.0f} s of them paused for a systemic reason, not counted; "
                f"BRIDGE_RETRY_DEADLINE_S={self._s.retry_deadline_s:g}); last error: "
                f"{entry.last_error}",
            )
            return
        async with self._holding(entry):
            await self._submit_document(entry)

    async def _read_back(self, entry: Entry) -> Accepted | None:
        """Step 0: the request, read back from the documents topic and judged again (None:
        dead-lettered, or no longer this replica's)."""
        try:
            original = await self._read_original(entry)
        except DocumentMissing as exc:
            await self._dead_letter(
                entry,
                DeadLetterReason.INVALID_REQUEST,
                f"the stored request cannot be read back: {exc}",
                original=OriginalRecord(
                    topic=self._s.input_topic,
                    partition=entry.partition,
                    offset=-1,
                    headers=entry.headers,
                ),
            )
            return None
        if not self._owned(entry):
            return None
        accepted = parse_original(original, self._limits)
        if accepted is None:
            await self._dead_letter(
                entry,
                DeadLetterReason.INVALID_REQUEST,
                "the stored request no longer passes validation (were the size limits lowered?)",
                original=original,
            )
        return accepted  # memory: the parsed request is all the call needs, not the original

    async def _submit_document(self, entry: Entry) -> None:
        """Steps 0-4 with the document read back and held (within the in-flight byte budget)."""
        key = entry.key
        accepted = await self._read_back(entry)
        if accepted is None:
            return
        # Step 1: the intent, durable before the HTTP call.
        resubmission = entry.in_doubt
        entry.state = "submitting"
        entry.attempts += 1
        self._update_gauges()
        try:
            committed = await self._write(
                Effect(entry.partition, entry.epoch, [self._changelog(entry)]), wait=True
            )
            if not committed or not self._owned(entry):
                return
            # Step 2: a connection slot, then the permit, right before the call; after a 402,
            # one submit at a time (the quota's probe) while the others wait for its answer.
            async with self._slots["submit"]:
                if not await self._permit("submit", entry, self._submit_due):
                    self._not_called(entry)
                    return
                async with self._systemic.probe_turn() as go:
                    if not go:  # the probe got a 402: submissions are held again
                        self._not_called(entry)
                        return
                    self._in_call.add(key)
                    if resubmission:
                        metrics.RESUBMISSIONS.labels("recovery").inc()
                        entry.in_doubt = False
                    # Step 3: the call.
                    try:
                        submission = await self._call_submit(accepted, entry)
                    except (DocuTrayError, FetchError) as exc:
                        await self._submit_failed(entry, exc)
                        return
        except asyncio.CancelledError:
            if key not in self._in_call:
                self._not_called(entry)
            raise
        finally:
            self._in_call.discard(key)
        # Step 4: the outcome.
        await self._submitted(entry, submission)

    def _not_called(self, entry: Entry) -> None:
        """The submit stopped before its call: back to ``queued``, no resubmission to count.

        Unless it is in doubt (a previous owner may have submitted it): then its durable
        state stays ``submitting``, so that whoever submits it next counts the resubmission.
        """
        if not self._owned(entry) or entry.state != "submitting":
            return
        entry.attempts = max(0, entry.attempts - 1)
        if not entry.in_doubt:
            entry.state = "queued"
            self._update_gauges()
            self.kafka.submit(Effect(entry.partition, entry.epoch, [self._changelog(entry)]))
        if not self._stopping and entry.partition not in self._revoking:
            self._submit_due.schedule(entry.key, time.monotonic() + self._rng.uniform(0.5, 2.0))

    async def _submitted(self, entry: Entry, submission: Submission) -> None:
        self._systemic.api_ok()
        self._systemic.quota_back()
        metrics.SUBMISSIONS.labels("accepted", "2xx").inc()
        self._limiter.on_success("submit")
        entry.state = "submitted"
        entry.conversion_id = submission.conversion_id
        entry.submitted_at = utcnow()
        entry.submitted_mono = time.monotonic()
        entry.status_calls = 0
        entry.last_error = None
        self._update_gauges()
        log.info(
            "conversion_submitted",
            request_id=entry.request_id,
            conversion_id=submission.conversion_id,
            attempt=entry.attempts,
            partition=entry.partition,
        )
        await self._write(
            Effect(entry.partition, entry.epoch, [self._changelog(entry)]), wait=False
        )
        delay = self._policy.first_delay_s(entry.document_type_code, rng=self._rng)
        self._poll_due.schedule(entry.key, time.monotonic() + delay)
        self._wake.set()

    async def _unexpected(
        self, entry: Entry, stage: Literal["submit", "status"], exc: Exception
    ) -> None:
        """An exception nobody classified: count it, log it, and retry with backoff."""
        metrics.UNEXPECTED_ERRORS.labels(stage).inc()
        log.error(
            "task_failed_unexpectedly",
            request_id=entry.request_id,
            conversion_id=entry.conversion_id,
            stage=stage,
            error=repr(exc),
            action="retried with backoff (then retries_exhausted or timeout); "
            "please report this with the log line",
            exc_info=exc,
        )
        if stage == "status":
            delay = retry_delay_s(
                min(max(1, entry.status_calls), 8),
                retry_after_s=None,
                base_s=self._s.retry_base_s,
                cap_s=self._s.retry_cap_s,
                rng=self._rng,
            )
            self._poll_due.schedule(entry.key, time.monotonic() + delay)
            self._wake.set()
            return
        await self._requeue(entry, exc, Verdict("retry"), budget="submit", attempts_charged=True)

    async def _call_submit(self, accepted: Accepted, entry: Entry) -> Submission:
        req = accepted.request
        src = req.source
        metadata = self._submit_metadata(req.metadata, entry)
        if src.url is not None and self._s.fetch_mode:
            doc = await fetch_document(
                src.url,
                max_bytes=self._s.max_document_bytes,
                timeout_s=self._s.fetch_timeout_s,
                allow_private=self._s.fetch_allow_private,
            )
            try:
                return await self._client.submit_upload(
                    file=cast(BinaryIO, doc.file),
                    filename=req.filename or doc.filename,
                    document_type_code=req.document_type_code,
                    content_type=doc.content_type,
                    metadata=metadata,
                    size_bytes=doc.size_bytes,
                )
            finally:
                doc.close()
        if src.url is not None:
            return await self._client.submit_url(
                url=src.url,
                document_type_code=req.document_type_code,
                content_type=src.content_type,
                metadata=metadata,
            )
        assert src.base64 is not None
        return await self._client.submit_base64(
            data_b64=src.base64,
            document_type_code=req.document_type_code,
            content_type=accepted.content_type,
            metadata=metadata,
        )

    async def _submit_failed(self, entry: Entry, exc: DocuTrayError | FetchError) -> None:
        status = getattr(exc, "status_code", None)
        verdict = classify_submit_error(exc, url_timeouts=entry.url_timeouts)
        detail = describe_error(exc)
        outcome = {
            "dead_letter": "rejected",
            "pause": "systemic_error",
        }.get(verdict.action, "transient_error")
        metrics.SUBMISSIONS.labels(outcome, metrics.status_class(status)).inc()
        if verdict.action == "dead_letter":
            assert verdict.reason is not None
            self._systemic.api_ok()
            await self._dead_letter(
                entry,
                verdict.reason,
                f"DocuTray refused the request: {detail}",
                error=exc if isinstance(exc, DocuTrayError) else None,
            )
            return
        if status == 408 or isinstance(exc, TransientFetchError):
            entry.url_timeouts += 1
        await self._requeue(entry, exc, verdict, budget="submit", attempts_charged=True)

    async def _requeue(
        self,
        entry: Entry,
        exc: BaseException,
        verdict: Verdict,
        *,
        budget: Budget,
        attempts_charged: bool,
    ) -> None:
        """Put a request back to `queued` with a retry time (transient or systemic failure)."""
        detail = describe_error(exc)
        await self._systemic.feedback(exc, verdict, budget=budget)
        if verdict.action == "pause" and attempts_charged:
            entry.attempts = max(0, entry.attempts - 1)  # not the request's fault
        delay = retry_delay_s(
            max(1, entry.attempts),
            retry_after_s=verdict.retry_after_s,
            base_s=self._s.retry_base_s,
            cap_s=self._s.retry_cap_s,
            rng=self._rng,
        )
        entry.state = "queued"
        entry.last_error = detail[:1000]  # the state record stays small
        entry.conversion_id = None
        self._update_gauges()
        log.warning(
            "submit_retry_scheduled",
            request_id=entry.request_id,
            attempt=entry.attempts,
            retry_in_s=round(delay, 2),
            error=detail,
            action="none: retried automatically until BRIDGE_RETRY_DEADLINE_S",
        )
        await self._write(
            Effect(
                entry.partition,
                entry.epoch,
                [self._changelog(entry, next_attempt_at=utcnow() + timedelta(seconds=delay))],
            ),
            wait=False,
        )
        self._submit_due.schedule(entry.key, time.monotonic() + delay)
        self._wake.set()

    async def _permit(self, budget: Budget, entry: Entry, queue: DueQueue[Key]) -> bool:
        """Wait for a rate-limit permit; on timeout put the entry back in its queue."""
        try:
            waited = await self._limiter.acquire(
                budget,
                deadline=time.monotonic() + _MAX_PERMIT_WAIT_S,
            )
        except LimiterTimeout:
            queue.schedule(entry.key, time.monotonic() + self._rng.uniform(0.5, 2.0))
            return False
        metrics.LIMITER_WAIT.labels(budget).observe(waited)
        if not self._owned(entry) or self._stopping or entry.partition in self._revoking:
            return False
        if self._systemic.paused:
            queue.schedule(entry.key, time.monotonic() + 1.0)
            return False
        return True

    # ---- polling ----

    async def _poll(self, key: Key) -> None:
        """One status call; whatever goes wrong, the entry keeps a next step (item 7)."""
        try:
            await self._poll_once(key)
        except Exception as exc:  # a bug or an unknown failure must not strand the entry
            entry = self._entries.get(key)
            if entry is not None and self._owned(entry):
                await self._unexpected(entry, "status", exc)

    async def _poll_once(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.conversion_id is None:
            return
        elapsed = time.monotonic() - (entry.submitted_mono or time.monotonic())
        remaining = self._s.conversion_deadline_s - elapsed
        # Status calls stop while consumption is paused: that time is not the conversion's.
        stopped_s = self._systemic.stopped_s(since=time.time() - elapsed) if remaining < 0 else 0.0
        remaining += stopped_s
        if remaining < 0:
            await self._dead_letter(
                entry,
                DeadLetterReason.TIMEOUT,
                f"no terminal status {elapsed:.0f} s after submit ({stopped_s:.0f} s of them "
                "paused for a systemic reason, not counted; "
                f"BRIDGE_CONVERSION_DEADLINE_S={self._s.conversion_deadline_s:g})",
            )
            return
        async with self._slots["status"]:
            if not await self._permit("status", entry, self._poll_due):
                return
            entry.status_calls += 1
            try:
                status = await self._client.get_status(entry.conversion_id)
            except DocuTrayError as exc:
                await self._status_failed(entry, exc)
                return
        self._systemic.api_ok()
        self._limiter.on_success("status")
        if not self._owned(entry):
            return
        if status.status == "SUCCESS":
            metrics.STATUS_CALLS.labels("success").inc()
            await self._succeeded(entry, status, elapsed)
        elif status.status == "ERROR":
            metrics.STATUS_CALLS.labels("error").inc()
            self._observe_finished(entry, status, elapsed)
            await self._dead_letter(
                entry,
                DeadLetterReason.CONVERSION_FAILED,
                f"DocuTray could not convert the document: {status.error or 'no error text'}",
            )
        else:
            metrics.STATUS_CALLS.labels("in_progress").inc()
            delay = self._policy.next_delay_s(
                entry.document_type_code,
                elapsed_s=elapsed,
                polls_done=entry.status_calls,
                remaining_s=max(0.0, remaining),
                rng=self._rng,
            )
            self._poll_due.schedule(entry.key, time.monotonic() + delay)
            self._wake.set()

    def _observe_finished(self, entry: Entry, status: ConversionStatus, elapsed: float) -> None:
        doc_type = entry.document_type_code
        processing = elapsed
        if status.request_timestamp and status.response_timestamp:
            processing = (status.response_timestamp - status.request_timestamp).total_seconds()
        if processing > 0:
            self._policy.model.observe(doc_type, processing)
        metrics.CONVERSION_DURATION.labels(metrics.doc_type_label(doc_type)).observe(elapsed)
        metrics.STATUS_CALLS_PER_CONVERSION.observe(entry.status_calls)

    async def _metadata(self, entry: Entry) -> dict[str, Any] | None:
        """The request's metadata (read back from the document when too large to keep)."""
        if not entry.metadata_in_document:
            return entry.metadata
        async with self._holding(entry):
            original = await self._read_original(entry)
        accepted = parse_original(original, self._limits)
        return accepted.request.metadata if accepted is not None else None

    async def _succeeded(self, entry: Entry, status: ConversionStatus, elapsed: float) -> None:
        self._observe_finished(entry, status, elapsed)
        result = build_result(
            request_id=entry.request_id,
            status=status,
            document_type_code=entry.document_type_code,
            metadata=await self._metadata(entry),
            filename=entry.filename,
            received_at=entry.received_at,
            submitted_at=entry.submitted_at,
            status_calls=entry.status_calls,
            submit_attempts=entry.attempts,
        )
        log.info(
            "conversion_succeeded",
            request_id=entry.request_id,
            conversion_id=entry.conversion_id,
            status_calls=entry.status_calls,
            seconds=round(elapsed, 3),
        )
        record = outbox.result(self._s.result_topic, entry, result)
        del result
        limit = self._output_limits.get(self._s.result_topic)
        size = record_bytes(record.key, record.value, record.headers)
        if limit is not None and size > limit:
            # Produced, it would fail the whole transaction, and every retry after it.
            await self._dead_letter(
                entry,
                DeadLetterReason.RESULT_TOO_LARGE,
                f"the result of conversion {entry.conversion_id} is {size} bytes, over the "
                f"{limit} bytes the results topic {self._s.result_topic} takes "
                "(its max.message.bytes); fetch the data from DocuTray with "
                f"GET /api/convert-async/status/{entry.conversion_id} while DocuTray keeps it, "
                "or raise the topic's max.message.bytes (and BRIDGE_MAX_RESULT_BYTES) and replay",
            )
            return
        await self._finish(entry, record)

    async def _status_failed(self, entry: Entry, exc: DocuTrayError) -> None:
        verdict = classify_status_error(exc)
        if verdict.action == "resubmit":
            metrics.STATUS_CALLS.labels("lost").inc()
            self._systemic.api_ok()
            if entry.lost_resubmits >= self._s.max_lost_resubmits:
                await self._dead_letter(
                    entry,
                    DeadLetterReason.CONVERSION_LOST,
                    f"DocuTray no longer knows conversion {entry.conversion_id} "
                    f"({describe_error(exc)}) after {entry.lost_resubmits} resubmissions "
                    "(BRIDGE_MAX_LOST_RESUBMITS)",
                    error=exc,
                )
                return
            metrics.RESUBMISSIONS.labels("conversion_lost").inc()
            log.warning(
                "conversion_lost_resubmitting",
                request_id=entry.request_id,
                conversion_id=entry.conversion_id,
                error=describe_error(exc),
                action="none: submitted again automatically",
            )
            entry.lost_resubmits += 1
            entry.state = "queued"
            entry.conversion_id = None
            entry.submitted_at = None
            self._update_gauges()
            await self._write(
                Effect(entry.partition, entry.epoch, [self._changelog(entry)]), wait=False
            )
            self._submit_due.schedule(entry.key, time.monotonic())
            self._wake.set()
            return
        outcome = "systemic_error" if verdict.action == "pause" else "transient_error"
        metrics.STATUS_CALLS.labels(outcome).inc()
        await self._systemic.feedback(exc, verdict, budget="status")
        delay = retry_delay_s(
            min(entry.status_calls, 8),
            retry_after_s=verdict.retry_after_s,
            base_s=self._s.retry_base_s,
            cap_s=self._s.retry_cap_s,
            rng=self._rng,
        )
        log.warning(
            "status_retry_scheduled",
            request_id=entry.request_id,
            conversion_id=entry.conversion_id,
            retry_in_s=round(delay, 2),
            error=describe_error(exc),
            action="none: retried automatically",
        )
        self._poll_due.schedule(entry.key, time.monotonic() + delay)
        self._wake.set()

    # ---- DocuTray's plan: webhook wake-ups (issue 14) ----

    def _waiting_to_submit(self) -> bool:
        """Whether any entry of this replica waits for (or is in) a submit."""
        return any(e.state != "submitted" for e in self._entries.values())

    def _submit_metadata(
        self, metadata: dict[str, Any] | None, entry: Entry
    ) -> dict[str, Any] | None:
        """The ``document_metadata`` to send: with webhooks on, the route back to this
        request's partition under the reserved key (results echo the request's own)."""
        if not self._s.webhooks_enabled:
            return metadata
        return routed_metadata(metadata, request_id=entry.request_id, partition=entry.partition)

    def wake(self, partition: int, request_id: str, conversion_id: str) -> str:
        """A webhook said conversion ``conversion_id`` of ``request_id`` finished: make its
        status call due now (one call confirms it and supplies the data; the webhook's own
        body is never used, so a forged one wastes one call at most). Returns the outcome
        counted in ``docutray_bridge_webhook_wakeups_total``.

        While the request's submit answer is not recorded yet, or a call for it is under
        way, the wake-up is tried again shortly (for up to ~5 s), so a webhook that outran
        the submit's answer, or a status call that started just before the conversion
        finished, still turns into one prompt confirmation.
        """
        outcome = self._try_wake((partition, request_id), conversion_id, tries=0)
        metrics.WEBHOOK_WAKEUPS.labels(outcome).inc()
        return outcome

    def _try_wake(self, key: Key, conversion_id: str, *, tries: int) -> str:
        entry = self._entries.get(key)
        if entry is None:
            return "unknown"  # finished already, another owner's, or forged
        busy = key in self._tasks_by_key or (
            entry.conversion_id is None and entry.state == "submitting"
        )
        if busy:
            if tries < 20 and not self._stopping:
                asyncio.get_running_loop().call_later(
                    0.25, lambda: self._try_wake(key, conversion_id, tries=tries + 1)
                )
            return "early" if entry.conversion_id is None else "woke"
        if entry.conversion_id != conversion_id:
            return "mismatch"
        due = self._poll_due.due_at(key)
        if due is None or due > time.monotonic():
            self._poll_due.schedule(key, time.monotonic())
            self._wake.set()
        return "woke"
