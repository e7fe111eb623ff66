"""The plan's monthly bookkeeping: usage (`GET /api/usage`) and the monthly quota (402).

Per API key (the emulator's stand-in for an organisation) and per calendar
month in UTC:

- `successful_conversions` / `successful_pages` count conversions that
  reached SUCCESS, in the month they finished (their `response_timestamp`).
  Conversions have no timers, so each accepted one that will succeed is
  queued with its end time and pages, and `settle(now_s)` moves every one
  that has ended into the month's counters (cheap; the app calls it often).
- `accepted` counts submissions answered 202 in the month they were made:
  that is what the quota compares with [inferred: DocuTray does not publish
  what its quota counts]. A 402 body carries `quota`, `used` and `resetDate`
  (the first instant of the next month, ISO 8601, as the SDK's type says).

Forgetting conversions (`/_emulator/forget`) does not touch this ledger:
DocuTray's billing survives a loss of conversion state. Time is passed in.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.emulator.conversions import iso_timestamp

Month = tuple[int, int]
QuotaPeriod = tuple[int, int] | int
"""A calendar month (year, month), or the index of a test-only fixed period."""


def month_of(epoch_s: float) -> Month:
    """(year, month) of an instant, in UTC."""
    moment = datetime.fromtimestamp(epoch_s, tz=UTC)
    return moment.year, moment.month


def next_month_start_s(month: Month) -> float:
    """Epoch seconds of the first instant of the month after `month` (UTC)."""
    year, number = month
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return datetime(year, number, 1, tzinfo=UTC).timestamp()


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """Whether one more conversion fits the month's quota, and the 402 fields if not."""

    allowed: bool
    quota: int | None
    used: int
    reset_at_s: float


@dataclass
class UsageLedger:
    """Monthly counters per owner (an API key fingerprint)."""

    _pending: list[tuple[float, int, str, int]] = field(default_factory=list)
    _sequence: int = 0
    conversions: Counter[tuple[str, Month]] = field(default_factory=Counter)
    pages: Counter[tuple[str, Month]] = field(default_factory=Counter)
    accepted: Counter[tuple[str, QuotaPeriod]] = field(default_factory=Counter)

    @staticmethod
    def _period(now_s: float, period_s: float | None) -> tuple[QuotaPeriod, float]:
        if period_s is None:
            month = month_of(now_s)
            return month, next_month_start_s(month)
        index = math.floor(now_s / period_s)
        return index, (index + 1) * period_s

    def check_quota(
        self, owner: str, quota: int | None, *, now_s: float, period_s: float | None = None
    ) -> QuotaDecision:
        """Whether `owner` may start one more conversion now (nothing is spent).

        The quota period is the calendar month, or (tests) a fixed period of
        `period_s` seconds aligned to the epoch.
        """
        period, reset_at_s = self._period(now_s, period_s)
        used = self.accepted[(owner, period)]
        allowed = quota is None or used < quota
        return QuotaDecision(allowed, quota, used, reset_at_s)

    def record_accepted(
        self,
        owner: str,
        *,
        now_s: float,
        succeeds_at_s: float | None,
        pages: int,
        period_s: float | None = None,
    ) -> None:
        """A submission got 202; if its plan ends in SUCCESS, queue it for usage."""
        self.accepted[(owner, self._period(now_s, period_s)[0])] += 1
        if succeeds_at_s is not None:
            self._sequence += 1
            heapq.heappush(self._pending, (succeeds_at_s, self._sequence, owner, pages))

    def settle(self, now_s: float) -> int:
        """Count every queued conversion that has succeeded by `now_s`; how many were."""
        settled = 0
        while self._pending and self._pending[0][0] <= now_s:
            ends_at_s, _, owner, pages = heapq.heappop(self._pending)
            key = (owner, month_of(ends_at_s))
            self.conversions[key] += 1
            self.pages[key] += pages
            settled += 1
        return settled

    def usage(self, owner: str, month: Month, *, now_s: float) -> dict[str, Any]:
        """The JSON body of `GET /api/usage` for `owner` and `month`."""
        self.settle(now_s)
        key = (owner, month)
        return {
            "year": month[0],
            "month": month[1],
            "successful_pages": self.pages[key],
            "successful_conversions": self.conversions[key],
        }


def quota_exceeded_body(decision: QuotaDecision) -> dict[str, Any]:
    """The 402 body [inferred]: the SDK's `QuotaExceededInfo` keys, `resetDate` as ISO 8601."""
    return {
        "error": "Monthly conversion quota exceeded",
        "quota": decision.quota,
        "used": decision.used,
        "resetDate": iso_timestamp(decision.reset_at_s),
    }
