"""The limiter callers use: per-budget waiting queues in front of a shared GCRA.

How a permit is handed out (one *lane* per Redis key: ``submit`` and
``status``, or one ``shared`` lane when both spend the same budget):

1. ``acquire`` queues the caller in its budget's FIFO and wakes the lane's
   dispatcher task.
2. The dispatcher holds at most one reservation at a time: it asks the
   backend (Redis script, or the in-process twin) for the next permit and
   sleeps until the reserved instant. Reservations are FIFO across replicas,
   so backlogged replicas take turns and nobody polls in a retry storm.
3. At that instant it asks again, in one round trip: "is the lane blocked by a
   429 since I reserved?" (if so the reserved permit is void) and, when more
   callers wait, "reserve the next one".
4. Only then does it choose *who* gets the permit: on a shared lane the
   :class:`~service.ratelimit.policy.ShareScheduler` gives status polls their
   share however many submissions queue; within a budget, the oldest caller
   whose deadline has not passed.

Because the choice is made at grant time, a caller that gives up (deadline,
cancellation) never strands a permit another caller could use.

If Redis fails, the limiter runs every lane on :class:`LocalBackend` at
``configured / expected_replicas`` until a background probe sees Redis answer
again; ``acquire`` never raises because of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog
from redis.exceptions import RedisError

from service.ratelimit.exceptions import LimiterClosed, LimiterTimeout
from service.ratelimit.local_backend import LocalBackend
from service.ratelimit.policy import (
    BUDGETS,
    AimdParams,
    Answer,
    Budget,
    Feedback,
    ShareScheduler,
    gcra_shape,
)
from service.ratelimit.redis_backend import RedisBackend, connect

log = structlog.get_logger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]
"""Receives ``(event, fields)``; events: ``waited``, ``timeout``, ``rate_limited``,
``degraded``, ``effective_rate`` (see :class:`Limiter`)."""

Mode = Literal["redis", "local"]

_REDIS_FAILURES = (RedisError, OSError)  # OSError covers builtin TimeoutError and ConnectionError


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

    async def on_rate_limited(self, budget: Budget, *, retry_after_s: float | None) -> None:
        """A 429 came back: block every replica for ``retry_after_s`` and lower the rate."""
        ...

    def on_success(self, budget: Budget) -> None:
        """A call went through: lets the effective rate climb back toward the configured one."""
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


@dataclass(eq=False)
class _Lane:
    """One budget key: its queues, its reservation, and what the backend last said."""

    name: str
    budgets: tuple[Budget, ...]
    configured_per_minute: float
    effective_per_minute: float
    picker: ShareScheduler[Budget] | None
    queues: dict[Budget, deque[_Waiter]] = field(default_factory=dict)
    held_at: float | None = None
    blocked_until: float = 0.0
    want_increase: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.queues = {b: deque() for b in self.budgets}

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def earliest_grant_at(self, now: float) -> float:
        """A lower bound on when a caller queued now could get a permit."""
        return max(now, self.blocked_until, self.held_at or now)

    def discard(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.queues[waiter.budget].remove(waiter)

    def grant(self, now: float) -> _Waiter | None:
        """Hand one permit to the next caller by share and FIFO; None if nobody can use it."""
        while True:
            ready = [b for b in self.budgets if self.queues[b]]
            if not ready:
                return None
            budget = self.picker.pick(ready) if self.picker else ready[0]
            queue = self.queues[budget]
            while queue:
                waiter = queue.popleft()
                if waiter.future.done():
                    continue
                if waiter.deadline is not None and waiter.deadline < now:
                    continue  # it is timing out; a late permit would break its deadline
                waiter.future.set_result(None)
                return waiter


class Limiter:
    """The :class:`RateLimiter` implementation; build it with :func:`build_limiter`.

    Hooks: ``on_event(name, fields)`` is called with
    ``("waited", {"budget", "seconds"})`` per permit,
    ``("timeout", {"budget"})`` per :class:`LimiterTimeout`,
    ``("rate_limited", {"budget", "hold_s", "decreased"})`` per reported 429,
    ``("degraded", {"degraded"})`` on each switch, and
    ``("effective_rate", {"budget", "per_minute"})`` when a rate changes.
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
        status_share: float = 0.5,
        params: AimdParams | None = None,
        default_hold_s: float = 1.0,
        max_hold_s: float = 3600.0,
        probe_interval_s: float = 2.0,
        redis_op_timeout_s: float = 2.0,
        on_event: EventHook | None = None,
    ) -> None:
        if submit_rate_per_minute <= 0 or status_rate_per_minute <= 0:
            raise ValueError("rates must be positive")
        if burst < 1 or expected_replicas < 1:
            raise ValueError("burst and expected_replicas must be at least 1")
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
        self._degraded = False
        self._degraded_since = 0.0
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        self._lanes: dict[Budget, _Lane] = {}
        if shared_budget:
            shared = _Lane(
                "shared",
                BUDGETS,
                submit_rate_per_minute,
                submit_rate_per_minute,
                ShareScheduler({"submit": 1.0 - status_share, "status": status_share}),
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
        if deadline is not None and lane.earliest_grant_at(start) > deadline:
            self._emit("timeout", budget=budget)
            raise LimiterTimeout(f"no {budget} permit before the deadline")
        waiter = _Waiter(budget, deadline, asyncio.get_running_loop().create_future())
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

    async def on_rate_limited(self, budget: Budget, *, retry_after_s: float | None) -> None:
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
        return {
            "mode": self.mode,
            "degraded": self._degraded,
            "shared_budget": self._shared_budget,
            "burst": self._burst,
            "expected_replicas": self._expected_replicas,
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
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in set(self._lanes.values()):
            for queue in lane.queues.values():
                while queue:
                    waiter = queue.popleft()
                    if not waiter.future.done():
                        waiter.future.set_exception(LimiterClosed("the limiter was closed"))
        if self._redis is not None:
            with contextlib.suppress(*_REDIS_FAILURES):
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
                lane.held_at = None
                await asyncio.sleep(0.1)

    async def _dispatch_once(self, lane: _Lane) -> None:
        while not lane.waiting():
            lane.wakeup.clear()
            await lane.wakeup.wait()
        holding = lane.held_at is not None
        if lane.held_at is not None:
            await asyncio.sleep(max(0.0, lane.held_at - time.monotonic()))
            if not lane.waiting():
                lane.held_at = None  # everyone gave up: the permit goes unused
                return
        # Step 3: confirm the held permit and, if others wait, reserve the next.
        want_slot = not holding or lane.waiting() > 1
        answer = await self._reserve(lane, want_slot=want_slot)
        now = time.monotonic()
        lane.blocked_until = now + answer.blocked_for_s
        self._set_effective(lane, answer.effective_per_minute)
        lane.held_at = None
        if holding and answer.blocked_for_s <= 0:
            lane.grant(now)
        if answer.reserved_in_s is not None:
            if answer.reserved_in_s <= 0:
                lane.grant(now)  # the script checked the block: it is ours now
            else:
                lane.held_at = now + answer.reserved_in_s

    # -- backends and fallback ----------------------------------------------------------

    def _local_rate(self, lane: _Lane) -> float:
        share = self._expected_replicas if self._degraded else 1
        return lane.configured_per_minute / share

    async def _reserve(self, lane: _Lane, *, want_slot: bool) -> Answer:
        want_increase, lane.want_increase = lane.want_increase, False
        if self._redis is not None and not self._degraded:
            try:
                async with asyncio.timeout(self._redis_op_timeout_s):
                    return await self._redis.reserve(
                        lane.name,
                        configured_per_minute=lane.configured_per_minute,
                        burst=self._burst,
                        want_slot=want_slot,
                        want_increase=want_increase,
                    )
            except _REDIS_FAILURES as exc:
                self._degrade(exc)
        return await self._local.reserve(
            lane.name,
            configured_per_minute=self._local_rate(lane),
            burst=self._burst,
            want_slot=want_slot,
            want_increase=want_increase,
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
    status_share: float = 0.5,
    params: AimdParams | None = None,
    default_hold_s: float = 1.0,
    probe_interval_s: float = 2.0,
    socket_timeout_s: float = 0.5,
) -> Limiter:
    """The limiter for this replica: shared through Redis when ``redis_url`` is set, else local.

    No I/O happens here; the first ``acquire`` connects. ``key_prefix``
    prefixes every Redis key (see :func:`~service.ratelimit.redis_backend.lane_key`).
    ``status_share`` is the fraction of a shared budget status polls get while
    submissions also wait.
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
    )
