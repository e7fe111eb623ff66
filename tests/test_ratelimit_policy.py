"""The limiter's pure decisions: GCRA, its shape, AIMD and class shares (no I/O)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.ratelimit.policy import (
    AimdParams,
    ShareScheduler,
    acquire_step,
    aimd_decrease,
    aimd_increase,
    aimd_initial,
    gcra,
    gcra_shape,
    lane_initial,
    rate_limited_step,
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


def test_shares_reject_bad_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        ShareScheduler({"submit": 0.0, "status": 1.0})
    with pytest.raises(ValueError, match="ready"):
        ShareScheduler({"submit": 1.0}).pick([])
