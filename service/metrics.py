"""Every Prometheus metric the bridge exports, in one place.

Conventions (see the README's metrics table): one `docutray_bridge_` prefix,
base units (`_seconds`), `_total` on counters, bounded label values only
(never a request id or conversion id), and every labelled series created at
zero by :func:`init_series` so dashboards and alerts see no gaps.

Document type codes are customer-defined; to keep the label set bounded,
:func:`doc_type_label` lets through the first :data:`MAX_DOCUMENT_TYPES`
distinct codes and folds the rest into ``other``.
"""

from __future__ import annotations

import platform
import threading
from typing import Final

import confluent_kafka
from prometheus_client import Counter, Gauge, Histogram, Info

from service import __version__

PREFIX: Final = "docutray_bridge_"

CONSUME_OUTCOMES: Final = ("accepted", "rejected", "duplicate")
SUBMIT_OUTCOMES: Final = ("accepted", "rejected", "transient_error", "systemic_error")
STATUS_CLASSES: Final = ("2xx", "4xx", "5xx", "none")
STATUS_OUTCOMES: Final = (
    "in_progress",
    "success",
    "error",
    "lost",
    "transient_error",
    "systemic_error",
)
ENDPOINTS: Final = ("submit", "status")
PENDING_STATES: Final = ("queued", "submitting", "submitted")
BUDGETS: Final = ("submit", "status")
TXN_OUTCOMES: Final = ("committed", "aborted")
RESUBMIT_REASONS: Final = ("recovery", "conversion_lost")
PAUSE_REASONS: Final = (
    "invalid_api_key",
    "api_misconfigured",
    "api_unreachable",
    "backpressure",
    "shutdown",
)
# Kept in step with service.messages.DeadLetterReason (a test checks they agree).
DEAD_LETTER_REASONS: Final = (
    "malformed_record",
    "invalid_request",
    "unsupported_format",
    "too_large",
    "source_unavailable",
    "forbidden_source",
    "conversion_failed",
    "conversion_lost",
    "timeout",
    "retries_exhausted",
    "request_id_conflict",
    "result_too_large",
)
MAX_DOCUMENT_TYPES: Final = 50

_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS: Final = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

