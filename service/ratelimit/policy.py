"""The limiter's decisions as pure functions: GCRA, AIMD, class shares and the submit gate.

Nothing here does I/O or reads a clock: time is an argument, in seconds, and
rates are per minute unless the name says otherwise. The Redis Lua scripts
(:mod:`service.ratelimit.redis_backend`) mirror :func:`reserve_step`,
:func:`rate_limited_step` and :func:`gate_step` line for line, and a test runs
both on the same sequence of calls and checks they agree; change one, change
the other.

Two states are kept per limiter: a :class:`LaneState` per budget key (the
per-minute GCRA, AIMD and the 429 block that stops every call on the lane),
and one :class:`GateState` for submissions only (the optional hour and day
budgets, an hour/day 429 block, and a named pause such as
``quota_exhausted``). A submit permit needs a permit of its lane *and* room
in the gate; status calls never look at the gate.

Clocks that step back: every state remembers the latest time it saw
(``seen``); a call with an earlier ``now`` shifts every stored time back by
the step (:func:`rebase`), so durations survive the step. A TAT that is
still implausibly far ahead (state written by hand, or a step nobody saw) is
clamped (:func:`clamp_tat`): permits flow at the configured rate instead of
stalling for the size of the step.
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

FOREVER = 1e18
"""A time that never comes (an open-ended pause)."""

FAR = 1e17
"""Times beyond +-FAR are the markers above: never shifted when a clock steps back."""


def gcra_shape(rate_per_minute: float, burst: int, *, window_s: float = 60.0) -> tuple[float, int]:
    """``(emission_interval, burst)`` keeping every window within its rate, bursts included.

    An API that limits "N per minute" counts any 60-s span (the emulator, like
    many APIs, uses a sliding window). GCRA at sustained rate ``S`` with burst
    ``b`` lets through at most ``floor(S) + b`` permits in any closed 60-s
    span, so the burst is paid for out of the rate: ``S = rate - b``. The
    burst is capped at a twentieth of the rate (so it costs at most 5 % of
    throughput) and ``S`` never drops below half the rate. ``window_s`` (3600
    for an hour, 86400 for a day) reads ``rate_per_minute`` as "per window".
    """
    b = max(1, min(burst, math.floor(rate_per_minute / 20)))
    sustained = max(rate_per_minute - b, rate_per_minute / 2)
    return window_s / sustained, b


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

    def preview(self, ready: Iterable[C], n: int) -> list[C]:
        """The next ``n`` picks if ``ready`` stays as it is, without making them."""
        ready_list = list(ready)
        if not ready_list:
            return []
        saved = dict(self._pass)
        try:
            return [self.pick(ready_list) for _ in range(n)]
        finally:
            self._pass = saved


@dataclass(frozen=True, slots=True)
class LaneState:
    """Everything one budget (a *lane*) keeps between calls; in Redis, one hash."""

    tat: float
    aimd: AimdState
    blocked_until: float
    seen: float = NEVER
    """The latest clock reading this state was written at (see :func:`rebase`)."""
    submitted_at: float = NEVER
    """When the gate last let a submission through on this lane (any replica)."""


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
    more_in_s: tuple[float, ...] = ()
    """When the call asked for extra slots: how long until each of them is ours, in order."""
    since_submit_s: float = math.inf
    """How long ago a submission last got a permit on this lane, on any replica."""
    submits_granted: int = 0
    """How many of the permits usable now may carry a submission (gate room was taken)."""
    submit_wait_s: float = 0.0
    """How long until the gate lets the next submission through (0: now)."""
    submit_reason: str = ""
    """Why the gate holds submissions back: a pause reason, ``rate_limit_hour``/``_day``
    (a 429), ``budget_hour``/``_day`` (the configured window); empty when it does not."""


@dataclass(frozen=True, slots=True)
class Feedback:
    """The outcome of reporting a 429."""

    effective_per_minute: float
    decreased: bool
    blocked_for_s: float


def shift(t: float, step_s: float) -> float:
    """``t`` moved by ``step_s``, unless it is one of the markers :data:`NEVER`/:data:`FOREVER`."""
    return t + step_s if -FAR < t < FAR else t


def rebase(seen: float, now: float) -> float:
    """The step to apply to every stored time: ``now - seen`` when the clock went back, else 0."""
    return now - seen if now < seen else 0.0


def clamp_tat(tat: float, start: float, emission_interval: float, slots: int) -> float:
    """``tat`` reset to ``start`` when it is more than ``slots`` intervals ahead of ``start``.

    A TAT that far ahead cannot come from reservations (each replica holds a
    few at most, and ``slots`` is larger than all of them together): it is a
    clock that stepped back, or state written by hand. Forgetting it costs at
    most one burst; keeping it would stall every permit for the size of the step.
    """
    return start if tat > start + slots * emission_interval else tat


def _rebase_lane(state: LaneState, now: float) -> LaneState:
    step = rebase(state.seen, now)
    if step == 0.0:
        return replace(state, seen=max(state.seen, now))
    aimd = replace(
        state.aimd,
        changed_at=shift(state.aimd.changed_at, step),
        decrease_gate_until=shift(state.aimd.decrease_gate_until, step),
    )
    return LaneState(
        shift(state.tat, step),
        aimd,
        shift(state.blocked_until, step),
        now,
        shift(state.submitted_at, step),
    )


def acquire_step(
    state: LaneState,
    *,
    now: float,
    configured_per_minute: float,
    burst: int,
    want_slot: bool,
    want_increase: bool,
    params: AimdParams,
    max_ahead_slots: int = 64,
    extra_slots: int = 0,
) -> tuple[LaneState, Answer]:
    """One call of the acquire script on a lane: optionally raise the rate, optionally reserve
    (one slot, plus ``extra_slots`` more in the same call when ``want_slot``).

    A reservation made while the lane is blocked lands after the block ends.
    ``max_ahead_slots`` bounds how far ahead of the block's end (or now) a TAT
    may be before :func:`clamp_tat` forgets it (plus the burst).
    """
    state = _rebase_lane(state, now)
    aimd = aimd_clamp(state.aimd, configured_per_minute)
    if want_increase:
        aimd = aimd_increase(
            aimd, now=now, configured_per_minute=configured_per_minute, params=params
        )
    tat = state.tat
    reserved: list[float] = []
    if want_slot:
        start = max(now, state.blocked_until)
        interval, tolerance = gcra_shape(aimd.effective_per_minute, burst)
        tat = clamp_tat(tat, start, interval, tolerance + max_ahead_slots)
        for _ in range(1 + extra_slots):
            allowed_at, tat = gcra(start, tat, interval, tolerance)
            reserved.append(allowed_at - now)
    answer = Answer(
        reserved[0] if reserved else None,
        max(0.0, state.blocked_until - now),
        aimd.effective_per_minute,
        more_in_s=tuple(reserved[1:]),
        since_submit_s=now - state.submitted_at,
    )
    return replace(state, tat=tat, aimd=aimd), answer


def rate_limited_step(
    state: LaneState,
    *,
    now: float,
    configured_per_minute: float,
    hold_s: float,
    params: AimdParams,
) -> tuple[LaneState, Feedback]:
    """One call of the 429 script: block the lane for ``hold_s`` and decrease the rate."""
    state = _rebase_lane(state, now)
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
    return replace(state, aimd=aimd, blocked_until=blocked_until), feedback


def usable_permits(answer: Answer, *, holding: bool) -> int:
    """How many permits one acquire call makes usable at once.

    The held one (``holding``) when no block voids it, plus the new
    reservations that are due already.
    """
    usable = 1 if holding and answer.blocked_for_s <= 0 else 0
    if answer.reserved_in_s is not None:
        usable += sum(1 for r in (answer.reserved_in_s, *answer.more_in_s) if r <= 0)
    return usable


# -- the submit gate ---------------------------------------------------------------------

HOUR_S = 3600.0
DAY_S = 86400.0

GateOp = Literal["block", "pause", "resume", "read"]


@dataclass(frozen=True, slots=True)
class GateState:
    """What holds submissions back (never status calls); in Redis, one hash for all lanes.

    ``hour_tat``/``day_tat`` are the GCRA states of the optional hour and day
    budgets; ``blocked_until`` comes from an hour or day 429 (reason
    ``rate_limit_hour``/``rate_limit_day``); ``paused_until`` is a named pause
    any replica may set and clear (:data:`FOREVER` when open-ended).
    """

    hour_tat: float = NEVER
    day_tat: float = NEVER
    blocked_until: float = NEVER
    blocked_reason: str = ""
    paused_until: float = NEVER
    pause_reason: str = ""
    seen: float = NEVER


def _rebase_gate(gate: GateState, now: float) -> GateState:
    step = rebase(gate.seen, now)
    if step == 0.0:
        return replace(gate, seen=max(gate.seen, now))
    return replace(
        gate,
        hour_tat=shift(gate.hour_tat, step),
        day_tat=shift(gate.day_tat, step),
        blocked_until=shift(gate.blocked_until, step),
        paused_until=shift(gate.paused_until, step),
        seen=now,
    )


def _gate_hold(gate: GateState, now: float) -> tuple[float, str]:
    """When the block or the pause (the later of the two) ends, and its reason."""
    if gate.paused_until > now and gate.paused_until >= gate.blocked_until:
        return gate.paused_until, gate.pause_reason
    if gate.blocked_until > now:
        return gate.blocked_until, gate.blocked_reason
    return now, ""


def gate_step(
    gate: GateState,
    *,
    now: float,
    submits: int,
    per_hour: float,
    per_day: float,
    burst: int,
) -> tuple[GateState, int, float, str]:
    """Admit up to ``submits`` submissions now; return ``(gate, granted, wait_s, reason)``.

    A submission is admitted only while no block or pause holds and every
    configured window (``per_hour``/``per_day`` > 0) has room now; each one
    admitted takes its room. ``wait_s`` is how long until the next one could
    be admitted, and ``reason`` why it waits (empty when it need not).
    A window's TAT beyond its own burst is clamped to "full" (not forgotten:
    an hour or day budget overspent costs a long block).
    """
    gate = _rebase_gate(gate, now)
    hour_tat, day_tat = gate.hour_tat, gate.day_tat
    ih, bh = gcra_shape(per_hour, burst, window_s=HOUR_S) if per_hour > 0 else (0.0, 1)
    iday, bday = gcra_shape(per_day, burst, window_s=DAY_S) if per_day > 0 else (0.0, 1)
    if per_hour > 0:
        hour_tat = min(hour_tat, now + bh * ih)
    if per_day > 0:
        day_tat = min(day_tat, now + bday * iday)
    held_until, reason = _gate_hold(gate, now)
    granted = 0
    while granted < submits and held_until <= now:
        if per_hour > 0 and gcra(now, hour_tat, ih, bh)[0] > now:
            break
        if per_day > 0 and gcra(now, day_tat, iday, bday)[0] > now:
            break
        if per_hour > 0:
            hour_tat = gcra(now, hour_tat, ih, bh)[1]
        if per_day > 0:
            day_tat = gcra(now, day_tat, iday, bday)[1]
        granted += 1
    ready = held_until
    if per_hour > 0:
        at = gcra(ready, hour_tat, ih, bh)[0]
        if at > ready:
            ready, reason = at, "budget_hour"
    if per_day > 0:
        at = gcra(ready, day_tat, iday, bday)[0]
        if at > ready:
            ready, reason = at, "budget_day"
    gate = replace(gate, hour_tat=hour_tat, day_tat=day_tat)
    return gate, granted, ready - now, reason


def gate_op(
    gate: GateState, *, now: float, op: GateOp, hold_s: float, reason: str
) -> tuple[GateState, float, str]:
    """Change the gate: ``block`` (an hour/day 429: the later end wins), ``pause`` (replace the
    pause; ``hold_s < 0`` is open-ended), ``resume`` (end the pause if ``reason`` is empty or
    matches), ``read``. Returns ``(gate, held_for_s, reason)`` of the block or pause now."""
    gate = _rebase_gate(gate, now)
    if op == "block":
        if now + hold_s > gate.blocked_until:
            gate = replace(gate, blocked_until=now + hold_s, blocked_reason=reason)
    elif op == "pause":
        until = FOREVER if hold_s < 0 else now + hold_s
        gate = replace(gate, paused_until=until, pause_reason=reason)
    elif op == "resume" and reason in ("", gate.pause_reason):
        gate = replace(gate, paused_until=NEVER, pause_reason="")
    held_until, held_reason = _gate_hold(gate, now)
    return gate, held_until - now, held_reason


def reserve_step(
    state: LaneState,
    gate: GateState | None,
    *,
    now: float,
    configured_per_minute: float,
    burst: int,
    want_slot: bool,
    want_increase: bool,
    params: AimdParams,
    holding: bool = False,
    plan: str = "",
    per_hour: float = 0.0,
    per_day: float = 0.0,
    max_ahead_slots: int = 64,
    extra_slots: int = 0,
) -> tuple[LaneState, GateState | None, Answer]:
    """The whole acquire script: :func:`acquire_step` on the lane, then, for a lane that
    carries submissions (``gate`` not None), :func:`gate_step` for the permits usable now.

    ``plan`` says who the dispatcher means to give each permit of this call to,
    in order (``s`` a submission, ``t`` a status call): the gate is asked for
    room only for the ``s`` among the permits that turn out usable, so no hour
    or day room is taken for a permit a status call gets.
    """
    state, answer = acquire_step(
        state,
        now=now,
        configured_per_minute=configured_per_minute,
        burst=burst,
        want_slot=want_slot,
        want_increase=want_increase,
        params=params,
        max_ahead_slots=max_ahead_slots,
        extra_slots=extra_slots,
    )
    if gate is None:
        return state, None, answer
    wanted = plan[: usable_permits(answer, holding=holding)].count("s")
    gate, granted, wait_s, reason = gate_step(
        gate, now=now, submits=wanted, per_hour=per_hour, per_day=per_day, burst=burst
    )
    if granted > 0:
        state = replace(state, submitted_at=now)
        answer = replace(answer, since_submit_s=0.0)
    return (
        state,
        gate,
        replace(answer, submits_granted=granted, submit_wait_s=wait_s, submit_reason=reason),
    )
