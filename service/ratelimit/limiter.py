"""The limiter callers use: per-budget waiting queues in front of a shared GCRA.

How a permit is handed out (one *lane* per Redis key: ``submit`` and
``status``, or one ``shared`` lane when both spend the same budget):

1. ``acquire`` queues the caller in its budget's FIFO and wakes the lane's
   dispatcher task.
2. The dispatcher asks the backend (Redis script, or the in-process twin) for
   the next permit and sleeps until the reserved instant. It holds one
   reservation at a time, or a few (see "Priority" below). Reservations are
   FIFO across replicas, so backlogged replicas take turns and nobody polls
   in a retry storm.
3. At that instant it asks again, in one round trip: "is the lane blocked by a
   429 since I reserved?" (if so the reserved permit is void), "is there room
   at the submit gate for the submissions I mean to serve?" and, when more
   callers wait, "reserve the next one".
4. Only then does it choose *who* gets the permit: on a shared lane the
   :class:`~service.ratelimit.policy.ShareScheduler` puts status polls first,
   up to ``status_share`` of the permits while submissions also wait; within a
   budget, the oldest caller whose deadline has not passed.

Because the choice is made at grant time, a caller that gives up (deadline,
cancellation) never strands a permit another caller could use.

The submit gate (submissions only; status calls never look at it): the
optional hour and day budgets (``submit_rate_per_hour``/``_per_day``, GCRA
shaped like the minute one, taken in the same script call as the minute
permit), the block an hour or day 429 publishes until its reset time
(:meth:`Limiter.on_rate_limited` with ``limit_type``), and a named pause any
replica may set and clear (:meth:`Limiter.pause_submissions`, e.g.
``quota_exhausted``). While the gate holds, submit callers wait (or time out
at once when their deadline is earlier), the dispatcher reserves no permits
for them, and it re-reads the gate every ``gate_recheck_s`` so a pause
cleared by another replica is seen.

Priority (status polls before new submissions, issue 14 item 5):

- In this process: when both wait, status callers get the permit, up to
  ``status_share`` (default 0.9) of the permits, so a flood of polls still
  leaves submissions a tenth (no starvation either way). A due poll waits at
  most for the permit already reserved, not behind the submit queue.
- Across replicas: GCRA hands out reservations first come, first served, so
  with one reservation each, N saturated replicas get 1/N of the budget each,
  whatever they spend it on. A replica whose polls fall behind (the oldest
  has waited ``priority_after_s``, default 2 s, the detection target) while
  submissions are taking the shared budget (the lane's Redis hash records
  when the gate last let one through, on any replica) may hold up to
  ``priority_depth`` reservations at once (one per waiting poll, taken in the
  same round trip as the confirm), so it gets ``k/(k+N-1)`` of the permits
  while its polls are due, taken from the other replicas' submissions, and
  falls back to one as soon as its polls are served. Nothing is over-issued
  (each reservation is an ordinary GCRA slot), the other replicas are
  slowed, never stopped, and reservations a 429 voids are dropped. Deeper
  holds lengthen the queue for every replica (measured: a depth of 4 held
  all the time cost ~15 % of the budget at the end of 8-s runs), hence both
  triggers. A Redis-side "priority window" that made submit-only replicas
  skip turns was considered and left out: a skipped slot is wasted unless
  someone fills it at once, and the depth already does that.

If Redis fails, the limiter runs every lane on :class:`LocalBackend` at
``configured / expected_replicas`` until a background probe sees Redis answer
again; ``acquire`` never raises because of Redis. The fallback starts from
the blocks Redis last reported (the later of the shared and the local one
always wins), so a shared 429 keeps holding while Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

import structlog
from redis.exceptions import RedisClusterException, RedisError

from service.ratelimit.exceptions import LimiterClosed, LimiterTimeout
from service.ratelimit.local_backend import LocalBackend
from service.ratelimit.policy import (
    BUDGETS,
    DAY_S,
    FAR,
    FOREVER,
    HOUR_S,
    NEVER,
    AimdParams,
    Answer,
    Budget,
    Feedback,
    GateOp,
    ShareScheduler,
    gcra_shape,
)
from service.ratelimit.redis_backend import RedisBackend, connect

log = structlog.get_logger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]
"""Receives ``(event, fields)``; events: ``waited``, ``timeout``, ``rate_limited``,
``degraded``, ``effective_rate``, ``submit_hold`` (see :class:`Limiter`)."""

Mode = Literal["redis", "local"]

# OSError covers builtin TimeoutError and ConnectionError; RedisClusterException is not a
# RedisError ("no reachable node", "slot not covered" while a cluster fails over).
_REDIS_FAILURES = (RedisError, RedisClusterException, OSError)

_SUBMITS_RECENT_S = 5.0
"""Submissions granted this recently (any replica) compete with polls for a shared budget."""

LONG_WINDOWS: dict[str, float] = {"hour": HOUR_S, "day": DAY_S}
"""The 429 ``limitType`` values that block submissions until their reset, not for a minute."""


@dataclass(frozen=True, slots=True)
class SubmitHold:
    """Why submissions are held on every replica, and for how long (``inf``: until cleared)."""

    reason: str
    for_s: float


class RateLimiter(Protocol):
    """What the pipeline needs from a limiter (the Redis-backed one, or the in-process one)."""

    async def acquire(self, budget: Budget, *, deadline: float | None = None) -> float:
        """Wait (cooperatively) for one permit; return the seconds waited.

        ``deadline`` is on the ``time.monotonic()`` clock. Raises
        :class:`LimiterTimeout` at once when the permit provably cannot come
        before it (the lane is blocked past it, or its next permit is later),
        and otherwise at the deadline itself, never later.
        """
        ...

    async def on_rate_limited(
        self,
        budget: Budget,
        *,
        retry_after_s: float | None,
        limit_type: str | None = None,
        reset_at: datetime | float | None = None,
    ) -> None:
        """A 429 came back: block every replica for ``retry_after_s`` and lower the rate; for an
        hour or day ``limit_type``, hold submissions on every replica until ``reset_at``."""
        ...

    def on_success(self, budget: Budget) -> None:
        """A call went through: lets the effective rate climb back toward the configured one."""
        ...

    async def pause_submissions(
        self, reason: str, *, until: datetime | float | None = None
    ) -> SubmitHold | None:
        """Hold submissions on every replica until ``until`` (None: until resumed)."""
        ...

    async def resume_submissions(self, reason: str | None = None) -> SubmitHold | None:
        """End the pause (only if it has ``reason``, when given); return what still holds."""
        ...

    async def read_submit_hold(self) -> SubmitHold | None:
        """The shared block or pause on submissions now (read from Redis), None if none."""
        ...

    @property
    def submit_hold(self) -> SubmitHold | None:
        """The block or pause on submissions as last seen (no I/O)."""
        ...

    def effective_rate_per_minute(self, budget: Budget) -> float:
        """The rate currently enforced for ``budget`` (this replica's share when degraded)."""
        ...

    def configured_rate_per_minute(self, budget: Budget) -> float:
        """The configured rate for ``budget`` (the submit rate for both on a shared budget)."""
        ...

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and the limiter runs on its local share."""
        ...

    def describe(self) -> dict[str, Any]:
        """Readiness details: mode, degraded, rates, blocks and queue lengths (no secrets)."""
        ...

    async def close(self) -> None:
        """Stop the dispatchers, fail waiting callers with :class:`LimiterClosed`, close Redis."""
        ...


@dataclass(eq=False, slots=True)
class _Waiter:
    budget: Budget
    deadline: float | None
    future: asyncio.Future[None]
    since: float = 0.0


@dataclass(eq=False)
class _Lane:
    """One budget key: its queues, its reservations, and what the backend last said."""

    name: str
    budgets: tuple[Budget, ...]
    configured_per_minute: float
    effective_per_minute: float
    picker: ShareScheduler[Budget] | None
    queues: dict[Budget, deque[_Waiter]] = field(default_factory=dict)
    held: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    submit_blocked_until: float = 0.0
    submit_reason: str = ""
    gate_read_at: float = -math.inf
    last_submit_at: float = -math.inf
    want_increase: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.queues = {b: deque() for b in self.budgets}

    @property
    def carries_submits(self) -> bool:
        return "submit" in self.budgets

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def gated(self, budget: Budget, now: float) -> bool:
        return budget == "submit" and now < self.submit_blocked_until

    def servable(self, now: float) -> dict[Budget, int]:
        """Waiters per budget that a permit could serve now (the gate may hold submissions)."""
        return {b: len(q) for b, q in self.queues.items() if q and not self.gated(b, now)}

    def earliest_grant_at(self, budget: Budget, now: float) -> float:
        """A lower bound on when a caller queued now could get a permit."""
        at = max(now, self.blocked_until, self.held[0] if self.held else now)
        return max(at, self.submit_blocked_until) if budget == "submit" else at

    def discard(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.queues[waiter.budget].remove(waiter)

    def plan(self, servable: dict[Budget, int], permits: int) -> str:
        """Who the next ``permits`` permits would go to (``s``/``t``), if nothing changes."""
        ready = list(servable)
        if not ready or permits <= 0:
            return ""
        order = self.picker.preview(ready, permits) if self.picker else [ready[0]] * permits
        return "".join("s" if b == "submit" else "t" for b in order)

    def _pop(self, budget: Budget, now: float) -> _Waiter | None:
        queue = self.queues[budget]
        while queue:
            waiter = queue.popleft()
            if waiter.future.done():
                continue
            if waiter.deadline is not None and waiter.deadline < now:
                continue  # it is timing out; a late permit would break its deadline
            return waiter
        return None

    def grant(self, now: float, permits: int, *, submit_permits: int) -> int:
        """Hand out ``permits`` permits by share and FIFO; a submission needs one of the
        ``submit_permits`` the gate let through. Returns how many found a caller."""
        granted = 0
        for _ in range(permits):
            while True:
                ready = [
                    b
                    for b in self.budgets
                    if self.queues[b] and (b != "submit" or submit_permits > 0)
                ]
                if not ready:
                    return granted
                budget = self.picker.pick(ready) if self.picker else ready[0]
                waiter = self._pop(budget, now)
                if waiter is None:
                    continue
                waiter.future.set_result(None)
                granted += 1
                if budget == "submit":
                    submit_permits -= 1
                break
        return granted


class Limiter:
    """The :class:`RateLimiter` implementation; build it with :func:`build_limiter`.

    Hooks: ``on_event(name, fields)`` is called with
    ``("waited", {"budget", "seconds"})`` per permit,
    ``("timeout", {"budget"})`` per :class:`LimiterTimeout`,
    ``("rate_limited", {"budget", "hold_s", "decreased"})`` per reported 429,
    ``("degraded", {"degraded"})`` on each switch,
    ``("effective_rate", {"budget", "per_minute"})`` when a rate changes, and
    ``("submit_hold", {"reason", "for_s"})`` when the reason submissions are
    held changes (``reason`` empty: no longer held).
    A hook that raises is logged and otherwise ignored.
    """

    def __init__(
        self,
        *,
        redis: RedisBackend | None,
        submit_rate_per_minute: float,
        status_rate_per_minute: float,
        shared_budget: bool,
        burst: int,
        expected_replicas: int,
        status_share: float = 0.9,
        params: AimdParams | None = None,
        default_hold_s: float = 1.0,
        max_hold_s: float = 3600.0,
        probe_interval_s: float = 2.0,
        redis_op_timeout_s: float = 2.0,
        on_event: EventHook | None = None,
        submit_rate_per_hour: float | None = None,
        submit_rate_per_day: float | None = None,
        priority_depth: int = 4,
        priority_after_s: float = 2.0,
        gate_recheck_s: float = 1.0,
        default_long_hold_s: float = 60.0,
    ) -> None:
        if submit_rate_per_minute <= 0 or status_rate_per_minute <= 0:
            raise ValueError("rates must be positive")
        if (submit_rate_per_hour is not None and submit_rate_per_hour <= 0) or (
            submit_rate_per_day is not None and submit_rate_per_day <= 0
        ):
            raise ValueError("hour and day rates must be positive when set")
        if burst < 1 or expected_replicas < 1 or priority_depth < 1:
            raise ValueError("burst, expected_replicas and priority_depth must be at least 1")
        if not 0 < status_share < 1:
            raise ValueError("status_share must be between 0 and 1")
        self._params = params or AimdParams()
        self._redis = redis
        self._local = LocalBackend(params=self._params)
        self._burst = burst
        self._expected_replicas = expected_replicas
        self._shared_budget = shared_budget
        self._default_hold_s = default_hold_s
        self._max_hold_s = max_hold_s
        self._probe_interval_s = probe_interval_s
        self._redis_op_timeout_s = redis_op_timeout_s
        self._on_event = on_event
        self._per_hour = submit_rate_per_hour or 0.0
        self._per_day = submit_rate_per_day or 0.0
        self._priority_depth = priority_depth if shared_budget else 1
        self._priority_after_s = priority_after_s
        self._max_ahead_slots = 2 * expected_replicas * priority_depth + 16
        self._gate_recheck_s = gate_recheck_s
        self._default_long_hold_s = default_long_hold_s
        self._degraded = False
        self._degraded_since = 0.0
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_hold_reason = ""
        self._lanes: dict[Budget, _Lane] = {}
        if shared_budget:
            shared = _Lane(
                "shared",
                BUDGETS,
                submit_rate_per_minute,
                submit_rate_per_minute,
                # Status first in the order: it wins ties, so a lone poll never waits its turn.
                ShareScheduler({"status": status_share, "submit": 1.0 - status_share}),
            )
            self._lanes = {"submit": shared, "status": shared}
        else:
            rates = {"submit": submit_rate_per_minute, "status": status_rate_per_minute}
            for budget in BUDGETS:
                self._lanes[budget] = _Lane(budget, (budget,), rates[budget], rates[budget], None)

    # -- the RateLimiter interface ------------------------------------------------------

    async def acquire(self, budget: Budget, *, deadline: float | None = None) -> float:
        if self._closed:
            raise LimiterClosed("the limiter is closed")
        lane = self._lanes[budget]
        start = time.monotonic()
        if deadline is not None and self._provably_late(lane, budget, start, deadline):
            self._emit("timeout", budget=budget)
            raise LimiterTimeout(f"no {budget} permit before the deadline")
        waiter = _Waiter(budget, deadline, asyncio.get_running_loop().create_future(), start)
        lane.queues[budget].append(waiter)
        self._start(lane)
        lane.wakeup.set()
        try:
            if deadline is None:
                await waiter.future
            else:
                await asyncio.wait([waiter.future], timeout=max(0.0, deadline - start))
                if not waiter.future.done():
                    self._emit("timeout", budget=budget)
                    raise LimiterTimeout(f"no {budget} permit before the deadline")
                waiter.future.result()  # raises LimiterClosed if we were closed meanwhile
        finally:
            lane.discard(waiter)
            if not waiter.future.done():
                waiter.future.cancel()
        waited = time.monotonic() - start
        self._emit("waited", budget=budget, seconds=waited)
        return waited

    def _provably_late(self, lane: _Lane, budget: Budget, now: float, deadline: float) -> bool:
        if max(now, lane.blocked_until, lane.held[0] if lane.held else now) > deadline:
            return True
        # The gate: only on a fresh view (another replica may have cleared a pause since).
        fresh = now - lane.gate_read_at < self._gate_recheck_s
        return budget == "submit" and fresh and lane.submit_blocked_until > deadline

    async def on_rate_limited(
        self,
        budget: Budget,
        *,
        retry_after_s: float | None,
        limit_type: str | None = None,
        reset_at: datetime | float | None = None,
    ) -> None:
        """Report a 429.

        A minute window (or an unknown ``limit_type``): block the budget's lane
        on every replica for ``retry_after_s`` (or ``default_hold_s``) and
        lower the effective rate. An hour or day window: hold *submissions*
        on every replica until ``reset_at`` (an aware datetime or epoch
        seconds; else ``retry_after_s``, else ``default_long_hold_s``), with no
        rate decrease; status calls go on (a status call that got it still
        backs off its own lane for ``retry_after_s``).
        """
        window_s = LONG_WINDOWS.get((limit_type or "").lower())
        if window_s is None:
            await self._minute_limited(budget, retry_after_s)
            return
        hold_s = _seconds_until(reset_at)
        if hold_s is None:
            hold_s = retry_after_s if retry_after_s and retry_after_s > 0 else None
        hold_s = min(hold_s or self._default_long_hold_s, window_s + 60.0)
        reason = f"rate_limit_{(limit_type or '').lower()}"
        await self._gate_op("block", hold_s=hold_s, reason=reason)
        log.warning(
            "api_rate_limited",
            budget=budget,
            limit_type=limit_type,
            hold_s=round(hold_s, 3),
            action="none: submissions wait on every replica until the window resets; "
            "status calls go on",
        )
        self._emit("rate_limited", budget=budget, hold_s=hold_s, decreased=False)
        if budget == "status":
            await self._minute_limited(budget, retry_after_s)

    async def _minute_limited(self, budget: Budget, retry_after_s: float | None) -> None:
        lane = self._lanes[budget]
        hold_s = retry_after_s if retry_after_s is not None and retry_after_s > 0 else None
        hold_s = min(hold_s or self._default_hold_s, self._max_hold_s)
        feedback = await self._rate_limited(lane, hold_s=hold_s)
        now = time.monotonic()
        lane.blocked_until = max(lane.blocked_until, now + feedback.blocked_for_s)
        self._set_effective(lane, feedback.effective_per_minute)
        log.warning(
            "api_rate_limited",
            budget=budget,
            lane=lane.name,
            hold_s=round(hold_s, 3),
            decreased=feedback.decreased,
            effective_per_minute=round(feedback.effective_per_minute, 3),
        )
        self._emit("rate_limited", budget=budget, hold_s=hold_s, decreased=feedback.decreased)

    def on_success(self, budget: Budget) -> None:
        self._lanes[budget].want_increase = True

    async def pause_submissions(
        self, reason: str, *, until: datetime | float | None = None
    ) -> SubmitHold | None:
        """Hold submissions on every replica until ``until`` (an aware datetime or epoch
        seconds; None: until :meth:`resume_submissions`), with ``reason`` (e.g.
        ``quota_exhausted``). A new pause replaces the previous one. Returns what holds now."""
        if not reason:
            raise ValueError("a pause needs a reason")
        hold_s = _seconds_until(until)
        if until is not None and hold_s is None:
            return await self.read_submit_hold()  # already past: nothing to pause
        log.warning(
            "submissions_paused",
            reason=reason,
            for_s=None if hold_s is None else round(hold_s, 1),
        )
        return await self._gate_op(
            "pause", hold_s=-1.0 if hold_s is None else hold_s, reason=reason
        )

    async def resume_submissions(self, reason: str | None = None) -> SubmitHold | None:
        """End the pause on every replica (only a pause with ``reason``, when given); an hour
        or day 429 block still holds until its reset. Returns what holds now."""
        hold = await self._gate_op("resume", hold_s=0.0, reason=reason or "")
        log.info("submissions_resumed", reason=reason, still_held_by=hold.reason if hold else None)
        return hold

    async def read_submit_hold(self) -> SubmitHold | None:
        """The shared block or pause on submissions now, read from Redis (or the local state)."""
        return await self._gate_op("read", hold_s=0.0, reason="")

    @property
    def submit_hold(self) -> SubmitHold | None:
        """The block, pause or window holding submissions back, as the dispatcher last saw it."""
        lane = self._lanes["submit"]
        left = lane.submit_blocked_until - time.monotonic()
        if left <= 0 or not lane.submit_reason:
            return None
        return SubmitHold(lane.submit_reason, math.inf if left > FAR / 2 else left)

    def effective_rate_per_minute(self, budget: Budget) -> float:
        return self._lanes[budget].effective_per_minute

    def configured_rate_per_minute(self, budget: Budget) -> float:
        return self._lanes[budget].configured_per_minute

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def mode(self) -> Mode:
        """``redis`` when built with a Redis URL (even while degraded), else ``local``."""
        return "redis" if self._redis is not None else "local"

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        budgets: dict[str, Any] = {}
        for budget, lane in self._lanes.items():
            interval_s, _ = gcra_shape(lane.effective_per_minute, self._burst)
            budgets[budget] = {
                "lane": lane.name,
                "configured_per_minute": lane.configured_per_minute,
                "effective_per_minute": round(lane.effective_per_minute, 3),
                "sustained_per_minute": round(60 / interval_s, 3),
                "blocked_for_s": round(max(0.0, lane.blocked_until - now), 3),
                "waiting": len(lane.queues[budget]),
            }
        hold = self.submit_hold
        return {
            "mode": self.mode,
            "degraded": self._degraded,
            "shared_budget": self._shared_budget,
            "burst": self._burst,
            "expected_replicas": self._expected_replicas,
            "submit_per_hour": self._per_hour or None,
            "submit_per_day": self._per_day or None,
            "submit_held": None
            if hold is None
            else {
                "reason": hold.reason,
                "for_s": None if math.isinf(hold.for_s) else round(hold.for_s, 1),
            },
            "budgets": budgets,
        }

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [lane.task for lane in set(self._lanes.values()) if lane.task is not None]
        if self._probe_task is not None:
            tasks.append(self._probe_task)
        for task in tasks:
            task.cancel()
        # Bounded: a dispatcher must never keep the process from stopping.
        _, stuck = await asyncio.wait(tasks, timeout=5.0) if tasks else (set(), set())
        if stuck:
            log.error("limiter_close_stuck", tasks=sorted(t.get_name() for t in stuck))
        for lane in set(self._lanes.values()):
            for queue in lane.queues.values():
                while queue:
                    waiter = queue.popleft()
                    if not waiter.future.done():
                        waiter.future.set_exception(LimiterClosed("the limiter was closed"))
        if self._redis is not None:
            with contextlib.suppress(*_REDIS_FAILURES):
                async with asyncio.timeout(self._redis_op_timeout_s):
                    await self._redis.close()

    # -- the dispatcher -----------------------------------------------------------------

    def _start(self, lane: _Lane) -> None:
        if lane.task is None or lane.task.done():
            lane.task = asyncio.get_running_loop().create_task(
                self._dispatch(lane), name=f"ratelimit-{lane.name}"
            )

    async def _dispatch(self, lane: _Lane) -> None:
        """Steps 2-4 of the module docstring, forever (until close)."""
        while True:
            try:
                await self._dispatch_once(lane)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not strand every waiter: log, breathe, carry on.
                log.exception("limiter_dispatch_failed", lane=lane.name)
                lane.held.clear()
                await asyncio.sleep(0.1)

    def _depth(self, lane: _Lane, servable: dict[Budget, int], now: float) -> int:
        """How many reservations to hold: one per waiting poll, up to ``priority_depth``, on a
        shared lane whose oldest poll has waited ``priority_after_s``; otherwise one (see
        "Priority" in the module docstring). Deeper holds cost every replica latency, so they
        are kept for polls that really fall behind."""
        polls = servable.get("status", 0) if lane.picker is not None else 0
        if polls == 0 or now - lane.queues["status"][0].since < self._priority_after_s:
            return 1
        if now - lane.last_submit_at > _SUBMITS_RECENT_S:
            return 1  # nobody's submissions compete: holding more would only add latency
        return max(1, min(sum(servable.values()), polls, self._priority_depth))

    async def _dispatch_once(self, lane: _Lane) -> None:
        lane.wakeup.clear()
        now = time.monotonic()
        servable = lane.servable(now)
        if not servable:
            await self._idle(lane, now)
            return
        depth = self._depth(lane, servable, now)
        holding = bool(lane.held) and lane.held[0] <= now
        if holding:
            lane.held.popleft()
        elif len(lane.held) >= depth:
            # Wait for the earliest reservation (a new caller may change the depth meanwhile).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(lane.held[0] - now):
                    await lane.wakeup.wait()
            return
        # Step 3: confirm the held permit and/or top the reservations up, in one round trip.
        remaining = sum(servable.values()) - (1 if holding else 0)
        slots = max(0, min(remaining, depth) - len(lane.held))
        plan = lane.plan(servable, (1 if holding else 0) + slots)
        answer = await self._reserve(
            lane, slots=slots, holding=holding, plan=plan if lane.carries_submits else None
        )
        now = time.monotonic()
        self._take_answer(lane, answer, now)
        usable = 1 if holding and now >= lane.blocked_until else 0
        if answer.reserved_in_s is not None:
            for reserved_in in (answer.reserved_in_s, *answer.more_in_s):
                if reserved_in <= 0 and now >= lane.blocked_until:
                    usable += 1  # the script checked the block: it is ours now
                else:
                    lane.held.append(max(now + reserved_in, lane.blocked_until))
        lane.grant(now, usable, submit_permits=answer.submits_granted)

    async def _idle(self, lane: _Lane, now: float) -> None:
        """Nobody can be served: sleep until a caller comes, or (when submissions wait at the
        gate) until the gate may open or is due for a re-read."""
        # Reservations nobody can use now are void: using them late would bunch permits.
        while lane.held and lane.held[0] < now:
            lane.held.popleft()
        if not lane.waiting():
            await lane.wakeup.wait()
            return
        reread_at = lane.gate_read_at + self._gate_recheck_s
        timeout = max(0.0, min(lane.submit_blocked_until, reread_at) - now)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await lane.wakeup.wait()
                return
        answer = await self._reserve(lane, slots=0, holding=False, plan="")
        self._take_answer(lane, answer, time.monotonic())

    def _take_answer(self, lane: _Lane, answer: Answer, now: float) -> None:
        # The later block wins: a fallback that knows no block must not lift a shared one.
        lane.blocked_until = max(lane.blocked_until, now + answer.blocked_for_s)
        while lane.held and lane.held[0] < lane.blocked_until:
            lane.held.popleft()  # reservations a 429 voided
        self._set_effective(lane, answer.effective_per_minute)
        lane.last_submit_at = now - min(answer.since_submit_s, 1e9)
        if lane.carries_submits:
            lane.gate_read_at = now
            self._set_submit_hold(lane, now, answer.submit_wait_s, answer.submit_reason)

    def _set_submit_hold(self, lane: _Lane, now: float, wait_s: float, reason: str) -> None:
        lane.submit_blocked_until = now + wait_s if wait_s > 0 else 0.0
        lane.submit_reason = reason if wait_s > 0 else ""
        if lane.submit_reason != self._last_hold_reason:
            self._last_hold_reason = lane.submit_reason
            self._emit(
                "submit_hold",
                reason=lane.submit_reason,
                for_s=math.inf if wait_s > FAR / 2 else max(0.0, wait_s),
            )

    # -- backends and fallback ----------------------------------------------------------

    def _share(self) -> int:
        return self._expected_replicas if self._degraded else 1

    def _local_rate(self, lane: _Lane) -> float:
        return lane.configured_per_minute / self._share()

    async def _reserve(self, lane: _Lane, *, slots: int, holding: bool, plan: str | None) -> Answer:
        want_increase, lane.want_increase = lane.want_increase, False
        if self._redis is not None and not self._degraded:
            try:
                async with asyncio.timeout(self._redis_op_timeout_s):
                    return await self._redis.reserve(
                        lane.name,
                        configured_per_minute=lane.configured_per_minute,
                        burst=self._burst,
                        want_slot=slots > 0,
                        extra_slots=max(0, slots - 1),
                        want_increase=want_increase,
                        holding=holding,
                        plan=plan,
                        per_hour=self._per_hour,
                        per_day=self._per_day,
                        max_ahead_slots=self._max_ahead_slots,
                    )
            except _REDIS_FAILURES as exc:
                self._degrade(exc)
        return await self._local.reserve(
            lane.name,
            configured_per_minute=self._local_rate(lane),
            burst=self._burst,
            want_slot=slots > 0,
            extra_slots=max(0, slots - 1),
            want_increase=want_increase,
            holding=holding,
            plan=plan,
            per_hour=self._per_hour / self._share(),
            per_day=self._per_day / self._share(),
            max_ahead_slots=self._max_ahead_slots,
        )

    async def _rate_limited(self, lane: _Lane, *, hold_s: float) -> Feedback:
        if self._redis is not None and not self._degraded:
            try:
                async with asyncio.timeout(self._redis_op_timeout_s):
                    return await self._redis.rate_limited(
                        lane.name,
                        configured_per_minute=lane.configured_per_minute,
                        hold_s=hold_s,
                    )
            except _REDIS_FAILURES as exc:
                self._degrade(exc)
        return await self._local.rate_limited(
            lane.name, configured_per_minute=self._local_rate(lane), hold_s=hold_s
        )

    async def _gate_op(self, op: GateOp, *, hold_s: float, reason: str) -> SubmitHold | None:
        """Run ``op`` on the shared submit gate (local while degraded); update this replica's
        view and wake the submit dispatcher so it acts on it at once."""
        result: tuple[float, str] | None = None
        if self._redis is not None and not self._degraded:
            try:
                async with asyncio.timeout(self._redis_op_timeout_s):
                    result = await self._redis.gate(op, hold_s=hold_s, reason=reason)
            except _REDIS_FAILURES as exc:
                self._degrade(exc)
        if result is None:
            result = await self._local.gate(op, hold_s=hold_s, reason=reason)
        held_for_s, held_reason = result
        lane = self._lanes["submit"]
        # The block or pause as the gate says now; when neither holds, the windows (which
        # this op does not report) are re-read by the dispatcher's next call.
        self._set_submit_hold(lane, time.monotonic(), held_for_s, held_reason)
        lane.gate_read_at = time.monotonic() if held_for_s > 0 else -math.inf
        lane.wakeup.set()
        if held_for_s <= 0:
            return None
        return SubmitHold(held_reason, math.inf if held_for_s > FAR / 2 else held_for_s)

    def _degrade(self, exc: BaseException) -> None:
        if self._degraded or self._closed:
            return
        self._degraded = True
        self._degraded_since = time.monotonic()
        for lane in set(self._lanes.values()):
            local_rate = self._local_rate(lane)
            self._local.seed(
                lane.name,
                configured_per_minute=local_rate,
                effective_per_minute=lane.effective_per_minute / self._expected_replicas,
                blocked_until=lane.blocked_until or NEVER,
            )
        submit = self._lanes["submit"]
        reason, until = submit.submit_reason, submit.submit_blocked_until
        if until - time.monotonic() > FAR / 2:
            until = FOREVER
        if reason.startswith("rate_limit_"):
            self._local.seed_gate(
                blocked_until=until, blocked_reason=reason, paused_until=NEVER, pause_reason=""
            )
        elif reason and not reason.startswith("budget_"):
            self._local.seed_gate(
                blocked_until=NEVER, blocked_reason="", paused_until=until, pause_reason=reason
            )
        log.warning(
            "limiter_degraded",
            reason=f"{type(exc).__name__}: {exc}",
            expected_replicas=self._expected_replicas,
            action="running on local share rate/N; check Redis",
        )
        self._emit("degraded", degraded=True)
        self._probe_task = asyncio.get_running_loop().create_task(
            self._probe(), name="ratelimit-redis-probe"
        )

    async def _probe(self) -> None:
        """Every few seconds (jittered), run the acquire script without reserving; switch
        back once it answers. Running the script, not just PING, also waits out a Redis that
        answers but cannot run it (read-only replica after a failover, script error)."""
        assert self._redis is not None
        lane = next(iter(self._lanes.values()))
        rng = random.Random()
        while True:
            await asyncio.sleep(self._probe_interval_s * rng.uniform(0.8, 1.2))
            try:
                async with asyncio.timeout(self._redis_op_timeout_s):
                    await self._redis.reserve(
                        lane.name,
                        configured_per_minute=lane.configured_per_minute,
                        burst=self._burst,
                        want_slot=False,
                        want_increase=False,
                    )
            except _REDIS_FAILURES:
                continue
            self._degraded = False
            log.info(
                "limiter_recovered",
                degraded_for_s=round(time.monotonic() - self._degraded_since, 1),
            )
            self._emit("degraded", degraded=False)
            return

    # -- hooks ------------------------------------------------------------------------

    def _set_effective(self, lane: _Lane, per_minute: float) -> None:
        if abs(per_minute - lane.effective_per_minute) < 1e-9:
            return
        lane.effective_per_minute = per_minute
        for budget in lane.budgets:
            self._emit("effective_rate", budget=budget, per_minute=per_minute)

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event, fields)
        except Exception:
            log.exception("limiter_event_hook_failed", limiter_event=event)


def _seconds_until(at: datetime | float | None) -> float | None:
    """Seconds from now (wall clock) until ``at`` (aware datetime or epoch seconds); None when
    unknown or already past."""
    if at is None:
        return None
    epoch = at.timestamp() if isinstance(at, datetime) else float(at)
    left = epoch - time.time()
    return left if left > 0 and math.isfinite(left) else None


def build_limiter(
    *,
    redis_url: str | None,
    submit_rate_per_minute: float,
    status_rate_per_minute: float,
    shared_budget: bool,
    burst: int,
    expected_replicas: int,
    key_prefix: str,
    on_event: EventHook | None = None,
    status_share: float = 0.9,
    params: AimdParams | None = None,
    default_hold_s: float = 1.0,
    probe_interval_s: float = 2.0,
    socket_timeout_s: float = 0.5,
    submit_rate_per_hour: float | None = None,
    submit_rate_per_day: float | None = None,
    priority_depth: int = 4,
    priority_after_s: float = 2.0,
) -> Limiter:
    """The limiter for this replica: shared through Redis when ``redis_url`` is set, else local.

    No I/O happens here; the first ``acquire`` connects. ``key_prefix``
    prefixes every Redis key (see :func:`~service.ratelimit.redis_backend.lane_key`).
    ``status_share`` is the largest fraction of a shared budget status polls
    take, first, while submissions also wait. ``submit_rate_per_hour`` and
    ``submit_rate_per_day`` (None: off) are budgets submissions must also fit.
    """
    aimd = params or AimdParams()
    redis = None
    if redis_url:
        client = connect(
            redis_url, socket_timeout_s=socket_timeout_s, connect_timeout_s=socket_timeout_s
        )
        redis = RedisBackend(client, key_prefix=key_prefix, params=aimd)
    return Limiter(
        redis=redis,
        submit_rate_per_minute=submit_rate_per_minute,
        status_rate_per_minute=status_rate_per_minute,
        shared_budget=shared_budget,
        burst=burst,
        expected_replicas=expected_replicas,
        status_share=status_share,
        params=aimd,
        default_hold_s=default_hold_s,
        probe_interval_s=probe_interval_s,
        on_event=on_event,
        submit_rate_per_hour=submit_rate_per_hour,
        submit_rate_per_day=submit_rate_per_day,
        priority_depth=priority_depth,
        priority_after_s=priority_after_s,
    )
