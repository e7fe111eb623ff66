"""Injected faults (500s and slow answers), drawn from one seeded random stream.

Every API call draws exactly two numbers whatever the rates are, so a run
with the same seed and the same sequence of calls injects the same faults,
and changing one rate does not shift the other's sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallFaults:
    """What to do to one API call."""

    fail_500: bool
    delay_s: float


class FaultInjector:
    """Draws `CallFaults` per call from `random.Random(seed)`."""

    def __init__(self, *, seed: int) -> None:
        self._rng = random.Random(f"docutray-emulator-faults:{seed}")

    def draw(
        self, *, fault_500_rate: float, slow_response_rate: float, slow_response_s: float
    ) -> CallFaults:
        """The faults for the next call, given the current rates."""
        fail_draw = self._rng.random()
        slow_draw = self._rng.random()
        return CallFaults(
            fail_500=fail_draw < fault_500_rate,
            delay_s=slow_response_s if slow_draw < slow_response_rate else 0.0,
        )
