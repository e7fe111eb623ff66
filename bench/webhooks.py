"""Webhook completions (issue 14): status calls per conversion and detection delay, live.

    python -m bench.webhooks [--rate 3] [--duration 60] [--replicas 2] [--out FILE]

Needs the local stack (``KAFKA_BOOTSTRAP_SERVERS``; ``REDIS_URL`` for more than one
replica). Three runs, one after the other, each with its own emulator (median 5 s,
sigma 0.5, no rate limit) and topics, requests produced at a steady rate:

- ``polling``: webhooks off (the adaptive poller alone, for comparison);
- ``webhooks``: every webhook delivered, to replica 1 only (completions of the
  other replica's partitions cross over through ``<group>.completions``);
- ``webhooks, 30 % lost``: ``--webhook-drop-rate 0.3``; polling is the fallback.

Per run: status calls per conversion (each result's ``timings.status_calls``, and the
emulator's count of status calls over conversions), and the delay from DocuTray
finishing (the emulator's ``response_timestamp``) to the result being published
(``timings.published_at``), p50/p95/max.

Targets (issue 14): with webhooks ≤ 1.1 calls per conversion and p95 delay ≤ 1.5 s;
with 30 % lost, every request completes with ≤ 2 calls per conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from bench.harness import (
    REPO,
    Run,
    b64,
    load_average,
    mean,
    paced_produce,
    percentile,
)
from service import samples
from service.devkit.outcomes import OutcomeCollector
from service.devkit.ports import free_port
from service.devkit.processes import BridgeProcess, EmulatorProcess
from service.devkit.waiting import wait_until

MEDIAN_S = 5.0
SIGMA = 0.5


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def one_run(
    label: str,
    *,
    workdir: Path,
    bootstrap: str,
    webhooks: bool,
    drop_rate: float,
    rate_per_s: float,
    duration_s: float,
    replicas: int,
    fallback_poll_s: float | None = None,
) -> dict[str, Any]:
    """One run: emulator, bridge replicas, paced requests, every outcome read back."""
    port = free_port()
    args = ["--processing-median-s", str(MEDIAN_S), "--processing-sigma", str(SIGMA)]
    args += ["--seed", "14"]
    if webhooks:
        args += ["--webhook-url", f"http://127.0.0.1:{port}/webhooks/docutray"]
        args += ["--webhook-drop-rate", str(drop_rate)]
    slug = label.replace(" ", "-").replace(",", "").replace("%", "pct")
    emulator = EmulatorProcess(
        args=args, log_path=workdir / f"emulator-{slug}.log", cwd=REPO
    ).start()
    run = Run.new(bootstrap, f"wh-{slug}", workdir)
    env = {
        "BRIDGE_SUBMIT_RATE_PER_MINUTE": "6000",
        "BRIDGE_STATUS_RATE_PER_MINUTE": "6000",
        "BRIDGE_USAGE_POLL_INTERVAL_S": "0",
    }
    if os.environ.get("REDIS_URL"):
        env["REDIS_URL"] = os.environ["REDIS_URL"]
    if webhooks:
        env["BRIDGE_WEBHOOKS_ENABLED"] = "true"
        if fallback_poll_s is not None:
            env["BRIDGE_WEBHOOK_FALLBACK_POLL_S"] = str(fallback_poll_s)
    bridges: list[BridgeProcess] = []
    collector: OutcomeCollector | None = None
    n = int(rate_per_s * duration_s)
    try:
        run.create_topics()
        for i in range(replicas):
            hook_port = port if i == 0 else free_port()
            bridges.append(
                run.bridge(f"{slug}-r{i + 1}", emulator, BRIDGE_WEBHOOK_PORT=str(hook_port), **env)
            )
        for bridge in bridges:
            bridge.start()
        for bridge in bridges:
            bridge.wait_ready(120)
        collector = OutcomeCollector(bootstrap, [run.result_topic, run.dead_letter_topic]).start()
        paced_produce(
            bootstrap,
            run.input_topic,
            [f"{run.name}-{i:05d}" for i in range(n)],
            rate_per_s=rate_per_s,
            document_b64=b64(samples.pdf("Invoice")),
            content_type="application/pdf",
        )
        wait_until(
            lambda: collector is not None and collector.count() >= n, 240, f"{label}: results"
        )
        outcomes = collector.snapshot()
        stats = emulator.stats()
        wakeups = {
            o: sum(b.metric("docutray_bridge_webhook_wakeups_total", outcome=o) for b in bridges)
            for o in ("woke", "unknown", "early", "mismatch")
        }
    finally:
        if collector is not None:
            collector.stop()
        for bridge in bridges:
            with contextlib.suppress(Exception):
                bridge.stop_timed(30)
        emulator.stop()
        with contextlib.suppress(Exception):
            run.delete_topics()
            AdminClient({"bootstrap.servers": bootstrap}).delete_topics(
                [f"{run.group}.completions"]
            )
    done = [o for o in outcomes if o.ok]
    calls = [float(o.status_calls or 0) for o in done]
    delays = [o.published_at - o.completed_at for o in done if o.published_at and o.completed_at]
    return {
        "run": label,
        "replicas": replicas,
        "fallback_poll_s": fallback_poll_s if webhooks else None,
        "median_s": MEDIAN_S,
        "offered_rate_per_s": rate_per_s,
        "requests": n,
        "results": len(done),
        "dead_letters": len(outcomes) - len(done),
        "status_calls_per_conversion": _r(mean(calls)),
        "status_calls_max": max(calls) if calls else None,
        "emulator_status_calls_per_conversion": _r(
            stats["status_calls"] / max(1, stats["submissions_accepted"])
        ),
        "delay_p50_s": _r(percentile(delays, 0.5)),
        "delay_p95_s": _r(percentile(delays, 0.95)),
        "delay_max_s": _r(max(delays) if delays else None),
        "webhooks_delivered": stats["webhooks"]["delivered"],
        "webhooks_dropped": stats["webhooks"]["dropped"],
        "wakeups": wakeups,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three runs and print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of offered load")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--fallback-poll-s", type=float, help="BRIDGE_WEBHOOK_FALLBACK_POLL_S (default: 30)"
    )
    parser.add_argument("--only", choices=("polling", "webhooks", "lost"), action="append")
    parser.add_argument("--out", type=Path, default=Path("bench/results/webhooks.json"))
    opts = parser.parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print("KAFKA_BOOTSTRAP_SERVERS is not set (start the local stack)", file=sys.stderr)
        return 2
    if opts.replicas > 1 and not os.environ.get("REDIS_URL"):
        print("REDIS_URL is needed for more than one replica", file=sys.stderr)
        return 2
    plan = [
        ("polling", "polling", False, 0.0),
        ("webhooks", "webhooks", True, 0.0),
        ("lost", "webhooks, 30 % lost", True, 0.3),
    ]
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    load_before = load_average()
    for key, label, webhooks, drop in plan:
        if opts.only and key not in opts.only:
            continue
        started = time.monotonic()
        row = one_run(
            label,
            workdir=workdir,
            bootstrap=bootstrap,
            webhooks=webhooks,
            drop_rate=drop,
            rate_per_s=opts.rate,
            duration_s=opts.duration,
            replicas=opts.replicas,
            fallback_poll_s=opts.fallback_poll_s,
        )
        row["seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "rows": rows,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "logs": str(workdir),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| run | results | calls/conversion (results) | (emulator) | max | "
        "delay p50 s | p95 s | max s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['run']} | {r['results']}/{r['requests']} | {r['status_calls_per_conversion']} "
            f"| {r['emulator_status_calls_per_conversion']} | {r['status_calls_max']} "
            f"| {r['delay_p50_s']} | {r['delay_p95_s']} | {r['delay_max_s']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