BUILD_INFO = Info(
    "docutray_bridge_build",
    "Build metadata: bridge version, Python, confluent-kafka and librdkafka versions.",
)
REQUESTS_CONSUMED = Counter(
    "docutray_bridge_requests_consumed_total",
    "Input records consumed, by outcome: accepted (now pending), rejected (dead-lettered at once), "
    "duplicate (same request id already pending; not submitted again).",
    ["outcome"],
)
SUBMISSIONS = Counter(
    "docutray_bridge_submissions_total",
    "POST /api/convert-async calls by outcome and HTTP status class (none = no HTTP answer).",
    ["outcome", "status_class"],
)
STATUS_CALLS = Counter(
    "docutray_bridge_status_calls_total",
    "GET /api/convert-async/status calls by outcome.",
    ["outcome"],
)
HTTP_DURATION = Histogram(
    "docutray_bridge_http_request_duration_seconds",
    "Latency of DocuTray API calls, by endpoint.",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
CONVERSION_DURATION = Histogram(
    "docutray_bridge_conversion_duration_seconds",
    "Time from a successful submit to the terminal status being seen, by document type.",
    ["document_type"],
    buckets=_DURATION_BUCKETS,
)
END_TO_END = Histogram(
    "docutray_bridge_end_to_end_seconds",
    "Time from the bridge accepting a request to its outcome being committed to Kafka, by outcome "
    "(result or dead_letter): the latency a downstream reader sees, for SLOs.",
    ["outcome"],
    buckets=_DURATION_BUCKETS,
)
OLDEST_PENDING_AGE = Gauge(
    "docutray_bridge_oldest_pending_age_seconds",
    "Age of the oldest pending request on this replica (0 when none); refreshed every 5 s.",
)
STATUS_CALLS_PER_CONVERSION = Histogram(
    "docutray_bridge_status_calls_per_conversion",
    "Status calls spent on each finished conversion (the polling cost).",
    buckets=(1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100),
)
PENDING = Gauge(
    "docutray_bridge_pending_conversions",
    "Requests this replica holds, by state: queued (waiting to submit or retry), submitting "
    "(submit in flight), submitted (conversion running at DocuTray, being polled).",
    ["state"],
)
RESULTS = Counter(
    "docutray_bridge_results_published_total",
    "Results published to the result topic (committed transactions only).",
)
DEAD_LETTERS = Counter(
    "docutray_bridge_dead_letters_total",
    "Dead letters published (committed transactions only), by reason.",
    ["reason"],
)
RATE_LIMITED = Counter(
    "docutray_bridge_rate_limited_total",
    "HTTP 429 answers received from DocuTray, by endpoint.",
    ["endpoint"],
)
LIMITER_WAIT = Histogram(
    "docutray_bridge_limiter_wait_seconds",
    "Time spent waiting for a rate-limit permit, by budget.",
    ["budget"],
    buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
LIMITER_EFFECTIVE_RATE = Gauge(
    "docutray_bridge_limiter_effective_rate_per_second",
    "Permits per second the limiter currently grants (lowered after 429s, AIMD), by budget.",
    ["budget"],
)
LIMITER_CONFIGURED_RATE = Gauge(
    "docutray_bridge_limiter_configured_rate_per_second",
    "Configured permits per second for the whole deployment, by budget.",
    ["budget"],
)
LIMITER_DEGRADED = Gauge(
    "docutray_bridge_limiter_degraded",
    "1 while Redis is unreachable and the limiter runs on a conservative local share.",
)
CONSUMER_LAG = Gauge(
    "docutray_bridge_consumer_lag",
    "Records behind the end of each assigned input partition (from librdkafka statistics).",
    ["partition"],
)
ASSIGNED_PARTITIONS = Gauge(
    "docutray_bridge_assigned_partitions",
    "Input partitions currently assigned to this replica.",
)
TRANSACTIONS = Counter(
    "docutray_bridge_transactions_total",
    "Kafka transactions by outcome.",
    ["outcome"],
)
RESUBMISSIONS = Counter(
    "docutray_bridge_resubmissions_total",
    "Conversions submitted again: recovery (a submit was in flight when the previous owner "
    "stopped, so DocuTray may have it twice) or conversion_lost (DocuTray forgot it: 404/403).",
    ["reason"],
)
RESTORE_DURATION = Histogram(
    "docutray_bridge_changelog_restore_seconds",
    "Time to restore the pending set of newly assigned partitions from the changelog.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
RESTORED_RECORDS = Counter(
    "docutray_bridge_changelog_restored_records_total",
    "Pending conversions restored from the changelog after an assignment.",
)
RESTORE_WAITING = Gauge(
    "docutray_bridge_restore_waiting_partitions",
    "Assigned partitions whose restore waits for an open transaction on the state topics.",
)
KAFKA_RETRIES = Counter(
    "docutray_bridge_kafka_retries_total",
    "Retriable Kafka errors retried, by call (begin/commit/abort_transaction, offsets, ...).",
    ["call"],
)
UNEXPECTED_ERRORS = Counter(
    "docutray_bridge_unexpected_errors_total",
    "Unexpected exceptions in a submit or status task (a bug or an unknown failure); "
    "the entry is retried with backoff.",
    ["stage"],
)
MEMORY_HELD = Gauge(
    "docutray_bridge_memory_held_bytes",
    "Bytes held by kind: pending (entries' states) and documents (read back for submits and "
    "dead letters). Consumption pauses before BRIDGE_MEMORY_BUDGET_MB's shares are reached.",
    ["kind"],
)
REMEMBERED = Gauge(
    "docutray_bridge_dedupe_remembered_requests",
    "Finished request ids in this replica's dedupe window (re-sends cost nothing).",
)
CONSUMPTION_PAUSED = Gauge(
    "docutray_bridge_consumption_paused",
    "1 while consumption is paused, by reason.",
    ["reason"],
)
READY = Gauge(
    "docutray_bridge_ready",
    "1 when the replica is ready (group joined, partitions restored, not paused by a systemic error).",
)
HEARTBEAT = Gauge(
    "docutray_bridge_heartbeat_timestamp_seconds",
    "Unix time of the processing loop's last heartbeat (liveness).",
)

# DocuTray's plan (issue 14): quota, submit holds, usage, webhooks.
SUBMIT_HOLD_REASONS: Final = ("quota_exhausted", "rate_limit_hour", "rate_limit_day", "other")
WEBHOOK_OUTCOMES: Final = (
    "routed",
    "ignored",
    "unrouted",
    "invalid",
    "too_large",
    "rate_limited",
    "produce_failed",
)
WAKEUP_OUTCOMES: Final = ("woke", "unknown", "finished", "mismatch", "early")
QUOTA_EXHAUSTED = Gauge(
    "docutray_bridge_quota_exhausted",
    "1 while submissions are paused on every replica: DocuTray's monthly quota is spent (402).",
)
QUOTA_RESET = Gauge(
    "docutray_bridge_quota_reset_timestamp_seconds",
    "Unix time DocuTray gave for the quota's reset (resetDate); 0 when unknown.",
)
SUBMIT_HELD = Gauge(
    "docutray_bridge_submissions_held",
    "1 while submissions are held on every replica (shared gate), by reason.",
    ["reason"],
)
USAGE_PAGES = Gauge(
    "docutray_bridge_usage_pages",
    "Pages DocuTray converted successfully this month for the organisation (GET /api/usage).",
)
USAGE_CONVERSIONS = Gauge(
    "docutray_bridge_usage_conversions",
    "Successful conversions this month for the organisation (GET /api/usage).",
)
USAGE_UPDATED = Gauge(
    "docutray_bridge_usage_updated_timestamp_seconds",
    "Unix time this replica last read GET /api/usage (one replica at a time does).",
)
MONTHLY_PAGE_BUDGET = Gauge(
    "docutray_bridge_monthly_page_budget",
    "BRIDGE_MONTHLY_PAGE_BUDGET (0: not set); alert at 80 % of it.",
)
WEBHOOKS = Counter(
    "docutray_bridge_webhooks_total",
    "Webhook posts received on BRIDGE_WEBHOOK_PORT, by outcome.",
    ["outcome"],
)
WEBHOOK_WAKEUPS = Counter(
    "docutray_bridge_webhook_wakeups_total",
    "Completion records read by the owning replica, by outcome (woke: a status call is due).",
    ["outcome"],
)

_seen_doc_types: set[str] = set()
_doc_types_lock = threading.Lock()


def doc_type_label(code: str) -> str:
    """A bounded label value for a customer-defined document type code."""
    with _doc_types_lock:
        if code in _seen_doc_types:
            return code
        if len(_seen_doc_types) < MAX_DOCUMENT_TYPES:
            _seen_doc_types.add(code)
            return code
    return "other"


def status_class(status_code: int | None) -> str:
    """Fold an HTTP status into a bounded label: 2xx, 4xx, 5xx, or none."""
    if status_code is None:
        return "none"
    if 200 <= status_code < 300:
        return "2xx"
    if 400 <= status_code < 500:
        return "4xx"
    if status_code >= 500:
        return "5xx"
    return "none"


def _version_string(value: object) -> str:
    """confluent-kafka's version calls answer a string or a (string, int) tuple, by release."""
    if isinstance(value, tuple):
        return str(value[0])
    return str(value)


def init_series() -> None:
    """Create every labelled series at zero and publish build metadata."""
    BUILD_INFO.info(
        {
            "version": __version__,
            "python": platform.python_version(),
            "confluent_kafka": _version_string(confluent_kafka.version()),
            "librdkafka": _version_string(confluent_kafka.libversion()),
        }
    )
    for outcome in CONSUME_OUTCOMES:
        REQUESTS_CONSUMED.labels(outcome)
    for outcome in SUBMIT_OUTCOMES:
        for cls in STATUS_CLASSES:
            SUBMISSIONS.labels(outcome, cls)
    for outcome in STATUS_OUTCOMES:
        STATUS_CALLS.labels(outcome)
    for endpoint in ENDPOINTS:
        HTTP_DURATION.labels(endpoint)
        RATE_LIMITED.labels(endpoint)
    for state in PENDING_STATES:
        PENDING.labels(state)
    for reason in DEAD_LETTER_REASONS:
        DEAD_LETTERS.labels(reason)
    for budget in BUDGETS:
        LIMITER_WAIT.labels(budget)
        LIMITER_EFFECTIVE_RATE.labels(budget)
        LIMITER_CONFIGURED_RATE.labels(budget)
    for outcome in TXN_OUTCOMES:
        TRANSACTIONS.labels(outcome)
    for stage in ("submit", "status"):
        UNEXPECTED_ERRORS.labels(stage)
    for kind in ("pending", "documents"):
        MEMORY_HELD.labels(kind)
    for outcome in ("result", "dead_letter"):
        END_TO_END.labels(outcome)
    for reason in RESUBMIT_REASONS:
        RESUBMISSIONS.labels(reason)
    for reason in PAUSE_REASONS:
        CONSUMPTION_PAUSED.labels(reason)
    for reason in SUBMIT_HOLD_REASONS:
        SUBMIT_HELD.labels(reason)
    for outcome in WEBHOOK_OUTCOMES:
        WEBHOOKS.labels(outcome)
    for outcome in WAKEUP_OUTCOMES:
        WEBHOOK_WAKEUPS.labels(outcome)
    LIMITER_DEGRADED.set(0)
    ASSIGNED_PARTITIONS.set(0)
    READY.set(0)
