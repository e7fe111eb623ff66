"""Chaos 4: the DocuTray API misbehaves (through the emulator's runtime fault knobs).

- bursts of 500s long enough to pause consumption as ``api_unreachable``, then healthy;
- slow responses past the client's read timeout (a timed-out submit may still create a
  conversion: at-least-once, counted);
- a 429 storm: a per-minute limit far below the bridge's configured rate;
- an emulator restart that forgets every conversion, then a second forget: the bridge
  resubmits, and dead-letters ``conversion_lost`` only after BRIDGE_MAX_LOST_RESUBMITS.

Every request must end with exactly one outcome; the waits are bounded, so a bridge that
spins forever fails the test.
"""

from __future__ import annotations

from service.devkit.history import result_or_dead_letter
from tests.chaos.harness import ChaosFactory, Scenario
from tests.fixtures.bridge import pdf_request


def test_bursts_of_500s(chaos: ChaosFactory) -> None:
    s: Scenario = chaos(
        "500 bursts",
        emulator_knobs={"processing_median_s": 0.5, "processing_sigma": 0.3, "seed": 31},
        BRIDGE_UNREACHABLE_PAUSE_AFTER_S="1.5",
        BRIDGE_SYSTEMIC_PROBE_INTERVAL_S="0.5",
    )
    b1 = s.bridge("b1")
    s.ready(b1)
    for burst in range(2):
        s.send([pdf_request(f"f5-{burst}-{i}") for i in range(40)])
        faults_before = s.emulator.stats()["faults_injected"]
        s.emulator.configure(fault_500_rate=1.0)
        s.fault(f"500 burst {burst + 1} (every API call fails)")
        s.wait_until(
            lambda: s.metric(b1, "docutray_bridge_consumption_paused", reason="api_unreachable"),
            30,
            "paused as api_unreachable during the burst",
        )
        assert s.emulator.stats()["faults_injected"] > faults_before
        s.hold(1.0, "paused while the 500s last")
        s.emulator.configure(fault_500_rate=0.0)
        s.note("500s stop")
        s.wait_until(
            lambda: (
                s.metric(b1, "docutray_bridge_consumption_paused", reason="api_unreachable") == 0
            ),
            30,
            "the probe resumes consumption",
        )
    s.finish(timeout_s=60)


def test_slow_responses_past_the_client_timeout(chaos: ChaosFactory) -> None:
    s: Scenario = chaos(
        "slow responses > timeout",
        emulator_knobs={
            "processing_median_s": 0.5,
            "processing_sigma": 0.3,
            "slow_response_rate": 0.3,
            "slow_response_s": 3.0,
            "seed": 32,
        },
        DOCUTRAY_READ_TIMEOUT_S="1",
    )
    b1 = s.bridge("b1")
    s.ready(b1)
    s.fault("30 % of API calls answer after 3 s; the client gives up after 1 s")
    s.send([pdf_request(f"slow-{i}") for i in range(80)])
    s.wait_until(
        lambda: s.metric(b1, "docutray_bridge_submissions_total", outcome="transient_error") > 0,
        30,
        "submits time out",
    )
    report = s.finish(timeout_s=90)
    assert s.emulator.stats()["slow_responses"] > 0
    # A submit that timed out on our side may still have created a conversion.
    assert report.resubmissions_emulator <= report.requests_in


def test_429_storm(chaos: ChaosFactory) -> None:
    s: Scenario = chaos(
        "429 storm",
        # Fixed windows aligned to the minute: retryAfter is the time to the next minute
        # (30 s on average) instead of a sliding window's ~60 s, to keep the suite short.
        emulator_knobs={
            "processing_median_s": 0.4,
            "processing_sigma": 0.3,
            "seed": 33,
            "rate_limit_algorithm": "fixed",
        },
        BRIDGE_SUBMIT_RATE_PER_MINUTE="6000",
        BRIDGE_STATUS_RATE_PER_MINUTE="6000",
        BRIDGE_RATE_BURST="20",
    )
    b1 = s.bridge("b1")
    s.ready(b1)
    s.send([pdf_request(f"r429-pre-{i}") for i in range(20)])
    s.wait_until(lambda: len(s.outcomes()) >= 20, 30, "results flow before the storm")
    s.emulator.configure(rate_limit_per_minute=10)
    s.fault("429 storm: DocuTray allows 10 calls/min against a configured 6000/min")
    s.send([pdf_request(f"r429-{i}") for i in range(60)])
    s.wait_until(lambda: s.metric(b1, "docutray_bridge_rate_limited_total") >= 3, 30, "429s seen")
    s.hold(3.0, "the storm lasts")
    s.emulator.configure(rate_limit_per_minute=None)
    s.note("limit lifted")
    report = s.finish(timeout_s=120)
    assert s.emulator.stats()["rate_limited"] > 0
    assert report.results == report.requests_in


def test_emulator_restart_forgets_conversions(chaos: ChaosFactory) -> None:
    s: Scenario = chaos(
        "emulator restart + forget",
        emulator_knobs={"processing_median_s": 3.0, "processing_sigma": 0.1, "seed": 34},
        BRIDGE_MAX_LOST_RESUBMITS="1",
        BRIDGE_POLL_DEFAULT_MEDIAN_S="0.5",
        BRIDGE_POLL_MAX_INTERVAL_S="1",
    )
    b1 = s.bridge("b1")
    s.ready(b1)
    requests = [pdf_request(f"lost-{i}") for i in range(60)]
    s.send(requests, expect=result_or_dead_letter("conversion_lost"))
    s.wait_until(
        lambda: s.metric(b1, "docutray_bridge_status_calls_total", outcome="in_progress") >= 30,
        30,
        "conversions submitted and polled",
    )
    s.restart_emulator()
    s.wait_until(
        lambda: s.metric(b1, "docutray_bridge_resubmissions_total", reason="conversion_lost") >= 20,
        30,
        "lost conversions resubmitted",
    )
    s.wait_until(
        lambda: s.metric(b1, "docutray_bridge_status_calls_total", outcome="in_progress") >= 60,
        30,
        "resubmitted conversions polled",
    )
    forgotten = s.emulator.forget()
    s.fault(f"emulator forgot {forgotten} conversions again")
    s.emulator.configure(processing_median_s=0.3)
    report = s.finish(timeout_s=90)
    # conversion_lost only after BRIDGE_MAX_LOST_RESUBMITS=1 resubmission: two conversions.
    counts = s.emulator_counts()
    lost_letters = [
        o.dead_letter
        for o in s.outcomes()
        if o.dead_letter is not None and o.dead_letter.reason.value == "conversion_lost"
    ]
    for letter in lost_letters:
        assert letter.request_id is not None
        assert counts[letter.request_id] >= 2, (letter.request_id, counts[letter.request_id])
        assert "BRIDGE_MAX_LOST_RESUBMITS" in letter.message
    assert report.resubmissions_bridge.get("conversion_lost", 0) >= 20
    print(f"conversion_lost dead letters: {len(lost_letters)} of {report.requests_in}")
