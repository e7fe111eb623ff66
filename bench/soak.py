"""`make soak`: an hour at a steady rate with faults every few minutes; flat memory is the pass.

    python -m bench.soak [--duration-s 3600 | --quick] [--rate-per-s 5] [--fault-every-s 300]
                         [--sample-every-s 10] [--json bench/results/soak.json]

What runs (all real processes on loopback):

- the emulator (processing median 2 s), two bridge replicas (``steady``, measured, never
  killed; ``victim``, the kill -9 target) in one group on fresh topics of the local
  Kafka (``KAFKA_BOOTSTRAP_SERVERS``), sharing a Redis of the soak's own (a
  ``redis-server`` on a free port, so that restarting it disturbs nobody else);
- a producer at ``--rate-per-s`` requests per second, each a small base64 PDF;
- a reader of the result and dead-letter topics (read_committed);
- a fault every ``--fault-every-s``, in turn: ``kill -9`` of the victim (restarted at once,
  as a container restart would), a burst of 500s (every API call fails for 15 s), a Redis
  restart (down for 5 s).

Every ``--sample-every-s`` it prints and records the RSS of both replicas (psutil), the
pending backlog (sum of ``docutray_bridge_pending_conversions``), and the counts. At the
end it stops producing, waits for every request's outcome, checks the history (exactly
one result per request: the chaos suite's checker), and gives a verdict:

- memory: the least-squares slope of the steady replica's RSS over the last 2/3 of the
  run; flat when the growth it implies over that window is under
  ``max(8 MiB, 5 % of the mean RSS)``;
- backlog: the pending backlog drains to zero after production stops;
- history: nothing lost, nothing duplicated.

Writes everything to ``--json`` (default ``bench/results/soak.json``); exit code 0 when the
verdict passes, 1 otherwise. ``--quick`` (120 s, a fault every 30 s, 10 s session timeout)
checks that the soak works; its memory verdict is only indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.harness import (
    REPO,
    Run,
    b64,
    request_value,
    rss_bytes,
)
from service import samples
from service.devkit.history import GOOD, Observed, check_history
from service.devkit.outcomes import OutcomeCollector
from service.devkit.processes import BridgeProcess, EmulatorProcess, RedisServer
from service.devkit.producing import PacedProducer, Record
from service.devkit.waiting import wait_until

MIB = 1024 * 1024
DEFAULT_JSON = REPO / "bench" / "results" / "soak.json"
FAULTS = ("kill -9 victim", "500 burst", "redis restart")


# --------------------------------------------------------------------------- pure verdicts


def slope_per_s(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) points (0 for fewer than two distinct times)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t == 0:
        return 0.0
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var_t


def tail_fraction(
    points: list[tuple[float, float]], *, fraction: float
) -> list[tuple[float, float]]:
    """The points in the last `fraction` of the time span."""
    if not points:
        return []
    start, end = points[0][0], points[-1][0]
    cut = end - (end - start) * fraction
    return [(t, y) for t, y in points if t >= cut]


@dataclass(frozen=True)
class MemoryVerdict:
    """Is memory flat over the last 2/3 of the run?"""

    window_s: float
    slope_mib_per_hour: float
    growth_over_window_mib: float
    allowed_growth_mib: float
    mean_rss_mib: float
    max_rss_mib: float
    flat: bool


def memory_verdict(
    rss_points: list[tuple[float, float]],
    *,
    fraction: float = 2 / 3,
    min_allowed_mib: float = 8.0,
    relative_allowed: float = 0.05,
) -> MemoryVerdict:
    """Slope of RSS (bytes) over the last `fraction` of the run, and whether it is flat."""
    window = tail_fraction(rss_points, fraction=fraction)
    if len(window) < 2:
        return MemoryVerdict(0.0, 0.0, 0.0, min_allowed_mib, 0.0, 0.0, False)
    slope = slope_per_s(window)
    span_s = window[-1][0] - window[0][0]
    mean_mib = sum(y for _, y in window) / len(window) / MIB
    growth_mib = slope * span_s / MIB
    allowed = max(min_allowed_mib, relative_allowed * mean_mib)
    return MemoryVerdict(
        window_s=round(span_s, 1),
        slope_mib_per_hour=round(slope * 3600 / MIB, 3),
        growth_over_window_mib=round(growth_mib, 3),
        allowed_growth_mib=round(allowed, 3),
        mean_rss_mib=round(mean_mib, 2),
        max_rss_mib=round(max(y for _, y in window) / MIB, 2),
        flat=growth_mib <= allowed,
    )


# --------------------------------------------------------------------------- moving parts


def soak_load(bootstrap: str, topic: str, *, rate_per_s: float) -> PacedProducer:
    """`soak-N` requests (a small base64 PDF each, stamped when produced) at a steady rate."""
    document = b64(samples.pdf("Soak invoice"))

    def make(n: int) -> Record:
        rid = f"soak-{n}"
        value = request_value(
            rid, document_b64=document, content_type="application/pdf", produced_at=time.time()
        )
        return rid, value, None

    return PacedProducer(bootstrap, topic, make, rate_per_s=rate_per_s)


@dataclass
class Sample:
    """One line of the soak's record."""

    t_s: float
    steady_rss_mib: float | None
    victim_rss_mib: float | None
    pending: float
    produced: int
    outcomes: int
    restarts: int
    fault: str | None = None


