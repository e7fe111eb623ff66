"""`make bench`: the scenarios of issues 8, 12 and 11.6, unattended, with a table, JSON and a chart.

    python -m bench.run [--quick] [--scenario N ...] [--sequential] [--results-dir DIR]
                        [--pending-documents N]

Scenarios 1-4 are issue 8's; 5-7 issue 12's (1 MB documents pending, write
amplification, a result over the results topic's limit); 8 the dedupe
window's memory (issue 11.6). The full scenario 5 writes ~20 GB to Kafka
(10,000 requests of 1 MiB, twice) and takes about 25 minutes on two cores;
``--pending-documents 2000`` measures a smaller set.

Needs the local stack (``KAFKA_BOOTSTRAP_SERVERS``; ``REDIS_URL`` or a
``redis-server`` binary for the 3-replica run): ``make bench`` starts it and
exports both. Scenarios 1-4 take about 15-25 minutes, 6-8 about 6, scenario 5 at
10,000 from about 15 minutes (an idle machine) to an hour; ``--quick`` about 7 in all.

Writes ``bench/results/latest.json`` (scenarios not run this time keep their
previous figures, each marked with its mode and time), ``chart.png`` and
``README.md``; prints the tables. Exit code 1 if a scenario failed to run
(a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import Context, load_average
from bench.scenarios import (
    big_payloads,
    pending_scale,
    pipeline_cost,
    polling_efficiency,
    throughput,
)

SCENARIOS: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "1": ("throughput at a rate limit", throughput.run),
    "2": ("raw pipeline cost", pipeline_cost.run),
    "3": ("scale of the pending set", pending_scale.run),
    "3b": ("small requests pending, restore after kill -9", big_payloads.run_pending_small),
    "4": ("polling efficiency", polling_efficiency.run),
    "5": ("1 MB documents pending, restore after kill -9", big_payloads.run_pending_documents),
    "6": ("bytes written to Kafka per input byte", big_payloads.run_write_amplification),
    "7": ("a result over the results topic's limit", big_payloads.run_result_too_large),
    "8": ("dedupe window memory", big_payloads.run_dedupe_memory),
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about 7 minutes")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="run only these (repeat)"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="scenario 1: run the contenders one after another (default: side by side)",
    )
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    parser.add_argument(
        "--pending-documents",
        type=int,
        default=None,
        help="scenario 5: this many pending 1 MiB requests (default 10,000; 200 with --quick)",
    )
    args = parser.parse_args()

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
    if not bootstrap:
        print(
            "bench: KAFKA_BOOTSTRAP_SERVERS is not set; run `make bench`, or `make stack-up` "
            "and export the variables of .stack/env",
            file=sys.stderr,
        )
        return 2
    args.results_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="docutray-bench-"))
    ctx = Context(
        bootstrap=bootstrap,
        workdir=workdir,
        results_dir=args.results_dir,
        quick=args.quick,
        parallel=not args.sequential,
        big_pending=args.pending_documents,
    )
    mode = "quick" if args.quick else "full"
    latest = args.results_dir / "latest.json"
    results: dict[str, Any] = json.loads(latest.read_text()) if latest.exists() else {}
    results.setdefault("scenarios", {})
    results["mode"] = mode
    results["started_at"] = _now()
    results["machine"] = {"cpus": os.cpu_count(), "load_average_before": load_average()}
    print(f"bench: {mode} run; logs in {workdir}", flush=True)
    failed: list[str] = []
    started = time.monotonic()
    for key in args.scenario or sorted(SCENARIOS):
        title, fn = SCENARIOS[key]
        print(f"bench: scenario {key}, {title} ...", flush=True)
        t0 = time.monotonic()
        try:
            outcome = fn(ctx)
        except Exception as exc:  # one broken scenario must not hide the others
            traceback.print_exc()
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(key)
        outcome["mode"] = mode
        outcome["finished_at"] = _now()
        results["scenarios"][key] = outcome
        print(f"bench: scenario {key} done in {time.monotonic() - t0:.0f} s", flush=True)
        latest.write_text(json.dumps(results, indent=2) + "\n")
    results["finished_at"] = _now()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"]["load_average_after"] = load_average()
    results["targets"] = report.judge(results)
    latest.write_text(json.dumps(results, indent=2) + "\n")
    report.chart(results, args.results_dir / "chart.png")
    (args.results_dir / "README.md").write_text(report.readme(results))
    print()
    print(report.tables(results))
    print(f"bench: {mode} run took {results['seconds']:.0f} s; results in {args.results_dir}")
    if failed:
        print(f"bench: scenario(s) {', '.join(failed)} failed to run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
