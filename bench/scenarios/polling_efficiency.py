"""Scenario 4: status calls per conversion and detection delay, adaptive versus fixed 2 s.

Two parts:

- **simulated** (``bench/polling.py``, pure and seeded): the bridge's
  :class:`~service.scheduler.PollPolicy` against the SDK's fixed 2 s polling
  at medians 1 s, 5 s and 30 s (log-normal, sigma 0.5), thousands of
  conversions each;
- **live** at median 5 s: requests produced at a steady rate to one bridge
  replica and, side by side, to the SDK loop in a thread pool big enough
  never to queue, each against its own emulator (no rate limit). Status calls
  come from each result's ``timings.status_calls``; the detection delay is the
  result's ``published_at`` minus the emulator's ``response_timestamp``
  (the exact instant the conversion finished).

Target (issue 8): under 1.5 status calls per conversion on average, with a
p95 detection delay under 25 % of the median plus 1 s.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import polling
from bench.harness import (
    REPO,
    Context,
    Run,
    b64,
    load_average,
    mean,
    paced_produce,
    percentile,
)
from bench.scenarios.throughput import _SdkLoop
from service import samples
from service.devkit.outcomes import OutcomeCollector
from service.devkit.processes import BridgeProcess, EmulatorProcess
from service.devkit.waiting import wait_until

LIVE_MEDIAN_S = 5.0
SIGMA = 0.5


def target_delay_s(median_s: float) -> float:
    """The issue's bound on the p95 detection delay at a given median processing time."""
    return 0.25 * median_s + 1.0


def simulated(*, n: int) -> list[dict[str, Any]]:
    """`bench/polling.py` rows, each judged against the target."""
    rows = polling.run(sigma=SIGMA, n=n, warmup=1000, seed=7)
    out = []
    for row in rows:
        item = {
            "median_s": row.median_s,
            "policy": row.policy,
            "status_calls_per_conversion": row.calls_per_conversion,
            "detection_delay_p50_s": row.delay_p50_s,
            "detection_delay_p95_s": row.delay_p95_s,
            "target_delay_p95_s": target_delay_s(row.median_s),
        }
        item["meets_calls_target"] = row.calls_per_conversion < 1.5
        item["meets_delay_target"] = row.delay_p95_s < target_delay_s(row.median_s)
        out.append(item)
    return out


def _live_one(
    ctx: Context, kind: str, *, rate_per_s: float, duration_s: float, threads: int
) -> dict[str, Any]:
    emulator = EmulatorProcess(
        cwd=REPO,
        args=[
            "--processing-median-s",
            str(LIVE_MEDIAN_S),
            "--processing-sigma",
            str(SIGMA),
            "--seed",
            "11",
        ],
        log_path=ctx.workdir / f"emulator-s4-{kind}.log",
    ).start()
    run = Run.new(ctx.bootstrap, f"s4-{kind}", ctx.workdir)
    bridge: BridgeProcess | None = None
    sdk: _SdkLoop | None = None
    collector: OutcomeCollector | None = None
    n = int(rate_per_s * duration_s)
    try:
        run.create_topics()
        if kind == "bridge":
            bridge = run.bridge(
                "r1",
                emulator,
                BRIDGE_SUBMIT_RATE_PER_MINUTE="6000",
                BRIDGE_STATUS_RATE_PER_MINUTE="6000",
            ).start()
            bridge.wait_ready(120)
        else:
            sdk = _SdkLoop(run, emulator, threads)
            time.sleep(3.0)  # wait-ok: the SDK loop's consumer joins its group
        collector = OutcomeCollector(ctx.bootstrap, [run.result_topic]).start()
        paced_produce(
            ctx.bootstrap,
            run.input_topic,
            [f"{run.name}-{i:05d}" for i in range(n)],
            rate_per_s=rate_per_s,
            document_b64=b64(samples.pdf("Invoice")),
            content_type="application/pdf",
        )
        wait_until(lambda: collector is not None and collector.count() >= n, 120, "live results")
        outcomes = collector.snapshot()
        stats = emulator.stats()
    finally:
        if collector is not None:
            collector.stop()
        if bridge is not None:
            bridge.stop_timed(30)
        if sdk is not None:
            sdk.stop()
        emulator.stop()
        with contextlib.suppress(Exception):
            run.delete_topics()
    done = [o for o in outcomes if o.ok]
    calls = [float(o.status_calls or 0) for o in done]
    delays = [o.published_at - o.completed_at for o in done if o.published_at and o.completed_at]
    avg_calls = mean(calls)
    p95 = percentile(delays, 0.95)
    return {
        "contender": "bridge (adaptive)"
        if kind == "bridge"
        else f"SDK fixed 2 s ({threads} threads)",
        "median_s": LIVE_MEDIAN_S,
        "conversions": len(done),
        "offered_rate_per_s": rate_per_s,
        "status_calls_per_conversion": round(avg_calls, 3) if avg_calls is not None else None,
        "emulator_status_calls_per_conversion": round(stats["status_calls"] / max(1, len(done)), 3),
        "detection_delay_p50_s": _r(percentile(delays, 0.5)),
        "detection_delay_p95_s": _r(p95),
        "detection_delay_max_s": _r(max(delays) if delays else None),
        "target_delay_p95_s": target_delay_s(LIVE_MEDIAN_S),
        "meets_calls_target": avg_calls is not None and avg_calls < 1.5,
        "meets_delay_target": p95 is not None and p95 < target_delay_s(LIVE_MEDIAN_S),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run(ctx: Context) -> dict[str, Any]:
    """Simulated at three medians, then live at 5 s (bridge and SDK side by side)."""
    started = time.monotonic()
    sim = simulated(n=5000 if ctx.quick else 20000)
    rate, duration = (3.0, 30.0) if ctx.quick else (4.0, 90.0)
    threads = 32 if ctx.quick else 48
    load_before = load_average()
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(_live_one, ctx, kind, rate_per_s=rate, duration_s=duration, threads=threads)
            for kind in ("bridge", "sdk")
        ]
        live = [f.result() for f in futures]
    return {
        "simulated": sim,
        "live": live,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "seconds": round(time.monotonic() - started, 1),
    }
