"""Build the Grafana dashboard of docutray-bridge from this one readable source.

The JSON lands in the chart (deploy/helm/docutray-bridge/dashboards/docutray-bridge.json),
where both the chart's sidecar ConfigMap and the compose Grafana load it. Edit the
panels here, then regenerate:

    .venv/bin/python deploy/grafana/build_dashboard.py

tests/test_deploy.py fails when the JSON is stale, and checks that every metric
the queries use is one the service exports.

The datasource is `${DS_PROMETHEUS}`: an import input for Grafana's "Import
dashboard" screen, and also a datasource variable of the same name, so the file
works unchanged when the Grafana sidecar provisions it (no import step there).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

UID: Final = "docutray-bridge"
TITLE: Final = "DocuTray bridge"
OUTPUT: Final = (
    Path(__file__).resolve().parents[1]
    / "helm"
    / "docutray-bridge"
    / "dashboards"
    / "docutray-bridge.json"
)

DATASOURCE: Final = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: Label matchers every query carries: the dashboard's namespace/job/pod/instance variables.
#: `pod` comes from a ServiceMonitor scrape; without it (compose) "All" (.*) matches the
#: empty label.
SEL: Final = 'namespace=~"$namespace", job=~"$job", pod=~"$pod", instance=~"$instance"'
RATE: Final = "$__rate_interval"

PanelType = Literal["timeseries", "stat", "bargauge", "gauge"]


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    """A panel: its queries, unit and size (Grafana grid: 24 columns)."""

    title: str
    description: str
    queries: tuple[Query, ...]
    type: PanelType = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    stacked: bool = False
    min_value: float | None = 0
    max_value: float | None = None
    thresholds: tuple[tuple[float, str], ...] = ()
    mappings: tuple[dict[str, Any], ...] = ()
    no_value: str | None = None
    extra_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A titled group of panels."""

    title: str
    panels: tuple[Panel, ...]


def m(name: str, extra: str = "") -> str:
    """A selector of `name` scoped to the dashboard's variables (plus `extra` matchers)."""
    inner = f"{SEL}, {extra}" if extra else SEL
    return f"{name}{{{inner}}}"


def quantile(q: float, metric: str, by: str) -> str:
    """histogram_quantile over a `_bucket` series, grouped by `by` (plus le)."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({m(metric + '_bucket')}[{RATE}])))"


def rate(metric: str, by: str = "", window: str = RATE) -> str:
    """sum (by) of rate(metric) over the window."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({m(metric)}[{window}]))"


CONFIGURED_SUBMIT: Final = m(
    "docutray_bridge_limiter_configured_rate_per_second", 'budget="submit"'
)
CONFIGURED_STATUS: Final = m(
    "docutray_bridge_limiter_configured_rate_per_second", 'budget="status"'
)


#: Bucket bounds of docutray_bridge_end_to_end_seconds (service/metrics.py _DURATION_BUCKETS)
#: that make sense as an end-to-end SLO, as (label, `le` value as the Python client writes it).
#: The SLO panels take the share of outcomes under the chosen bound: a bucket's cumulative count.
SLO_CHOICES: Final = (
    ("10 s", "10.0"),
    ("30 s", "30.0"),
    ("1 min", "60.0"),
    ("2 min", "120.0"),
    ("5 min", "300.0"),
    ("10 min", "600.0"),
    ("30 min", "1800.0"),
    ("1 h", "3600.0"),
)
#: The default SLO: the chart's prometheusRule.endToEndSloSeconds default (300 s), which the
#: DocutrayBridgeEndToEndSlow alert compares the p95 with.
SLO_DEFAULT: Final = "300.0"
E2E: Final = "docutray_bridge_end_to_end_seconds"


def _slo_share(window: str) -> str:
    """Share of outcomes published within $slo seconds of being received, over `window`."""
    func = "increase" if window == "$__range" else "rate"
    within = m(E2E + "_bucket", 'le="$slo"')
    return f"sum({func}({within}[{window}])) / sum({func}({m(E2E + '_count')}[{window}]))"


