"""Adaptive polling versus the SDK's fixed 2 s polling, simulated (no network, seeded).

Conversions take a log-normal time (sigma 0.5 unless ``--sigma``) at medians
of 1 s, 5 s and 30 s. The adaptive policy (service.scheduler) starts from the
configured default median (5 s), learns during a warm-up, then is measured.
The SDK checks the submit answer, then polls every 2 s until done.

For each: mean status calls per conversion, and the delay between a
conversion finishing and the poll that sees it (p50, p95).

    .venv/bin/python bench/polling.py [--json PATH] [--sigma 0.5] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.scheduler import DurationModel, PollPolicy

DEADLINE_S = 3600.0
DOC_TYPE = "invoice"


@dataclass
class Row:
    median_s: float
    policy: str
    calls_per_conversion: float
    delay_p50_s: float
    delay_p95_s: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate_adaptive(
    policy: PollPolicy, durations: list[float], rng: random.Random, *, learn: bool
) -> tuple[list[int], list[float]]:
    calls: list[int] = []
    delays: list[float] = []
    for duration in durations:
        t = policy.first_delay_s(DOC_TYPE, rng=rng, remaining_s=DEADLINE_S)
        n = 1
        while t < duration:
            t += policy.next_delay_s(
                DOC_TYPE, elapsed_s=t, polls_done=n, remaining_s=DEADLINE_S - t, rng=rng
            )
            n += 1
        calls.append(n)
        delays.append(t - duration)
        if learn:
            policy.model.observe(DOC_TYPE, duration)
    return calls, delays


def simulate_fixed(durations: list[float], interval_s: float) -> tuple[list[int], list[float]]:
    calls = [max(1, math.ceil(d / interval_s)) for d in durations]
    delays = [n * interval_s - d for n, d in zip(calls, durations, strict=True)]
    return calls, delays


def run(*, sigma: float, n: int, warmup: int, seed: int) -> list[Row]:
    rows: list[Row] = []
    presets = {
        "adaptive (defaults)": {},
        "adaptive, latency-leaning": {
            "first_poll_quantile": 0.4,
            "first_gap_fraction": 0.45,
            "backoff": 0.1,
        },
    }
    for median in (1.0, 5.0, 30.0):
        rng = random.Random(seed)
        durations = [median * math.exp(sigma * rng.gauss()) for _ in range(warmup + n)]
        for name, kwargs in presets.items():
            model = DurationModel(default_median_s=5.0)
            policy = PollPolicy(model=model, **kwargs)
            prng = random.Random(seed + 1)
            simulate_adaptive(policy, durations[:warmup], prng, learn=True)
            calls, delays = simulate_adaptive(policy, durations[warmup:], prng, learn=True)
            rows.append(_row(median, name, calls, delays))
        calls, delays = simulate_fixed(durations[warmup:], 2.0)
        rows.append(_row(median, "SDK fixed 2 s", calls, delays))
    return rows


def _row(median: float, name: str, calls: list[int], delays: list[float]) -> Row:
    return Row(
        median,
        name,
        round(statistics.fmean(calls), 3),
        round(_percentile(delays, 0.5), 3),
        round(_percentile(delays, 0.95), 3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--n", type=int, default=20000, help="measured conversions per median")
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rows = run(sigma=args.sigma, n=args.n, warmup=args.warmup, seed=args.seed)
    header = f"{'median':>7} {'policy':<26} {'calls/conv':>10} {'delay p50':>10} {'delay p95':>10}"
    print(f"log-normal processing time, sigma {args.sigma}; {args.n} conversions per median")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.median_s:>6.0f}s {r.policy:<26} {r.calls_per_conversion:>10.2f}"
            f" {r.delay_p50_s:>9.2f}s {r.delay_p95_s:>9.2f}s"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
