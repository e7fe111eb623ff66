"""The in-process limiter (no Redis): pacing, shares, deadlines, 429 feedback, close."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from service.ratelimit import (
    AimdParams,
    Budget,
    Limiter,
    LimiterClosed,
    LimiterTimeout,
    build_limiter,
)
from service.ratelimit.policy import gcra_shape


def local_limiter(
    rate: float = 3000.0,
    *,
    shared: bool = False,
    burst: int = 5,
    events: list[tuple[str, dict[str, Any]]] | None = None,
    **kwargs: Any,
) -> Limiter:
    return build_limiter(
        redis_url=None,
        submit_rate_per_minute=rate,
        status_rate_per_minute=rate,
        shared_budget=shared,
        burst=burst,
        expected_replicas=3,
        key_prefix="unused:",
        on_event=(lambda e, f: events.append((e, f))) if events is not None else None,
        **kwargs,
    )


def max_in_window(times: list[float], window: float) -> int:
    ordered = sorted(times)
    best = first = 0
    for last, t in enumerate(ordered):
        while t - ordered[first] > window:
            first += 1
        best = max(best, last - first + 1)
    return best


def waiting(limiter: Limiter, budget: Budget) -> int:
    return int(limiter.describe()["budgets"][budget]["waiting"])


async def until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)  # wait-ok: polling a condition under a deadline


async def grant_times(limiter: Limiter, budget: Budget, n: int) -> list[float]:
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire(budget)
        times.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(n)))
    return times


async def test_permits_come_as_a_burst_then_at_the_sustained_rate() -> None:
    """The shape is checked by what cannot stretch on a busy machine: the limiter's own
    waits (a burst permit returns at once, a later one sleeps about an interval) and
    lower bounds on time (never faster than the rate); the upper bounds are loose."""
    limiter = local_limiter(3000.0, burst=5)
    interval, burst = gcra_shape(3000.0, 5)
    waits: list[float] = []
    times: list[float] = []

    async def one() -> None:
        waits.append(await limiter.acquire("submit"))
        times.append(time.monotonic())

    try:
        start = time.monotonic()
        await asyncio.gather(*(one() for _ in range(55)))
    finally:
        await limiter.close()
    elapsed = max(times) - start
    assert sum(1 for w in waits if w < interval / 2) == burst
    assert elapsed >= 50 * interval - 0.01  # the sustained rate is never exceeded
    assert elapsed <= 50 * interval + 1.0  # and it is kept up (loosely: load stretches it)
    assert max_in_window(times, 0.2) <= int(0.2 / interval) + burst + 1


async def test_budgets_are_independent_unless_shared() -> None:
    interval = gcra_shape(600.0, 1)[0]
    limiter = local_limiter(600.0, burst=1)
    try:
        await limiter.acquire("submit")
        waited = await limiter.acquire("status")  # its own budget: no wait
        assert waited < interval / 2
    finally:
        await limiter.close()
    shared = local_limiter(600.0, burst=1, shared=True)
    try:
        await shared.acquire("submit")
        between = time.monotonic()
        waited = await shared.acquire("status")  # the same budget: the rest of one interval
        lag = time.monotonic() - between - waited  # time this test itself lost in between
        assert waited >= interval - 0.01 - lag
        assert waited <= interval + 0.5
    finally:
        await shared.close()


async def test_a_waiting_poll_goes_before_a_submission_that_waited_longer() -> None:
    limiter = local_limiter(120.0, shared=True, burst=1)  # one permit per ~0.5 s
    order: list[Budget] = []

    async def one(budget: Budget) -> None:
        await limiter.acquire(budget)
        order.append(budget)

    try:
        await limiter.acquire("submit")
        submits = [asyncio.create_task(one("submit")) for _ in range(2)]
        await until(lambda: waiting(limiter, "submit") == 2)
        poll = asyncio.create_task(one("status"))
        await asyncio.gather(*submits, poll)
    finally:
        await limiter.close()
    assert order == ["status", "submit", "submit"]


async def test_polls_come_first_from_a_flood_of_submissions() -> None:
    limiter = local_limiter(12000.0, shared=True, burst=5)
    order: list[Budget] = []

    async def one(budget: Budget) -> None:
        await limiter.acquire(budget)
        order.append(budget)

    try:
        floods = [asyncio.create_task(one("submit")) for _ in range(200)]
        await until(lambda: waiting(limiter, "submit") >= 150)
        polls = [asyncio.create_task(one("status")) for _ in range(20)]
        await asyncio.gather(*floods, *polls)
    finally:
        await limiter.close()
    first = order.index("status")
    last = max(i for i, b in enumerate(order) if b == "status")
    # Up to 90 % of the permits go to polls while they wait: 20 polls within ~23 grants.
    assert last - first < 25, order[first : first + 30]
    assert first < 60, order[:60]


async def test_a_flood_of_polls_still_leaves_submissions_their_tenth() -> None:
    limiter = local_limiter(12000.0, shared=True, burst=5)
    order: list[Budget] = []

    async def one(budget: Budget) -> None:
        await limiter.acquire(budget)
        order.append(budget)

    try:
        floods = [asyncio.create_task(one("status")) for _ in range(200)]
        await until(lambda: waiting(limiter, "status") >= 150)
        few = [asyncio.create_task(one("submit")) for _ in range(20)]
        await asyncio.gather(*floods, *few)
    finally:
        await limiter.close()
    first = order.index("submit")
    window = order[first : first + 100]
    assert 8 <= window.count("submit") <= 13, window  # status_share 0.9: one in ten


async def test_a_deadline_that_cannot_be_met_fails_at_once() -> None:
    limiter = local_limiter(600.0)
    try:
        await limiter.on_rate_limited("submit", retry_after_s=5.0)
        start = time.monotonic()
        with pytest.raises(LimiterTimeout):
            await limiter.acquire("submit", deadline=start + 1.0)
        assert time.monotonic() - start < 0.05
    finally:
        await limiter.close()


async def test_a_waiter_gives_up_at_its_deadline_and_not_later() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    limiter = local_limiter(60.0, burst=1, events=events)  # one permit per second
    try:
        await limiter.acquire("status")
        queued = asyncio.create_task(limiter.acquire("status"))  # takes the next permit
        await asyncio.sleep(0)  # wait-ok: yield once so it queues
        start = time.monotonic()
        with pytest.raises(LimiterTimeout):
            await limiter.acquire("status", deadline=start + 0.3)
        assert time.monotonic() - start == pytest.approx(0.3, abs=0.05)
        await queued
        assert ("timeout", {"budget": "status"}) in events
    finally:
        await limiter.close()


async def test_a_cancelled_waiter_does_not_strand_its_permit() -> None:
    limiter = local_limiter(120.0, burst=1)  # one permit per ~0.5 s
    try:
        await limiter.acquire("submit")
        first = asyncio.create_task(limiter.acquire("submit"))
        second = asyncio.create_task(limiter.acquire("submit"))
        await until(lambda: waiting(limiter, "submit") == 2)
        first.cancel()
        start = time.monotonic()
        await second  # gets the permit `first` would have had
        assert time.monotonic() - start < 0.6
    finally:
        await limiter.close()


async def test_429_blocks_the_budget_and_lowers_the_rate() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    limiter = local_limiter(1200.0, events=events)
    try:
        await limiter.acquire("submit")
        with capture_logs() as logs:
            await limiter.on_rate_limited("submit", retry_after_s=0.4)
        assert limiter.effective_rate_per_minute("submit") == pytest.approx(840.0)
        assert limiter.configured_rate_per_minute("submit") == 1200.0
        assert limiter.effective_rate_per_minute("status") == 1200.0
        assert limiter.describe()["budgets"]["submit"]["blocked_for_s"] > 0.3
        start = time.monotonic()
        await limiter.acquire("submit")
        assert time.monotonic() - start == pytest.approx(0.4, abs=0.05)
        start = time.monotonic()
        await limiter.acquire("status")  # a separate budget is not blocked
        assert time.monotonic() - start < 0.02
    finally:
        await limiter.close()
    assert logs[0]["event"] == "api_rate_limited"
    assert ("effective_rate", {"budget": "submit", "per_minute": pytest.approx(840.0)}) in events
    assert (
        "rate_limited",
        {"budget": "submit", "hold_s": 0.4, "decreased": True},
    ) in events


async def test_successes_raise_the_rate_back_but_never_above_configured() -> None:
    params = AimdParams(increase_interval_s=0.02, increase_fraction=0.1, min_decrease_gap_s=0.0)
    limiter = local_limiter(6000.0, params=params)
    try:
        await limiter.on_rate_limited("submit", retry_after_s=0.01)
        assert limiter.effective_rate_per_minute("submit") == pytest.approx(4200.0)
        deadline = time.monotonic() + 5.0
        while limiter.effective_rate_per_minute("submit") < 6000.0:
            assert time.monotonic() < deadline, limiter.describe()
            await limiter.acquire("submit")
            limiter.on_success("submit")
        assert limiter.effective_rate_per_minute("submit") == 6000.0
        for _ in range(20):
            await limiter.acquire("submit")
            limiter.on_success("submit")
        assert limiter.effective_rate_per_minute("submit") == 6000.0
    finally:
        await limiter.close()


async def test_close_fails_waiters_and_later_calls() -> None:
    limiter = local_limiter(60.0, burst=1)
    await limiter.acquire("submit")
    queued = asyncio.create_task(limiter.acquire("submit"))
    await until(lambda: waiting(limiter, "submit") == 1)
    await limiter.close()
    with pytest.raises(LimiterClosed):
        await queued
    with pytest.raises(LimiterClosed):
        await limiter.acquire("submit")


def test_describe_reports_mode_and_rates_without_secrets() -> None:
    limiter = build_limiter(
        redis_url="redis://:s3cret-pass@127.0.0.1:1/0",
        submit_rate_per_minute=60.0,
        status_rate_per_minute=120.0,
        shared_budget=False,
        burst=5,
        expected_replicas=2,
        key_prefix="x:",
    )
    details = limiter.describe()
    assert details["mode"] == "redis"
    assert details["degraded"] is False
    assert details["budgets"]["status"]["configured_per_minute"] == 120.0
    assert "s3cret" not in repr(details)
    assert local_limiter().describe()["mode"] == "local"


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        local_limiter(0.0)
    with pytest.raises(ValueError, match="status_share"):
        local_limiter(60.0, status_share=1.0)


# -- the submit gate: hour/day budgets, hour/day 429s, pauses --------------------------


async def test_an_hour_budget_holds_submissions_but_not_polls() -> None:
    # 40 per hour, burst 5 -> GCRA burst 2 (a twentieth of 40), then one per ~95 s.
    limiter = local_limiter(6000.0, shared=True, submit_rate_per_hour=40.0)
    try:
        for _ in range(2):
            assert await limiter.acquire("submit", deadline=time.monotonic() + 1.0) < 0.1
        start = time.monotonic()
        with pytest.raises(LimiterTimeout):
            await limiter.acquire("submit", deadline=start + 0.5)
        assert time.monotonic() - start < 0.6
        hold = limiter.submit_hold
        assert hold is not None
        assert hold.reason == "budget_hour"
        assert hold.for_s == pytest.approx(3600 / 38, abs=1.0)
        for _ in range(10):  # polls are not counted against the hour
            assert await limiter.acquire("status", deadline=time.monotonic() + 1.0) < 0.1
        # ...and a submit whose deadline is before the window's room fails at once.
        start = time.monotonic()
        with pytest.raises(LimiterTimeout):
            await limiter.acquire("submit", deadline=start + 5.0)
        assert time.monotonic() - start < 0.05
    finally:
        await limiter.close()


async def test_a_day_budget_counts_together_with_the_hour() -> None:
    limiter = local_limiter(6000.0, submit_rate_per_hour=400.0, submit_rate_per_day=40.0, burst=5)
    try:
        granted = 0
        for _ in range(6):
            try:
                await limiter.acquire("submit", deadline=time.monotonic() + 0.3)
            except LimiterTimeout:
                break
            granted += 1
        assert granted == 2  # the day's burst (a twentieth of 40), though the hour has room
        assert limiter.submit_hold is not None
        assert limiter.submit_hold.reason == "budget_day"
    finally:
        await limiter.close()


async def test_an_hour_429_holds_submissions_until_its_reset_and_polls_go_on() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    limiter = local_limiter(6000.0, shared=True, events=events)
    try:
        reset_at = time.time() + 0.6
        await limiter.on_rate_limited(
            "submit", retry_after_s=30.0, limit_type="hour", reset_at=reset_at
        )
        assert limiter.effective_rate_per_minute("submit") == 6000.0  # no decrease
        assert limiter.submit_hold is not None
        assert limiter.submit_hold.reason == "rate_limit_hour"
        start = time.monotonic()
        await limiter.acquire("status")
        assert time.monotonic() - start < 0.05
        await limiter.acquire("submit")
        assert time.time() == pytest.approx(reset_at, abs=0.1)
        assert limiter.submit_hold is None
    finally:
        await limiter.close()
    assert (
        "rate_limited",
        {"budget": "submit", "hold_s": pytest.approx(0.6, abs=0.05), "decreased": False},
    ) in events
    assert (
        "submit_hold",
        {"reason": "rate_limit_hour", "for_s": pytest.approx(0.6, abs=0.05)},
    ) in events


async def test_a_day_429_without_reset_time_falls_back_to_retry_after() -> None:
    limiter = local_limiter(6000.0)
    try:
        await limiter.on_rate_limited("submit", retry_after_s=0.3, limit_type="DAY")
        start = time.monotonic()
        await limiter.acquire("submit")
        assert time.monotonic() - start == pytest.approx(0.3, abs=0.06)
    finally:
        await limiter.close()


async def test_a_pause_holds_submissions_until_resumed_with_its_reason() -> None:
    limiter = local_limiter(6000.0, shared=True)
    try:
        hold = await limiter.pause_submissions("quota_exhausted")
        assert hold is not None
        assert hold.reason == "quota_exhausted"
        assert hold.for_s == math.inf
        assert limiter.submit_hold == hold
        assert limiter.describe()["submit_held"] == {"reason": "quota_exhausted", "for_s": None}
        start = time.monotonic()
        with pytest.raises(LimiterTimeout):
            await limiter.acquire("submit", deadline=start + 0.2)
        assert time.monotonic() - start < 0.05  # provably late: fails at once
        await limiter.acquire("status", deadline=time.monotonic() + 0.1)
        waiting_submit = asyncio.create_task(limiter.acquire("submit"))
        assert await limiter.resume_submissions("something_else") == hold
        await asyncio.sleep(0.2)  # wait-ok: proving the submit is still held
        assert not waiting_submit.done()
        assert await limiter.resume_submissions("quota_exhausted") is None
        resumed_at = time.monotonic()
        await asyncio.wait_for(waiting_submit, 1.0)
        assert time.monotonic() - resumed_at < 0.1
        assert await limiter.read_submit_hold() is None
    finally:
        await limiter.close()


async def test_a_timed_pause_ends_by_itself() -> None:
    limiter = local_limiter(6000.0)
    try:
        until = time.time() + 0.4
        hold = await limiter.pause_submissions("quota_exhausted", until=until)
        assert hold is not None
        assert hold.for_s == pytest.approx(0.4, abs=0.05)
        await limiter.acquire("submit")
        assert time.time() == pytest.approx(until, abs=0.1)
        assert await limiter.pause_submissions("quota_exhausted", until=time.time() - 1) is None
        with pytest.raises(ValueError, match="reason"):
            await limiter.pause_submissions("")
    finally:
        await limiter.close()
