"""The budget in process memory: the same decisions as the Redis scripts, one replica's view.

Used on its own when there is no Redis (one replica), and as the fallback
while Redis is unreachable (then the limiter passes it a conservative share
of the configured rate).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from service.ratelimit.policy import (
    NEVER,
    AimdParams,
    AimdState,
    Answer,
    Feedback,
    LaneState,
    acquire_step,
    lane_initial,
    rate_limited_step,
)


class LocalBackend:
    """Lane states in a dict, time from ``clock`` (``time.monotonic`` unless a test passes one)."""

    def __init__(self, *, params: AimdParams, clock: Callable[[], float] = time.monotonic) -> None:
        self._params = params
        self._clock = clock
        self._lanes: dict[str, LaneState] = {}

    def seed(self, lane: str, *, configured_per_minute: float, effective_per_minute: float) -> None:
        """Start ``lane`` afresh at ``effective_per_minute`` (e.g. the last shared rate's share)."""
        eff = min(effective_per_minute, configured_per_minute)
        self._lanes[lane] = LaneState(
            NEVER, AimdState(eff, configured_per_minute, NEVER, NEVER), NEVER
        )

    async def reserve(
        self,
        lane: str,
        *,
        configured_per_minute: float,
        burst: int,
        want_slot: bool,
        want_increase: bool,
    ) -> Answer:
        """Same contract as the Redis acquire script."""
        state = self._lanes.get(lane) or lane_initial(configured_per_minute)
        state, answer = acquire_step(
            state,
            now=self._clock(),
            configured_per_minute=configured_per_minute,
            burst=burst,
            want_slot=want_slot,
            want_increase=want_increase,
            params=self._params,
        )
        self._lanes[lane] = state
        return answer

    async def rate_limited(
        self, lane: str, *, configured_per_minute: float, hold_s: float
    ) -> Feedback:
        """Same contract as the Redis 429 script."""
        state = self._lanes.get(lane) or lane_initial(configured_per_minute)
        state, feedback = rate_limited_step(
            state,
            now=self._clock(),
            configured_per_minute=configured_per_minute,
            hold_s=hold_s,
            params=self._params,
        )
        self._lanes[lane] = state
        return feedback
