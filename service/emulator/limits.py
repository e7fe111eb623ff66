"""The plan's rate limits (per API key, per minute, hour and day) and the 429 body.

DocuTray's 429 names the spent window in `limitType`: minute, hour or day
(docs/docutray-api.md). Each window is one `WindowRateLimiter`; a
`PlanRateLimiter` lets a call through only when every configured window has
room, and then spends one call in each. Two algorithms (see
`RateLimitAlgorithm`):

- `sliding` (default): a log of accepted call times per key; a call is let
  through only if fewer than N calls were accepted in the last window. So no
  span of the window's length ever holds more than N accepted calls, which
  makes the emulator a strict judge of a client's limiter.
- `fixed`: N calls per wall-clock window, aligned to :00 (minute, hour) and
  to midnight UTC (day), as many APIs do; a burst can straddle a boundary.

Rejected calls do not spend budget in any window. Time is passed in, so this
is pure.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal

from service.emulator.config import RateLimitAlgorithm

LimitType = Literal["minute", "hour", "day"]
WINDOW_S: Final = 60.0
"""The minute window (kept under its old name for callers of the minute limiter)."""
WINDOWS_S: Final[dict[LimitType, float]] = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The limiter's verdict on one call."""

    allowed: bool
    limit: int
    remaining: int
    reset_at_s: float
    """Wall-clock time when budget next frees up (end of window / oldest call + window)."""
    limit_type: LimitType = "minute"


class WindowRateLimiter:
    """Counts calls per key in one window; `limit=None` lets everything through."""

    def __init__(
        self,
        *,
        limit: int | None,
        limit_type: LimitType = "minute",
        algorithm: RateLimitAlgorithm = "sliding",
        window_s: float | None = None,
    ) -> None:
        self.limit = limit
        self.limit_type: LimitType = limit_type
        self.window_s = WINDOWS_S[limit_type] if window_s is None else window_s
        self.algorithm: RateLimitAlgorithm = algorithm
        self._calls: dict[str, deque[float]] = {}
        self._fixed: dict[str, tuple[int, int]] = {}

    def check(self, key: str, *, now_s: float) -> RateDecision:
        """Whether `key` has room at `now_s`, without spending anything."""
        limit = self.limit
        if limit is None:
            return RateDecision(True, 0, 0, now_s, self.limit_type)
        if self.algorithm == "fixed":
            window = math.floor(now_s / self.window_s)
            reset_at_s = (window + 1) * self.window_s
            current, used = self._fixed.get(key, (window, 0))
            if current != window:
                used = 0
            return RateDecision(
                used < limit, limit, max(0, limit - used), reset_at_s, self.limit_type
            )
        calls = self._calls.setdefault(key, deque())
        while calls and calls[0] <= now_s - self.window_s:
            calls.popleft()
        # A limit lowered at runtime can leave more entries than the new limit.
        while len(calls) > limit:
            calls.popleft()
        if len(calls) < limit:
            reset_at_s = (calls[0] if calls else now_s) + self.window_s
            return RateDecision(True, limit, limit - len(calls), reset_at_s, self.limit_type)
        # The call that frees a slot for this one is the N-th most recent.
        reset_at_s = calls[len(calls) - limit] + self.window_s
        return RateDecision(False, limit, 0, reset_at_s, self.limit_type)

    def spend(self, key: str, *, now_s: float) -> None:
        """Record one accepted call of `key` (after `check` allowed it)."""
        if self.limit is None:
            return
        if self.algorithm == "fixed":
            window = math.floor(now_s / self.window_s)
            current, used = self._fixed.get(key, (window, 0))
            self._fixed[key] = (window, (used if current == window else 0) + 1)
        else:
            self._calls.setdefault(key, deque()).append(now_s)

    def acquire(self, key: str, *, now_s: float) -> RateDecision:
        """Spend one call of `key`'s budget if there is any left at `now_s`."""
        decision = self.check(key, now_s=now_s)
        if not decision.allowed or self.limit is None:
            return decision
        self.spend(key, now_s=now_s)
        return RateDecision(
            True,
            decision.limit,
            decision.remaining - 1,
            self._reset_after_spend(key, now_s, decision),
            self.limit_type,
        )

    def _reset_after_spend(self, key: str, now_s: float, before: RateDecision) -> float:
        if self.algorithm == "fixed":
            return before.reset_at_s
        return self._calls[key][0] + self.window_s


