"""The limiter's pure decisions: GCRA, its shape, AIMD and class shares (no I/O)."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.ratelimit.policy import (
    FOREVER,
    AimdParams,
    GateState,
    LaneState,
    ShareScheduler,
    acquire_step,
    aimd_decrease,
    aimd_increase,
    aimd_initial,
    gate_op,
    gate_step,
    gcra,
    gcra_shape,
    lane_initial,
    rate_limited_step,
    reserve_step,
)

PARAMS = AimdParams()


def reserve_all(arrivals: list[float], interval: float, burst: int) -> list[float]:
    """Every caller waits for its reservation: the permit times, in call order."""
    tat = -1e18
    granted = []
    for now in arrivals:
        allowed_at, tat = gcra(now, tat, interval, burst)
        assert allowed_at >= now
        granted.append(allowed_at)
    return granted


def max_in_closed_window(times: list[float], window: float) -> int:
    ordered = sorted(times)
    best = first = 0
    for last, t in enumerate(ordered):
        while t - ordered[first] > window + 1e-9:
            first += 1
        best = max(best, last - first + 1)
    return best


# -- GCRA ----------------------------------------------------------------------------


def test_gcra_grants_the_burst_at_once_then_one_per_interval() -> None:
    granted = reserve_all([0.0] * 8, 1.0, 5)
    assert granted == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


def test_gcra_refills_the_burst_while_idle() -> None:
    granted = reserve_all([0.0] * 5 + [10.0] * 6, 1.0, 5)
    assert granted[5:] == [10.0] * 5 + [11.0]


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=200),
    interval=st.floats(min_value=0.01, max_value=2.0),
    burst=st.integers(min_value=1, max_value=10),
    window=st.floats(min_value=0.0, max_value=20.0),
)
def test_gcra_never_exceeds_burst_plus_rate_in_any_window(
    gaps: list[float], interval: float, burst: int, window: float
) -> None:
    arrivals = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    granted = reserve_all(arrivals, interval, burst)
    assert granted == sorted(granted), "reservations are FIFO"
    assert max_in_closed_window(granted, window) <= math.floor(window / interval + 1e-9) + burst


@pytest.mark.parametrize("burst", [1, 5, 50])
@pytest.mark.parametrize("rate", [1, 3, 19, 20, 60, 120, 600, 1200, 20000])
def test_shape_keeps_every_minute_within_the_configured_rate(rate: int, burst: int) -> None:
    interval, b = gcra_shape(rate, burst)
    assert 1 <= b <= burst
    sustained = 60 / interval
    assert sustained >= rate / 2
    if rate >= 20 * burst:
        assert b == burst
    if rate >= 20:
        assert sustained >= 0.95 * rate
    # Saturated for five minutes: no closed 60 s span may hold more than `rate` permits.
    granted = reserve_all([0.0] * int(5 * sustained + 2 * burst), interval, b)
    assert max_in_closed_window(granted, 60.0) <= rate


# -- AIMD ----------------------------------------------------------------------------


def test_decrease_is_multiplicative_and_once_per_retry_window() -> None:
    state = aimd_initial(100.0)
    first = aimd_decrease(state, now=10.0, configured_per_minute=100.0, hold_s=5.0, params=PARAMS)
    assert first.effective_per_minute == pytest.approx(70.0)
    assert first.ceiling_per_minute == pytest.approx(100.0)
    # In-flight calls answering 429 within the window must not collapse the rate.
    again = aimd_decrease(first, now=14.9, configured_per_minute=100.0, hold_s=5.0, params=PARAMS)
    assert again is first
    later = aimd_decrease(first, now=15.0, configured_per_minute=100.0, hold_s=1.0, params=PARAMS)
    assert later.effective_per_minute == pytest.approx(49.0)
    assert later.ceiling_per_minute == pytest.approx(70.0)


def test_short_holds_still_gate_decreases_for_the_minimum_gap() -> None:
    first = aimd_decrease(
        aimd_initial(100.0), now=0.0, configured_per_minute=100.0, hold_s=0.1, params=PARAMS
    )
    assert (
        aimd_decrease(first, now=1.0, configured_per_minute=100.0, hold_s=0.1, params=PARAMS)
        is first
    )


def test_decrease_never_goes_below_the_floor() -> None:
    state = aimd_initial(100.0)
    for i in range(50):
        state = aimd_decrease(
            state, now=i * 100.0, configured_per_minute=100.0, hold_s=1.0, params=PARAMS
        )
    assert state.effective_per_minute == pytest.approx(PARAMS.floor_fraction * 100.0)


def test_increase_climbs_fast_to_the_knee_then_probes_and_never_passes_configured() -> None:
    configured = 1000.0
    state = aimd_decrease(
        aimd_initial(configured),
        now=0.0,
        configured_per_minute=configured,
        hold_s=1.0,
        params=PARAMS,
    )
    assert state.effective_per_minute == pytest.approx(700.0)
    # Not within the interval after a change.
    same = aimd_increase(state, now=4.0, configured_per_minute=configured, params=PARAMS)
    assert same is state
    rates = []
    now = 0.0
    for _ in range(400):
        now += PARAMS.increase_interval_s
        state = aimd_increase(state, now=now, configured_per_minute=configured, params=PARAMS)
        rates.append(state.effective_per_minute)
    knee = 0.9 * configured
    fast = [r for r in rates if r <= knee + 1e-9]
    assert rates[0] == pytest.approx(750.0)  # + 5 % of configured
    assert len(fast) <= 5  # 700 -> 900 in 50-per-step increments
    assert rates[len(fast)] == pytest.approx(knee + 5.0)  # then + 0.5 % (probing)
    assert max(rates) == configured
    assert all(b >= a for a, b in itertools.pairwise(rates))


def test_a_lowered_configuration_clamps_the_effective_rate() -> None:
    state = aimd_initial(1000.0)
    lowered = aimd_increase(state, now=100.0, configured_per_minute=600.0, params=PARAMS)
    assert lowered.effective_per_minute == 600.0
    assert lowered.ceiling_per_minute == 600.0


# -- lane steps (what the Lua scripts mirror) ----------------------------------------


def test_a_reservation_made_while_blocked_lands_after_the_block() -> None:
    state = lane_initial(600.0)
    state, feedback = rate_limited_step(
        state, now=100.0, configured_per_minute=600.0, hold_s=3.0, params=PARAMS
    )
    assert feedback.decreased
    assert feedback.blocked_for_s == pytest.approx(3.0)
    state, answer = acquire_step(
        state,
        now=101.0,
        configured_per_minute=600.0,
        burst=5,
        want_slot=True,
        want_increase=False,
        params=PARAMS,
    )
    assert answer.reserved_in_s == pytest.approx(2.0)
    assert answer.blocked_for_s == pytest.approx(2.0)
    assert answer.effective_per_minute == pytest.approx(420.0)


def test_a_confirm_without_slot_reserves_nothing() -> None:
    state = lane_initial(600.0)
    after, answer = acquire_step(
        state,
        now=5.0,
        configured_per_minute=600.0,
        burst=5,
        want_slot=False,
        want_increase=False,
        params=PARAMS,
    )
    assert answer.reserved_in_s is None
    assert after.tat == state.tat


def reserve(state: LaneState, now: float, **kwargs: object) -> tuple[LaneState, float]:
    args: dict[str, object] = {
        "configured_per_minute": 60.0,
        "burst": 1,
        "want_slot": True,
        "want_increase": False,
        "params": PARAMS,
    }
    args.update(kwargs)
    state, answer = acquire_step(state, now=now, **args)  # type: ignore[arg-type]
    assert answer.reserved_in_s is not None
    return state, answer.reserved_in_s


def test_a_clock_stepping_back_keeps_reservations_and_blocks_their_length() -> None:
    state = lane_initial(60.0)
    state, _ = reserve(state, 1000.0)  # 60/min burst 1: one per 60/59 s
    state, _ = rate_limited_step(
        state, now=1000.0, configured_per_minute=60.0, hold_s=5.0, params=PARAMS
    )
    # The clock steps back an hour: the block still ends 5 s after it began, not 3605 s.
    stepped = 1000.0 - 3600.0
    state, wait = reserve(state, stepped)
    assert wait == pytest.approx(5.0)
    assert state.seen == stepped
    state, wait = reserve(state, stepped + 2.0)  # and time goes on from there
    assert wait == pytest.approx(3.0 + gcra_shape(42.0, 1)[0])  # 70 % of 60 after the 429


def test_a_tat_implausibly_far_ahead_is_forgotten_not_waited_for() -> None:
    # Written by hand (or a step nobody saw): an hour ahead, no `seen` to shift it back.
    state = replace(lane_initial(60.0), tat=5000.0 + 3600.0)
    times = []
    now = 5000.0
    for _ in range(4):
        state, wait = reserve(state, now)
        times.append(now + wait)
    interval, _ = gcra_shape(60.0, 1)
    assert times == pytest.approx([5000.0 + i * interval for i in range(4)])
    # A TAT within reach of real reservations is kept.
    near = replace(lane_initial(60.0), tat=5000.0 + 10 * interval)
    _, wait = reserve(near, 5000.0, max_ahead_slots=64)
    assert wait == pytest.approx(10 * interval)


def test_the_hour_window_admits_its_burst_then_its_sustained_rate() -> None:
    gate = GateState()
    gate, granted, wait, reason = gate_step(
        gate, now=0.0, submits=8, per_hour=100.0, per_day=0.0, burst=5
    )
    interval, _ = gcra_shape(100.0, 5, window_s=3600.0)
    assert granted == 5
    assert reason == "budget_hour"
    assert wait == pytest.approx(interval)
    gate, granted, wait, _ = gate_step(
        gate, now=interval, submits=2, per_hour=100.0, per_day=0.0, burst=5
    )
    assert granted == 1
    assert wait == pytest.approx(interval)


@settings(max_examples=60, deadline=None)
@given(
    per_hour=st.integers(min_value=20, max_value=400),
    gaps=st.lists(st.floats(min_value=0.0, max_value=120.0), min_size=50, max_size=400),
)
def test_no_hour_ever_holds_more_than_the_hour_budget(per_hour: int, gaps: list[float]) -> None:
    gate = GateState()
    now = 0.0
    admitted: list[float] = []
    for gap in gaps:
        now += gap
        gate, granted, _, _ = gate_step(
            gate, now=now, submits=3, per_hour=float(per_hour), per_day=0.0, burst=5
        )
        admitted += [now] * granted
    assert max_in_closed_window(admitted, 3600.0) <= per_hour


def test_the_day_window_and_blocks_hold_submissions_too() -> None:
    gate = GateState()
    gate, granted, _, _ = gate_step(gate, now=0.0, submits=3, per_hour=0.0, per_day=40.0, burst=2)
    assert granted == 2
    gate, wait, reason = gate_op(gate, now=10.0, op="block", hold_s=50.0, reason="rate_limit_hour")
    assert (wait, reason) == (50.0, "rate_limit_hour")
    gate, granted, wait, reason = gate_step(
        gate, now=20.0, submits=1, per_hour=0.0, per_day=0.0, burst=2
    )
    assert (granted, wait, reason) == (0, 40.0, "rate_limit_hour")
    # A shorter block does not shorten it; a longer one lengthens it.
    gate, wait, _ = gate_op(gate, now=20.0, op="block", hold_s=1.0, reason="rate_limit_day")
    assert wait == 40.0
    gate, wait, reason = gate_op(gate, now=20.0, op="block", hold_s=90.0, reason="rate_limit_day")
    assert (wait, reason) == (90.0, "rate_limit_day")


def test_a_pause_holds_until_resumed_by_its_reason() -> None:
    gate = GateState()
    gate, wait, reason = gate_op(gate, now=0.0, op="pause", hold_s=-1.0, reason="quota_exhausted")
    assert gate.paused_until == FOREVER
    assert reason == "quota_exhausted"
    assert wait > 1e17
    gate, granted, _, reason = gate_step(
        gate, now=5.0, submits=1, per_hour=0.0, per_day=0.0, burst=1
    )
    assert (granted, reason) == (0, "quota_exhausted")
    gate, wait, _ = gate_op(gate, now=6.0, op="resume", hold_s=0.0, reason="other")
    assert wait > 1e17  # another reason does not end it
    gate, wait, reason = gate_op(gate, now=6.0, op="resume", hold_s=0.0, reason="quota_exhausted")
    assert (wait, reason) == (0.0, "")
    gate, granted, _, _ = gate_step(gate, now=7.0, submits=1, per_hour=0.0, per_day=0.0, burst=1)
    assert granted == 1
    # A timed pause ends by itself.
    gate, wait, _ = gate_op(gate, now=10.0, op="pause", hold_s=5.0, reason="quota_exhausted")
    assert wait == 5.0
    _, granted, _, _ = gate_step(gate, now=15.0, submits=1, per_hour=0.0, per_day=0.0, burst=1)
    assert granted == 1


def test_gate_room_is_taken_only_for_usable_permits_planned_for_submissions() -> None:
    lane = lane_initial(600.0)
    gate = GateState()
    common = {
        "configured_per_minute": 600.0,
        "burst": 1,
        "want_increase": False,
        "params": PARAMS,
        "per_hour": 100.0,
    }
    # A fresh reservation, due now, planned for a status call: no hour room taken.
    lane, gate, answer = reserve_step(lane, gate, now=0.0, want_slot=True, plan="t", **common)  # type: ignore[arg-type]
    assert answer.submits_granted == 0
    assert gate.hour_tat == GateState().hour_tat
    # Held permit confirmed (usable) plus a new one not due yet: only the first counts.
    lane, gate, answer = reserve_step(  # type: ignore[arg-type]
        lane, gate, now=0.1, want_slot=True, holding=True, plan="ss", **common
    )
    assert answer.reserved_in_s is not None
    assert answer.reserved_in_s > 0
    assert answer.submits_granted == 1
    assert gate.hour_tat > 0.1
    # A lane without submissions never touches the gate.
    _, none_gate, answer = reserve_step(lane, None, now=0.2, want_slot=True, plan="s", **common)  # type: ignore[arg-type]
    assert none_gate is None
    assert answer.submits_granted == 0


# -- shares ----------------------------------------------------------------------------


def test_shares_follow_the_weights_when_both_classes_wait() -> None:
    picker = ShareScheduler({"submit": 0.75, "status": 0.25})
    picks = Counter(picker.pick(["submit", "status"]) for _ in range(400))
    assert picks == {"submit": 300, "status": 100}


def test_a_class_alone_gets_every_permit() -> None:
    picker = ShareScheduler({"submit": 0.5, "status": 0.5})
    assert {picker.pick(["submit"]) for _ in range(50)} == {"submit"}


def test_an_idle_class_banks_no_credit() -> None:
    picker = ShareScheduler({"submit": 0.5, "status": 0.5})
    for _ in range(100):
        picker.pick(["submit"])
    # Status returns after a long absence: it gets its half, not 100 permits in a row.
    picks = [picker.pick(["submit", "status"]) for _ in range(10)]
    assert picks.count("status") in (5, 6)
    assert picks.count("submit") >= 4


def test_preview_tells_the_next_picks_without_making_them() -> None:
    picker = ShareScheduler({"status": 0.9, "submit": 0.1})
    planned = picker.preview(["submit", "status"], 100)
    assert [picker.pick(["submit", "status"]) for _ in range(100)] == planned
    assert planned[0] == "status"
    assert planned.count("submit") in (10, 11)


def test_shares_reject_bad_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        ShareScheduler({"submit": 0.0, "status": 1.0})
    with pytest.raises(ValueError, match="ready"):
        ShareScheduler({"submit": 1.0}).pick([])
