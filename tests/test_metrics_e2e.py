"""A live bridge's /metrics, /healthz and /readyz during an end-to-end run (issue 6)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from tests.deploy_checks import (
    dashboard_exprs,
    load_dashboard,
    load_rules,
    rule_exprs,
    unknown_metrics,
)
from tests.fixtures.bridge import Rig, assert_exactly_once, pdf_request, sent_ids

#: Every metric the service must export (issue 6, item 1), by exported sample name.
REQUIRED = {
    "docutray_bridge_requests_consumed_total",
    "docutray_bridge_submissions_total",
    "docutray_bridge_status_calls_total",
    "docutray_bridge_http_request_duration_seconds_bucket",
    "docutray_bridge_conversion_duration_seconds_bucket",
    "docutray_bridge_status_calls_per_conversion_bucket",
    "docutray_bridge_pending_conversions",
    "docutray_bridge_results_published_total",
    "docutray_bridge_dead_letters_total",
    "docutray_bridge_rate_limited_total",
    "docutray_bridge_limiter_wait_seconds_bucket",
    "docutray_bridge_limiter_effective_rate_per_second",
    "docutray_bridge_limiter_configured_rate_per_second",
    "docutray_bridge_limiter_degraded",
    "docutray_bridge_consumer_lag",
    "docutray_bridge_assigned_partitions",
    "docutray_bridge_transactions_total",
    "docutray_bridge_resubmissions_total",
    "docutray_bridge_changelog_restore_seconds_bucket",
    "docutray_bridge_build_info",
    "docutray_bridge_consumption_paused",
    "docutray_bridge_ready",
    "docutray_bridge_heartbeat_timestamp_seconds",
}


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _total(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_live_scrape_has_every_metric_with_plausible_values(rig_factory):
    rig: Rig = rig_factory(BRIDGE_TOPIC_PARTITIONS="4")
    bridge = rig.bridge()
    bridge.wait_ready()
    requests = [pdf_request(f"m-{i}") for i in range(20)]
    bad = [b"not json at all"]
    rig.send([*requests, *bad])
    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=60)
    assert_exactly_once(grouped, sent_ids(requests))

    text = bridge.metrics_text()
    samples = _samples(text)
    missing = REQUIRED - set(samples)
    assert not missing, f"metrics missing from a live scrape: {sorted(missing)}"

    # Plausible values, not just names.
    assert _total(samples, "docutray_bridge_requests_consumed_total", outcome="accepted") == 20
    assert _total(samples, "docutray_bridge_requests_consumed_total", outcome="rejected") == 1
    assert (
        _total(samples, "docutray_bridge_submissions_total", outcome="accepted", status_class="2xx")
        == 20
    )
    assert _total(samples, "docutray_bridge_results_published_total") == 20
    assert _total(samples, "docutray_bridge_dead_letters_total", reason="malformed_record") == 1
    assert _total(samples, "docutray_bridge_status_calls_total", outcome="success") == 20
    assert _total(samples, "docutray_bridge_status_calls_per_conversion_count") == 20
    assert (
        _total(samples, "docutray_bridge_http_request_duration_seconds_count", endpoint="submit")
        == 20
    )
    assert (
        _total(
            samples, "docutray_bridge_conversion_duration_seconds_count", document_type="invoice"
        )
        == 20
    )
    assert _total(samples, "docutray_bridge_assigned_partitions") == 4
    assert _total(samples, "docutray_bridge_transactions_total", outcome="committed") > 0
    assert _total(samples, "docutray_bridge_transactions_total", outcome="aborted") == 0
    assert _total(samples, "docutray_bridge_changelog_restore_seconds_count") >= 1
    assert _total(samples, "docutray_bridge_ready") == 1
    assert (
        _total(samples, "docutray_bridge_limiter_configured_rate_per_second", budget="submit")
        == 1000
    )
    assert _total(samples, "docutray_bridge_limiter_effective_rate_per_second", budget="submit") > 0
    assert _total(samples, "docutray_bridge_limiter_degraded") == 0
    assert _total(samples, "docutray_bridge_heartbeat_timestamp_seconds") > 1.7e9
    # Every dead-letter reason and pause reason exists at zero or more (no gaps for alerts).
    for reason in metrics.DEAD_LETTER_REASONS:
        assert any(
            lab.get("reason") == reason for lab, _ in samples["docutray_bridge_dead_letters_total"]
        )
    build = samples["docutray_bridge_build_info"][0][0]
    assert build["version"]
    assert build["librdkafka"]

    # One consumer-lag series per assigned partition (librdkafka statistics update them).
    assert len(samples["docutray_bridge_consumer_lag"]) == 4

    # The dashboard and the alert rules only use metrics this scrape has.
    exprs = [*dashboard_exprs(load_dashboard()), *rule_exprs(load_rules())]
    assert exprs
    assert unknown_metrics(exprs, text) == set()

    health = httpx.get(bridge.url("/healthz"), timeout=5)
    ready = httpx.get(bridge.url("/readyz"), timeout=5)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["assigned_partitions"] == [0, 1, 2, 3]
    assert set(body["pending"]) == {"queued", "submitting", "submitted"}
    assert bridge.stop() == 0
