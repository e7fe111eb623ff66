"""Scenario 1: documents per minute at an API limit of 600 calls/min (status calls count too).

Four contenders, each against its own emulator (limit 600/min on every call,
processing time log-normal, median 5 s, sigma 0.5) and its own topics, with
a backlog of requests queued before it starts:

- ``sdk-naive``: the official SDK, one document at a time (run_async + wait, 2 s polling);
- ``sdk-16-threads``: the same loop in a 16-thread pool;
- ``bridge-1`` / ``bridge-3``: 1 or 3 ``docutray-bridge run`` replicas with one shared
  budget of 590/min (submits and status calls), via Redis for 3 replicas.

Each is measured over a fixed window after a warm-up (the naive loop does
about 10 documents a minute, so 2,000 requests each would take hours):
documents whose result was published inside the window, the API calls the
emulator counted inside it, 429s over the whole run, latencies.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.harness import (
    REPO,
    Context,
    Run,
    b64,
    cpu_seconds,
    load_average,
    mean,
    percentile,
    produce_requests,
    redis_url,
)
from service import samples
from service.devkit.outcomes import OutcomeCollector
from service.devkit.processes import BridgeProcess, EmulatorProcess, stop_process
from service.devkit.waiting import wait_until

LIMIT_PER_MINUTE = 600
BRIDGE_RATE_PER_MINUTE = 590
MEDIAN_S = 5.0
SIGMA = 0.5
CONTENDERS = ("sdk-naive", "sdk-16-threads", "bridge-1", "bridge-3")


def _emulator(ctx: Context, label: str, seed: int) -> EmulatorProcess:
    return EmulatorProcess(
        cwd=REPO,
        args=[
            "--rate-limit-per-minute",
            str(LIMIT_PER_MINUTE),
            "--rate-limit-scope",
            "all",
            "--processing-median-s",
            str(MEDIAN_S),
            "--processing-sigma",
            str(SIGMA),
            "--seed",
            str(seed),
        ],
        log_path=ctx.workdir / f"emulator-s1-{label}.log",
    ).start()


class _SdkLoop:
    """The SDK loop as its own process."""

    def __init__(self, run: Run, emulator: EmulatorProcess, threads: int) -> None:
        self.log_path = run.workdir / "sdk-loop.log"
        env = {**os.environ, "DOCUTRAY_API_KEY": emulator.api_key}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.sdk_loop",
                    "--bootstrap",
                    run.bootstrap,
                    "--input-topic",
                    run.input_topic,
                    "--result-topic",
                    run.result_topic,
                    "--group",
                    run.group,
                    "--base-url",
                    emulator.base_url,
                    "--threads",
                    str(threads),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"SDK loop did not start: {line!r}; see {self.log_path}")

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=15)


def run_contender(
    ctx: Context,
    kind: str,
    *,
    window_s: float,
    warmup_s: float,
    backlog: int,
    redis: str,
    seed: int,
) -> dict[str, Any]:
    """Queue `backlog` requests, start the contender, measure over the window, stop it."""
    emulator = _emulator(ctx, kind, seed)
    run = Run.new(ctx.bootstrap, f"s1-{kind}", ctx.workdir)
    bridges: list[BridgeProcess] = []
    sdk: _SdkLoop | None = None
    collector: OutcomeCollector | None = None
    try:
        run.create_topics()
        ids = [f"{run.name}-{i:05d}" for i in range(backlog)]
        produce_requests(
            ctx.bootstrap,
            run.input_topic,
            ids,
            document_b64=b64(samples.pdf("Invoice")),
            content_type="application/pdf",
        )
        collector = OutcomeCollector(ctx.bootstrap, [run.result_topic]).start()
        if kind.startswith("sdk"):
            sdk = _SdkLoop(run, emulator, 1 if kind == "sdk-naive" else 16)
        else:
            replicas = int(kind.rsplit("-", 1)[1])
            env = {
                "BRIDGE_SHARED_BUDGET": "true",
                "BRIDGE_SUBMIT_RATE_PER_MINUTE": str(BRIDGE_RATE_PER_MINUTE),
                "BRIDGE_STATUS_RATE_PER_MINUTE": str(BRIDGE_RATE_PER_MINUTE),
                "BRIDGE_EXPECTED_REPLICAS": str(replicas),
                "REDIS_URL": redis if replicas > 1 else "",
            }
            bridges = [run.bridge(f"r{i + 1}", emulator, **env).start() for i in range(replicas)]
            for bridge in bridges:
                bridge.wait_ready(120)

            def settled() -> bool:
                owned = [b.metric("docutray_bridge_assigned_partitions") for b in bridges]
                return all(owned) and sum(owned) == run.partitions

            # The window starts once the group has settled: every replica owns partitions.
            wait_until(settled, 90, f"{kind}: partitions spread over every replica")
        t0, m0 = time.time(), time.monotonic()
        load_before = load_average()
        w_start, w_end = t0 + warmup_s, t0 + warmup_s + window_s
        end_at = m0 + warmup_s + window_s + 2.0
        while time.monotonic() < end_at:
            for bridge in bridges:
                if not bridge.alive:
                    raise RuntimeError(f"bridge {bridge.name} died:\n{bridge.log_tail()}")
            time.sleep(min(1.0, max(0.0, end_at - time.monotonic())))  # wait-ok: the window
        stats = emulator.stats(timestamps=True)
        load_after = load_average()
        cpu = sum(cpu_seconds(b.pid) for b in bridges) if bridges else None
        exit_codes = [b.stop_timed(40)[0] for b in bridges]
        if sdk is not None:
            sdk.stop()
        collector.stop()
        outcomes = collector.snapshot()
    finally:
        if collector is not None:
            collector.stop()
        for bridge in bridges:
            if bridge.alive:
                bridge.stop_timed(10)
        if sdk is not None and sdk.proc.poll() is None:
            sdk.stop()
        emulator.stop()
        with contextlib.suppress(Exception):
            run.delete_topics()

    window_min = window_s / 60
    done = [o for o in outcomes if o.ok and o.published_at and w_start <= o.published_at <= w_end]
    calls_in_window = [
        t
        for t in stats.get("counted_call_times_s", [])
        if m0 + warmup_s <= t <= m0 + warmup_s + window_s
    ]
    docs_per_min = len(done) / window_min
    status_per_doc = mean([float(o.status_calls or 0) for o in done])
    calls_per_doc = len(calls_in_window) / len(done) if done else None
    e2e = [o.published_at - o.produced_at for o in done if o.published_at and o.produced_at]
    service = [o.published_at - o.submitted_at for o in done if o.published_at and o.submitted_at]
    detect = [o.published_at - o.completed_at for o in done if o.published_at and o.completed_at]
    own_limit = LIMIT_PER_MINUTE / calls_per_doc if calls_per_doc else None
    ideal_limit = LIMIT_PER_MINUTE / 2
    per_10s: dict[str, int] = {}
    for o in outcomes:
        if o.ok and o.published_at:
            bucket = int((o.published_at - t0) // 10) * 10
            per_10s[str(bucket)] = per_10s.get(str(bucket), 0) + 1
    calls_per_10s: dict[str, int] = {}
    for t in stats.get("counted_call_times_s", []):
        if t >= m0:
            bucket = str(int((t - m0) // 10) * 10)
            calls_per_10s[bucket] = calls_per_10s.get(bucket, 0) + 1
    return {
        "contender": kind,
        "window_s": window_s,
        "warmup_s": warmup_s,
        "backlog": backlog,
        "docs_in_window": len(done),
        "docs_per_min": round(docs_per_min, 1),
        "status_calls_per_doc": _r(status_per_doc, 3),
        "api_calls_per_doc": _r(calls_per_doc, 3),
        "api_calls_per_min": round(len(calls_in_window) / window_min, 1),
        "rate_limited_429": stats["rate_limited"],
        "max_calls_in_any_60s": stats["max_calls_per_60s"],
        "submissions_accepted": stats["submissions_accepted"],
        "status_calls_total": stats["status_calls"],
        "latency_e2e_p50_s": _r(percentile(e2e, 0.5), 2),
        "latency_e2e_p95_s": _r(percentile(e2e, 0.95), 2),
        "latency_service_p50_s": _r(percentile(service, 0.5), 2),
        "latency_service_p95_s": _r(percentile(service, 0.95), 2),
        "detection_delay_p50_s": _r(percentile(detect, 0.5), 2),
        "detection_delay_p95_s": _r(percentile(detect, 0.95), 2),
        "physical_limit_ideal_docs_per_min": ideal_limit,
        "share_of_ideal_limit": round(docs_per_min / ideal_limit, 4),
        "physical_limit_own_docs_per_min": _r(own_limit, 1),
        "share_of_own_limit": _r(docs_per_min / own_limit if own_limit else None, 4),
        "bridge_cpu_s": _r(cpu, 2),
        "bridge_exit_codes": exit_codes,
        "results_per_10s": per_10s,
        "api_calls_per_10s": calls_per_10s,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run(ctx: Context) -> dict[str, Any]:
    """All four contenders (concurrently with ``ctx.parallel``, else one after the other)."""
    window_s = 35.0 if ctx.quick else 180.0
    warmup_s = 12.0 if ctx.quick else 30.0
    backlog = 1000 if ctx.quick else 3000
    started = time.monotonic()
    with redis_url() as redis:
        kwargs = {"window_s": window_s, "warmup_s": warmup_s, "backlog": backlog, "redis": redis}
        if ctx.parallel:
            with ThreadPoolExecutor(len(CONTENDERS)) as pool:
                futures = [
                    pool.submit(run_contender, ctx, kind, seed=i, **kwargs)
                    for i, kind in enumerate(CONTENDERS)
                ]
                rows = [f.result() for f in futures]
        else:
            rows = [run_contender(ctx, kind, seed=i, **kwargs) for i, kind in enumerate(CONTENDERS)]
    by_name = {row["contender"]: row for row in rows}
    naive = by_name["sdk-naive"]["docs_per_min"]
    for row in rows:
        row["speedup_vs_naive"] = round(row["docs_per_min"] / naive, 1) if naive else None
    return {
        "limit_per_minute": LIMIT_PER_MINUTE,
        "bridge_rate_per_minute": BRIDGE_RATE_PER_MINUTE,
        "processing": {"median_s": MEDIAN_S, "sigma": SIGMA},
        "parallel_contenders": ctx.parallel,
        "seconds": round(time.monotonic() - started, 1),
        "contenders": rows,
    }
