"""Chaos 5 and 6: a rebalance storm, then several faults at once.

Replica churn follows Kubernetes: a replica that gets SIGTERM leaves for good (its pod is
deleted) and a brand-new replica (new name, so a new transactional id) joins; a replica
that gets `kill -9` comes back as the same container of the same pod (same name, same
transactional id, which fences its dead predecessor and aborts its open transaction).
"""

from __future__ import annotations

import itertools
import random

from tests.chaos.harness import ChaosFactory, Scenario
from tests.fixtures.bridge import BridgeProcess, pdf_request


def _send_batch(s: Scenario, prefix: str, counter: itertools.count[int], n: int) -> None:
    s.send([pdf_request(f"{prefix}-{next(counter)}") for _ in range(n)])


def test_rebalance_storm(chaos: ChaosFactory) -> None:
    s: Scenario = chaos(
        "rebalance storm",
        emulator_knobs={"processing_median_s": 1.0, "processing_sigma": 0.4, "seed": 51},
        BRIDGE_TOPIC_PARTITIONS="6",
        BRIDGE_SHUTDOWN_GRACE_S="8",
    )
    replicas: list[BridgeProcess] = [s.bridge(f"r{i}") for i in range(3)]
    for proc in replicas:
        s.ready(proc)
    rng = random.Random(52)
    counter = itertools.count()
    names = itertools.count(len(replicas))
    for step in range(10):
        _send_batch(s, "storm", counter, 12)
        victim = replicas.pop(rng.randrange(len(replicas)))
        if step % 2 == 0:
            code = s.terminate(victim)
            assert code == 0, f"{victim.name} exited {code} on SIGTERM:\n{victim.log_tail(30)}"
            replicas.append(s.bridge(f"r{next(names)}"))
        else:
            s.kill(victim)
            s.restart(victim)
            replicas.append(victim)
        s.hold(rng.uniform(2.0, 3.0), "until the next replica change")
    s.note("storm over; settling")
    report = s.finish(timeout_s=120)
    assert report.requests_in == 120


def test_kill_500_burst_and_rebalance_together(chaos: ChaosFactory) -> None:
    s: Scenario = chaos(
        "kill-9 + 500s + rebalance",
        emulator_knobs={"processing_median_s": 0.8, "processing_sigma": 0.4, "seed": 61},
        BRIDGE_TOPIC_PARTITIONS="6",
        BRIDGE_SHUTDOWN_GRACE_S="8",
        BRIDGE_UNREACHABLE_PAUSE_AFTER_S="2",
        BRIDGE_SYSTEMIC_PROBE_INTERVAL_S="0.5",
    )
    a, b = s.bridge("a"), s.bridge("b")
    s.ready(a)
    s.ready(b)
    counter = itertools.count()
    _send_batch(s, "mix", counter, 50)
    s.wait_until(lambda: s.emulator.stats()["submissions_accepted"] >= 20, 30, "work under way")
    s.emulator.configure(fault_500_rate=0.7)
    s.fault("500s on 70 % of API calls")
    s.kill(a)
    c = s.bridge("c")
    _send_batch(s, "mix", counter, 50)
    s.hold(2.0, "500s, one replica dead, one joining")
    s.restart(a)
    code = s.terminate(b)
    assert code == 0, f"b exited {code} on SIGTERM:\n{b.log_tail(30)}"
    _send_batch(s, "mix", counter, 30)
    s.hold(2.0, "500s while the group rebalances again")
    s.emulator.configure(fault_500_rate=0.0)
    s.note("500s stop")
    s.ready(a)
    s.ready(c)
    report = s.finish(timeout_s=120)
    assert report.requests_in == 130
