"""Counters the emulator exposes at `GET /_emulator/stats` for tests and benchmarks.

Pure bookkeeping: the app calls the `record_*` methods; time is passed in.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

MAX_CALL_TIMESTAMPS: Final = 100_000
"""How many budget-counted call times are kept (oldest dropped first)."""


def max_calls_in_window(timestamps_s: Sequence[float], *, window_s: float = 60.0) -> int:
    """The most calls in any half-open span of `window_s` (t_last - t_first < window_s).

    `timestamps_s` must be sorted ascending. This is what a per-minute limit
    promises to bound, so tests compare it with the configured limit.
    """
    best = 0
    first = 0
    for last, t in enumerate(timestamps_s):
        while t - timestamps_s[first] >= window_s:
            first += 1
        best = max(best, last - first + 1)
    return best


def _by_code(counter: Counter[int]) -> dict[str, int]:
    return {str(code): count for code, count in sorted(counter.items())}


@dataclass
class EmulatorStats:
    """Counters since start or the last reset."""

    submissions_accepted: int = 0
    submissions_rejected: Counter[int] = field(default_factory=Counter)
    status_calls: int = 0
    status_responses: Counter[int] = field(default_factory=Counter)
    document_type_calls: int = 0
    rate_limited: int = 0
    faults_injected: int = 0
    slow_responses: int = 0
    auth_failures: int = 0
    counted_calls_total: int = 0
    conversions_by_request_id: Counter[str] = field(default_factory=Counter)
    counted_call_times_s: deque[float] = field(
        default_factory=lambda: deque(maxlen=MAX_CALL_TIMESTAMPS)
    )
    usage_calls: int = 0
    quota_exceeded: int = 0
    rate_limited_by_window: Counter[str] = field(default_factory=Counter)
    webhook_events: Counter[str] = field(default_factory=Counter)
    webhook_attempts: int = 0
    webhook_answers: Counter[str] = field(default_factory=Counter)
    webhooks_delivered: int = 0
    webhooks_dropped: int = 0
    webhooks_duplicated: int = 0
    webhook_retries: int = 0
    webhooks_failed: int = 0
    webhooks_skipped_forgotten: int = 0

    def record_counted_call(self, monotonic_s: float) -> None:
        """A call that passed the limiter and spends budget under the configured scope."""
        self.counted_calls_total += 1
        self.counted_call_times_s.append(monotonic_s)

    def record_submission(self, status_code: int, *, request_id: str | None) -> None:
        """The answer to one `POST /api/convert-async`."""
        if status_code == 202:
            self.submissions_accepted += 1
            if request_id is not None:
                self.conversions_by_request_id[request_id] += 1
        else:
            self.submissions_rejected[status_code] += 1

    def record_status_call(self, status_code: int) -> None:
        """The answer to one `GET /api/convert-async/status/{id}`."""
        self.status_calls += 1
        self.status_responses[status_code] += 1

    def snapshot(self, *, conversions_live: int, include_timestamps: bool) -> dict[str, Any]:
        """The JSON body of `GET /_emulator/stats`."""
        times = list(self.counted_call_times_s)
        body: dict[str, Any] = {
            "submissions_accepted": self.submissions_accepted,
            "submissions_rejected": {
                str(k): v for k, v in sorted(self.submissions_rejected.items())
            },
            "status_calls": self.status_calls,
            "status_responses": _by_code(self.status_responses),
            "document_type_calls": self.document_type_calls,
            "rate_limited": self.rate_limited,
            "faults_injected": self.faults_injected,
            "slow_responses": self.slow_responses,
            "auth_failures": self.auth_failures,
            "conversions_live": conversions_live,
            "conversions_by_request_id": dict(self.conversions_by_request_id),
            "counted_calls_total": self.counted_calls_total,
            "max_calls_per_60s": max_calls_in_window(times),
            "usage_calls": self.usage_calls,
            "quota_exceeded": self.quota_exceeded,
            "rate_limited_by_window": dict(sorted(self.rate_limited_by_window.items())),
            "webhooks": {
                "events": dict(sorted(self.webhook_events.items())),
                "attempts": self.webhook_attempts,
                "answers": dict(sorted(self.webhook_answers.items())),
                "delivered": self.webhooks_delivered,
                "dropped": self.webhooks_dropped,
                "duplicated": self.webhooks_duplicated,
                "retries": self.webhook_retries,
                "failed": self.webhooks_failed,
                "skipped_forgotten": self.webhooks_skipped_forgotten,
            },
        }
        if include_timestamps:
            body["counted_call_times_s"] = times
        return body
