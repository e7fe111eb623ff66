"""Chaos 7: recovery after `kill -9` with a stable replica identity (issue 11, item 2).

- **Same id** (a StatefulSet): two replicas, ``BRIDGE_INSTANCE_ID`` r1 and r2, the Kafka
  session timeout at its default (45 s), a steady load on known partitions. Ten times:
  `kill -9` r1 and restart it at once under the same id; measure from the kill to the first
  outcome published for a request on r1's partitions. Static membership gives the partitions
  back without a rebalance and ``init_transactions`` aborts the dead process's transaction,
  so every recovery must be shorter than the session timeout.
- **Two live processes with one id**: the older one is fenced and exits (or the newer one
  fails), never both processing; every request still gets exactly one outcome.
- **A new name** (a Deployment): `kill -9` r1 and start r3 instead; what that costs is
  reported (the dead member's session timeout, then its open transaction's timeout).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime

import pytest

from service.devkit.outcomes import OutcomeCollector
from tests.chaos.harness import (
    ChaosFactory,
    Scenario,
    SteadyLoad,
    assigned_partitions,
    nearest_rank,
    outcome_tail,
)
from tests.fixtures.bridge import BridgeProcess

PARTITIONS = 4
#: librdkafka's default session.timeout.ms (this file never sets it).
SESSION_TIMEOUT_S = 45.0


def _default_session_timeout(s: Scenario) -> None:
    """Drop the chaos suite's 6 s session timeout: these scenarios measure the default's cost."""
    s.rig.base_env.pop("KAFKA_CONSUMER_SESSION_TIMEOUT_MS", None)
    s.rig.base_env.pop("KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS", None)


def _balanced(s: Scenario, *procs: BridgeProcess) -> dict[str, list[int]]:
    """Wait until the replicas hold disjoint partitions that cover the input topic."""
    owners: dict[str, list[int]] = {}

    def check() -> bool:
        owners.clear()
        for proc in procs:
            owners[proc.name] = assigned_partitions(proc)
        held = [p for parts in owners.values() for p in parts]
        return sorted(held) == list(range(PARTITIONS)) and all(owners.values())

    s.wait_until(check, 90, f"{', '.join(p.name for p in procs)} share the partitions")
    s.note(f"assignment {owners}")
    return dict(owners)


@dataclass
class TwoReplicas:
    """Two replicas (r1, r2) sharing the partitions under a steady load, and a tail of the
    outcomes: the start of the kill -9 scenarios."""

    s: Scenario
    r1: BridgeProcess
    r2: BridgeProcess
    owners: dict[str, list[int]]
    tail: OutcomeCollector
    load: SteadyLoad

    def stop(self) -> None:
        """Stop the load and the tail."""
        self.load.stop()
        self.tail.stop()


def _two_replicas_under_load(
    chaos: ChaosFactory, name: str, *, seed: int, prefix: str
) -> TwoReplicas:
    """Scenario `name` at the default session timeout: r1 and r2 balanced, then the load."""
    s: Scenario = chaos(
        name,
        emulator_knobs={"processing_median_s": 0.3, "processing_sigma": 0.2, "seed": seed},
        BRIDGE_TOPIC_PARTITIONS=str(PARTITIONS),
    )
    _default_session_timeout(s)
    r1 = s.bridge("r1", BRIDGE_INSTANCE_ID="r1")
    s.ready(r1)
    r2 = s.bridge("r2", BRIDGE_INSTANCE_ID="r2")
    s.ready(r2)
    owners = _balanced(s, r1, r2)
    tail = outcome_tail(s.rig)
    load = SteadyLoad(s, prefix, rate_per_s=4, partitions=PARTITIONS).start()
    return TwoReplicas(s, r1, r2, owners, tail, load)


def _recovery_s(
    s: Scenario, tail: OutcomeCollector, load: SteadyLoad, owned: set[int], since: float, why: str
) -> float:
    """Seconds from `since` to the first outcome published for a request on `owned`."""

    def first() -> float | None:
        return tail.first_after(since, lambda rid: load.partition_of.get(rid) in owned)

    at = s.wait_until(first, 120, why, interval_s=0.1)
    return round(at - since, 2)


@pytest.mark.timeout(420)  # ten restarts of a Python process on a loaded 2-core machine
def test_kill9_and_restart_under_the_same_id_recovers_without_rebalance_wait(
    chaos: ChaosFactory,
) -> None:
    run = _two_replicas_under_load(chaos, "kill-9 + restart same id x10", seed=71, prefix="rec")
    s, r1, r2, owners, tail, load = run.s, run.r1, run.r2, run.owners, run.tail, run.load
    rng = random.Random(72)
    recoveries: list[float] = []
    kills: list[float] = []
    try:
        s.wait_until(
            lambda: tail.first_after(0, lambda rid: True), 30, "the load produces outcomes"
        )
        for round_ in range(10):
            s.hold(rng.uniform(0.5, 1.5), "steady work before the kill")
            owned = set(assigned_partitions(r1))
            assert owned == set(owners["r1"]), f"r1's partitions moved: {owned} vs {owners}"
            s.kill(r1)  # returns once the process is gone
            killed_at = time.time()
            kills.append(killed_at)
            s.restart(r1)
            took = _recovery_s(
                s, tail, load, owned, killed_at, f"round {round_}: an outcome on r1's partitions"
            )
            recoveries.append(took)
            s.note(f"round {round_}: first outcome on {sorted(owned)} {took:.2f} s after kill")
            s.ready(r1)
        # No rebalance happened: r2 still holds exactly what it held at the start.
        assert assigned_partitions(r2) == owners["r2"]
    finally:
        run.stop()
    # Where the time goes: kill -> the new process logs bridge_starting (interpreter and
    # imports) -> state_restored (init_transactions, rejoin, restore) -> first outcome.
    starting, restored = _event_times(r1, "bridge_starting"), _event_times(r1, "state_restored")
    s.measure("process_started_s", [_after(starting, k) for k in kills])
    s.measure("state_restored_s", [_after(restored, k) for k in kills])
    s.measure("recovery_s", recoveries)
    s.measure("recovery_p50_s", nearest_rank(recoveries, 50))
    s.measure("recovery_p95_s", nearest_rank(recoveries, 95))
    print(
        f"recovery after kill -9 (same id), s: {recoveries}; "
        f"p50 {nearest_rank(recoveries, 50)} p95 {nearest_rank(recoveries, 95)}"
    )
    s.finish(timeout_s=90)
    slow = [t for t in recoveries if t >= SESSION_TIMEOUT_S]
    assert not slow, (
        f"recoveries not shorter than the {SESSION_TIMEOUT_S:.0f} s session timeout "
        f"(a rebalance wait): {recoveries}"
    )


def _event_times(proc: BridgeProcess, event: str) -> list[float]:
    """Epoch seconds of every `event` line in the process log (all incarnations)."""
    return [
        datetime.fromisoformat(body["timestamp"]).timestamp()
        for body in proc.log_events(event)
        if "timestamp" in body
    ]


def _after(times: list[float], since: float) -> float | None:
    later = [t for t in times if t > since]
    return round(min(later) - since, 2) if later else None


def _fenced_lines(proc: BridgeProcess) -> list[str]:
    """The structured log lines of `proc` that say it was fenced."""
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if "fenc" not in line.lower():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # librdkafka's own stderr lines
        out.append(f"{event.get('level')} {event.get('event')}: {line[:300]}")
    return out


def test_two_live_processes_with_one_id_never_both_process(chaos: ChaosFactory) -> None:
    s: Scenario = chaos(
        "two processes, one id",
        emulator_knobs={"processing_median_s": 0.5, "processing_sigma": 0.3, "seed": 73},
        BRIDGE_TOPIC_PARTITIONS=str(PARTITIONS),
    )
    r1 = s.bridge("r1", BRIDGE_INSTANCE_ID="r1")
    s.ready(r1)
    tail = outcome_tail(s.rig)
    load = SteadyLoad(s, "twin", rate_per_s=6, partitions=PARTITIONS).start()
    try:
        s.wait_until(lambda: tail.count() >= 20, 60, "r1 converts under load")
        twin = s.bridge("r1-twin", BRIDGE_INSTANCE_ID="r1")
        s.fault("a second live process starts with BRIDGE_INSTANCE_ID=r1")
        # Neither is restarted if it exits: one of the two is expected to.
        s.unsupervise(r1)
        s.unsupervise(twin)

        def one_left() -> bool:
            return not (r1.alive and twin.alive)

        s.wait_until(one_left, 90, "one of the two processes claiming r1 exits")
        loser, winner = (r1, twin) if not r1.alive else (twin, r1)
        assert loser.proc is not None
        code = loser.proc.returncode
        s.note(f"{loser.name} exited {code}; {winner.name} goes on")
        s.hold(10, "the winner alone under load")
        assert winner.alive, f"both exited:\n{winner.log_tail(30)}"
        s.ready(winner)
    finally:
        load.stop()
        tail.stop()
    lines = _fenced_lines(loser)
    s.measure("loser", f"{loser.name} (exit {code})")
    s.measure("loser_fenced_lines", len(lines))
    print(f"{loser.name} exited {code}; its 'fenced' log lines:\n" + "\n".join(lines))
    report = s.finish(timeout_s=90)
    s.measure("duplicate_conversions", report.resubmissions_emulator)
    print(f"conversions created twice (emulator): {report.resubmissions_emulator}")
    assert code != 0, f"{loser.name} exited 0 although fenced:\n{loser.log_tail(30)}"
    assert lines, f"{loser.name} exited {code} without a log line about being fenced:\n" + (
        loser.log_tail(30)
    )


def test_kill9_then_a_new_name_costs_session_and_transaction_timeouts(
    chaos: ChaosFactory,
) -> None:
    run = _two_replicas_under_load(chaos, "kill-9, new name (Deployment)", seed=75, prefix="dep")
    s, r1, owners, tail, load = run.s, run.r1, run.owners, run.tail, run.load
    try:
        s.wait_until(lambda: tail.count() >= 10, 30, "the load produces outcomes")
        s.hold(2.0, "steady work before the kill")
        owned = set(owners["r1"])
        s.kill(r1)
        killed_at = time.time()
        r3 = s.bridge("r3", BRIDGE_INSTANCE_ID="r3")
        took = _recovery_s(
            s, tail, load, owned, killed_at, "an outcome on the dead r1's partitions"
        )
        s.note(f"first outcome on {sorted(owned)} {took:.2f} s after kill")
        s.ready(r3)
    finally:
        run.stop()
    s.measure("recovery_new_name_s", took)
    print(f"recovery after kill -9 with a new name: {took} s")
    s.finish(timeout_s=120)
