"""N limiter replicas (separate processes) sharing one Redis budget against the emulator.

Measures what the issue asks: the share of the emulator's per-minute limit the
replicas achieve together, and how many 429s they get, over a long run.

    .venv/bin/python bench/limiter_share.py [--duration-s 180] [--limit 600]
        [--overdrive 1.0] [--replicas 3] [--redis-url URL] [--json PATH]

``--overdrive 1.5`` configures the limiter 50 % above the emulator's limit to
watch the 429 feedback (AIMD + shared block) bring 429s down. Without
``--redis-url`` a private redis-server is started on a free port.

The replica itself and :class:`~service.devkit.limiter_replica.ReplicaProcess` (which the
limiter tests use too) live in :mod:`service.devkit.limiter_replica`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service import samples  # noqa: E402 - after the path fix: run as a script too
from service.devkit.limiter_replica import ReplicaProcess  # noqa: E402
from service.devkit.processes import EmulatorProcess, running_redis  # noqa: E402
from service.devkit.waiting import wait_until  # noqa: E402

# --------------------------------------------------------------------------- the benchmark


def bench(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="limiter-share-"))
    emulator = EmulatorProcess(
        log_path=log_dir / "emulator.log",
        args=["--rate-limit-per-minute", str(args.limit), "--processing-median-s", "0.2"],
        cwd=ROOT,
    ).start()
    api_key = emulator.api_key
    with contextlib.ExitStack() as stack:
        stack.callback(emulator.close)
        redis_url = args.redis_url or stack.enter_context(running_redis(log_dir / "redis")).url
        answer = httpx.post(
            f"{emulator.base_url}/api/convert-async",
            headers=emulator.auth_headers,
            json={
                "image_base64": base64.b64encode(samples.pdf("limiter share")).decode(),
                "document_type_code": "invoice",
            },
            timeout=10,
        )
        answer.raise_for_status()
        conversion_id = answer.json()["conversion_id"]
        emulator.reset_stats()
        cfg = {
            "mode": "emulator",
            "redis_url": redis_url,
            "rate": args.limit * args.overdrive,
            "burst": args.burst,
            "replicas": args.replicas,
            "prefix": f"bench-{os.urandom(4).hex()}:",
            "duration_s": args.duration_s,
            "concurrency": 4,
            "base_url": emulator.base_url,
            "api_key": api_key,
            "conversion_id": conversion_id,
        }
        replicas = [ReplicaProcess(cfg, log_dir=log_dir) for _ in range(args.replicas)]
        wait_until(lambda: all(r.of("ready") for r in replicas), 30, "every replica ready")
        start_at = time.time() + 0.5
        for r in replicas:
            r.go(start_at)
        for r in replicas:
            r.stop(timeout_s=args.duration_s + 60)
        stats = emulator.stats()
    calls = [e for r in replicas for e in r.of("call")]
    buckets: dict[int, list[int]] = {}
    for e in calls:
        bucket = int((e["at"] - start_at) // 30)
        counts = buckets.setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += e["status"] == 429
    ok = stats["counted_calls_total"]
    result = {
        "limit_per_minute": args.limit,
        "limiter_per_minute": args.limit * args.overdrive,
        "replicas": args.replicas,
        "duration_s": args.duration_s,
        "accepted_calls": ok,
        "share_of_limit": round(ok / (args.limit * args.duration_s / 60), 4),
        "rate_limited_429": stats["rate_limited"],
        "max_calls_in_any_60s": stats["max_calls_per_60s"],
        "per_replica_calls": [len(r.of("call")) for r in replicas],
        "final_effective_per_minute": [
            r.of("done")[-1]["effective_per_minute"] for r in replicas if r.of("done")
        ],
        "per_30s": {
            f"{b * 30}-{b * 30 + 30}s": {"calls": c, "429": n}
            for b, (c, n) in sorted(buckets.items())
        },
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--limit", type=int, default=600, help="emulator limit per minute")
    parser.add_argument("--overdrive", type=float, default=1.0, help="limiter rate / limit")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = bench(args)
    print(
        f"{args.replicas} replicas, {args.duration_s:.0f} s, emulator limit {args.limit}/min, "
        f"limiter {result['limiter_per_minute']:.0f}/min"
    )
    print(f"  accepted calls       {result['accepted_calls']}")
    print(f"  share of the limit   {result['share_of_limit'] * 100:.1f} %")
    print(f"  429 answers          {result['rate_limited_429']}")
    print(f"  max in any 60 s      {result['max_calls_in_any_60s']} (limit {args.limit})")
    print(f"  per replica          {result['per_replica_calls']}")
    print(f"  final effective rate {result['final_effective_per_minute']}")
    for span, row in result["per_30s"].items():
        print(f"  {span:>10}: {row['calls']:5d} calls, {row['429']:4d} x 429")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