def _value_map(value: str, text: str, color: str) -> dict[str, Any]:
    return {"type": "value", "options": {value: {"text": text, "color": color, "index": 0}}}


ROWS: Final[tuple[Row, ...]] = (
    Row(
        "Health",
        (
            Panel(
                "Ready replicas",
                "Replicas whose /readyz is 200 (group joined, partitions restored, not paused by "
                "a systemic error), out of the replicas scraped.",
                (
                    Query(f"sum({m('docutray_bridge_ready')})", "ready"),
                    Query(f"count({m('docutray_bridge_ready')})", "replicas"),
                ),
                type="stat",
                width=4,
                height=5,
            ),
            Panel(
                "Consumption paused",
                "Reasons consumption is paused on any replica: invalid_api_key and "
                "api_unreachable are systemic errors (see the runbook); backpressure means "
                "BRIDGE_MAX_PENDING is reached; shutdown is a drain in progress.",
                (
                    Query(
                        f"sum by (reason) ({m('docutray_bridge_consumption_paused')}) > 0",
                        "{{reason}}",
                    ),
                ),
                type="stat",
                width=5,
                height=5,
                no_value="not paused",
                thresholds=((0, "green"), (1, "red")),
            ),
            Panel(
                "Limiter degraded",
                "DEGRADED while Redis is unreachable and the rate limiter runs on a "
                "conservative local share (rate / BRIDGE_EXPECTED_REPLICAS).",
                (Query(f"max({m('docutray_bridge_limiter_degraded')})"),),
                type="stat",
                width=4,
                height=5,
                mappings=(
                    _value_map("0", "OK", "green"),
                    _value_map("1", "DEGRADED", "red"),
                ),
                thresholds=((0, "green"), (1, "red")),
            ),
            Panel(
                "Heartbeat age",
                "Seconds since the oldest processing-loop heartbeat of the replicas (liveness). "
                "Above BRIDGE_HEARTBEAT_TIMEOUT_S, /healthz fails.",
                (
                    Query(
                        f"max(time() - {m('docutray_bridge_heartbeat_timestamp_seconds')})",
                    ),
                ),
                type="stat",
                unit="s",
                width=4,
                height=5,
                thresholds=((0, "green"), (30, "orange"), (120, "red")),
            ),
            Panel(
                "Versions",
                "Replicas per bridge version (docutray_bridge_build_info).",
                (
                    Query(
                        f"count by (version) ({m('docutray_bridge_build_info')})",
                        "{{version}}",
                    ),
                ),
                type="stat",
                width=7,
                height=5,
            ),
            Panel(
                "Readiness per replica",
                "1 = ready. A replica stuck at 0 is explained by its /readyz JSON body.",
                (Query(m("docutray_bridge_ready"), "{{instance}}"),),
                width=12,
                height=7,
                max_value=1,
            ),
            Panel(
                "Paused by reason",
                "1 while consumption is paused, per replica and reason.",
                (
                    Query(
                        f"max by (instance, reason) ({m('docutray_bridge_consumption_paused')})",
                        "{{instance}} {{reason}}",
                    ),
                ),
                width=12,
                height=7,
                max_value=1,
            ),
        ),
    ),
    Row(
        "Throughput and outcomes",
        (
            Panel(
                "Throughput",
                "Requests consumed from the input topic, results and dead letters published "
                "(committed transactions only).",
                (
                    Query(rate("docutray_bridge_requests_consumed_total"), "consumed"),
                    Query(rate("docutray_bridge_results_published_total"), "results"),
                    Query(rate("docutray_bridge_dead_letters_total"), "dead letters"),
                ),
                unit="reqps",
            ),
            Panel(
                "Requests consumed by outcome",
                "accepted: now pending; rejected: dead-lettered at once; duplicate: same "
                "request id already pending, not submitted again.",
                (Query(rate("docutray_bridge_requests_consumed_total", "outcome"), "{{outcome}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Dead letters by reason",
                "Dead letters per second, by reason. Request faults (malformed_record, "
                "invalid_request, unsupported_format, too_large, source_unavailable, "
                "forbidden_source) are upstream's to fix; conversion_failed, conversion_lost, "
                "timeout and retries_exhausted point at DocuTray or the bridge.",
                (Query(rate("docutray_bridge_dead_letters_total", "reason"), "{{reason}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Dead letters in the time range",
                "Dead letters published over the dashboard's time range, by reason.",
                (
                    Query(
                        f"sum by (reason) (increase({m('docutray_bridge_dead_letters_total')}"
                        "[$__range]))",
                        "{{reason}}",
                        instant=True,
                    ),
                ),
                type="bargauge",
                extra_options={"displayMode": "basic", "orientation": "horizontal"},
            ),
            Panel(
                "Submissions by outcome",
                "POST /api/convert-async calls by outcome and HTTP status class "
                "(none = no HTTP answer).",
                (
                    Query(
                        rate("docutray_bridge_submissions_total", "outcome, status_class"),
                        "{{outcome}} {{status_class}}",
                    ),
                ),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Status calls by outcome",
                "GET /api/convert-async/status calls by outcome.",
                (Query(rate("docutray_bridge_status_calls_total", "outcome"), "{{outcome}}"),),
                unit="reqps",
                stacked=True,
            ),
        ),
    ),
    Row(
        "End-to-end latency and SLO",
        (
            Panel(
                "End-to-end latency",
                "From the bridge accepting a request to its outcome (result or dead letter) "
                "being handed to Kafka, p50 and p95 by outcome: what downstream readers wait. "
                "DocutrayBridgeEndToEndSlow fires when the p95 over 10 minutes passes the SLO.",
                (
                    Query(quantile(0.5, E2E, "outcome"), "p50 {{outcome}}"),
                    Query(quantile(0.95, E2E, "outcome"), "p95 {{outcome}}"),
                ),
                unit="s",
                width=8,
            ),
            Panel(
                "Outcomes within the SLO",
                "Share of outcomes published within the SLO variable's bound of being received "
                "(the histogram bucket at that bound), results and dead letters together.",
                (Query(_slo_share(RATE), "within SLO"),),
                unit="percentunit",
                width=6,
                max_value=1,
                thresholds=((0, "red"), (0.9, "orange"), (0.95, "green")),
            ),
            Panel(
                "Within the SLO in the time range",
                "Share of the outcomes of the dashboard's time range that met the SLO.",
                (Query(_slo_share("$__range"), "within SLO", instant=True),),
                type="stat",
                unit="percentunit",
                width=4,
                max_value=1,
                thresholds=((0, "red"), (0.9, "orange"), (0.95, "green")),
            ),
            Panel(
                "Oldest pending request",
                "Age of the oldest request each replica holds (0 when none). It keeps growing "
                "in an outage even when nothing finishes, which the latency histogram cannot "
                "show; DocutrayBridgeOldestPendingOld fires on it.",
                (
                    Query(
                        f"max by (instance) ({m('docutray_bridge_oldest_pending_age_seconds')})",
                        "{{instance}}",
                    ),
                ),
                unit="s",
                width=6,
            ),
        ),
    ),
    Row(
        "Backlog",
        (
            Panel(
                "Pending conversions by state",
                "Requests held by the bridge: queued (waiting to submit or retry), submitting, "
                "submitted (running at DocuTray). Kafka lag no longer counts these; KEDA scales "
                "on both.",
                (
                    Query(
                        f"sum by (state) ({m('docutray_bridge_pending_conversions')})",
                        "{{state}}",
                    ),
                ),
                stacked=True,
            ),
            Panel(
                "Consumer lag",
                "Records behind the end of each input partition (librdkafka statistics).",
                (
                    Query(f"sum({m('docutray_bridge_consumer_lag')})", "total"),
                    Query(
                        f"sum by (partition) ({m('docutray_bridge_consumer_lag')})",
                        "partition {{partition}}",
                    ),
                ),
            ),
            Panel(
                "Assigned partitions per replica",
                "Input partitions each replica owns; a replica with none only stands by.",
                (
                    Query(
                        f"sum by (instance) ({m('docutray_bridge_assigned_partitions')})",
                        "{{instance}}",
                    ),
                ),
            ),
            Panel(
                "Conversion duration by document type",
                "Submit to terminal status, p50 and p95 per document type (what the poll "
                "scheduler learns).",
                (
                    Query(
                        quantile(
                            0.5, "docutray_bridge_conversion_duration_seconds", "document_type"
                        ),
                        "p50 {{document_type}}",
                    ),
                    Query(
                        quantile(
                            0.95, "docutray_bridge_conversion_duration_seconds", "document_type"
                        ),
                        "p95 {{document_type}}",
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "DocuTray API",
        (
            Panel(
                "API latency by endpoint",
                "p50 and p95 latency of DocuTray calls.",
                (
                    Query(
                        quantile(0.5, "docutray_bridge_http_request_duration_seconds", "endpoint"),
                        "p50 {{endpoint}}",
                    ),
                    Query(
                        quantile(0.95, "docutray_bridge_http_request_duration_seconds", "endpoint"),
                        "p95 {{endpoint}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "429 Too Many Requests",
                "Rate-limited answers from DocuTray by endpoint. A few are expected while the "
                "limiter's AIMD probes the plan's limit; a steady stream is not.",
                (Query(rate("docutray_bridge_rate_limited_total", "endpoint"), "{{endpoint}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Status calls per conversion",
                "Polling cost: status calls spent on each finished conversion (ideal: 1).",
                (
                    Query(
                        f"sum(rate({m('docutray_bridge_status_calls_per_conversion_sum')}"
                        f"[{RATE}])) / sum(rate("
                        f"{m('docutray_bridge_status_calls_per_conversion_count')}[{RATE}]))",
                        "mean",
                    ),
                    Query(quantile(0.5, "docutray_bridge_status_calls_per_conversion", ""), "p50"),
                    Query(quantile(0.95, "docutray_bridge_status_calls_per_conversion", ""), "p95"),
                ),
            ),
            Panel(
                "Resubmissions",
                "Conversions submitted again: recovery (a submit was in flight when the "
                "previous owner stopped) or conversion_lost (DocuTray forgot it).",
                (
                    Query(
                        f"sum by (reason) (increase({m('docutray_bridge_resubmissions_total')}"
                        f"[{RATE}]))",
                        "{{reason}}",
                    ),
                ),
                stacked=True,
            ),
        ),
    ),
    Row(
        "Rate limit",
        (
            Panel(
                "Limiter rate: effective vs configured",
                "Permits per second for the whole deployment, by budget. Effective drops "
                "below configured after 429s (AIMD) and climbs back when they stop.",
                (
                    Query(
                        f"max by (budget) "
                        f"({m('docutray_bridge_limiter_effective_rate_per_second')})",
                        "effective {{budget}}",
                    ),
                    Query(
                        f"max by (budget) "
                        f"({m('docutray_bridge_limiter_configured_rate_per_second')})",
                        "configured {{budget}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "API calls vs configured rate",
                "Calls actually made per second against the configured rate of each budget.",
                (
                    Query(rate("docutray_bridge_submissions_total"), "submissions"),
                    Query(rate("docutray_bridge_status_calls_total"), "status calls"),
                    Query(
                        f"max({CONFIGURED_SUBMIT})",
                        "configured submit",
                    ),
                    Query(
                        f"max({CONFIGURED_STATUS})",
                        "configured status",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Rate-limit usage",
                "Share of the configured rate spent over 5 minutes: submissions and status "
                "calls against their budgets, and all calls against the sum of both budgets. "
                "With BRIDGE_SHARED_BUDGET both kinds of call spend the submit budget.",
                (
                    Query(
                        f"{rate('docutray_bridge_submissions_total', window='5m')} / "
                        f"max({CONFIGURED_SUBMIT})",
                        "submit",
                        instant=True,
                    ),
                    Query(
                        f"{rate('docutray_bridge_status_calls_total', window='5m')} / "
                        f"max({CONFIGURED_STATUS})",
                        "status",
                        instant=True,
                    ),
                    Query(
                        f"({rate('docutray_bridge_submissions_total', window='5m')} + "
                        f"{rate('docutray_bridge_status_calls_total', window='5m')}) / "
                        f"sum(max by (budget) "
                        f"({m('docutray_bridge_limiter_configured_rate_per_second')}))",
                        "all calls",
                        instant=True,
                    ),
                ),
                type="gauge",
                unit="percentunit",
                max_value=1,
                thresholds=((0, "green"), (0.8, "orange"), (0.95, "red")),
            ),
            Panel(
                "Limiter wait p95",
                "Time spent waiting for a rate-limit permit, p95 by budget.",
                (
                    Query(
                        quantile(0.95, "docutray_bridge_limiter_wait_seconds", "budget"),
                        "{{budget}}",
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "Pods",
        (
            Panel(
                "CPU",
                "CPU cores used per replica (the process's own counter). A replica pinned near "
                "its limit decodes and uploads documents slowly: raise resources or replicas.",
                (
                    Query(
                        f"sum by (instance) (rate({m('process_cpu_seconds_total')}[{RATE}]))",
                        "{{instance}}",
                    ),
                ),
                unit="short",
                width=6,
            ),
            Panel(
                "Memory",
                "Resident memory per replica. Pending conversions and documents in flight hold "
                "memory; compare with the container's memory limit.",
                (
                    Query(
                        f"sum by (instance) ({m('process_resident_memory_bytes')})",
                        "{{instance}}",
                    ),
                ),
                unit="bytes",
                width=6,
            ),
            Panel(
                "Memory held by the bridge",
                "Bytes the bridge accounts for, per replica and kind: pending (entries' states) "
                "and documents (read back for submits and dead letters). Consumption pauses "
                "before BRIDGE_MEMORY_BUDGET_MB's shares are reached.",
                (
                    Query(
                        f"sum by (instance, kind) ({m('docutray_bridge_memory_held_bytes')})",
                        "{{instance}} {{kind}}",
                    ),
                ),
                unit="bytes",
                width=6,
            ),
            Panel(
                "Restarts",
                "Process restarts seen per replica in the last hour (a new process start "
                "time). A crash loop shows here and in the DocutrayBridgeDown alert.",
                (
                    Query(
                        f"sum by (instance) (changes({m('process_start_time_seconds')}[1h]))",
                        "{{instance}}",
                    ),
                ),
                width=6,
            ),
        ),
    ),
    Row(
        "Kafka transactions and recovery",
        (
            Panel(
                "Transactions",
                "Kafka transactions committed and aborted per second. Aborts redo work: "
                "each one is a rebalance, a fenced producer or a broker error.",
                (Query(rate("docutray_bridge_transactions_total", "outcome"), "{{outcome}}"),),
                unit="ops",
                width=6,
            ),
            Panel(
                "Changelog restore duration",
                "p95 time to restore the pending set of newly assigned partitions (readiness "
                "waits for it).",
                (Query(quantile(0.95, "docutray_bridge_changelog_restore_seconds", ""), "p95"),),
                unit="s",
                width=6,
            ),
            Panel(
                "Restored pending records",
                "Pending conversions restored from the changelog after assignments.",
                (
                    Query(
                        f"sum(increase({m('docutray_bridge_changelog_restored_records_total')}"
                        f"[{RATE}]))",
                        "restored",
                    ),
                ),
                width=6,
            ),
            Panel(
                "Restores waiting",
                "Assigned partitions whose restore waits for an open transaction on the state "
                "topics (a producer that died mid-transaction: up to transaction.timeout.ms). "
                "The replica is not ready meanwhile.",
                (
                    Query(
                        f"sum by (instance) ({m('docutray_bridge_restore_waiting_partitions')})",
                        "{{instance}}",
                    ),
                ),
                width=6,
            ),
        ),
    ),
)


def _thresholds(panel: Panel) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    for i, (value, color) in enumerate(panel.thresholds):
        if i == 0:
            steps[0]["color"] = color
        else:
            steps.append({"color": color, "value": value})
    return {"mode": "absolute", "steps": steps}


def _options(panel: Panel) -> dict[str, Any]:
    if panel.type == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    options: dict[str, Any] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "auto",
    }
    if panel.type == "stat":
        options.update({"colorMode": "value", "graphMode": "none", "textMode": "value_and_name"})
    options.update(panel.extra_options)
    return options


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "thresholds": _thresholds(panel)}
    if panel.min_value is not None:
        defaults["min"] = panel.min_value
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
    if panel.mappings:
        defaults["mappings"] = list(panel.mappings)
    if panel.no_value is not None:
        defaults["noValue"] = panel.no_value
    if panel.type == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stacked else 0,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
        }
    else:
        defaults["color"] = {"mode": "thresholds"}
    targets = [
        {
            "datasource": dict(DATASOURCE),
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "instant": q.instant,
            "range": not q.instant,
            "refId": chr(ord("A") + i),
        }
        for i, q in enumerate(panel.queries)
    ]
    return {
        "id": panel_id,
        "type": panel.type,
        "title": panel.title,
        "description": panel.description,
        "datasource": dict(DATASOURCE),
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": _options(panel),
        "targets": targets,
    }


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": dict(DATASOURCE),
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "options": [],
        "regex": "",
    }


def _slo_variable() -> dict[str, Any]:
    """A custom variable: the end-to-end SLO bound the SLO panels measure against."""
    options = [
        {"text": text, "value": value, "selected": value == SLO_DEFAULT}
        for text, value in SLO_CHOICES
    ]
    default = next(o for o in options if o["selected"])
    return {
        "name": "slo",
        "label": "End-to-end SLO",
        "description": "Bound of the SLO panels (a bucket of docutray_bridge_end_to_end_seconds); "
        "keep it equal to the chart's prometheusRule.endToEndSloSeconds.",
        "type": "custom",
        "query": ", ".join(f"{text} : {value}" for text, value in SLO_CHOICES),
        "current": {"selected": True, "text": default["text"], "value": default["value"]},
        "options": options,
        "includeAll": False,
        "multi": False,
        "hide": 0,
    }


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict (deterministic: ids and positions in order)."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x = 0
                y += line_height
                line_height = 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    build_info = "docutray_bridge_build_info"
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "Prometheus that scrapes docutray-bridge",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "uid": UID,
        "title": TITLE,
        "description": "docutray-bridge: Kafka to DocuTray conversions. Runbook: see the README.",
        "tags": ["docutray-bridge", "kafka"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "links": [
            {
                "title": "Runbook",
                "type": "link",
                "url": "https://github.com/docutray/docutray-bridge#runbook",
                "targetBlank": True,
                "icon": "doc",
            }
        ],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "DS_PROMETHEUS",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                },
                _query_variable("namespace", "Namespace", f"label_values({build_info}, namespace)"),
                _query_variable(
                    "job", "Job", f'label_values({build_info}{{namespace=~"$namespace"}}, job)'
                ),
                _query_variable(
                    "pod",
                    "Pod",
                    f'label_values({build_info}{{namespace=~"$namespace", job=~"$job"}}, pod)',
                ),
                _query_variable(
                    "instance",
                    "Replica",
                    f"label_values({build_info}"
                    '{namespace=~"$namespace", job=~"$job", pod=~"$pod"}, instance)',
                ),
                _slo_variable(),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    """The dashboard file's exact text."""
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
