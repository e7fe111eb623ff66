"""Conversions as data: their drawn fate, their state at a given time, their store.

No background task drives a conversion. At submit the emulator draws a plan
(time spent ENQUEUED, total duration, SUCCESS or ERROR) from a random source
seeded by the run's seed and the submission's sequence number; the status at
any later instant is then a pure function of the plan and the clock. A
caller may rely on:

- the same seed and the same order of submissions give the same plans and
  the same extracted data, whatever the timing of status calls;
- a conversion past its end plus `finished_ttl_s` is gone (404), so memory is
  bounded by the submission rate times (duration + TTL).
"""

from __future__ import annotations

import heapq
import math
import random
import secrets
import string
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Any, Final, Literal

from service.emulator.doctypes import generate_data

ConversionState = Literal["ENQUEUED", "PROCESSING", "SUCCESS", "ERROR"]
Outcome = Literal["SUCCESS", "ERROR"]

GIVE_UP_ERROR: Final = "Processing timeout after 60 minutes"
ERROR_TEXTS: Final = (
    "Failed to extract data from document",
    "Document could not be read: image quality too low",
    "Document content does not match the requested document type",
)

_BASE36: Final = string.digits + string.ascii_lowercase
_STANDARD_NORMAL: Final = NormalDist()


@dataclass(frozen=True, slots=True)
class ConversionPlan:
    """Everything drawn at submit time that decides how a conversion unfolds."""

    queue_s: float
    duration_s: float
    outcome: Outcome
    error: str | None
    data_seed: int


def plan_rng(seed: int, sequence: int) -> random.Random:
    """The random source of the `sequence`-th conversion of a run seeded with `seed`."""
    return random.Random(f"docutray-emulator:{seed}:{sequence}")


def draw_plan(
    rng: random.Random,
    *,
    median_s: float,
    sigma: float,
    error_rate: float,
    enqueued_fraction: float,
    give_up_s: float,
) -> ConversionPlan:
    """Draw one conversion's fate: log-normal duration, ERROR with `error_rate`.

    Always consumes the same number of draws whatever the knob values, so
    changing one knob does not reshuffle the rest of a seeded run. A duration
    beyond `give_up_s` becomes an ERROR at `give_up_s`, like the real service's
    60-minute limit.
    """
    # One uniform per quantity (inverse CDF), so the draw count never varies.
    z = _STANDARD_NORMAL.inv_cdf(min(max(rng.random(), 1e-12), 1 - 1e-12))
    duration_s = math.exp(math.log(median_s) + sigma * z)
    queue_s = duration_s * enqueued_fraction * rng.uniform(0.5, 1.0)
    fails = rng.random() < error_rate
    error_text = rng.choice(ERROR_TEXTS)
    data_seed = rng.getrandbits(64)
    if duration_s > give_up_s:
        return ConversionPlan(
            queue_s=min(queue_s, give_up_s),
            duration_s=give_up_s,
            outcome="ERROR",
            error=GIVE_UP_ERROR,
            data_seed=data_seed,
        )
    return ConversionPlan(
        queue_s=queue_s,
        duration_s=duration_s,
        outcome="ERROR" if fails else "SUCCESS",
        error=error_text if fails else None,
        data_seed=data_seed,
    )


def new_conversion_id(*, now_s: float | None = None, counter: int = 0) -> str:
    """A 25-character cuid-like id: `c`, time (8), counter (4), fingerprint (4), random (8).

    Unique across emulator restarts (time and randomness), unlike the seeded
    plans; the seed decides what happens to a conversion, not its name.
    """
    millis = int((time.time() if now_s is None else now_s) * 1000)
    return (
        "c"
        + _base36(millis, 8)
        + _base36(counter % 36**4, 4)
        + "".join(secrets.choice(_BASE36) for _ in range(12))
    )


def _base36(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, rem = divmod(value, 36)
        digits.append(_BASE36[rem])
    return "".join(reversed(digits))


def iso_timestamp(epoch_s: float) -> str:
    """`2024-01-15T10:30:00.000Z`: UTC, milliseconds, `Z`, as the API writes them."""
    moment = datetime.fromtimestamp(epoch_s, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class Conversion:
    """One accepted submission; `owner` is a fingerprint of the API key, never the key."""

    conversion_id: str
    sequence: int
    owner: str
    document_type_code: str
    original_filename: str | None
    submitted_at_s: float
    plan: ConversionPlan
    request_id: str | None = None
    _data: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ends_at_s(self) -> float:
        """Wall-clock time at which the conversion reaches SUCCESS or ERROR."""
        return self.submitted_at_s + self.plan.duration_s

    def state_at(self, now_s: float) -> ConversionState:
        """The status a call at `now_s` observes."""
        elapsed_s = now_s - self.submitted_at_s
        if elapsed_s < self.plan.queue_s:
            return "ENQUEUED"
        if elapsed_s < self.plan.duration_s:
            return "PROCESSING"
        return self.plan.outcome

    def data(self) -> dict[str, Any]:
        """The extracted data (generated once, deterministic from the plan's seed)."""
        if self._data is None:
            self._data = generate_data(self.document_type_code, random.Random(self.plan.data_seed))
        return self._data

    def status_body(self, now_s: float) -> dict[str, Any]:
        """The JSON body of `GET /api/convert-async/status/{id}` at `now_s`."""
        return self.body_in(self.state_at(now_s))

    def final_body(self) -> dict[str, Any]:
        """The status body once finished (what the completed/failed webhook carries)."""
        return self.body_in(self.plan.outcome)

    def body_in(self, state: ConversionState) -> dict[str, Any]:
        """The status body of this conversion in `state`."""
        body: dict[str, Any] = {
            "conversion_id": self.conversion_id,
            "status": state,
            "request_timestamp": iso_timestamp(self.submitted_at_s),
            "document_type_code": self.document_type_code,
            "original_filename": self.original_filename,
        }
        if state == "SUCCESS":
            body["response_timestamp"] = iso_timestamp(self.ends_at_s)
            body["data"] = self.data()
        elif state == "ERROR":
            body["response_timestamp"] = iso_timestamp(self.ends_at_s)
            body["error"] = self.plan.error
        return body


class ConversionStore:
    """The live conversions, with lazy expiry (no timers): call `expire(now_s)` often.

    Expiry is kept in a heap ordered by end + TTL, so each call costs
    O(log n) per expired item and nothing otherwise.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Conversion] = {}
        self._expiry: list[tuple[float, str]] = []

    def add(self, conversion: Conversion, *, ttl_s: float) -> None:
        """Keep `conversion` until `ttl_s` after it finishes."""
        self._by_id[conversion.conversion_id] = conversion
        heapq.heappush(self._expiry, (conversion.ends_at_s + ttl_s, conversion.conversion_id))

    def get(self, conversion_id: str) -> Conversion | None:
        """The conversion, or None if unknown, expired or forgotten."""
        return self._by_id.get(conversion_id)

    def expire(self, now_s: float) -> int:
        """Drop every conversion whose TTL has passed; returns how many were dropped."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now_s:
            _, conversion_id = heapq.heappop(self._expiry)
            if self._by_id.pop(conversion_id, None) is not None:
                dropped += 1
        return dropped

    def clear(self) -> int:
        """Forget everything (a restart that loses state); returns how many were dropped."""
        dropped = len(self._by_id)
        self._by_id.clear()
        self._expiry.clear()
        return dropped

    def __len__(self) -> int:
        return len(self._by_id)
