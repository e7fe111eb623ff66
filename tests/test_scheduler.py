"""The poll scheduler's pure parts: duration model, poll policy, due queue, retry backoff."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.scheduler import DueQueue, DurationModel, PollPolicy, retry_delay_s

# -- DurationModel ---------------------------------------------------------------------


def test_cold_start_answers_from_the_configured_defaults() -> None:
    model = DurationModel(default_median_s=5.0, default_sigma=0.5)
    assert model.quantile("never-seen", 0.5) == pytest.approx(5.0, rel=0.03)
    # The 84th percentile of a log-normal is median * e^sigma.
    assert model.quantile("never-seen", 0.8413) == pytest.approx(5.0 * math.exp(0.5), rel=0.03)


def test_the_model_learns_a_new_median_per_type() -> None:
    model = DurationModel(default_median_s=5.0, half_life=100)
    rng = random.Random(1)
    for _ in range(600):
        model.observe("invoice", 20.0 * math.exp(0.4 * rng.gauss()))
        model.observe("receipt", 1.0 * math.exp(0.4 * rng.gauss()))
    assert model.quantile("invoice", 0.5) == pytest.approx(20.0, rel=0.1)
    assert model.quantile("receipt", 0.5) == pytest.approx(1.0, rel=0.1)
    assert model.quantile("other", 0.5) == pytest.approx(5.0, rel=0.03)


def test_the_model_follows_drift_within_a_few_half_lives() -> None:
    model = DurationModel(default_median_s=5.0, half_life=50)
    rng = random.Random(2)
    for _ in range(500):
        model.observe("invoice", 4.0 * math.exp(0.3 * rng.gauss()))
    for _ in range(250):
        model.observe("invoice", 12.0 * math.exp(0.3 * rng.gauss()))
    assert model.quantile("invoice", 0.5) == pytest.approx(12.0, rel=0.1)


def test_the_model_stays_bounded_in_types_and_ignores_nonsense() -> None:
    model = DurationModel(default_median_s=5.0, max_types=3)
    for code in ("a", "b", "c", "d"):
        model.observe(code, 50.0)
    assert model.quantile("a", 0.5) == pytest.approx(5.0, rel=0.03)  # evicted: prior again
    assert model.quantile("d", 0.5) > 5.0
    model.observe("d", float("nan"))
    model.observe("d", -1.0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        model.quantile("d", 1.0)


def test_the_histogram_weights_stay_finite_over_many_observations() -> None:
    model = DurationModel(default_median_s=5.0, half_life=10)
    for i in range(5000):
        model.observe("x", 1.0 + (i % 7))
    assert 1.0 <= model.quantile("x", 0.5) <= 8.0


# -- PollPolicy ------------------------------------------------------------------------


def simulate(policy: PollPolicy, durations: list[float], rng: random.Random) -> tuple[float, float]:
    calls, delays = [], []
    for d in durations:
        t = policy.first_delay_s("invoice", rng=rng)
        n = 1
        while t < d:
            t += policy.next_delay_s(
                "invoice", elapsed_s=t, polls_done=n, remaining_s=3600 - t, rng=rng
            )
            n += 1
        calls.append(n)
        delays.append(t - d)
        policy.model.observe("invoice", d)
    delays.sort()
    return statistics.fmean(calls), delays[int(0.95 * len(delays))]


def test_the_default_policy_polls_far_less_than_fixed_2s_at_median_5s() -> None:
    rng = random.Random(3)
    durations = [5.0 * math.exp(0.5 * rng.gauss()) for _ in range(4000)]
    policy = PollPolicy(model=DurationModel(default_median_s=5.0))
    calls, p95 = simulate(policy, durations, random.Random(4))
    fixed_calls = statistics.fmean(math.ceil(d / 2.0) for d in durations)
    assert calls < 1.5
    assert fixed_calls > 3.0
    # Near the optimum for that call budget (about 3.9 s); see the module docstring.
    assert p95 < 4.5


def test_the_policy_adapts_to_a_slower_document_type() -> None:
    rng = random.Random(5)
    durations = [30.0 * math.exp(0.5 * rng.gauss()) for _ in range(3000)]
    policy = PollPolicy(model=DurationModel(default_median_s=5.0))
    simulate(policy, durations[:1000], random.Random(6))
    calls, p95 = simulate(policy, durations[1000:], random.Random(7))
    assert calls < 1.6
    assert p95 < 30.0 * 0.9


def test_first_poll_lands_near_the_configured_quantile() -> None:
    model = DurationModel(default_median_s=10.0, default_sigma=0.5)
    policy = PollPolicy(model=model, first_poll_quantile=0.5, jitter=0.0)
    assert policy.first_delay_s("x", rng=random.Random(0)) == pytest.approx(10.0, rel=0.03)
    assert policy.first_delay_s("x", rng=random.Random(0), remaining_s=3.0) == 3.0


def test_gaps_grow_geometrically_up_to_the_cap() -> None:
    policy = PollPolicy(
        model=DurationModel(default_median_s=5.0), jitter=0.0, backoff=0.5, max_interval_s=30.0
    )
    rng = random.Random(0)
    gaps = [
        policy.next_delay_s("x", elapsed_s=e, polls_done=3, remaining_s=1e9, rng=rng)
        for e in (20.0, 40.0, 80.0, 1000.0)
    ]
    assert gaps == pytest.approx([10.0, 20.0, 30.0, 30.0])


def test_a_restored_conversion_aims_at_the_first_poll_target() -> None:
    model = DurationModel(default_median_s=10.0, default_sigma=0.5)
    policy = PollPolicy(model=model, first_poll_quantile=0.5, jitter=0.0)
    delay = policy.next_delay_s(
        "x", elapsed_s=4.0, polls_done=0, remaining_s=100.0, rng=random.Random(0)
    )
    assert delay == pytest.approx(6.0, rel=0.05)


def test_policy_rejects_bad_settings() -> None:
    model = DurationModel(default_median_s=1.0)
    with pytest.raises(ValueError, match="quantile"):
        PollPolicy(model=model, first_poll_quantile=1.0)
    with pytest.raises(ValueError, match="interval"):
        PollPolicy(model=model, min_interval_s=5.0, max_interval_s=1.0)


@settings(max_examples=300, deadline=None)
@given(
    median=st.floats(min_value=0.05, max_value=600.0),
    elapsed=st.floats(min_value=0.0, max_value=4000.0),
    polls=st.integers(min_value=0, max_value=100),
    remaining=st.floats(min_value=0.0, max_value=4000.0),
    seed=st.integers(min_value=0, max_value=2**32),
    q=st.floats(min_value=0.01, max_value=0.99),
)
def test_delays_are_positive_and_never_past_the_deadline(
    median: float, elapsed: float, polls: int, remaining: float, seed: int, q: float
) -> None:
    policy = PollPolicy(model=DurationModel(default_median_s=median), first_poll_quantile=q)
    rng = random.Random(seed)
    delay = policy.next_delay_s(
        "x", elapsed_s=elapsed, polls_done=polls, remaining_s=remaining, rng=rng
    )
    assert 0.0 <= delay <= remaining
    if remaining > 0:
        assert delay > 0
    first = policy.first_delay_s("x", rng=rng, remaining_s=remaining)
    assert 0.0 <= first <= remaining


# -- DueQueue ----------------------------------------------------------------------------


def test_due_queue_pops_due_keys_in_order_and_respects_limit() -> None:
    queue: DueQueue[str] = DueQueue()
    queue.schedule("c", 3.0)
    queue.schedule("a", 1.0)
    queue.schedule("b", 2.0)
    assert queue.next_due_at() == 1.0
    assert queue.pop_due(2.5, limit=1) == ["a"]
    assert queue.pop_due(2.5) == ["b"]
    assert queue.pop_due(2.5) == []
    assert len(queue) == 1
    assert "c" in queue


def test_rescheduling_replaces_and_cancel_forgets() -> None:
    queue: DueQueue[str] = DueQueue()
    queue.schedule("a", 1.0)
    queue.schedule("a", 5.0)
    queue.schedule("b", 2.0)
    queue.cancel("b")
    queue.cancel("missing")
    assert queue.pop_due(4.0) == []
    assert queue.next_due_at() == 5.0
    assert queue.due_at("a") == 5.0
    assert queue.pop_due(5.0) == ["a"]
    assert len(queue) == 0
    assert queue.next_due_at() is None


def test_stale_entries_are_purged() -> None:
    queue: DueQueue[int] = DueQueue()
    for i in range(10_000):
        queue.schedule(i % 10, float(i))
    assert len(queue) == 10
    assert len(queue._heap) <= 2 * 10 + 64 + 1


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["schedule", "cancel", "pop"]),
            st.integers(min_value=0, max_value=15),
            st.floats(min_value=0.0, max_value=100.0),
        ),
        max_size=300,
    )
)
def test_due_queue_never_loses_keys_and_pops_in_order(
    ops: list[tuple[str, int, float]],
) -> None:
    queue: DueQueue[int] = DueQueue()
    model: dict[int, float] = {}
    for op, key, t in ops:
        if op == "schedule":
            queue.schedule(key, t)
            model[key] = t
        elif op == "cancel":
            queue.cancel(key)
            model.pop(key, None)
        else:
            popped = queue.pop_due(t)
            expected_due = {k for k, due in model.items() if due <= t}
            assert set(popped) == expected_due
            dues = [model[k] for k in popped]
            assert dues == sorted(dues)
            for k in popped:
                del model[k]
        assert len(queue) == len(model)
        assert all(k in queue for k in model)
        assert queue.next_due_at() == (min(model.values()) if model else None)
    assert sorted(queue.pop_due(math.inf)) == sorted(model)


# -- retry backoff -------------------------------------------------------------------------


def test_retry_backoff_grows_and_is_capped() -> None:
    rng = random.Random(0)
    for attempt, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8)], start=1):
        d = retry_delay_s(attempt, retry_after_s=None, rng=rng)
        assert low <= d <= high
    assert 150 <= retry_delay_s(40, retry_after_s=None, rng=rng) <= 300
    assert 150 <= retry_delay_s(10_000, retry_after_s=None, rng=rng) <= 300


def test_retry_honours_retry_after_with_a_little_spread() -> None:
    rng = random.Random(0)
    delays = [retry_delay_s(1, retry_after_s=30.0, rng=rng) for _ in range(100)]
    assert all(30.0 <= d <= 33.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 50


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=-5, max_value=10_000),
    retry_after=st.one_of(st.none(), st.floats(min_value=-1.0, max_value=10_000.0)),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_retry_delay_is_positive_and_bounded(
    attempt: int, retry_after: float | None, seed: int
) -> None:
    d = retry_delay_s(
        attempt, retry_after_s=retry_after, base_s=1.0, cap_s=300.0, rng=random.Random(seed)
    )
    assert d > 0
    assert d <= max(300.0, 1.1 * (retry_after or 0.0))
    if retry_after is not None and retry_after > 0:
        assert d >= retry_after
