"""The limiter's decisions as pure functions: GCRA, AIMD and class shares.

Nothing here does I/O or reads a clock: time is an argument, in seconds, and
rates are per minute. The Redis Lua scripts (:mod:`service.ratelimit.redis_backend`)
mirror :func:`gcra`, :func:`aimd_increase` and :func:`aimd_decrease` line for
line, and a test runs both on the same sequence of calls and checks they agree;
change one, change the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Generic, Literal, TypeVar

Budget = Literal["submit", "status"]
BUDGETS: tuple[Budget, ...] = ("submit", "status")

C = TypeVar("C", bound=str)

NEVER = -1e18
"""A time long past (finite, so Lua and Redis store it as they store any number)."""


def gcra_shape(rate_per_minute: float, burst: int) -> tuple[float, int]:
    """``(emission_interval, burst)`` keeping every 60 s within ``rate_per_minute``, bursts included.

    An API that limits "N per minute" counts any 60-s span (the emulator, like
    many APIs, uses a sliding window). GCRA at sustained rate ``S`` with burst
    ``b`` lets through at most ``floor(S) + b`` permits in any closed 60-s
    span, so the burst is paid for out of the rate: ``S = rate - b``. The
    burst is capped at a twentieth of the rate (so it costs at most 5 % of
    throughput) and ``S`` never drops below half the rate.
    """
    b = max(1, min(burst, math.floor(rate_per_minute / 20)))
    sustained = max(rate_per_minute - b, rate_per_minute / 2)
    return 60 / sustained, b


def gcra(now: float, tat: float, emission_interval: float, burst: int) -> tuple[float, float]:
    """Reserve one permit with the generic cell rate algorithm.

    ``tat`` is the theoretical arrival time kept between calls (0 for a fresh
    budget). Returns ``(allowed_at, new_tat)``: the permit is the caller's at
    ``allowed_at`` (``>= now``), and storing ``new_tat`` reserves it. A caller
    that cannot wait until ``allowed_at`` simply does not store ``new_tat``.

    Guarantee: if every permit is reserved through this function, any window
    of length ``w`` holds at most ``burst + w / emission_interval`` permits.
    Reservations are granted in call order, which makes the budget fair (FIFO)
    among callers and spares them a retry storm.
    """
    base = max(tat, now)
    allowed_at = max(now, base - (burst - 1) * emission_interval)
    return allowed_at, base + emission_interval


@dataclass(frozen=True, slots=True)
class AimdParams:
    """How the effective rate reacts to 429s (decrease) and successes (increase).

    Below ``probe_margin * ceiling`` (the rate at which the last 429 came) the
    rate climbs ``increase_fraction`` of the configured rate per
    ``increase_interval_s``; above it, it only probes upward at
    ``probe_fraction`` per interval. That keeps the sawtooth of 429s rare when
    the configured rate is above what the API really allows.
    """

    decrease_factor: float = 0.7
    floor_fraction: float = 0.05
    increase_interval_s: float = 5.0
    increase_fraction: float = 0.05
    probe_fraction: float = 0.005
    probe_margin: float = 0.9
    min_decrease_gap_s: float = 2.0

    def as_args(self) -> list[float]:
        """The parameters in the order the Lua scripts read them."""
        return [
            self.decrease_factor,
            self.floor_fraction,
            self.increase_interval_s,
            self.increase_fraction,
            self.probe_fraction,
            self.probe_margin,
            self.min_decrease_gap_s,
        ]


@dataclass(frozen=True, slots=True)
class AimdState:
    """The effective rate of one budget and what AIMD remembers about it."""

    effective_per_minute: float
    ceiling_per_minute: float
    changed_at: float
    decrease_gate_until: float


def aimd_initial(configured_per_minute: float) -> AimdState:
    """A budget that has never seen a 429 runs at its configured rate."""
    return AimdState(configured_per_minute, configured_per_minute, NEVER, NEVER)


def aimd_clamp(state: AimdState, configured_per_minute: float) -> AimdState:
    """Never above the configured rate (it may have been lowered since)."""
    if (
        state.effective_per_minute <= configured_per_minute
        and state.ceiling_per_minute <= configured_per_minute
    ):
        return state
    return replace(
        state,
        effective_per_minute=min(state.effective_per_minute, configured_per_minute),
        ceiling_per_minute=min(state.ceiling_per_minute, configured_per_minute),
    )


def aimd_increase(
    state: AimdState, *, now: float, configured_per_minute: float, params: AimdParams
) -> AimdState:
    """Additive increase after successes: at most one step per ``increase_interval_s``.

    The interval is shared by every replica (the state lives in Redis), so N
    replicas reporting successes do not climb N times as fast.
    """
    state = aimd_clamp(state, configured_per_minute)
    if now - state.changed_at < params.increase_interval_s:
        return state
    eff = state.effective_per_minute
    if eff >= configured_per_minute:
        return state
    knee = state.ceiling_per_minute * params.probe_margin
    if eff < knee:
        new = min(eff + params.increase_fraction * configured_per_minute, knee)
    else:
        new = eff + params.probe_fraction * configured_per_minute
    new = min(new, configured_per_minute)
    ceiling = max(state.ceiling_per_minute, new)
    return AimdState(new, ceiling, now, state.decrease_gate_until)


def aimd_decrease(
    state: AimdState,
    *,
    now: float,
    configured_per_minute: float,
    hold_s: float,
    params: AimdParams,
) -> AimdState:
    """Multiplicative decrease on a 429, at most once per retry window.

    Calls already in flight when the first 429 came back answer 429 too; the
    gate (``max(hold_s, min_decrease_gap_s)`` after a decrease) keeps that
    burst from collapsing the rate. Returns ``state`` itself when gated.
    """
    state = aimd_clamp(state, configured_per_minute)
    if now < state.decrease_gate_until:
        return state
    eff = state.effective_per_minute
    new = max(eff * params.decrease_factor, params.floor_fraction * configured_per_minute)
    return AimdState(new, eff, now, now + max(hold_s, params.min_decrease_gap_s))


class ShareScheduler(Generic[C]):
    """Stride scheduling between classes that want permits from one budget.

    When several classes have waiters, each gets permits in proportion to its
    weight; a class alone gets every permit (no capacity is kept idle). A class
    that was idle does not bank credit while it waits: on its return it gets
    its share, not a catch-up burst that would starve the others.
    """

    def __init__(self, weights: Mapping[C, float]) -> None:
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError("every class needs a positive weight")
        self._order = list(weights)
        self._stride = {c: 1.0 / w for c, w in weights.items()}
        self._pass = dict.fromkeys(self._order, 0.0)

    def pick(self, ready: Iterable[C]) -> C:
        """The class that gets the next permit, among those with waiters."""
        ready_set = set(ready)
        candidates = [c for c in self._order if c in ready_set]
        if not candidates:
            raise ValueError("no class is ready")
        chosen = min(candidates, key=lambda c: self._pass[c])
        floor = self._pass[chosen]
        for c in self._order:
            if c not in ready_set:
                self._pass[c] = max(self._pass[c], floor)
        self._pass[chosen] += self._stride[chosen]
        return chosen


@dataclass(frozen=True, slots=True)
class LaneState:
    """Everything one budget (a *lane*) keeps between calls; in Redis, one hash."""

    tat: float
    aimd: AimdState
    blocked_until: float


def lane_initial(configured_per_minute: float) -> LaneState:
    """A lane nobody has used yet: full burst, configured rate, not blocked."""
    return LaneState(NEVER, aimd_initial(configured_per_minute), NEVER)


@dataclass(frozen=True, slots=True)
class Answer:
    """What a backend tells the dispatcher on each call.

    ``reserved_in_s`` is how long until the reserved permit is ours (None when
    no permit was asked for); ``blocked_for_s`` is how long the shared
    "blocked until" (from a 429) still holds, 0 when it does not.
    """

    reserved_in_s: float | None
    blocked_for_s: float
    effective_per_minute: float


@dataclass(frozen=True, slots=True)
class Feedback:
    """The outcome of reporting a 429."""

    effective_per_minute: float
    decreased: bool
    blocked_for_s: float


def acquire_step(
    state: LaneState,
    *,
    now: float,
    configured_per_minute: float,
    burst: int,
    want_slot: bool,
    want_increase: bool,
    params: AimdParams,
) -> tuple[LaneState, Answer]:
    """One call of the acquire script: optionally raise the rate, optionally reserve a permit.

    A reservation made while the lane is blocked lands after the block ends.
    """
    aimd = aimd_clamp(state.aimd, configured_per_minute)
    if want_increase:
        aimd = aimd_increase(
            aimd, now=now, configured_per_minute=configured_per_minute, params=params
        )
    tat = state.tat
    reserved_in: float | None = None
    if want_slot:
        start = max(now, state.blocked_until)
        interval, tolerance = gcra_shape(aimd.effective_per_minute, burst)
        allowed_at, tat = gcra(start, tat, interval, tolerance)
        reserved_in = allowed_at - now
    answer = Answer(reserved_in, max(0.0, state.blocked_until - now), aimd.effective_per_minute)
    return LaneState(tat, aimd, state.blocked_until), answer


def rate_limited_step(
    state: LaneState,
    *,
    now: float,
    configured_per_minute: float,
    hold_s: float,
    params: AimdParams,
) -> tuple[LaneState, Feedback]:
    """One call of the 429 script: block the lane for ``hold_s`` and decrease the rate."""
    before = aimd_clamp(state.aimd, configured_per_minute)
    aimd = aimd_decrease(
        before,
        now=now,
        configured_per_minute=configured_per_minute,
        hold_s=hold_s,
        params=params,
    )
    blocked_until = max(state.blocked_until, now + hold_s)
    feedback = Feedback(aimd.effective_per_minute, aimd is not before, blocked_until - now)
    return LaneState(state.tat, aimd, blocked_until), feedback
