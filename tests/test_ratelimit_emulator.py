"""Three limiter replicas (separate processes, one Redis budget) against the emulator's limit.

The emulator limits per sliding 60 s, so a test of seconds would never fill its window on
its own: each test first spends most of the window's budget directly, then lets the
replicas loose on what is left. Overshooting it by a handful of calls gives 429s, so
"no 429" is a strict check of the union of the three processes. The long run (3 minutes,
share of the limit) is ``bench/limiter_share.py``.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.devkit.limiter_replica import ReplicaProcess
from service.docutray import DocuTrayClient, RateLimited
from service.ratelimit import Limiter, LimiterTimeout, build_limiter
from service.ratelimit.policy import gcra_shape
from tests.fixtures.emulator import PDF_BYTES, EmulatorStarter, RunningEmulator
from tests.fixtures.stack import new_id, wait_for

pytestmark = pytest.mark.redis


def create_conversion(emulator: RunningEmulator) -> str:
    response = httpx.post(
        f"{emulator.base_url}/api/convert-async",
        headers=emulator.auth_headers,
        json={
            "image_base64": base64.b64encode(PDF_BYTES).decode(),
            "document_type_code": "invoice",
        },
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["conversion_id"])


def spend(emulator: RunningEmulator, conversion_id: str, calls: int) -> None:
    """Spend `calls` of the emulator's budget directly (no limiter), as other clients would."""
    with httpx.Client(base_url=emulator.base_url, headers=emulator.auth_headers) as client:
        for _ in range(calls):
            response = client.get(f"/api/convert-async/status/{conversion_id}")
            assert response.status_code == 200, response.text


def run_replicas(
    cfg: dict[str, Any], log_dir: Path, *, before_go: Any = None, n: int = 3
) -> list[ReplicaProcess]:
    replicas = [ReplicaProcess(cfg, log_dir=log_dir) for _ in range(n)]
    try:
        if before_go is not None:
            before_go()
        wait_for(lambda: all(r.of("ready") for r in replicas), 30.0, message="replicas not ready")
        start_at = time.time() + 0.2
        for r in replicas:
            r.go(start_at)
    finally:
        for r in replicas:
            r.stop(timeout_s=cfg["duration_s"] + 20)
    return replicas


def max_in_window(times: list[float], window_s: float) -> int:
    best = first = 0
    for last, t in enumerate(times):
        while t - times[first] > window_s:
            first += 1
        best = max(best, last - first + 1)
    return best


def test_three_replicas_at_the_limit_never_get_a_429(
    emulator_factory: EmulatorStarter, redis_url: str, tmp_path: Path
) -> None:
    limit, burst, duration_s = 1200, 5, 8.0
    emulator = emulator_factory(rate_limit_per_minute=limit, processing_median_s=0.2)
    conversion_id = create_conversion(emulator)
    interval, b = gcra_shape(limit, burst)
    most_the_run_may_use = math.floor(duration_s / interval) + b  # 164
    headroom = most_the_run_may_use + 6
    cfg = {
        "mode": "emulator",
        "redis_url": redis_url,
        "rate": float(limit),
        "burst": burst,
        "replicas": 3,
        "prefix": f"{new_id('emu')}:",
        "duration_s": duration_s,
        "concurrency": 4,
        "base_url": emulator.base_url,
        "api_key": emulator.api_key,
        "conversion_id": conversion_id,
    }
    replicas = run_replicas(
        cfg, tmp_path, before_go=lambda: spend(emulator, conversion_id, limit - 1 - headroom)
    )
    stats = emulator.stats(timestamps=True)
    calls = [e for r in replicas for e in r.of("call")]
    assert stats["rate_limited"] == 0
    assert {e["status"] for e in calls} == {200}
    assert stats["max_calls_per_60s"] <= limit
    assert len(calls) <= most_the_run_may_use + 1
    assert len(calls) >= 0.9 * most_the_run_may_use  # the budget is used, not wasted
    per_replica = [len(r.of("call")) for r in replicas]
    assert min(per_replica) >= 0.25 * len(calls), per_replica
    # As the emulator saw them (its clock): paced at the one shared rate, give or take the
    # spread of request latency on a busy machine (allowed: a quarter of a second).
    seen = sorted(stats["counted_call_times_s"])[-len(calls) :]
    for window_s in (1.0, 2.0):
        assert max_in_window(seen, window_s) <= math.floor((window_s + 0.25) / interval) + b + 1


