"""The limiter on real Redis: the Lua scripts agree with the pure functions, replicas in
separate processes share one budget and one 429 block, and a Redis that dies degrades the
replicas to a local share and back (a private redis-server, so the shared one stays up)."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from service.devkit.limiter_replica import ReplicaProcess
from service.devkit.processes import RedisServer
from service.ratelimit import AimdParams, Budget, Limiter, build_limiter
from service.ratelimit.policy import (
    LaneState,
    acquire_step,
    gcra_shape,
    lane_initial,
    rate_limited_step,
)
from service.ratelimit.redis_backend import RedisBackend, lane_key
from tests.fixtures.stack import new_id, wait_for

pytestmark = pytest.mark.redis


def assert_state_matches(stored: Mapping[Any, Any], state: LaneState) -> None:
    expected = {
        b"tat": state.tat,
        b"eff": state.aimd.effective_per_minute,
        b"ceiling": state.aimd.ceiling_per_minute,
        b"changed": state.aimd.changed_at,
        b"gate": state.aimd.decrease_gate_until,
        b"blocked": state.blocked_until,
    }
    for field, value in expected.items():
        assert float(stored[field]) == pytest.approx(value, rel=1e-12, abs=1e-9), field


async def test_lua_scripts_agree_with_the_pure_functions(redis_client: Redis) -> None:
    params = AimdParams(increase_interval_s=1.0, min_decrease_gap_s=0.5)
    prefix = f"{new_id('lua')}:"
    backend = RedisBackend(redis_client, key_prefix=prefix, params=params)
    rng = random.Random(11)
    state = lane_initial(600.0)
    now = 1_700_000_000.0  # a Redis-TIME-like clock, overridden in the script
    configured = 600.0
    for step in range(400):
        now += rng.choice([0.0, 0.001, 0.05, 0.3, 1.0, 2.5])
        if step % 97 == 96:
            configured = rng.choice([300.0, 600.0, 1200.0])
        if rng.random() < 0.15:
            hold = rng.choice([0.2, 1.0, 3.0])
            state, want_fb = rate_limited_step(
                state, now=now, configured_per_minute=configured, hold_s=hold, params=params
            )
            got_fb = await backend.rate_limited(
                "shared", configured_per_minute=configured, hold_s=hold, now=now
            )
            assert got_fb.decreased == want_fb.decreased, step
            assert got_fb.effective_per_minute == pytest.approx(want_fb.effective_per_minute)
            assert got_fb.blocked_for_s == pytest.approx(want_fb.blocked_for_s, abs=1e-6)
        else:
            want_slot = rng.random() < 0.8
            want_increase = rng.random() < 0.5
            burst = rng.choice([1, 5])
            state, want = acquire_step(
                state,
                now=now,
                configured_per_minute=configured,
                burst=burst,
                want_slot=want_slot,
                want_increase=want_increase,
                params=params,
            )
            got = await backend.reserve(
                "shared",
                configured_per_minute=configured,
                burst=burst,
                want_slot=want_slot,
                want_increase=want_increase,
                now=now,
            )
            if want.reserved_in_s is None:
                assert got.reserved_in_s is None
            else:
                assert got.reserved_in_s == pytest.approx(want.reserved_in_s, abs=1e-6), step
            assert got.blocked_for_s == pytest.approx(want.blocked_for_s, abs=1e-6)
            assert got.effective_per_minute == pytest.approx(want.effective_per_minute)
    assert_state_matches(await redis_client.hgetall(lane_key(prefix, "shared")), state)
    assert await redis_client.pttl(lane_key(prefix, "shared")) > 0  # the state expires


async def test_the_script_uses_redis_time_and_survives_script_flush(
    private_redis: RedisServer,
) -> None:
    redis_client = Redis.from_url(private_redis.url)
    prefix = f"{new_id('time')}:"
    backend = RedisBackend(redis_client, key_prefix=prefix, params=AimdParams())
    first = await backend.reserve(
        "submit", configured_per_minute=60.0, burst=1, want_slot=True, want_increase=False
    )
    assert first.reserved_in_s == 0.0
    await redis_client.script_flush()  # NOSCRIPT on the next EVALSHA: redis-py reloads
    second = await backend.reserve(
        "submit", configured_per_minute=60.0, burst=1, want_slot=True, want_increase=False
    )
    assert second.reserved_in_s == pytest.approx(60 / 59, abs=0.05)  # shape(60, 1): 59/min
    redis_now = float((await redis_client.time())[0])
    tat = float(await redis_client.hget(lane_key(prefix, "submit"), "tat") or "nan")
    await redis_client.aclose()
    assert redis_now < tat < redis_now + 3


def make_limiter(redis_url: str, **kwargs: Any) -> Limiter:
    settings: dict[str, Any] = {
        "submit_rate_per_minute": 12000.0,
        "status_rate_per_minute": 12000.0,
        "shared_budget": True,
        "burst": 5,
        "expected_replicas": 3,
        "key_prefix": f"{new_id('lim')}:",
    }
    settings.update(kwargs)
    return build_limiter(redis_url=redis_url, **settings)


async def test_status_keeps_its_share_of_a_shared_redis_budget(redis_url: str) -> None:
    limiter = make_limiter(redis_url)
    order: list[Budget] = []

    async def one(budget: Budget) -> None:
        await limiter.acquire(budget)
        order.append(budget)

    try:
        submits = [asyncio.create_task(one("submit")) for _ in range(200)]
        await asyncio.sleep(0)  # wait-ok: yield once so the submissions queue first
        statuses = [asyncio.create_task(one("status")) for _ in range(20)]
        await asyncio.gather(*submits, *statuses)
    finally:
        await limiter.close()
    assert not limiter.degraded
    assert max(i for i, b in enumerate(order) if b == "status") < 50


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_no_redis_at_start_degrades_to_the_local_share_and_logs_once() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    limiter = make_limiter(
        f"redis://127.0.0.1:{closed_port()}/0",
        submit_rate_per_minute=6000.0,
        shared_budget=False,
        on_event=lambda e, f: events.append((e, f)),
    )
    try:
        with capture_logs() as logs:
            start = time.monotonic()
            for _ in range(30):
                await limiter.acquire("submit")
            elapsed = time.monotonic() - start
        assert limiter.degraded
        assert limiter.describe()["degraded"] is True
        # The local share: 6000/3 = 2000 per minute, burst 5: 25 more permits take ~0.75 s.
        assert limiter.effective_rate_per_minute("submit") == pytest.approx(2000.0)
        assert elapsed == pytest.approx(25 * 60 / 1995, abs=0.15)
    finally:
        await limiter.close()
    degraded_logs = [entry for entry in logs if entry["event"] == "limiter_degraded"]
    assert len(degraded_logs) == 1
    assert degraded_logs[0]["log_level"] == "warning"
    assert "check Redis" in degraded_logs[0]["action"]
    assert ("degraded", {"degraded": True}) in events


async def test_a_429_while_redis_is_down_still_blocks_locally() -> None:
    limiter = make_limiter(f"redis://127.0.0.1:{closed_port()}/0", shared_budget=False)
    try:
        await limiter.on_rate_limited("status", retry_after_s=0.3)
        assert limiter.degraded
        start = time.monotonic()
        await limiter.acquire("status")
        assert time.monotonic() - start == pytest.approx(0.3, abs=0.05)
    finally:
        await limiter.close()


# -- replicas in separate processes ------------------------------------------------------


def max_in_window(times: list[float], window_s: float) -> int:
    ordered = sorted(times)
    best = first = 0
    for last, t in enumerate(ordered):
        while t - ordered[first] > window_s:
            first += 1
        best = max(best, last - first + 1)
    return best


def start_replicas(
    n: int, cfg: dict[str, Any], log_dir: Path, *, extra: dict[int, dict[str, Any]] | None = None
) -> tuple[list[ReplicaProcess], float]:
    replicas = [
        ReplicaProcess({**cfg, **(extra or {}).get(i, {})}, log_dir=log_dir) for i in range(n)
    ]
    try:
        wait_for(lambda: all(r.of("ready") for r in replicas), 30.0, message="replicas not ready")
    except AssertionError:
        for r in replicas:
            r.process.kill()
        raise
    start_at = time.time() + 0.3
    for r in replicas:
        r.go(start_at)
    return replicas, start_at


def grant_times(replicas: list[ReplicaProcess]) -> list[float]:
    return sorted(e["at"] for r in replicas for e in r.of("grant"))


def test_three_processes_share_one_budget_and_one_429_stops_them_all(
    redis_url: str, tmp_path: Path
) -> None:
    rate, burst, duration_s, block_s = 1200.0, 5, 6.0, 1.0
    cfg = {
        "mode": "grants",
        "redis_url": redis_url,
        "rate": rate,
        "burst": burst,
        "replicas": 3,
        "prefix": f"{new_id('share')}:",
        "duration_s": duration_s,
        "concurrency": 4,
    }
    replicas, _ = start_replicas(
        3, cfg, tmp_path, extra={0: {"block_at_s": 3.0, "block_s": block_s}}
    )
    for r in replicas:
        r.stop(timeout_s=duration_s + 20)
    grants = grant_times(replicas)
    interval, b = gcra_shape(rate, burst)
    # The union of three processes never exceeds the one budget in any window (+1 for the
    # gap between a permit and the moment its holder read the clock).
    for window_s in (0.25, 0.5, 1.0, 2.0, duration_s):
        bound = math.floor(window_s / interval) + b + 1
        assert max_in_window(grants, window_s) <= bound, window_s
    # ...and uses it: the sustained rate before the 429, 70 % of it after the block, 2 bursts.
    after_interval, _ = gcra_shape(0.7 * rate, burst)
    expected = 3.0 / interval + (duration_s - 3.0 - block_s) / after_interval + 2 * b
    assert len(grants) >= 0.9 * expected
    per_replica = [len(r.of("grant")) for r in replicas]
    assert min(per_replica) >= 0.25 * len(grants), per_replica
    # One replica's 429 blocks all three for the hold.
    blocking_at = replicas[0].of("blocking")[0]["at"]
    during = [t for t in grants if blocking_at + 0.05 < t < blocking_at + block_s - 0.02]
    assert during == []
    assert any(blocking_at + block_s - 0.02 <= t < blocking_at + block_s + 0.2 for t in grants)
    assert all(r.of("done")[0]["effective_per_minute"] == pytest.approx(840.0) for r in replicas)


def test_redis_dying_degrades_every_replica_to_a_local_share_and_back(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    rate, burst, duration_s = 1200.0, 5, 9.0
    cfg = {
        "mode": "grants",
        "redis_url": private_redis.url,
        "rate": rate,
        "burst": burst,
        "replicas": 3,
        "prefix": f"{new_id('down')}:",
        "duration_s": duration_s,
        "concurrency": 4,
        "probe_interval_s": 0.3,
    }
    replicas, start_at = start_replicas(3, cfg, tmp_path)
    try:
        wait_for(lambda: time.time() >= start_at + 2.0, 10.0, message="run did not start")
        private_redis.kill()
        killed_at = time.time()

        def all_flagged(flag: bool) -> bool:
            return all(any(e["degraded"] is flag for e in r.of("degraded")) for r in replicas)

        wait_for(lambda: all_flagged(True), 5.0, message="replicas did not degrade")
        degraded_at = max(e["at"] for r in replicas for e in r.of("degraded"))
        wait_for(lambda: time.time() >= start_at + 5.5, 10.0, message="clock")
        private_redis.start()
        restarted_at = time.time()
        wait_for(lambda: all_flagged(False), 5.0, message="replicas did not recover")
        recovered_at = max(e["at"] for r in replicas for e in r.of("degraded"))
    finally:
        for r in replicas:
            r.stop(timeout_s=duration_s + 20)
    assert degraded_at - killed_at < 1.0

    # While Redis was down: each replica kept going at its share, rate / 3.
    local_interval, _ = gcra_shape(rate / 3, burst)
    span = (degraded_at + 0.3, restarted_at)
    length = span[1] - span[0]
    for r in replicas:
        n = sum(1 for e in r.of("grant") if span[0] <= e["at"] < span[1])
        assert n == pytest.approx(length / local_interval, rel=0.25), n
    # Back on the shared budget: the union is paced as one budget again.
    shared_interval, b = gcra_shape(rate, burst)
    end = max(e["at"] for r in replicas for e in r.of("done"))
    after = [t for t in grant_times(replicas) if recovered_at + 0.3 <= t < end - 0.1]
    length = end - 0.1 - recovered_at - 0.3
    assert len(after) <= length / shared_interval + b + 1
    assert len(after) >= 0.8 * length / shared_interval
    for r in replicas:
        log = r.log_text()
        assert log.count("limiter_degraded") == 1, log
        assert log.count("limiter_recovered") == 1, log
        assert "check Redis" in log
