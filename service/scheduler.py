"""When to poll a conversion, and when to retry: pure decisions, no I/O, no clock.

Every status call spends rate-limit budget, so the bridge learns how long
conversions take per document type (:class:`DurationModel`), polls first
near a quantile of that distribution, then backs off geometrically relative
to the time already elapsed (:class:`PollPolicy`). :class:`DueQueue` is the
heap of due times the pipeline's poll loop drains. Times are seconds; "now"
is always the caller's argument.

The trade-off and its limit: at a log-normal processing time with median
5 s and sigma 0.5, the default policy needs under 1.5 status calls per
conversion (fixed 2 s polling: about 3.3) for a p95 detection delay near
4 s, close to the best any schedule can do at that call count. No schedule reaches *both* fewer than 1.5 calls and a p95 delay under
2.25 s there: fewer than 1.5 calls means the first poll comes after the
median, and then more than 5 % of conversions (those finishing before
2.75 s) wait over 2.25 s. ``bench/polling.py`` prints the numbers.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import OrderedDict
from collections.abc import Hashable
from statistics import NormalDist
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_LOG_MIN = math.log(0.01)  # 10 ms
_LOG_MAX = math.log(7200.0)  # 2 h: the API gives up after 60 min
_BUCKET_WIDTH = 0.05  # in log-seconds: about 5 % per bucket
_BUCKETS = math.ceil((_LOG_MAX - _LOG_MIN) / _BUCKET_WIDTH)
_RESCALE_AT = 1e12


def _bucket(duration_s: float) -> int:
    x = math.log(max(duration_s, 1e-9))
    return min(_BUCKETS - 1, max(0, int((x - _LOG_MIN) / _BUCKET_WIDTH)))


class _Histogram:
    """Decaying weights over log-duration buckets: recent observations count more."""

    __slots__ = ("increment", "total", "weights")

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights
        self.total = sum(weights)
        self.increment = 1.0

    def add(self, bucket: int, growth: float) -> None:
        # Decay by growing the weight of new observations instead of shrinking old ones.
        self.increment *= growth
        self.weights[bucket] += self.increment
        self.total += self.increment
        if self.increment > _RESCALE_AT:
            scale = 1.0 / self.increment
            self.weights = [w * scale for w in self.weights]
            self.total *= scale
            self.increment = 1.0

    def quantile(self, q: float) -> float:
        target = q * self.total
        acc = 0.0
        for i, w in enumerate(self.weights):
            if w > 0 and acc + w >= target:
                frac = (target - acc) / w
                return math.exp(_LOG_MIN + (i + frac) * _BUCKET_WIDTH)
            acc += w
        return math.exp(_LOG_MAX)


class DurationModel:
    """Online estimate of conversion processing time per document type.

    A decaying histogram of log-durations per type (about 5 % resolution from
    10 ms to 2 h). Each type starts from a log-normal prior built from the
    configured defaults, worth ``prior_weight`` observations, which fades as
    real observations arrive; an observation's weight halves every
    ``half_life`` newer observations of the same type, so the model follows
    drift. At most ``max_types`` types are kept (least recently observed
    dropped first), so customer-defined type codes cannot grow memory.

    Feed it true processing times (the status' ``response_timestamp`` minus
    ``request_timestamp``), not detection times, which the polling itself delays.
    """

    def __init__(
        self,
        *,
        default_median_s: float,
        default_sigma: float = 0.6,
        half_life: int = 200,
        prior_weight: float = 20.0,
        max_types: int = 1000,
    ) -> None:
        if default_median_s <= 0 or default_sigma <= 0:
            raise ValueError("default_median_s and default_sigma must be positive")
        if half_life < 1 or prior_weight <= 0 or max_types < 1:
            raise ValueError("half_life, prior_weight and max_types must be positive")
        self._growth = 2.0 ** (1.0 / half_life)
        self._max_types = max_types
        self._prior = self._lognormal_weights(default_median_s, default_sigma, prior_weight)
        self._prior_hist = _Histogram(list(self._prior))
        self._types: OrderedDict[str, _Histogram] = OrderedDict()

    @staticmethod
    def _lognormal_weights(median_s: float, sigma: float, mass: float) -> list[float]:
        dist = NormalDist(math.log(median_s), sigma)
        edges = [dist.cdf(_LOG_MIN + i * _BUCKET_WIDTH) for i in range(_BUCKETS + 1)]
        weights = [(edges[i + 1] - edges[i]) * mass for i in range(_BUCKETS)]
        weights[0] += edges[0] * mass
        weights[-1] += (1.0 - edges[-1]) * mass
        return weights

    def observe(self, document_type: str, duration_s: float) -> None:
        """Learn one finished conversion's processing time."""
        if not math.isfinite(duration_s) or duration_s < 0:
            return
        hist = self._types.get(document_type)
        if hist is None:
            hist = _Histogram(list(self._prior))
            self._types[document_type] = hist
            if len(self._types) > self._max_types:
                self._types.popitem(last=False)
        else:
            self._types.move_to_end(document_type)
        hist.add(_bucket(duration_s), self._growth)

    def quantile(self, document_type: str, q: float) -> float:
        """The ``q`` quantile of processing time in seconds (the prior for unseen types)."""
        if not 0 < q < 1:
            raise ValueError("q must be between 0 and 1")
        return self._types.get(document_type, self._prior_hist).quantile(q)