@dataclass
class Soak:
    """State of one soak run."""

    emulator: EmulatorProcess
    redis: RedisServer
    steady: BridgeProcess
    victim: BridgeProcess
    producer: PacedProducer
    reader: OutcomeCollector
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    restarts: int = 0
    exits: list[tuple[str, int | None]] = field(default_factory=list)
    #: The sampling clock; also ticks while a fault lasts.
    sample_due: Callable[[float], bool] | None = None

    def now(self) -> float:
        return time.monotonic() - self.started

    def supervise(self) -> None:
        """Restart a replica that exited on its own (as Kubernetes would), counting it."""
        for bridge in (self.steady, self.victim):
            if bridge.proc is not None and bridge.proc.poll() is not None:
                self.exits.append((bridge.name, bridge.proc.returncode))
                self.restarts += 1
                print(f"soak: {bridge.name} exited {bridge.proc.returncode}; restarting")
                bridge.start()

    def pending(self) -> float:
        total = 0.0
        for bridge in (self.steady, self.victim):
            with contextlib.suppress(httpx.HTTPError):
                total += bridge.metric("docutray_bridge_pending_conversions")
        return total

    @staticmethod
    def rss_mib(bridge: BridgeProcess) -> float | None:
        try:
            return round(rss_bytes(bridge.pid) / MIB, 2) if bridge.alive else None
        except psutil.Error:
            return None

    def sample(self, fault: str | None = None) -> Sample:
        s = Sample(
            t_s=round(self.now(), 1),
            steady_rss_mib=self.rss_mib(self.steady),
            victim_rss_mib=self.rss_mib(self.victim),
            pending=self.pending(),
            produced=len(self.producer.sent),
            outcomes=self.reader.count(),
            restarts=self.restarts,
            fault=fault,
        )
        self.samples.append(s)
        print(
            f"soak: t={s.t_s:7.1f}s  rss steady={s.steady_rss_mib} MiB victim="
            f"{s.victim_rss_mib} MiB  pending={s.pending:g}  produced={s.produced}  "
            f"outcomes={s.outcomes}  restarts={s.restarts}" + (f"  FAULT {fault}" if fault else ""),
            flush=True,
        )
        return s

    def inject(self, fault: str, *, burst_s: float, redis_down_s: float) -> None:
        """One fault; the 500 burst and the Redis outage last while sampling continues."""
        self.faults.append((round(self.now(), 1), fault))
        if fault == "kill -9 victim":
            if self.victim.proc is not None and self.victim.proc.poll() is None:
                self.victim.proc.kill()
                self.victim.proc.wait(10)
            self.victim.start()
        elif fault == "500 burst":
            self._configure(fault_500_rate=1.0)
            self._during(burst_s)
            self._configure(fault_500_rate=0.0)
        elif fault == "redis restart":
            self.redis.stop()
            self._during(redis_down_s)
            self.redis.start()
        self.sample(fault)

    def _configure(self, **knobs: Any) -> None:
        response = httpx.post(f"{self.emulator.base_url}/_emulator/config", json=knobs, timeout=10)
        response.raise_for_status()

    def _during(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.supervise()
            if self.sample_due is not None and self.sample_due(self.now()):
                self.sample()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))  # wait-ok: fault duration


