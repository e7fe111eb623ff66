"""Scenario 2: the bridge's own cost, with DocuTray out of the way.

The emulator answers at once (processing time ~1 ms, no rate limit), the
bridge's limiter rates are huge and its first poll comes after ~10 ms, so
what remains is the pipeline: consume, validate, changelog writes, HTTP
submit and status calls, result plus tombstone in a transaction, commit.
One replica; N requests produced after a warm-up batch.

Measured: requests per second from the first request produced to the last
result seen committed (read_committed reader), and the CPU seconds the bridge
process used per 1,000 requests (psutil: user + system, all threads, from
just before the first request to the last result). Then the same run again
under ``py-spy record`` (non-blocking, all threads) for the profile.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    Context,
    PySpy,
    b64,
    contender,
    cpu_seconds,
    load_average,
    produce_requests,
    py_spy_binary,
    rss_bytes,
    summarize_profile,
)
from service import samples

WARMUP_REQUESTS = 200

BRIDGE_ENV = {
    "BRIDGE_SUBMIT_RATE_PER_MINUTE": "100000000",
    "BRIDGE_STATUS_RATE_PER_MINUTE": "100000000",
    "BRIDGE_RATE_BURST": "10000",
    "BRIDGE_POLL_DEFAULT_MEDIAN_S": "0.01",
    "BRIDGE_POLL_MIN_INTERVAL_S": "0.01",
    "BRIDGE_POLL_MAX_INTERVAL_S": "1",
    "BRIDGE_MAX_PENDING": "20000",
}


def measure(ctx: Context, n: int, *, profile_to: Path | None = None) -> dict[str, Any]:
    """One bridge replica, `n` requests after a warm-up; optionally under py-spy."""
    document = b64(samples.pdf("Invoice"))
    emulator_args = ["--processing-median-s", "0.001", "--processing-sigma", "0"]
    with contender(ctx, "s2", emulator_args=emulator_args, env=BRIDGE_ENV) as entrant:
        emulator, run, bridge = entrant.emulator, entrant.run, entrant.bridge
        collector = entrant.collector
        ready_s = entrant.start()

        def send(ids: list[str]) -> None:
            produce_requests(
                ctx.bootstrap,
                run.input_topic,
                ids,
                document_b64=document,
                content_type="application/pdf",
            )

        send([f"{run.name}-warm-{i:05d}" for i in range(WARMUP_REQUESTS)])
        collector.wait_count(WARMUP_REQUESTS, 120)
        time.sleep(1.0)  # wait-ok: let the warm-up's last commit settle before measuring
        warm = collector.count()
        load_before = load_average()
        with contextlib.ExitStack() as stack:
            if profile_to is not None:
                stack.enter_context(PySpy(bridge.pid, profile_to))
            cpu0, emu_cpu0 = cpu_seconds(bridge.pid), cpu_seconds(emulator.pid)
            t_first = time.time()
            send([f"{run.name}-{i:06d}" for i in range(n)])
            produced_s = time.time() - t_first

            collector.wait_count(warm + n, 60 + n / 50, on_wait=bridge.check_alive)
            cpu1, emu_cpu1 = cpu_seconds(bridge.pid), cpu_seconds(emulator.pid)
        outcomes = collector.snapshot()[warm:]
        t_last = max(o.seen_at for o in outcomes)
        rss = rss_bytes(bridge.pid)
        exit_code, stop_s = bridge.stop_timed(40)
    elapsed = t_last - t_first
    return {
        "requests": n,
        "results": sum(o.ok for o in outcomes),
        "dead_letters": sum(not o.ok for o in outcomes),
        "seconds": round(elapsed, 3),
        "produce_seconds": round(produced_s, 3),
        "requests_per_s": round(n / elapsed, 1),
        "bridge_cpu_s": round(cpu1 - cpu0, 3),
        "bridge_cpu_s_per_1000": round((cpu1 - cpu0) / n * 1000, 3),
        "bridge_cpu_utilisation_cores": round((cpu1 - cpu0) / elapsed, 2),
        "emulator_cpu_s_per_1000": round((emu_cpu1 - emu_cpu0) / n * 1000, 3),
        "bridge_rss_mb_after": round(rss / 2**20, 1),
        "bridge_ready_s": round(ready_s, 2),
        "bridge_exit_code": exit_code,
        "bridge_stop_s": round(stop_s, 2),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def run(ctx: Context) -> dict[str, Any]:
    """The measured run, then the profiled run."""
    n = 1000 if ctx.quick else 5000
    started = time.monotonic()
    result: dict[str, Any] = {"config": BRIDGE_ENV, "measured": measure(ctx, n)}
    if py_spy_binary() is not None:
        out = ctx.results_dir / "profile-s2.collapsed.txt"
        profiled = measure(ctx, n, profile_to=out)
        result["profiled_run"] = profiled
        result["profile"] = summarize_profile(out) if out.exists() else None
        result["profile_file"] = out.name
    else:
        result["profile"] = None
        result["profile_note"] = "py-spy not installed: pip install py-spy"
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
