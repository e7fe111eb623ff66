"""A graceful stop and a scale-out resubmit nothing (issue 11, item 5).

DocuTray answers every call after 20 s, 300 requests are queued, and the submit rate
(6/s after a burst of 50) keeps calls of every age under way (0 to 20 s old, about 120 at
once), so whenever a stop or a revoke comes, some calls have just started. The replica gets
SIGTERM and is restarted; then a second replica joins, so partitions are revoked from the
first while its submits are under way. A stop or a revoke
starts no new submit, lets the calls under way finish (within the grace) and commit them,
and puts the submits still waiting for a slot or permit back to ``queued``. So DocuTray
sees exactly one conversion per request id, every request gets exactly one outcome, and no
process counts a ``recovery`` resubmission.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import pytest

from tests.chaos.harness import Scenario, assigned_partitions
from tests.fixtures.bridge import BridgeProcess, Rig, pdf_request
from tests.fixtures.emulator import EmulatorStarter

SLOW_S = 20.0
REQUESTS = 300


def _submitting(s: Scenario, proc: BridgeProcess) -> float:
    return s.metric(proc, "docutray_bridge_pending_conversions", state="submitting")


def _at_least(s: Scenario, proc: BridgeProcess, n: float) -> Callable[[], float]:
    """A predicate for `wait_until`: the submitting count once it reaches `n` (else 0)."""

    def check() -> float:
        now = _submitting(s, proc)
        return now if now >= n else 0.0

    return check


def _log_events(proc: BridgeProcess, *names: str) -> list[str]:
    text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
    return [line[:300] for line in text.splitlines() if any(f'"{n}"' in line for n in names)]


def _submitted_again(proc: BridgeProcess) -> list[str]:
    """Request ids `proc` (any incarnation) submitted on an attempt after the first."""
    out = []
    text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
    for line in text.splitlines():
        if '"conversion_submitted"' not in line:
            continue
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if int(event.get("attempt", 1)) > 1:
                out.append(f"{event.get('request_id')} (attempt {event.get('attempt')})")
    return out


@pytest.mark.timeout(600)
def test_sigterm_restart_and_scale_out_under_slow_submits_resubmit_nothing(
    rig_factory: Callable[..., Rig], emulator_factory: EmulatorStarter
) -> None:
    emu = emulator_factory(
        processing_median_s=0.5,
        processing_sigma=0.2,
        slow_response_rate=1.0,
        slow_response_s=SLOW_S,
        seed=81,
    )
    rig = rig_factory(
        emu,
        BRIDGE_TOPIC_PARTITIONS="6",
        BRIDGE_SHUTDOWN_GRACE_S="30",
        KAFKA_CONSUMER_SESSION_TIMEOUT_MS="6000",
        # 128 submit slots: a call starts as soon as its permit comes (6/s), never waits for
        # a connection, so calls under way are spread evenly over the last 20 s.
        DOCUTRAY_MAX_CONNECTIONS="256",
        BRIDGE_SUBMIT_RATE_PER_MINUTE="360",
    )
    s = Scenario(name="graceful stop + scale-out, 20 s answers", rig=rig, emulator=emu)
    g1 = s.bridge("g1", BRIDGE_INSTANCE_ID="g1")
    s.ready(g1)
    s.send([pdf_request(f"gr-{i}") for i in range(REQUESTS)])

    # 1. SIGTERM once the burst and 30 more calls reached DocuTray (each answers in 20 s:
    # with a 30 s grace every one of them must finish), then restart under the same id.
    s.wait_until(
        lambda: emu.stats()["slow_responses"] >= 80, 60, "80 calls under way", interval_s=0.05
    )
    in_flight = _submitting(s, g1)
    s.note(f"g1: {in_flight:g} submitting at SIGTERM")
    stopping_at = time.monotonic()
    code = s.terminate(g1, timeout_s=60)
    stop_s = round(time.monotonic() - stopping_at, 1)
    s.measure("sigterm_to_exit_s", stop_s)
    s.measure("submitting_at_sigterm", in_flight)
    assert code == 0, f"g1 exited {code} on SIGTERM:\n{g1.log_tail(30)}"
    s.restart(g1)
    s.ready(g1)

    # 2. Scale-out while the restarted replica's submits are under way.
    again = s.wait_until(_at_least(s, g1, 20), 60, "submits under way again on g1", interval_s=0.1)
    s.measure("submitting_at_scale_out", again)
    before = assigned_partitions(g1)
    g2 = s.bridge("g2", BRIDGE_INSTANCE_ID="g2")
    s.fault("scale-out: g2 joins, partitions are revoked from g1")
    s.ready(g2, timeout_s=90)
    s.wait_until(lambda: assigned_partitions(g2), 30, "g2 holds partitions")
    after = assigned_partitions(g1)
    s.note(f"g1 held {before}, now {after}; g2 holds {assigned_partitions(g2)}")
    assert set(after) < set(before), f"no partition moved from g1: {before} -> {after}"

    # 3. DocuTray fast again: the rest finishes quickly.
    s.emulator.configure(slow_response_rate=0.0)
    s.note("emulator answers at once again")
    report = s.finish(timeout_s=240)

    counts = s.emulator_counts()
    ids = {f"gr-{i}" for i in range(REQUESTS)}
    not_once = {rid: counts.get(rid, 0) for rid in ids if counts.get(rid, 0) != 1}
    per_process = s.resubmissions_by_process()
    grace_exceeded = _log_events(g1, "revoke_grace_exceeded", "bridge_stop_timeout")
    print(f"resubmissions per process incarnation: {per_process}")
    print("grace exceeded:\n" + "\n".join(grace_exceeded))
    again_ids = _submitted_again(g1) + _submitted_again(g2)
    print(f"submitted on a later attempt: {again_ids}")
    assert not not_once, (
        f"{len(not_once)} request ids not converted exactly once (emulator counts), e.g. "
        f"{dict(list(not_once.items())[:10])}; resubmissions per process: {per_process}; "
        f"grace exceeded: {grace_exceeded[:5]}"
    )
    recovery = {k: c.get("recovery", 0.0) for k, c in per_process.items()}
    assert not any(recovery.values()), (
        f"recovery resubmissions counted: {recovery}; submitted again: {again_ids[:10]}; "
        f"grace exceeded: {grace_exceeded[:5]}"
    )
    assert report.resubmissions_bridge.get("recovery", 0) == 0