def test_a_429_blocks_all_replicas_at_once_and_lowers_the_rate_once(
    emulator_factory: EmulatorStarter, redis_url: str, tmp_path: Path
) -> None:
    limit, burst, overdrive, duration_s = 300, 5, 1.5, 4.0
    emulator = emulator_factory(rate_limit_per_minute=limit, processing_median_s=0.2)
    conversion_id = create_conversion(emulator)
    cfg = {
        "mode": "emulator",
        "redis_url": redis_url,
        "rate": overdrive * limit,  # configured 50 % above the API's limit
        "burst": burst,
        "replicas": 3,
        "prefix": f"{new_id('emu429')}:",
        "duration_s": duration_s,
        "concurrency": 4,
        "base_url": emulator.base_url,
        "api_key": emulator.api_key,
        "conversion_id": conversion_id,
    }
    # Other clients already spent the whole minute: the first calls get 429 (retryAfter ~60 s).
    replicas = run_replicas(
        cfg, tmp_path, before_go=lambda: spend(emulator, conversion_id, limit - 1)
    )
    stats = emulator.stats()
    calls = sorted((e for r in replicas for e in r.of("call")), key=lambda e: e["at"])
    rejected = [e for e in calls if e["status"] == 429]
    assert rejected, "the emulator's window was full: the first calls must be refused"
    # Without feedback: ~450/min for 4 s = 30 refused calls. With it: only the first burst
    # (already granted before the first 429 came back) is refused, then nobody calls.
    assert stats["rate_limited"] == len(rejected) <= burst + 2
    first_429_at = rejected[0]["at"]
    assert all(e["at"] < first_429_at + 0.1 for e in calls)
    # Five 429s, one decrease: the retry window gates the multiplicative decrease.
    for r in replicas:
        assert r.of("done")[0]["effective_per_minute"] == pytest.approx(0.7 * overdrive * limit)


async def test_an_hour_window_429_holds_both_replicas_submissions_until_its_reset(
    emulator_factory: EmulatorStarter, redis_url: str
) -> None:
    """Two replicas' limiters (one Redis) submit through the real client to an emulator whose
    hour window is 3 s long (6 calls): after an hour 429 neither replica submits again before
    the window's resetTime, so 429s stay a handful instead of every other call."""
    emulator = emulator_factory(
        rate_limit_per_hour=6, rate_limit_hour_window_s=3.0, processing_median_s=0.2
    )
    prefix = f"{new_id('emuhour')}:"
    limiters = [
        build_limiter(
            redis_url=redis_url,
            submit_rate_per_minute=600.0,
            status_rate_per_minute=600.0,
            shared_budget=False,
            burst=5,
            expected_replicas=2,
            key_prefix=prefix,
        )
        for _ in range(2)
    ]
    data_b64 = base64.b64encode(PDF_BYTES).decode()
    accepted: list[float] = []
    refused: list[tuple[float, float | None]] = []
    kinds: set[str | None] = set()
    stop = time.monotonic() + 8.0

    async def caller(limiter: Limiter, client: DocuTrayClient) -> None:
        while True:
            try:
                await limiter.acquire("submit", deadline=stop)
            except LimiterTimeout:
                return
            try:
                await client.submit_base64(data_b64=data_b64, document_type_code="invoice")
                accepted.append(time.time())
            except RateLimited as exc:
                reset = exc.reset_at.timestamp() if exc.reset_at else None
                refused.append((time.time(), reset))
                kinds.add(exc.limit_type)
                await limiter.on_rate_limited(
                    "submit",
                    retry_after_s=exc.retry_after_s,
                    limit_type=exc.limit_type,
                    reset_at=exc.reset_at,
                )

    clients = [
        DocuTrayClient(base_url=emulator.base_url, api_key=emulator.api_key) for _ in range(2)
    ]
    try:
        await asyncio.gather(
            *(
                caller(lim, cli)
                for lim, cli in zip(limiters, clients, strict=True)
                for _ in range(4)
            )
        )
    finally:
        for cli in clients:
            await cli.aclose()
        for lim in limiters:
            await lim.close()
    assert kinds == {"hour"}
    # Without the shared hold: 10 calls/s for 8 s against 2 calls/s allowed, ~60 refused.
    assert len(accepted) >= 12, (len(accepted), len(refused))
    assert 1 <= len(refused) <= 16, (len(accepted), len(refused))
    # Nothing was sent between a 429 and the reset it named (the calls then in flight aside).
    for at, reset in refused:
        assert reset is not None
        sent_in_hold = [t for t in accepted if at + 0.3 < t < reset - 0.1]
        assert sent_in_hold == [], (at, reset, sent_in_hold)
