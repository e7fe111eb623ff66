"""The budget in process memory: the same decisions as the Redis scripts, one replica's view.

Used on its own when there is no Redis (one replica), and as the fallback
while Redis is unreachable (then the limiter passes it a conservative share
of the configured rate, and seeds it with the last blocks Redis reported).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from service.ratelimit.policy import (
    NEVER,
    AimdParams,
    AimdState,
    Answer,
    Feedback,
    GateOp,
    GateState,
    LaneState,
    gate_op,
    lane_initial,
    rate_limited_step,
    reserve_step,
)


class LocalBackend:
    """Lane states in a dict, time from ``clock`` (``time.monotonic`` unless a test passes one)."""

    def __init__(self, *, params: AimdParams, clock: Callable[[], float] = time.monotonic) -> None:
        self._params = params
        self._clock = clock
        self._lanes: dict[str, LaneState] = {}
        self._gate = GateState()

    def seed(
        self,
        lane: str,
        *,
        configured_per_minute: float,
        effective_per_minute: float,
        blocked_until: float = NEVER,
    ) -> None:
        """Start ``lane`` afresh at ``effective_per_minute`` (e.g. the last shared rate's share),
        still blocked until ``blocked_until`` (this backend's clock) when a shared 429 said so."""
        eff = min(effective_per_minute, configured_per_minute)
        self._lanes[lane] = LaneState(
            NEVER, AimdState(eff, configured_per_minute, NEVER, NEVER), blocked_until
        )

    def seed_gate(
        self, *, blocked_until: float, blocked_reason: str, paused_until: float, pause_reason: str
    ) -> None:
        """Carry the shared gate's block and pause over (this backend's clock); windows start
        afresh (the limiter gives this backend a share of them)."""
        self._gate = replace(
            GateState(),
            blocked_until=blocked_until,
            blocked_reason=blocked_reason,
            paused_until=paused_until,
            pause_reason=pause_reason,
        )

    async def reserve(
        self,
        lane: str,
        *,
        configured_per_minute: float,
        burst: int,
        want_slot: bool,
        want_increase: bool,
        holding: bool = False,
        plan: str | None = None,
        per_hour: float = 0.0,
        per_day: float = 0.0,
        max_ahead_slots: int = 64,
        extra_slots: int = 0,
    ) -> Answer:
        """Same contract as the Redis acquire script."""
        state = self._lanes.get(lane) or lane_initial(configured_per_minute)
        state, gate, answer = reserve_step(
            state,
            None if plan is None else self._gate,
            now=self._clock(),
            configured_per_minute=configured_per_minute,
            burst=burst,
            want_slot=want_slot,
            want_increase=want_increase,
            params=self._params,
            holding=holding,
            plan=plan or "",
            per_hour=per_hour,
            per_day=per_day,
            max_ahead_slots=max_ahead_slots,
            extra_slots=extra_slots,
        )
        self._lanes[lane] = state
        if gate is not None:
            self._gate = gate
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

    async def gate(self, op: GateOp, *, hold_s: float = 0.0, reason: str = "") -> tuple[float, str]:
        """Same contract as the Redis gate script."""
        self._gate, held_for_s, held_reason = gate_op(
            self._gate, now=self._clock(), op=op, hold_s=hold_s, reason=reason
        )
        return held_for_s, held_reason
