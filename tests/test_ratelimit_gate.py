"""The limiter's newer duties on real Redis: the submit gate (hour/day budgets, hour/day 429
blocks, a named pause) shared by replicas, clocks that step back, a TAT written far ahead,
the fallback keeping a shared block, and polls taking more of a shared budget across
replicas (issue 11 item 8, issue 14 items 2 and 5)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from service.devkit.processes import RedisServer
from service.ratelimit import AimdParams, Budget, Limiter, LimiterTimeout, build_limiter
from service.ratelimit.policy import (
    GateState,
    gate_op,
    gcra_shape,
    lane_initial,
    rate_limited_step,
    reserve_step,
)
from service.ratelimit.redis_backend import GATE_KEY, RedisBackend, lane_key
from tests.fixtures.stack import new_id

pytestmark = pytest.mark.redis


def make_limiter(redis_url: str, prefix: str, **kwargs: Any) -> Limiter:
    settings: dict[str, Any] = {
        "submit_rate_per_minute": 6000.0,
        "status_rate_per_minute": 6000.0,
        "shared_budget": True,
        "burst": 5,
        "expected_replicas": 2,
        "key_prefix": prefix,
    }
    settings.update(kwargs)
    return build_limiter(redis_url=redis_url, **settings)


async def test_the_scripts_agree_with_the_pure_steps_on_windows_gate_and_clock_steps(
    redis_client: Redis,
) -> None:
    params = AimdParams(increase_interval_s=1.0, min_decrease_gap_s=0.5)
    prefix = f"{new_id('agree')}:"
    backend = RedisBackend(redis_client, key_prefix=prefix, params=params)
    rng = random.Random(14)
    lane = lane_initial(600.0)
    gate = GateState()
    now = 1_700_000_000.0
    for step in range(500):
        if rng.random() < 0.03:
            now -= rng.choice([5.0, 120.0, 3600.0])  # the Redis host's clock steps back
        else:
            now += rng.choice([0.0, 0.01, 0.3, 2.0, 40.0])
        roll = rng.random()
        if roll < 0.08:
            hold = rng.choice([0.5, 3.0])
            lane, want_fb = rate_limited_step(
                lane, now=now, configured_per_minute=600.0, hold_s=hold, params=params
            )
            got_fb = await backend.rate_limited(
                "shared", configured_per_minute=600.0, hold_s=hold, now=now
            )
            assert got_fb.blocked_for_s == pytest.approx(want_fb.blocked_for_s, abs=1e-6), step
        elif roll < 0.2:
            op = rng.choice(["block", "pause", "resume", "read"])
            hold = rng.choice([-1.0, 2.0, 90.0]) if op == "pause" else rng.choice([1.0, 30.0])
            reason = rng.choice(["quota_exhausted", "rate_limit_hour", ""])
            if op in ("block", "pause") and not reason:
                reason = "x"
            gate, want_for, want_reason = gate_op(gate, now=now, op=op, hold_s=hold, reason=reason)
            got_for, got_reason = await backend.gate(op, hold_s=hold, reason=reason, now=now)
            assert got_for == pytest.approx(want_for, rel=1e-12, abs=1e-6), step
            assert got_reason == want_reason, step
        else:
            kwargs: dict[str, Any] = {
                "configured_per_minute": 600.0,
                "burst": rng.choice([1, 5]),
                "want_slot": rng.random() < 0.8,
                "want_increase": rng.random() < 0.5,
                "holding": rng.random() < 0.5,
                "per_hour": rng.choice([0.0, 60.0, 500.0]),
                "per_day": rng.choice([0.0, 200.0]),
                "extra_slots": rng.choice([0, 0, 2]),
            }
            plan = "".join(rng.choice("st") for _ in range(rng.randint(0, 3)))
            lane, next_gate, want = reserve_step(
                lane, gate, now=now, params=params, plan=plan, **kwargs
            )
            assert next_gate is not None
            gate = next_gate
            if not kwargs["want_slot"]:
                kwargs["extra_slots"] = 0
            got = await backend.reserve("shared", plan=plan, now=now, **kwargs)
            if want.reserved_in_s is None:
                assert got.reserved_in_s is None
            else:
                assert got.reserved_in_s == pytest.approx(want.reserved_in_s, abs=1e-6), step
            assert got.more_in_s == pytest.approx(want.more_in_s, abs=1e-6), step
            assert got.blocked_for_s == pytest.approx(want.blocked_for_s, abs=1e-6), step
            assert got.submits_granted == want.submits_granted, step
            assert got.submit_wait_s == pytest.approx(want.submit_wait_s, rel=1e-12, abs=1e-6)
            assert got.submit_reason == want.submit_reason, step
    stored = await redis_client.hgetall(lane_key(prefix, GATE_KEY))
    assert float(stored[b"hour_tat"]) == pytest.approx(gate.hour_tat, rel=1e-12)
    assert float(stored[b"seen"]) == pytest.approx(gate.seen, rel=1e-12)
    assert stored[b"pause_reason"].decode() == gate.pause_reason


async def test_redis_time_stepping_back_does_not_stretch_a_block(redis_client: Redis) -> None:
    backend = RedisBackend(redis_client, key_prefix=f"{new_id('step')}:", params=AimdParams())
    t = 1_800_000_000.0
    await backend.rate_limited("submit", configured_per_minute=600.0, hold_s=5.0, now=t)
    await backend.gate("block", hold_s=20.0, reason="rate_limit_hour", now=t)
    stepped = t - 3600.0
    answer = await backend.reserve(
        "submit",
        configured_per_minute=600.0,
        burst=1,
        want_slot=True,
        want_increase=False,
        plan="",
        now=stepped,
    )
    assert answer.reserved_in_s == pytest.approx(5.0)
    assert answer.submit_wait_s == pytest.approx(20.0)


async def test_a_tat_written_an_hour_ahead_does_not_stall_permits(
    redis_url: str, redis_client: Redis
) -> None:
    prefix = f"{new_id('tat')}:"
    redis_now = float((await redis_client.time())[0])
    # What a clock step nobody saw would leave behind: an hour of reservations, no `seen`.
    await redis_client.hset(
        lane_key(prefix, "submit"), mapping={"tat": repr(redis_now + 3600.0), "eff": "600"}
    )
    limiter = make_limiter(
        redis_url, prefix, submit_rate_per_minute=600.0, shared_budget=False, burst=1
    )
    try:
        start = time.monotonic()
        for _ in range(6):
            await limiter.acquire("submit", deadline=start + 5.0)
        elapsed = time.monotonic() - start
    finally:
        await limiter.close()
    interval, _ = gcra_shape(600.0, 1)
    assert elapsed == pytest.approx(5 * interval, abs=0.15)  # the configured rate, no stall
    assert not limiter.degraded


async def test_an_hour_429_on_one_replica_holds_submissions_on_all_until_reset(
    redis_url: str,
) -> None:
    prefix = f"{new_id('hour')}:"
    a, b = make_limiter(redis_url, prefix), make_limiter(redis_url, prefix)
    try:
        await b.acquire("submit")  # b has seen the gate open
        reset_at = time.time() + 1.0
        await a.on_rate_limited("submit", retry_after_s=None, limit_type="hour", reset_at=reset_at)
        start = time.monotonic()
        for _ in range(5):
            await b.acquire("status", deadline=start + 0.5)  # polls go on
        await b.acquire("submit")
        assert time.time() == pytest.approx(reset_at, abs=0.15)
        assert a.effective_rate_per_minute("submit") == 6000.0
    finally:
        await a.close()
        await b.close()


async def test_a_pause_set_on_one_replica_holds_every_replica_until_another_clears_it(
    redis_url: str,
) -> None:
    prefix = f"{new_id('pause')}:"
    a, b = make_limiter(redis_url, prefix), make_limiter(redis_url, prefix)
    try:
        await b.acquire("submit")
        await a.pause_submissions("quota_exhausted")
        hold = await b.read_submit_hold()
        assert hold is not None
        assert hold.reason == "quota_exhausted"
        held = asyncio.create_task(b.acquire("submit"))
        await asyncio.sleep(1.5)  # wait-ok: longer than the gate re-read, to prove it holds
        assert not held.done()
        assert b.submit_hold is not None
        assert b.submit_hold.reason == "quota_exhausted"
        await b.acquire("status", deadline=time.monotonic() + 0.5)
        assert await a.resume_submissions("quota_exhausted") is None
        resumed_at = time.monotonic()
        await asyncio.wait_for(held, 3.0)
        assert time.monotonic() - resumed_at < 1.3  # b re-reads the gate every second
    finally:
        await a.close()
        await b.close()


async def test_two_replicas_share_one_hour_budget(redis_url: str) -> None:
    prefix = f"{new_id('hbud')}:"
    kwargs = {"submit_rate_per_hour": 100.0}  # burst 5 of the hour, then one per ~38 s
    a, b = make_limiter(redis_url, prefix, **kwargs), make_limiter(redis_url, prefix, **kwargs)
    granted = 0
    try:
        for limiter in (a, b, a, b, a, b, a, b):
            try:
                await limiter.acquire("submit", deadline=time.monotonic() + 0.3)
                granted += 1
            except LimiterTimeout:
                pass
    finally:
        await a.close()
        await b.close()
    assert granted == 5


async def test_the_fallback_keeps_a_shared_429_block(private_redis: RedisServer) -> None:
    prefix = f"{new_id('keep')}:"
    limiter = make_limiter(private_redis.url, prefix, shared_budget=False, probe_interval_s=30.0)
    try:
        await limiter.acquire("submit")
        await limiter.on_rate_limited("submit", retry_after_s=1.5)
        blocked_at = time.monotonic()
        await limiter.pause_submissions("quota_exhausted", until=time.time() + 2.0)
        private_redis.kill()
        await limiter.acquire("status")  # the other lane notices Redis is gone
        assert limiter.degraded
        await limiter.acquire("submit")
        # The later of the two: the pause Redis reported, carried into the local state.
        assert time.monotonic() - blocked_at == pytest.approx(2.0, abs=0.2)
    finally:
        await limiter.close()


async def test_the_fallback_does_not_lift_a_block_it_never_saw(private_redis: RedisServer) -> None:
    prefix = f"{new_id('keep2')}:"
    limiter = make_limiter(private_redis.url, prefix, shared_budget=True, probe_interval_s=30.0)
    try:
        await limiter.acquire("status")
        await limiter.on_rate_limited("status", retry_after_s=1.0)
        blocked_at = time.monotonic()
        private_redis.kill()
        await limiter.acquire("status")
        assert limiter.degraded
        assert time.monotonic() - blocked_at == pytest.approx(1.0, abs=0.15)
    finally:
        await limiter.close()


async def grant_shares(redis_url: str, **kwargs: Any) -> float:
    """Replica a floods submissions, replica b has due polls: b's share of 3 s of permits."""
    prefix = f"{new_id('prio')}:"
    a = make_limiter(redis_url, prefix, submit_rate_per_minute=1200.0, burst=1, **kwargs)
    b = make_limiter(redis_url, prefix, submit_rate_per_minute=1200.0, burst=1, **kwargs)
    counts: dict[str, int] = {"a": 0, "b": 0}
    stop = time.monotonic() + 3.0

    async def caller(name: str, limiter: Limiter, budget: Budget) -> None:
        while True:
            try:
                await limiter.acquire(budget, deadline=stop)
            except LimiterTimeout:
                return
            counts[name] += 1

    try:
        await asyncio.gather(
            *(caller("a", a, "submit") for _ in range(20)),
            *(caller("b", b, "status") for _ in range(8)),
        )
    finally:
        await a.close()
        await b.close()
    return counts["b"] / (counts["a"] + counts["b"])


async def test_a_replica_with_due_polls_takes_more_of_the_budget_from_others_submits(
    redis_url: str,
) -> None:
    fair = await grant_shares(redis_url, priority_depth=1)
    prioritised = await grant_shares(redis_url, priority_after_s=0.0)
    assert fair == pytest.approx(0.5, abs=0.1)
    assert prioritised >= 0.7, (fair, prioritised)  # 4 reservations to 1: ~80 %
