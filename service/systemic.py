"""Systemic pauses: DocuTray cannot take calls for a reason no single request caused.

One :class:`Systemic` per engine holds both kinds, and what each one costs:

- **Consumption pauses** (``invalid_api_key``, ``api_misconfigured``, ``api_unreachable``):
  this replica stops fetching input (the Kafka edge's ``pause``) and starts no call; a
  probe (one cheap call every ``systemic_probe_interval_s``, within the status budget)
  lifts them as soon as DocuTray answers again.
- **Submit holds** on the limiter's shared gate (a 402's ``quota_exhausted`` pause, the
  block an hour or day 429 sets until its reset, the optional hour/day budgets' windows):
  submissions wait on every replica while status calls go on. The quota pause lasts until
  the quota's reset, but never longer than ``quota_probe_interval_s``; the first submit
  after it is the probe (one at a time on every replica that got the 402 or saw the
  shared pause, until one is accepted; a quota still spent answers 402 and pauses again).

Neither is the request's fault, so time spent in either does not count against a
request's retry deadline (:meth:`Systemic.paused_s`), and time in a consumption pause
(status calls stop too) not against its conversion deadline (:meth:`Systemic.stopped_s`).
:class:`PausedTime` keeps the intervals, on the wall clock, as this process saw them: a
pause before a restart is not known to the next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from service import metrics
from service.docutray import DocuTrayClient, DocuTrayError, QuotaExhausted, RateLimited
from service.kafka.effects import KafkaEdge
from service.outcomes import SYSTEMIC_PAUSES, Verdict, describe_error
from service.ratelimit import Budget, LimiterTimeout, RateLimiter

log = structlog.get_logger(__name__)

#: What an operator should do about each consumption pause (the default: DocuTray unreachable).
_PAUSE_ACTIONS = {
    "invalid_api_key": "set a valid DOCUTRAY_API_KEY (the Secret) and restart, or wait: "
    "the bridge probes and resumes by itself",
    "api_misconfigured": "check DOCUTRAY_BASE_URL and the key's permissions; the bridge "
    "probes and resumes by itself",
}
_UNREACHABLE_ACTION = (
    "check DocuTray's status and the network path to DOCUTRAY_BASE_URL; "
    "the bridge probes and resumes by itself"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemicSettings:
    """The slice of :class:`service.config.Settings` the systemic pauses use."""

    #: No successful call for this long, with transport errors: pause as ``api_unreachable``.
    unreachable_pause_after_s: float
    #: How often a paused replica probes DocuTray.
    systemic_probe_interval_s: float
    #: The longest a 402 pauses submissions before they are tried again.
    quota_probe_interval_s: float


class PausedTime:
    """Intervals (wall clock) during which this replica was paused or held, merged as seen.

    Bounded: the oldest of more than ``max_intervals`` are forgotten (a request older than
    those is then charged for pauses it sat through, never credited for ones it did not).
    """

    def __init__(self, *, max_intervals: int = 1024) -> None:
        self._closed: deque[tuple[float, float]] = deque(maxlen=max_intervals)
        self._open_since: float | None = None

    def note(self, paused: bool, now: float) -> None:
        """Record whether a pause holds at ``now`` (a pause starts or ends at a change)."""
        if paused and self._open_since is None:
            self._open_since = now
        elif not paused and self._open_since is not None:
            self._closed.append((self._open_since, now))
            self._open_since = None

    def within(self, start: float, end: float) -> float:
        """Seconds paused between ``start`` and ``end``."""
        if not self._closed and self._open_since is None:
            return 0.0
        spans = list(self._closed)
        if self._open_since is not None:
            spans.append((self._open_since, end))
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)


class Systemic:
    """The engine's systemic pauses, probe, quota episode and view of the shared submit gate.

    ``wake`` wakes the engine's dispatcher (a pause lifted: work may be due);
    ``waiting_to_submit`` says whether any entry of this replica still waits to submit.
    """

    def __init__(
        self,
        settings: SystemicSettings,
        *,
        client: DocuTrayClient,
        limiter: RateLimiter,
        kafka: KafkaEdge,
        wake: Callable[[], None],
        waiting_to_submit: Callable[[], bool],
    ) -> None:
        self._s = settings
        self._client = client
        self._limiter = limiter
        self._kafka = kafka
        self._wake = wake
        self._waiting_to_submit = waiting_to_submit
        self._paused: set[str] = set()
        self._last_api_ok = time.monotonic()
        self._probe_task: asyncio.Task[None] | None = None
        self._stopping = False
        #: When this replica got a 402, or saw the shared ``quota_exhausted`` pause, with no
        #: accepted submit since (None: quota fine). While set, submits are probes.
        self._quota_since: float | None = None
        self._paused_time = PausedTime()
        self._stopped_time = PausedTime()
        #: A quota probe (a submit after a 402) is under way; others wait for its answer.
        self._probe_busy = False
        self._probe_done = asyncio.Condition()

    # ---- what the engine asks ----

    @property
    def paused(self) -> frozenset[str]:
        """Consumption pauses in force (empty: DocuTray may be called)."""
        return frozenset(self._paused)

    @property
    def submits_held(self) -> bool:
        """Whether the shared gate holds submissions (a 402 pause, an hour or day 429, a
        budget window), as last seen: no submit task starts then (each would read its
        document and write two changelog records only to time out at the gate)."""
        return self._limiter.submit_hold is not None

    @property
    def hold_reasons(self) -> frozenset[str]:
        """Readiness reasons from the plan: ``quota_exhausted`` while the monthly quota is
        spent (this replica got the 402, or the shared gate says so)."""
        hold = self._limiter.submit_hold
        if self._quota_since is not None or (hold is not None and hold.reason == "quota_exhausted"):
            return frozenset({"quota_exhausted"})
        return frozenset()

    @property
    def probing_quota(self) -> bool:
        """Whether this replica got a 402, or saw the shared ``quota_exhausted`` pause, and
        no submit was accepted since: its next submit is the quota's probe (the engine sends
        one at a time then, so a quota still spent costs one 402, not a burst)."""
        return self._quota_since is not None

    @contextlib.asynccontextmanager
    async def probe_turn(self) -> AsyncIterator[bool]:
        """Around a submit's call (its permit taken): while :attr:`probing_quota`, one
        submit at a time; the others wait for its answer, then go on together if it was
        accepted, or yield False if it got a 402 (submissions are held again: do not call).
        A backlog meeting a quota still spent so costs one 402 per probe, not a burst."""
        waited = False
        async with self._probe_done:
            while self._quota_since is not None and self._probe_busy:
                waited = True
                await self._probe_done.wait()
            go = not (waited and self.submits_held)
            mine = go and self._quota_since is not None
            self._probe_busy = self._probe_busy or mine
        try:
            yield go
        finally:
            if mine:
                async with self._probe_done:
                    self._probe_busy = False
                    self._probe_done.notify_all()

    def tick(self) -> None:
        """Note whether calls are paused, or submissions held, now (the dispatcher calls this
        every turn, at least once a second), for :meth:`paused_s` and :meth:`stopped_s`; a
        shared quota pause seen (a read or a permit's answer) makes this replica probe too."""
        hold = self._limiter.submit_hold
        if hold is not None and hold.reason == "quota_exhausted":
            self._quota_held()
        now = time.time()
        self._paused_time.note(bool(self._paused) or self.submits_held, now)
        self._stopped_time.note(bool(self._paused), now)

    def paused_s(self, *, since: float) -> float:
        """Seconds submissions were paused or held since ``since`` (epoch seconds)."""
        return self._paused_time.within(since, time.time())

    def stopped_s(self, *, since: float) -> float:
        """Seconds every call (status calls too) was paused since ``since`` (epoch seconds)."""
        return self._stopped_time.within(since, time.time())

    def stop(self) -> None:
        """The engine stops: no more probing or watching."""
        self._stopping = True
        if self._probe_task is not None:
            self._probe_task.cancel()

    # ---- what DocuTray's answers tell ----

    def api_ok(self) -> None:
        """DocuTray answered (any answer that is not a transport failure)."""
        self._last_api_ok = time.monotonic()

    async def feedback(self, exc: BaseException, verdict: Verdict, *, budget: Budget) -> None:
        """A failed call: tell the limiter about a 429, pause for a systemic verdict, or for
        transport errors that have lasted ``unreachable_pause_after_s``."""
        if isinstance(exc, RateLimited):
            metrics.RATE_LIMITED.labels(budget).inc()
            # An hour or day window holds submissions on every replica until its reset.
            await self._limiter.on_rate_limited(
                budget,
                retry_after_s=exc.retry_after_s,
                limit_type=exc.limit_type,
                reset_at=exc.reset_at,
            )
        if isinstance(exc, QuotaExhausted):
            await self._quota_exhausted(exc)
        elif verdict.pause is not None:
            self._enter_pause(verdict.pause, describe_error(exc))
        elif verdict.transport:
            down_s = time.monotonic() - self._last_api_ok
            if down_s > self._s.unreachable_pause_after_s:
                self._enter_pause(
                    "api_unreachable", f"{describe_error(exc)}; no success for {down_s:.0f} s"
                )
        self.tick()

    def quota_back(self) -> None:
        """A submit was accepted: the quota episode (if any) is over on this replica."""
        if self._quota_since is None:
            return
        self._quota_since = None
        metrics.QUOTA_EXHAUSTED.set(0)
        log.info("quota_available", action="none: submissions resumed")

    # ---- consumption pauses and the probe ----

    def _enter_pause(self, reason: str, detail: str) -> None:
        if reason in self._paused:
            return
        self._paused.add(reason)
        self._kafka.pause(reason)
        action = _PAUSE_ACTIONS.get(reason, _UNREACHABLE_ACTION)
        log.error("consumption_paused_systemic", reason=reason, error=detail, action=action)
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        """While paused for a systemic reason, check DocuTray now and then; resume when it works."""
        while self._paused & set(SYSTEMIC_PAUSES) and not self._stopping:
            await asyncio.sleep(self._s.systemic_probe_interval_s)
            try:
                await self._limiter.acquire(
                    "status", deadline=time.monotonic() + self._s.systemic_probe_interval_s
                )
                await self._client.list_document_types(limit=1)
            except LimiterTimeout:
                continue
            except DocuTrayError as exc:
                log.warning("systemic_probe_failed", error=describe_error(exc))
                continue
            for reason in SYSTEMIC_PAUSES:
                if reason in self._paused:
                    self._paused.discard(reason)
                    self._kafka.resume(reason)
            self.api_ok()
            self.tick()
            log.info("consumption_resumed_systemic", action="none: DocuTray answers again")
            self._wake()

    # ---- the monthly quota and the shared submit gate (issue 14) ----

    async def _quota_exhausted(self, exc: QuotaExhausted) -> None:
        """A 402: pause submissions on every replica (shared gate, reason ``quota_exhausted``).

        The pause lasts until the quota's ``resetDate`` when DocuTray gave one, but never
        longer than ``BRIDGE_QUOTA_PROBE_INTERVAL_S``: when it ends, the next submissions are
        the probe (a plan upgraded mid-month is noticed; a quota still spent answers 402 and
        pauses again). Status calls go on; nothing is dead-lettered; the request that got
        the 402 is queued again without counting an attempt.
        """
        now = time.time()
        reset = exc.reset_at.timestamp() if exc.reset_at is not None else None
        until = now + self._s.quota_probe_interval_s
        if reset is not None and now < reset < until:
            until = reset
        first = self._quota_since is None
        self._quota_since = time.monotonic()
        metrics.QUOTA_EXHAUSTED.set(1)
        metrics.QUOTA_RESET.set(reset or 0)
        await self._limiter.pause_submissions("quota_exhausted", until=until)
        if first:
            log.error(
                "quota_exhausted",
                quota=exc.quota,
                used=exc.used,
                reset_at=exc.reset_at.isoformat() if exc.reset_at else None,
                retry_in_s=round(until - now, 1),
                action="DocuTray's monthly quota is spent: raise the plan's quota in DocuTray's "
                "dashboard or wait for its reset; submissions resume by themselves, "
                "conversions already submitted still complete",
            )

    def _quota_held(self) -> None:
        """The shared gate holds ``quota_exhausted`` (this replica's 402 or another's): this
        replica probes too when it ends, one submit at a time, and is unready until one is
        accepted (or it has nothing left to submit), as the replica that got the 402."""
        metrics.QUOTA_EXHAUSTED.set(1)
        if self._quota_since is None:
            self._quota_since = time.monotonic()
            log.warning(
                "quota_exhausted_shared",
                action="none: DocuTray's monthly quota is spent (a 402, on this or another "
                "replica); submissions resume by themselves, one probe at a time",
            )

    async def watch_submit_hold(self, *, every_s: float = 2.0) -> None:
        """Keep this replica's view of the shared submit gate fresh, and its gauges.

        A pause or block another replica set (a 402, an hour or day 429) is read from
        Redis every ``every_s``; a budget window the limiter itself reported ends on its
        own. Runs until cancelled; a failed read is retried on the next turn.
        """
        while not self._stopping:
            hold = self._limiter.submit_hold
            if hold is None or not hold.reason.startswith("budget_"):
                try:
                    hold = await self._limiter.read_submit_hold()
                except Exception as exc:  # the limiter falls back by itself; keep watching
                    log.warning("submit_hold_read_failed", error=repr(exc))
            reason = "" if hold is None else hold.reason
            _set_hold_gauges(reason)
            if reason == "quota_exhausted":
                self._quota_held()
            elif self._quota_since is not None and not self._waiting_to_submit():
                # The pause ended and nothing here waits to submit (another replica's submits
                # are the probe): this replica has nothing left to be unready for.
                self.quota_back()
            elif self._quota_since is None:
                metrics.QUOTA_EXHAUSTED.set(0)
            self.tick()
            if hold is None:
                self._wake()
            await asyncio.sleep(every_s)


def _set_hold_gauges(reason: str) -> None:
    """``docutray_bridge_submissions_held{reason}``: 1 for the reason holding now, else 0."""
    for label in metrics.SUBMIT_HOLD_REASONS:
        held = reason == label or (
            label == "other" and bool(reason) and reason not in metrics.SUBMIT_HOLD_REASONS
        )
        metrics.SUBMIT_HELD.labels(label).set(1 if held else 0)
