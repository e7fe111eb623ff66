"""The chaos scenario harness: faults at chosen moments, a supervisor, and the final check.

A :class:`Scenario` wraps one :class:`~tests.fixtures.bridge.Rig` (its own topics and
group) and one emulator. A test sends requests through it (each with an
:class:`~service.devkit.history.Expectation`), injects faults with its helpers, and ends
with :meth:`Scenario.finish`, which

1. waits until every expected request id has an outcome (bounded by time);
2. waits until every live replica holds nothing pending (no late outcome can follow);
3. reads every output topic with read_committed and checks the history
   (exactly one acceptable outcome per id, nothing lost, nothing duplicated);
4. reads the pending changelog (read_committed) and checks nothing is left in it;
5. prints the report row and appends it to ``$STACK_DIR/chaos-report.jsonl``.

While a scenario runs, every wait goes through :meth:`Scenario.wait_until`, which
also plays Kubernetes: a replica that should run but exited is restarted and counted
(``restarts``), and each live replica's ``docutray_bridge_resubmissions_total`` is
sampled per process incarnation, so counters of killed processes are not forgotten.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from service.devkit.history import (
    GOOD,
    Expectation,
    Observed,
    ScenarioReport,
    check_history,
    emulator_resubmissions,
    format_table,
)
from service.devkit.outcomes import OutcomeCollector
from service.devkit.processes import ProcessExited, sum_samples
from service.devkit.producing import PacedProducer, Record
from service.devkit.waiting import wait_until
from service.tools import Outcome
from tests.fixtures.bridge import BridgeProcess, Rig, pdf_request
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.stack import consume_all, stack_dir

T = TypeVar("T")

#: librdkafka settings every chaos replica gets through the KAFKA_* pass-through: a killed
#: replica's partitions move after 6 s (the broker's minimum) instead of the default 45 s.
CHAOS_KAFKA_ENV: Mapping[str, str] = {
    "KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
    "KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS": "1000",
}

REPORT_FILE = "chaos-report.jsonl"

#: The `chaos` fixture: `chaos(name, emulator=None, *, max_restarts=0, liveness_probe=False,
#: emulator_knobs=None, **bridge_env) -> Scenario`.
ChaosFactory = Callable[..., "Scenario"]


def report_path() -> Path:
    """Where report rows accumulate (under the stack's state directory, git-ignored)."""
    return stack_dir() / REPORT_FILE


@dataclass
class Scrape:
    """The few series the harness reads from one replica's /metrics."""

    resubmissions: dict[str, float]
    pending: float
    ready: float
    degraded: float
    assigned: float


def scrape(proc: BridgeProcess, *, timeout_s: float = 2.0) -> Scrape:
    """One /metrics scrape of a live replica (raises httpx.HTTPError when it does not answer)."""
    samples = proc.ops.metrics(timeout_s=timeout_s)
    resub: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "docutray_bridge_resubmissions_total":
            reason = dict(labels).get("reason", "?")
            resub[reason] = resub.get(reason, 0.0) + value
    return Scrape(
        resubmissions=resub,
        pending=sum_samples(samples, "docutray_bridge_pending_conversions"),
        ready=sum_samples(samples, "docutray_bridge_ready"),
        degraded=sum_samples(samples, "docutray_bridge_limiter_degraded"),
        assigned=sum_samples(samples, "docutray_bridge_assigned_partitions"),
    )


@dataclass
class Scenario:
    """One chaos scenario: requests with expectations, faults, a supervisor, a checker."""

    name: str
    rig: Rig
    emulator: RunningEmulator
    max_restarts: int = 0
    #: Play kubelet's liveness probe too: a replica whose /healthz answers 503 three times in
    #: a row (one check per second) is killed and restarted (counted in ``restarts``).
    liveness_probe: bool = False
    expected: dict[str, Expectation] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    restarts: int = 0
    exits: list[tuple[str, int | None]] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _want_running: dict[str, bool] = field(default_factory=dict)
    _resub: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    _emulator_base: Counter[str] = field(default_factory=Counter)
    _procs: dict[str, BridgeProcess] = field(default_factory=dict)
    _liveness_failures: dict[str, int] = field(default_factory=dict)
    _last_probe: float = 0.0
    #: Figures the scenario measured; written into its report row (``measures``).
    measures: dict[str, Any] = field(default_factory=dict)

    # ---- bookkeeping ----

    def note(self, event: str) -> None:
        """Add a line to the timeline printed with the report."""
        self.timeline.append(f"{time.monotonic() - self.started:7.1f}s  {event}")

    def fault(self, description: str) -> None:
        """Record an injected fault (listed in the report) and note it."""
        self.faults.append(description)
        self.note(f"FAULT {description}")

    # ---- requests ----

    def send(
        self,
        requests: list[dict[str, Any]],
        *,
        expect: Expectation = GOOD,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Produce requests and expect each to end as `expect` says."""
        for req in requests:
            rid = str(req["request_id"])
            assert rid not in self.expected, f"request id {rid} sent twice by the scenario"
            self.expected[rid] = expect
        self.rig.send(list(requests), headers=headers)

    # ---- replicas ----

    def bridge(self, name: str | None = None, **env: str) -> BridgeProcess:
        """Start a new replica (supervised: restarted if it exits on its own)."""
        proc = self.rig.bridge(name, start=True, **env)
        self._procs[proc.name] = proc
        self._want_running[proc.name] = True
        self.note(f"start {proc.name} (pid {self._pid(proc)})")
        return proc

    def ready(self, proc: BridgeProcess, *, timeout_s: float = 60.0) -> None:
        """Wait until `proc` is ready; fail at once (with its log) if it exits."""

        def check() -> bool:
            if not proc.alive:
                code = proc.proc.returncode if proc.proc is not None else None
                raise ProcessExited(f"bridge {proc.name} exited with {code}:\n{proc.log_tail(30)}")
            return proc.ready()

        self.wait_until(check, timeout_s, f"bridge {proc.name} ready", supervise=False)

    def kill(self, proc: BridgeProcess) -> None:
        """`kill -9` (not restarted until :meth:`restart`)."""
        self.sample()
        self._want_running[proc.name] = False
        pid = self._pid(proc)
        proc.kill()
        self.fault(f"kill -9 {proc.name} (pid {pid})")

    def terminate(self, proc: BridgeProcess, *, timeout_s: float = 40.0) -> int:
        """SIGTERM and wait; the replica leaves for good (returns the exit code)."""
        self.sample()
        self._want_running[proc.name] = False
        code = proc.stop(timeout_s=timeout_s)
        self.fault(f"SIGTERM {proc.name} -> exit {code}")
        return code

    def restart(self, proc: BridgeProcess) -> None:
        """Start a stopped replica again (same name and instance id: same transactional id)."""
        assert not proc.alive, f"{proc.name} still runs"
        proc.start()
        self._want_running[proc.name] = True
        self.note(f"restart {proc.name} (pid {self._pid(proc)})")

    def unsupervise(self, proc: BridgeProcess) -> None:
        """Leave `proc` alone from now on: if it exits, it is not restarted (nor counted)."""
        self._want_running[proc.name] = False

    def measure(self, key: str, value: Any) -> None:
        """Record a figure for the report row (``measures``) and note it."""
        self.measures[key] = value
        self.note(f"MEASURE {key} = {value}")

    def alive(self) -> list[BridgeProcess]:
        """Replicas running now."""
        return [p for p in self._procs.values() if p.alive]

    @staticmethod
    def _pid(proc: BridgeProcess) -> int:
        return proc.proc.pid if proc.proc is not None else -1

    # ---- the emulator ----

    def emulator_counts(self) -> Counter[str]:
        """Conversions created per request id, across emulator restarts."""
        counts = Counter(self._emulator_base)
        with contextlib.suppress(httpx.HTTPError):
            counts.update(self.emulator.stats()["conversions_by_request_id"])
        return counts

    def restart_emulator(self) -> None:
        """Restart the emulator process on its port: every conversion (and counter) is lost."""
        self._emulator_base.update(self.emulator.stats()["conversions_by_request_id"])
        self.emulator.restart()
        self.fault("emulator restarted (all conversions forgotten)")

    # ---- waiting, supervising, sampling ----

    def sample(self) -> dict[str, Scrape]:
        """Scrape every live replica; remember its resubmission counters per incarnation."""
        out: dict[str, Scrape] = {}
        for proc in self.alive():
            try:
                s = scrape(proc)
            except httpx.HTTPError:
                continue
            out[proc.name] = s
            self._resub[(proc.name, self._pid(proc))] = s.resubmissions
        return out

    def supervise(self) -> None:
        """Restart replicas that should run but exited (as Kubernetes would), counting them.

        With ``liveness_probe``, also restart a live replica whose /healthz failed three
        checks in a row (kubelet's ``failureThreshold: 3``).
        """
        for name, proc in self._procs.items():
            if not self._want_running.get(name) or proc.alive or proc.proc is None:
                continue
            code = proc.proc.returncode
            self.exits.append((name, code))
            self.restarts += 1
            self.note(f"CRASH {name} exited {code}; restarting (restart #{self.restarts})")
            print(f"--- {name} exited {code}; log tail:\n{proc.log_tail(25)}")
            proc.start()
        if not self.liveness_probe or time.monotonic() - self._last_probe < 1.0:
            return
        self._last_probe = time.monotonic()
        for name, proc in self._procs.items():
            if not self._want_running.get(name) or not proc.alive:
                continue
            try:
                response = httpx.get(proc.url("/healthz"), timeout=2)
            except httpx.HTTPError:
                continue  # not listening yet (starting): kubelet's startup probe covers that
            if response.status_code == 200:
                self._liveness_failures[name] = 0
                continue
            failures = self._liveness_failures.get(name, 0) + 1
            self._liveness_failures[name] = failures
            if failures < 3:
                continue
            self._liveness_failures[name] = 0
            self.exits.append((name, None))
            self.restarts += 1
            readyz = "unreachable"
            with contextlib.suppress(httpx.HTTPError):
                readyz = str(httpx.get(proc.url("/readyz"), timeout=2).status_code)
            self.note(
                f"LIVENESS {name} /healthz failed 3x ({response.text[:160]}; /readyz said "
                f"{readyz}); kill -9 and restart (restart #{self.restarts})"
            )
            self.sample()
            proc.kill()
            proc.start()

    def wait_until(
        self,
        predicate: Callable[[], T],
        timeout_s: float,
        message: str,
        *,
        interval_s: float = 0.25,
        supervise: bool = True,
    ) -> T:
        """Like `wait_for`, but supervising and sampling the replicas between checks.

        A :class:`~service.devkit.processes.ProcessExited` raised by the predicate fails at
        once (a replica exited while we wait for it); other exceptions are retried until the
        deadline, which fails with the timeline and the replicas' logs.
        """

        def check() -> T:
            if supervise:
                self.supervise()
            return predicate()

        try:
            return wait_until(
                check,
                timeout_s,
                f"[{self.name}] {message}",
                interval_s=interval_s,
                retry_on=(Exception,),
                between=self.sample,
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self._debug()}") from None

    def hold(self, seconds: float, why: str) -> None:
        """Let a fault last `seconds` while supervising and sampling (the fault's duration)."""
        self.note(f"hold {seconds:.1f}s: {why}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.supervise()
            self.sample()
            time.sleep(min(0.25, max(0.0, end - time.monotonic())))  # wait-ok: fault duration

    def resubmissions_by_process(self) -> dict[str, dict[str, float]]:
        """``docutray_bridge_resubmissions_total`` by reason, per process incarnation sampled."""
        self.sample()
        return {f"{name} pid {pid}": dict(c) for (name, pid), c in self._resub.items()}

    def metric(self, proc: BridgeProcess, name: str, **labels: str) -> float:
        """One metric of one replica (0 when it does not answer)."""
        try:
            return proc.metric(name, **labels)
        except httpx.HTTPError:
            return 0.0

    # ---- the end ----

    def outcomes(self) -> list[Outcome]:
        """Every committed outcome so far."""
        return self.rig.outcomes()

    def _observed(self, outcomes: Iterable[Outcome]) -> list[Observed]:
        out: list[Observed] = []
        for o in outcomes:
            if o.result is not None:
                out.append(Observed(o.result.request_id, "result"))
            elif o.dead_letter is not None:
                out.append(
                    Observed(o.dead_letter.request_id, "dead_letter", o.dead_letter.reason.value)
                )
            else:
                out.append(Observed(None, "dead_letter", "unreadable_outcome"))
        return out

    def _all_have_outcomes(self) -> bool:
        seen = {o.request_id for o in self._observed(self.outcomes())}
        return set(self.expected) <= seen

    def _quiet(self) -> bool:
        scrapes = self.sample()
        live = self.alive()
        if not live or len(scrapes) != len(live):
            return False
        # /readyz itself, not the docutray_bridge_ready gauge: the gauge only changes when
        # /readyz is asked (kubelet asks every few seconds; nobody else does here).
        return all(s.pending == 0 for s in scrapes.values()) and all(p.ready() for p in live)

    def leftover_pending(self) -> dict[int, list[str]]:
        """Request ids still live in the pending changelog (read_committed), by partition.

        Read directly (last value per key; a tombstone removes it), not through the
        bridge's restore code, so the check does not share a bug with what it checks.
        """
        group = self.rig.base_env["BRIDGE_GROUP_ID"]
        topic = self.rig.base_env.get("BRIDGE_CHANGELOG_TOPIC") or f"{group}.pending-changelog"
        live: dict[int, dict[bytes, bool]] = {}
        for record in consume_all(self.rig.bootstrap, topic, timeout_s=30):
            if record.key is not None:
                live.setdefault(record.partition, {})[record.key] = record.value is not None
        return {
            p: sorted(k.decode("utf-8", "replace") for k, alive in keys.items() if alive)
            for p, keys in sorted(live.items())
            if any(keys.values())
        }

    def finish(self, *, timeout_s: float = 90.0, expect_quiet: bool = True) -> ScenarioReport:
        """Steps 1-5 of the module docstring; asserts the history is clean."""
        self.note("settling")
        try:
            self.wait_until(self._all_have_outcomes, timeout_s, "every request has an outcome")
            if expect_quiet:
                self.wait_until(self._quiet, 60, "every live replica idle and ready")
        finally:
            self.sample()
        history = check_history(self.expected, self._observed(self.outcomes()))
        leftover = self.leftover_pending()
        resub_bridge: Counter[str] = Counter()
        for counters in self._resub.values():
            resub_bridge.update(counters)
        report = ScenarioReport.build(
            self.name,
            history,
            resubmissions_emulator=emulator_resubmissions(self.emulator_counts()),
            resubmissions_bridge=dict(resub_bridge),
            restarts=self.restarts,
            leftover_pending=sum(len(v) for v in leftover.values()),
            duration_s=time.monotonic() - self.started,
            faults=self.faults,
        )
        report.measures = dict(self.measures)
        self.note("checked")
        print(f"\n== chaos scenario {self.name}\n" + "\n".join(self.timeline))
        print(format_table([report]))
        path = report_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(report.to_json() + "\n")
        problems = []
        if history.lost:
            problems.append(f"lost {len(history.lost)}: {history.lost[:10]}")
        if history.duplicates:
            problems.append(f"duplicated: {dict(list(history.duplicates.items())[:10])}")
        if history.wrong:
            problems.append(f"wrong outcome: {dict(list(history.wrong.items())[:10])}")
        if history.unexpected:
            problems.append(f"{history.unexpected} outcomes for ids nobody sent")
        if leftover:
            problems.append(f"left in the pending changelog: {leftover}")
        if self.restarts > self.max_restarts:
            problems.append(
                f"{self.restarts} unplanned restarts (allowed {self.max_restarts}): {self.exits}"
            )
        assert not problems, f"[{self.name}] " + "; ".join(problems) + "\n" + self._debug()
        return report

    def _debug(self) -> str:
        parts = ["timeline:", *self.timeline[-40:]]
        for p in self._procs.values():
            state = "not running"
            if p.alive:
                try:
                    state = "readyz " + httpx.get(p.url("/readyz"), timeout=2).text[:400]
                except httpx.HTTPError as exc:
                    state = f"readyz unreachable: {exc!r}"
            lines = [ln for ln in p.log_tail(400).splitlines() if not ln.startswith("%")]
            parts += [f"--- {p.name}: {state}", *lines[-15:]]
        return "\n".join(parts)


# ---- steady load, outcome timing and partition ownership (recovery scenarios) ----


class SteadyLoad:
    """A producer thread: `rate_per_s` valid requests a second, round robin over `partitions`.

    Each request goes to an explicit input partition (``partition_of``), so a test knows
    which replica owns it; each is registered in the scenario as expecting one result.
    """

    def __init__(
        self, scenario: Scenario, prefix: str, *, rate_per_s: float, partitions: int
    ) -> None:
        self.scenario = scenario
        self.prefix = prefix
        self.rate_per_s = rate_per_s
        self.partitions = partitions
        self.partition_of: dict[str, int] = {}
        self._producer = PacedProducer(
            scenario.rig.bootstrap, scenario.rig.input_topic, self._make, rate_per_s=rate_per_s
        )

    def _make(self, n: int) -> Record:
        rid = f"{self.prefix}-{n}"
        partition = n % self.partitions
        self.scenario.expected[rid] = GOOD
        self.partition_of[rid] = partition
        return rid, json.dumps(pdf_request(rid)).encode(), partition

    def start(self) -> SteadyLoad:
        """Start producing."""
        self.scenario.note(f"steady load {self.rate_per_s:g}/s over {self.partitions} partitions")
        self._producer.start()
        return self

    def stop(self) -> int:
        """Stop producing; return how many requests were sent (fails on a delivery error)."""
        try:
            sent = self._producer.stop()
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None
        self.scenario.note(f"steady load stopped after {sent} requests")
        return sent


def outcome_tail(rig: Rig) -> OutcomeCollector:
    """Follow the rig's result and dead-letter topics (read_committed) in a thread; each
    outcome keeps its request id and when the bridge published it (start it once a replica
    is ready: the topics must exist)."""
    return OutcomeCollector(rig.bootstrap, [rig.result_topic, rig.dead_letter_topic]).start()


def assigned_partitions(proc: BridgeProcess) -> list[int]:
    """The input partitions a replica holds, as its /readyz says (ready or not)."""
    body = httpx.get(proc.url("/readyz"), timeout=2).json()
    return sorted(int(p) for p in body.get("assigned_partitions", []))


def nearest_rank(values: Iterable[float], q: float) -> float:
    """The nearest-rank percentile `q` (0-100) of `values` (p95 of 10 values is the largest)."""
    ordered = sorted(values)
    assert ordered, "no values"
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
