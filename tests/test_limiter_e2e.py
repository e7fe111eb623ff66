"""Three bridge processes share one DocuTray budget through Redis (issue 5, end to end)."""

from __future__ import annotations

from tests.fixtures.bridge import Rig, assert_exactly_once, pdf_request, sent_ids
from tests.fixtures.stack import wait_for


def test_three_replicas_stay_under_the_emulators_limit(rig_factory, emulator_factory):
    # Calls per minute, counted over submissions and status calls alike. The work (at least two
    # calls per request) is more than one minute's budget, so without a shared limiter the
    # emulator would answer 429.
    limit = 240
    emulator = emulator_factory(
        rate_limit_per_minute=limit, processing_median_s=0.5, processing_sigma=0.3, seed=21
    )
    rig: Rig = rig_factory(
        emulator,
        BRIDGE_SHARED_BUDGET="true",
        BRIDGE_SUBMIT_RATE_PER_MINUTE=str(limit - 20),
        BRIDGE_RATE_BURST="5",
        BRIDGE_EXPECTED_REPLICAS="3",
        BRIDGE_TOPIC_PARTITIONS="6",
    )
    replicas = [rig.bridge(f"r{i}") for i in range(3)]
    for replica in replicas:
        replica.wait_ready()
    wait_for(
        lambda: all(r.metric("docutray_bridge_assigned_partitions") == 2 for r in replicas),
        60,
        message="three replicas with two partitions each",
    )
    requests = [pdf_request(f"lim-{i}") for i in range(140)]
    assert 2 * len(requests) > limit
    rig.send(requests)
    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=180)
    assert_exactly_once(grouped, sent_ids(requests))
    assert all(outs[0].result is not None for outs in grouped.values())
    stats = emulator.stats()
    assert stats["rate_limited"] == 0, stats
    # Never more than the limit in any 60-s window (the burst is inside the configured rate).
    assert stats["max_calls_per_60s"] <= limit, stats
    # ...and the budget was used, not wasted: a full window saw at least 90 % of it.
    assert stats["max_calls_per_60s"] >= 0.9 * (limit - 20), stats
    # All three did real work: the budget was shared, not taken by one.
    for replica in replicas:
        assert replica.metric("docutray_bridge_submissions_total", outcome="accepted") > 0
        assert replica.metric("docutray_bridge_limiter_degraded") == 0
    for replica in replicas:
        assert replica.stop() == 0