def _every(interval_s: float, start_s: float) -> Callable[[float], bool]:
    """A clock that says True once per interval (first at start_s + interval_s)."""
    next_at = [start_s + interval_s]

    def due(now: float) -> bool:
        if now >= next_at[0]:
            next_at[0] += interval_s
            return True
        return False

    return due


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole soak; returns the JSON report."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
    if not bootstrap:
        raise SystemExit("soak: KAFKA_BOOTSTRAP_SERVERS is not set (run `make soak`)")
    workdir = Path(tempfile.mkdtemp(prefix="docutray-soak-"))
    print(f"soak: {args.duration_s:.0f} s at {args.rate_per_s}/s; logs in {workdir}", flush=True)
    emulator = EmulatorProcess(
        cwd=REPO,
        args=["--processing-median-s", "2.0", "--processing-sigma", "0.5", "--seed", "7"],
        log_path=workdir / "emulator.log",
    ).start()
    redis = RedisServer(workdir / "redis").start(timeout_s=20)
    soak_run = Run.new(bootstrap, "soak", workdir, partitions=6)
    soak_run.create_topics()
    overrides = {
        "REDIS_URL": redis.url,
        "BRIDGE_EXPECTED_REPLICAS": "2",
        "BRIDGE_SUBMIT_RATE_PER_MINUTE": str(int(args.rate_per_s * 60 * 4)),
        "BRIDGE_STATUS_RATE_PER_MINUTE": str(int(args.rate_per_s * 60 * 12)),
        "BRIDGE_UNREACHABLE_PAUSE_AFTER_S": "5",
        "BRIDGE_SYSTEMIC_PROBE_INTERVAL_S": "2",
    }
    if args.quick:
        overrides["KAFKA_CONSUMER_SESSION_TIMEOUT_MS"] = "10000"
    steady = soak_run.bridge("steady", emulator, **overrides).start()
    victim = soak_run.bridge("victim", emulator, **overrides).start()
    steady.wait_ready()
    victim.wait_ready()
    reader = OutcomeCollector(bootstrap, [soak_run.result_topic, soak_run.dead_letter_topic])
    reader.start()
    producer = soak_load(bootstrap, soak_run.input_topic, rate_per_s=args.rate_per_s)
    sample_due = _every(args.sample_every_s, 0.0)
    soak = Soak(emulator, redis, steady, victim, producer, reader, sample_due=sample_due)
    producer.start()
    faults = itertools.cycle(FAULTS)
    fault_due = _every(args.fault_every_s, 0.0)
    soak.sample()
    try:
        while soak.now() < args.duration_s:
            soak.supervise()
            now = soak.now()
            if fault_due(now):
                soak.inject(next(faults), burst_s=15.0, redis_down_s=5.0)
            if sample_due(soak.now()):
                soak.sample()
            time.sleep(0.2)  # wait-ok: the soak's clock tick
        producer.stop()
        produced = list(producer.sent)
        drain_started = time.monotonic()

        def drained() -> bool:
            soak.supervise()
            if sample_due(soak.now()):
                soak.sample()
            return reader.count() >= len(produced) and soak.pending() == 0

        try:
            wait_until(drained, args.drain_timeout_s, "every request has an outcome")
            drain_s: float | None = round(time.monotonic() - drain_started, 1)
        except TimeoutError:
            drain_s = None
        final_sample = soak.sample("end")
        history = check_history(
            dict.fromkeys(produced, GOOD),
            [
                Observed(o.request_id, "result" if o.ok else "dead_letter", o.reason)
                for o in reader.snapshot()
            ],
        )
        stats = emulator.stats()
        codes = {}
        for bridge in (steady, victim):
            code, seconds = bridge.stop_timed()
            codes[bridge.name] = {"exit_code": code, "stop_s": round(seconds, 1)}
    finally:
        producer.halt()
        reader.stop()
        for bridge in (steady, victim):
            if bridge.alive:
                bridge.stop_timed(30)
        emulator.stop()
        redis.stop()
        soak_run.delete_topics()

    rss = [(s.t_s, s.steady_rss_mib * MIB) for s in soak.samples if s.steady_rss_mib]
    verdict = memory_verdict(rss)
    pending_window = tail_fraction(
        [(s.t_s, s.pending) for s in soak.samples if s.fault != "end"], fraction=2 / 3
    )
    resubmitted = sum(max(0, n - 1) for n in stats["conversions_by_request_id"].values())
    passed = (
        verdict.flat
        and drain_s is not None
        and history.ok
        and final_sample.pending == 0
        and all(c["exit_code"] == 0 for c in codes.values())
    )
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "duration_s": args.duration_s,
        "rate_per_s": args.rate_per_s,
        "fault_every_s": args.fault_every_s,
        "sample_every_s": args.sample_every_s,
        "logs": str(workdir),
        "samples": [asdict(s) for s in soak.samples],
        "faults": soak.faults,
        "restarts": soak.restarts,
        "unplanned_exits": soak.exits,
        "memory": asdict(verdict),
        "pending": {
            "max": max((s.pending for s in soak.samples), default=0),
            "slope_per_min_last_2_3": round(slope_per_s(pending_window) * 60, 3),
            "drained_in_s": drain_s,
        },
        "history": {
            "requests": history.requests_in,
            "outcomes": history.outcomes_out,
            "results": history.results,
            "dead_letters": history.dead_letters,
            "lost": len(history.lost),
            "duplicate_outcomes": history.duplicate_outcomes,
            "wrong": len(history.wrong),
        },
        "resubmitted_conversions": resubmitted,
        "stop": codes,
        "passed": passed,
    }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true", help="120 s, a fault every 30 s")
    parser.add_argument("--rate-per-s", type=float, default=5.0)
    parser.add_argument("--fault-every-s", type=float, default=300.0)
    parser.add_argument("--sample-every-s", type=float, default=10.0)
    parser.add_argument("--drain-timeout-s", type=float, default=180.0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    if args.quick:
        args.duration_s = 120.0
        args.fault_every_s = 30.0
    report = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    mem, pend, hist = report["memory"], report["pending"], report["history"]
    print(
        f"soak: memory {'FLAT' if mem['flat'] else 'GROWING'}: steady replica "
        f"{mem['slope_mib_per_hour']:+.2f} MiB/h over the last {mem['window_s']:.0f} s "
        f"(growth {mem['growth_over_window_mib']:+.2f} MiB, allowed {mem['allowed_growth_mib']:.1f}"
        f" MiB; mean {mem['mean_rss_mib']:.1f} MiB, max {mem['max_rss_mib']:.1f} MiB)"
    )
    print(
        f"soak: backlog max {pend['max']:g}, slope {pend['slope_per_min_last_2_3']:+.2f}/min, "
        f"drained in {pend['drained_in_s']} s; history: {hist['requests']} requests, "
        f"{hist['results']} results, {hist['dead_letters']} dead letters, lost {hist['lost']}, "
        f"duplicates {hist['duplicate_outcomes']}; {report['restarts']} unplanned restarts; "
        f"{report['resubmitted_conversions']} resubmitted conversions"
    )
    print(f"soak: {'PASS' if report['passed'] else 'FAIL'}; wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
