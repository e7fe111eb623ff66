"""Scenario 3: 100,000 conversions pending at once; memory, and the restore after a restart.

The emulator keeps every conversion running for about 50 minutes (so none
finishes during the run) and has no rate limit; requests carry a tiny base64
PNG (the URL form would make the emulator download it). One bridge replica
with ``BRIDGE_MAX_PENDING`` above N and a poll prior of 50 minutes (no status
calls while it submits). Measured:

1. the time until every request is ``submitted``
   (``docutray_bridge_pending_conversions{state="submitted"}`` = N) and the
   submit rate that implies;
2. the bridge's peak RSS over that time (psutil, sampled every 250 ms);
3. SIGTERM, restart, and the time from process start to ``/readyz`` 200
   (the changelog restore is inside it), plus
   ``docutray_bridge_changelog_restore_seconds`` and the restored count.
"""

from __future__ import annotations

import time
from typing import Any

from bench.harness import (
    Context,
    RssSampler,
    b64,
    contender,
    cpu_seconds,
    load_average,
    produce_requests,
    rss_bytes,
)
from service import samples
from service.devkit.processes import BridgeProcess
from service.devkit.waiting import wait_until

MEDIAN_S = 3000.0

BRIDGE_ENV = {
    "BRIDGE_SUBMIT_RATE_PER_MINUTE": "600000",
    "BRIDGE_STATUS_RATE_PER_MINUTE": "60000",
    "BRIDGE_RATE_BURST": "1000",
    "BRIDGE_POLL_DEFAULT_MEDIAN_S": str(MEDIAN_S),
    "BRIDGE_POLL_MAX_INTERVAL_S": "600",
    "BRIDGE_CONVERSION_DEADLINE_S": "7200",
}


def entry_footprint(n: int = 5000) -> dict[str, Any]:
    """Bytes per pending entry, measured in this process with tracemalloc.

    Builds `n` entries the way a restore does (``entry_from_changelog`` on
    changelog values of this scenario's request shape, state ``submitted``).
    Explains the RSS figure; not a substitute for it (RSS adds the allocator's
    slack, the engine's queues and the Kafka client's buffers).
    """
    import gc
    import tracemalloc
    from datetime import UTC, datetime

    from service.messages import DocumentRef, PendingRecord
    from service.pending import entry_from_changelog

    now = datetime.now(UTC)
    values = [
        PendingRecord(
            request_id=f"bench-s3-abcdef-{i:06d}",
            state="submitted",
            document_type_code="invoice",
            document=DocumentRef(partition=i % 6, offset=i, size_bytes=1200),
            received_at=now,
            attempts=1,
            conversion_id=f"c{i:024d}",
            submitted_at=now,
            content_hash=f"{i:032x}",
        )
        .model_dump_json()
        .encode()
        for i in range(n)
    ]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    entries = [entry_from_changelog(v, partition=0, epoch=1) for v in values]
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del entries
    return {
        "entries": n,
        "changelog_value_bytes": sum(map(len, values)) // n,
        "bytes_per_submitted_entry": used // n,
    }


def _pending(bridge: BridgeProcess, state: str) -> float:
    return bridge.metric("docutray_bridge_pending_conversions", state=state)


def run(ctx: Context) -> dict[str, Any]:
    """Fill the pending set, measure memory, restart, measure the restore."""
    n = 10_000 if ctx.quick else 100_000
    started = time.monotonic()
    env = {**BRIDGE_ENV, "BRIDGE_MAX_PENDING": str(n + 10_000)}
    result: dict[str, Any] = {"requests": n, "config": env, "load_average_before": load_average()}
    emulator_args = ["--processing-median-s", str(MEDIAN_S), "--processing-sigma", "0.01"]
    with contender(
        ctx, "s3", emulator_args=[*emulator_args, "--finished-ttl-s", "600"], env=env
    ) as entrant:
        emulator, run_, bridge = entrant.emulator, entrant.run, entrant.bridge
        t0 = time.monotonic()
        produce_requests(
            ctx.bootstrap,
            run_.input_topic,
            (f"{run_.name}-{i:06d}" for i in range(n)),
            document_b64=b64(samples.png(1, 1)),
            content_type="image/png",
            stamp=False,
        )
        result["produce_s"] = round(time.monotonic() - t0, 2)
        bridge.start()
        with RssSampler(bridge.pid) as rss:
            result["first_ready_s"] = round(bridge.wait_ready(120), 2)
            t_ready = time.monotonic()
            cpu_ready = cpu_seconds(bridge.pid)

            def all_submitted() -> bool:
                bridge.check_alive()
                return _pending(bridge, "submitted") >= n

            wait_until(all_submitted, 60 + n / 20, f"{n} conversions submitted", interval_s=1.0)
            fill_s = time.monotonic() - t_ready
            result["fill_s"] = round(fill_s, 1)
            result["submits_per_s"] = round(n / fill_s, 1)
            result["fill_cpu_s_per_1000"] = round(
                (cpu_seconds(bridge.pid) - cpu_ready) / n * 1000, 3
            )
            time.sleep(3.0)  # wait-ok: a steady-state memory sample with the set complete
            result["rss_mb_steady"] = round(rss_bytes(bridge.pid) / 2**20, 1)
            result["pending_by_state"] = {
                s: _pending(bridge, s) for s in ("queued", "submitting", "submitted")
            }
        result["rss_mb_peak"] = round(rss.peak_bytes / 2**20, 1)
        stats = emulator.stats()
        result["emulator_submissions_accepted"] = stats["submissions_accepted"]
        result["emulator_status_calls_before_restart"] = stats["status_calls"]
        code, stop_s = bridge.stop_timed(60)
        result["stop_exit_code"] = code
        result["stop_s"] = round(stop_s, 2)

        bridge.start()
        with RssSampler(bridge.pid) as rss2:
            result["restart_ready_s"] = round(bridge.wait_ready(300), 2)
            restore_sum = bridge.metric("docutray_bridge_changelog_restore_seconds_sum")
            restore_count = bridge.metric("docutray_bridge_changelog_restore_seconds_count")
            restored = bridge.metric("docutray_bridge_changelog_restored_records_total")
            events = bridge.log_events("changelog_restored")
            wait_until(lambda: _pending(bridge, "submitted") >= n, 120, "restored entries adopted")
            result["restart_adopted_s"] = round(time.monotonic() - bridge.started_at, 2)
            result["restore_seconds_metric_sum"] = round(restore_sum, 3)
            result["restore_observations"] = int(restore_count)
            result["restored_records"] = int(restored)
            result["restore_log_seconds"] = [e.get("seconds") for e in events]
            time.sleep(2.0)  # wait-ok: memory after the restored set is adopted
            result["restart_rss_mb"] = round(rss_bytes(bridge.pid) / 2**20, 1)
        result["restart_rss_mb_peak"] = round(rss2.peak_bytes / 2**20, 1)
        code, stop_s = bridge.stop_timed(60)
        result["second_stop_exit_code"] = code
    result["load_average_after"] = load_average()
    result["footprint"] = entry_footprint()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