class PollPolicy:
    """When to make each status call for one conversion.

    First call at ``t1``, the ``first_poll_quantile`` of the learned processing
    time. Afterwards the gap is ``max(first_gap_fraction * t1, backoff * elapsed)``:
    even gaps while the bulk of conversions finish (the shape that minimises
    calls for a given detection delay), then geometric growth so a stuck
    conversion costs few calls; clamped to ``[min_interval_s, max_interval_s]``
    and jittered by ``±jitter`` to spread the load. A delay never reaches past
    the conversion's deadline (``remaining_s``). Lower ``first_poll_quantile``
    and gaps buy a shorter detection delay for more calls.
    """

    def __init__(
        self,
        *,
        model: DurationModel,
        first_poll_quantile: float = 0.65,
        first_gap_fraction: float = 0.6,
        backoff: float = 0.35,
        max_interval_s: float = 30.0,
        min_interval_s: float = 0.5,
        jitter: float = 0.1,
    ) -> None:
        if not 0 < first_poll_quantile < 1:
            raise ValueError("first_poll_quantile must be between 0 and 1")
        if backoff <= 0 or first_gap_fraction < 0:
            raise ValueError("need backoff > 0 and first_gap_fraction >= 0")
        if not 0 < min_interval_s <= max_interval_s:
            raise ValueError("need 0 < min_interval_s <= max_interval_s")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.model = model
        self._q = first_poll_quantile
        self._first_gap = first_gap_fraction
        self._backoff = backoff
        self._max = max_interval_s
        self._min = min_interval_s
        self._jitter = jitter

    def _finish(
        self, delay_s: float, remaining_s: float | None, rng: random.Random, *, cap_s: float
    ) -> float:
        delay_s *= 1.0 + rng.uniform(-self._jitter, self._jitter)
        delay_s = min(max(delay_s, self._min), cap_s)
        if remaining_s is not None:
            delay_s = min(delay_s, max(remaining_s, 0.0))
        return delay_s

    def first_delay_s(
        self, document_type: str, *, rng: random.Random, remaining_s: float | None = None
    ) -> float:
        """Seconds from submission to the first status call."""
        first = self.model.quantile(document_type, self._q)
        return self._finish(first, remaining_s, rng, cap_s=math.inf)

    def next_delay_s(
        self,
        document_type: str,
        *,
        elapsed_s: float,
        polls_done: int,
        remaining_s: float,
        rng: random.Random,
    ) -> float:
        """Seconds from now to the next status call; ``0 <= result <= remaining_s``.

        ``elapsed_s`` counts from submission. With ``polls_done == 0`` (e.g. a
        conversion restored after a restart) the call aims at the first-poll
        target instead. The result is positive whenever ``remaining_s`` is; 0
        means the deadline has come.
        """
        first = self.model.quantile(document_type, self._q)
        if polls_done <= 0:
            return self._finish(first - elapsed_s, remaining_s, rng, cap_s=math.inf)
        gap = max(self._first_gap * first, self._backoff * max(elapsed_s, 0.0))
        return self._finish(gap, remaining_s, rng, cap_s=self._max)


class DueQueue(Generic[K]):
    """A heap of due times, one per key, with lazy deletion.

    ``schedule`` on a key already queued replaces its due time; ``cancel``
    forgets it. Both are O(log n); stale heap entries are skipped on pop and
    purged once they outnumber live ones, so memory stays O(live keys).
    Keys due at the same time pop in the order they were scheduled.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        #: Each queued key's live heap item (the very tuple in the heap: an item is live iff
        #: it *is* its key's entry here; no second tuple per key, which matters at 100,000).
        self._live: dict[K, tuple[float, int, K]] = {}
        self._seq = itertools.count()

    def schedule(self, key: K, due_at: float) -> None:
        """Make ``key`` due at ``due_at`` (replacing any earlier schedule)."""
        item = (due_at, next(self._seq), key)
        self._live[key] = item
        heapq.heappush(self._heap, item)
        self._maybe_compact()

    def cancel(self, key: K) -> None:
        """Forget ``key`` (no error if it is not queued)."""
        if self._live.pop(key, None) is not None:
            self._maybe_compact()

    def due_at(self, key: K) -> float | None:
        """When ``key`` is due, or None if it is not queued."""
        item = self._live.get(key)
        return item[0] if item else None

    def pop_due(self, now: float, *, limit: int | None = None) -> list[K]:
        """Remove and return keys due at or before ``now``, earliest first, at most ``limit``."""
        out: list[K] = []
        while self._heap and (limit is None or len(out) < limit):
            item = self._heap[0]
            if self._live.get(item[2]) is not item:
                heapq.heappop(self._heap)
                continue
            if item[0] > now:
                break
            heapq.heappop(self._heap)
            del self._live[item[2]]
            out.append(item[2])
        return out

    def next_due_at(self) -> float | None:
        """The earliest due time, or None when empty."""
        while self._heap:
            item = self._heap[0]
            if self._live.get(item[2]) is item:
                return item[0]
            heapq.heappop(self._heap)
        return None

    def _maybe_compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live


def retry_delay_s(
    attempt: int,
    *,
    retry_after_s: float | None,
    base_s: float = 1.0,
    cap_s: float = 300.0,
    rng: random.Random,
) -> float:
    """How long to wait before retry number ``attempt`` (1 for the first retry).

    Exponential backoff ``base_s * 2**(attempt-1)`` capped at ``cap_s``, with
    "equal jitter" (uniform in the upper half: spread out, never near zero).
    A server's ``retry_after_s`` is a floor, not a suggestion; the result is
    a little above it (up to 10 %) so replicas told the same instant do not
    all return at once. Never exceeds ``max(cap_s, 1.1 * retry_after_s)``.
    """
    exponent = min(max(attempt, 1) - 1, 62)
    ceiling = min(cap_s, base_s * (2.0**exponent))
    delay = rng.uniform(ceiling / 2.0, ceiling)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, retry_after_s * rng.uniform(1.0, 1.1))
    return delay