class MinuteRateLimiter(WindowRateLimiter):
    """The per-minute window alone; `limit_per_minute=None` lets everything through."""

    def __init__(
        self,
        *,
        limit_per_minute: int | None,
        algorithm: RateLimitAlgorithm = "sliding",
    ) -> None:
        super().__init__(limit=limit_per_minute, limit_type="minute", algorithm=algorithm)

    @property
    def limit_per_minute(self) -> int | None:
        """The minute budget (None: no limit)."""
        return self.limit

    @limit_per_minute.setter
    def limit_per_minute(self, value: int | None) -> None:
        self.limit = value


class PlanRateLimiter:
    """The minute, hour and day windows together: a call needs room in every one."""

    def __init__(
        self,
        *,
        per_minute: int | None = None,
        per_hour: int | None = None,
        per_day: int | None = None,
        algorithm: RateLimitAlgorithm = "sliding",
        hour_window_s: float = WINDOWS_S["hour"],
        day_window_s: float = WINDOWS_S["day"],
    ) -> None:
        self.windows: dict[LimitType, WindowRateLimiter] = {
            "minute": WindowRateLimiter(limit=per_minute, limit_type="minute", algorithm=algorithm),
            "hour": WindowRateLimiter(
                limit=per_hour, limit_type="hour", algorithm=algorithm, window_s=hour_window_s
            ),
            "day": WindowRateLimiter(
                limit=per_day, limit_type="day", algorithm=algorithm, window_s=day_window_s
            ),
        }

    def set_limits(
        self,
        *,
        per_minute: int | None,
        per_hour: int | None,
        per_day: int | None,
        hour_window_s: float = WINDOWS_S["hour"],
        day_window_s: float = WINDOWS_S["day"],
    ) -> None:
        """Change the budgets (and the test-only window lengths) at runtime; calls already
        counted still count."""
        self.windows["minute"].limit = per_minute
        self.windows["hour"].limit = per_hour
        self.windows["day"].limit = per_day
        self.windows["hour"].window_s = hour_window_s
        self.windows["day"].window_s = day_window_s

    def acquire(self, key: str, *, now_s: float) -> RateDecision:
        """Spend one call in every window, or none when any window is spent.

        When several windows are spent, the answer names the one that frees
        up last (waiting for an earlier one would only meet the next 429).
        """
        decisions = [w.check(key, now_s=now_s) for w in self.windows.values()]
        denied = [d for d in decisions if not d.allowed]
        if denied:
            return max(denied, key=lambda d: d.reset_at_s)
        for window in self.windows.values():
            window.spend(key, now_s=now_s)
        limited = [d for d in decisions if d.limit]
        if not limited:
            return RateDecision(True, 0, 0, now_s, "minute")
        tightest = min(limited, key=lambda d: d.remaining)
        return RateDecision(
            True, tightest.limit, tightest.remaining - 1, tightest.reset_at_s, tightest.limit_type
        )


def rate_limited_body(decision: RateDecision, *, now_s: float) -> tuple[dict[str, Any], int]:
    """The contract's 429 body and the `Retry-After` value (whole seconds, at least 1).

    `limitType` names the spent window; `resetTime` is Unix seconds (an
    integer, as the SDK expects) when that window frees up; `retryAfter` is
    seconds from now, rounded up so a client that waits it is never early.
    """
    retry_after_s = max(1, math.ceil(decision.reset_at_s - now_s))
    body = {
        "error": "Rate limit exceeded",
        "limitType": decision.limit_type,
        "limit": decision.limit,
        "remaining": 0,
        "resetTime": math.ceil(decision.reset_at_s),
        "retryAfter": retry_after_s,
    }
    return body, retry_after_s
