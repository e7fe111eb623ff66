"""The per-API-key, per-minute rate limit and the 429 body it produces.

Two algorithms (see `RateLimitAlgorithm`):

- `sliding` (default): a log of accepted call times per key; a call is let
  through only if fewer than N calls were accepted in the last 60 s. So no
  60-s span ever holds more than N accepted calls, which makes the emulator a
  strict judge of a client's limiter.
- `fixed`: N calls per wall-clock minute, windows aligned to :00, as many
  APIs do; a burst can straddle a boundary and reach 2N in 60 s.

Rejected calls do not spend budget. Time is passed in, so this is pure.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from service.emulator.config import RateLimitAlgorithm

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The limiter's verdict on one call."""

    allowed: bool
    limit: int
    remaining: int
    reset_at_s: float
    """Wall-clock time when budget next frees up (end of window / oldest call + 60 s)."""


class MinuteRateLimiter:
    """Counts calls per key; `limit_per_minute=None` lets everything through."""

    def __init__(
        self,
        *,
        limit_per_minute: int | None,
        algorithm: RateLimitAlgorithm = "sliding",
    ) -> None:
        self.limit_per_minute = limit_per_minute
        self.algorithm: RateLimitAlgorithm = algorithm
        self._calls: dict[str, deque[float]] = {}
        self._fixed: dict[str, tuple[int, int]] = {}

    def acquire(self, key: str, *, now_s: float) -> RateDecision:
        """Spend one call of `key`'s budget if there is any left at `now_s`."""
        limit = self.limit_per_minute
        if limit is None:
            return RateDecision(allowed=True, limit=0, remaining=0, reset_at_s=now_s)
        if self.algorithm == "fixed":
            return self._acquire_fixed(key, limit, now_s)
        return self._acquire_sliding(key, limit, now_s)

    def _acquire_sliding(self, key: str, limit: int, now_s: float) -> RateDecision:
        calls = self._calls.setdefault(key, deque())
        while calls and calls[0] <= now_s - WINDOW_S:
            calls.popleft()
        # A limit lowered at runtime can leave more entries than the new limit.
        while len(calls) > limit:
            calls.popleft()
        if len(calls) < limit:
            calls.append(now_s)
            reset_at_s = calls[0] + WINDOW_S
            return RateDecision(True, limit, limit - len(calls), reset_at_s)
        # The call that frees a slot for this one is the N-th most recent.
        reset_at_s = calls[len(calls) - limit] + WINDOW_S
        return RateDecision(False, limit, 0, reset_at_s)

    def _acquire_fixed(self, key: str, limit: int, now_s: float) -> RateDecision:
        window = math.floor(now_s / WINDOW_S)
        reset_at_s = (window + 1) * WINDOW_S
        current, used = self._fixed.get(key, (window, 0))
        if current != window:
            used = 0
        if used < limit:
            self._fixed[key] = (window, used + 1)
            return RateDecision(True, limit, limit - used - 1, reset_at_s)
        self._fixed[key] = (window, used)
        return RateDecision(False, limit, 0, reset_at_s)


def rate_limited_body(decision: RateDecision, *, now_s: float) -> tuple[dict[str, Any], int]:
    """The contract's 429 body and the `Retry-After` value (whole seconds, at least 1).

    `resetTime` is Unix seconds (an integer, as the SDK expects);
    `retryAfter` is seconds from now, rounded up so a client that waits it is
    never early.
    """
    retry_after_s = max(1, math.ceil(decision.reset_at_s - now_s))
    body = {
        "error": "Rate limit exceeded",
        "limitType": "minute",
        "limit": decision.limit,
        "remaining": 0,
        "resetTime": math.ceil(decision.reset_at_s),
        "retryAfter": retry_after_s,
    }
    return body, retry_after_s
