"""The history checker of the chaos suite and the soak: pure functions, no I/O.

Jepsen-style: a scenario records what it sent (one :class:`Expectation` per
request id) and, at the end, everything a ``read_committed`` reader finds on
the result and dead-letter topics (:class:`Observed`). :func:`check_history`
compares the two and counts, per scenario:

- ``lost``: an expected request id with no outcome at all (must be 0);
- ``duplicates``: outcomes beyond the first for one request id (must be 0);
- ``wrong``: the (first) outcome is not one the expectation allows, e.g. a
  dead letter for a good request, or the wrong dead-letter reason;
- ``unexpected``: outcomes for request ids nobody sent (or without an id).

The report also carries the resubmission counts the scenario measured
(from the emulator's per-request conversion counts and the bridge's
``docutray_bridge_resubmissions_total``), which are expected under faults
(submission is at-least-once) but must stay bounded.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

OutcomeKind = Literal["result", "dead_letter"]


@dataclass(frozen=True, slots=True)
class Expectation:
    """Which outcomes are acceptable for one request id.

    ``result=True`` accepts a result; ``dead_letter_reasons`` lists the dead-letter reasons
    accepted. A good request expects only a result; an injected bad one only its reason.
    """

    result: bool = True
    dead_letter_reasons: frozenset[str] = frozenset()

    def allows(self, kind: OutcomeKind, reason: str | None) -> bool:
        """Whether an outcome of this kind (and dead-letter reason) is acceptable."""
        if kind == "result":
            return self.result
        return reason in self.dead_letter_reasons


GOOD = Expectation()
"""A valid request: exactly one result."""


def dead_letter(*reasons: str) -> Expectation:
    """An injected bad request: exactly one dead letter with one of `reasons`."""
    return Expectation(result=False, dead_letter_reasons=frozenset(reasons))


def result_or_dead_letter(*reasons: str) -> Expectation:
    """A request that may end either way (e.g. conversion_lost after repeated forgetting)."""
    return Expectation(result=True, dead_letter_reasons=frozenset(reasons))


@dataclass(frozen=True, slots=True)
class Observed:
    """One committed outcome as a reader saw it."""

    request_id: str | None
    kind: OutcomeKind
    reason: str | None = None


@dataclass(slots=True)
class History:
    """What :func:`check_history` found; ``ok`` when nothing is lost, duplicated or wrong."""

    requests_in: int
    outcomes_out: int
    results: int
    dead_letters: int
    lost: list[str]
    duplicates: dict[str, int]
    wrong: dict[str, str]
    unexpected: int
    dead_letter_reasons: dict[str, int]

    @property
    def duplicate_outcomes(self) -> int:
        """Outcomes beyond the first, summed over request ids."""
        return sum(n - 1 for n in self.duplicates.values())

    @property
    def ok(self) -> bool:
        """Exactly one acceptable outcome per expected id, and nothing else."""
        return not self.lost and not self.duplicates and not self.wrong and not self.unexpected


def check_history(expected: Mapping[str, Expectation], observed: Iterable[Observed]) -> History:
    """Compare what was sent with what a read_committed reader sees (see the module docstring)."""
    by_id: dict[str | None, list[Observed]] = defaultdict(list)
    for outcome in observed:
        by_id[outcome.request_id].append(outcome)
    lost = sorted(rid for rid in expected if rid not in by_id)
    duplicates = {
        str(rid): len(outs) for rid, outs in by_id.items() if rid in expected and len(outs) > 1
    }
    wrong: dict[str, str] = {}
    for rid, expectation in expected.items():
        outs = by_id.get(rid)
        if not outs:
            continue
        first = outs[0]
        if not expectation.allows(first.kind, first.reason):
            wrong[rid] = first.kind if first.reason is None else f"{first.kind}:{first.reason}"
    counted = [o for rid, outs in by_id.items() if rid in expected for o in outs]
    unexpected = sum(len(outs) for rid, outs in by_id.items() if rid not in expected)
    reasons = Counter(o.reason or "?" for o in counted if o.kind == "dead_letter")
    return History(
        requests_in=len(expected),
        outcomes_out=len(counted),
        results=sum(1 for o in counted if o.kind == "result"),
        dead_letters=sum(1 for o in counted if o.kind == "dead_letter"),
        lost=lost,
        duplicates=duplicates,
        wrong=wrong,
        unexpected=unexpected,
        dead_letter_reasons=dict(sorted(reasons.items())),
    )


def emulator_resubmissions(conversions_by_request_id: Mapping[str, int]) -> int:
    """Conversions created beyond the first, summed over request ids (0 when each got one)."""
    return sum(max(0, n - 1) for n in conversions_by_request_id.values())


@dataclass(slots=True)
class ScenarioReport:
    """One row of the chaos report table (also one JSON line in the report file)."""

    scenario: str
    requests_in: int
    outcomes_out: int
    results: int
    dead_letters: int
    lost: int
    duplicate_outcomes: int
    wrong_outcomes: int
    unexpected_outcomes: int
    resubmissions_emulator: int
    resubmissions_bridge: dict[str, float]
    restarts: int
    leftover_pending: int
    duration_s: float
    faults: list[str] = field(default_factory=list)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    #: Figures a scenario measured (e.g. recovery seconds per kill, their p50/p95).
    measures: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        scenario: str,
        history: History,
        *,
        resubmissions_emulator: int,
        resubmissions_bridge: Mapping[str, float],
        restarts: int,
        leftover_pending: int,
        duration_s: float,
        faults: Iterable[str] = (),
    ) -> ScenarioReport:
        """A report row from a checked history and what the scenario measured."""
        return cls(
            scenario=scenario,
            requests_in=history.requests_in,
            outcomes_out=history.outcomes_out,
            results=history.results,
            dead_letters=history.dead_letters,
            lost=len(history.lost),
            duplicate_outcomes=history.duplicate_outcomes,
            wrong_outcomes=len(history.wrong),
            unexpected_outcomes=history.unexpected,
            resubmissions_emulator=resubmissions_emulator,
            resubmissions_bridge=dict(resubmissions_bridge),
            restarts=restarts,
            leftover_pending=leftover_pending,
            duration_s=round(duration_s, 1),
            faults=list(faults),
            dead_letter_reasons=dict(history.dead_letter_reasons),
        )

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(asdict(self), sort_keys=True)


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("scenario", "scenario"),
    ("requests_in", "in"),
    ("outcomes_out", "out"),
    ("results", "results"),
    ("dead_letters", "dead"),
    ("lost", "lost"),
    ("duplicate_outcomes", "dup"),
    ("wrong_outcomes", "wrong"),
    ("resubmissions_emulator", "resub(emu)"),
    ("resubmissions_bridge", "resub(bridge)"),
    ("restarts", "restarts"),
    ("duration_s", "s"),
)


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v:g}" for k, v in sorted(value.items()) if v) or "0"
    return str(value)


def format_table(reports: Iterable[ScenarioReport]) -> str:
    """A Markdown table of report rows (what docs/chaos.md shows)."""
    rows = [[_cell(getattr(r, attr)) for attr, _ in _COLUMNS] for r in reports]
    header = [title for _, title in _COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def parse_report_lines(lines: Iterable[str]) -> list[ScenarioReport]:
    """Report rows back from the JSON lines file (the last row per scenario wins)."""
    latest: dict[str, ScenarioReport] = {}
    for line in lines:
        if not line.strip():
            continue
        data = json.loads(line)
        latest[data["scenario"]] = ScenarioReport(**data)
    return list(latest.values())
