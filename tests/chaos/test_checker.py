"""Unit tests of the chaos history checker (pure: no Kafka, no processes)."""

from __future__ import annotations

from service.devkit.history import (
    GOOD,
    Observed,
    ScenarioReport,
    check_history,
    dead_letter,
    emulator_resubmissions,
    format_table,
    parse_report_lines,
    result_or_dead_letter,
)


def test_clean_history_is_ok() -> None:
    expected = {"a": GOOD, "b": dead_letter("too_large")}
    history = check_history(
        expected, [Observed("a", "result"), Observed("b", "dead_letter", "too_large")]
    )
    assert history.ok
    assert (history.requests_in, history.outcomes_out) == (2, 2)
    assert (history.results, history.dead_letters) == (1, 1)
    assert history.dead_letter_reasons == {"too_large": 1}


def test_lost_duplicate_wrong_and_unexpected_are_each_counted() -> None:
    expected = {"lost": GOOD, "dup": GOOD, "wrong": GOOD, "bad": dead_letter("too_large")}
    history = check_history(
        expected,
        [
            Observed("dup", "result"),
            Observed("dup", "result"),
            Observed("dup", "dead_letter", "timeout"),
            Observed("wrong", "dead_letter", "retries_exhausted"),
            Observed("bad", "dead_letter", "invalid_request"),
            Observed("stranger", "result"),
            Observed(None, "dead_letter", "malformed_record"),
        ],
    )
    assert not history.ok
    assert history.lost == ["lost"]
    assert history.duplicates == {"dup": 3}
    assert history.duplicate_outcomes == 2
    assert history.wrong == {
        "wrong": "dead_letter:retries_exhausted",
        "bad": "dead_letter:invalid_request",
    }
    assert history.unexpected == 2


def test_either_outcome_expectation() -> None:
    expected = {"x": result_or_dead_letter("conversion_lost"), "y": result_or_dead_letter()}
    ok = check_history(
        expected, [Observed("x", "dead_letter", "conversion_lost"), Observed("y", "result")]
    )
    assert ok.ok
    bad = check_history(
        expected, [Observed("x", "dead_letter", "timeout"), Observed("y", "result")]
    )
    assert bad.wrong == {"x": "dead_letter:timeout"}


def test_emulator_resubmissions_counts_conversions_beyond_the_first() -> None:
    assert emulator_resubmissions({"a": 1, "b": 3, "c": 2}) == 3
    assert emulator_resubmissions({}) == 0


def test_report_round_trips_through_json_lines_and_renders_a_table() -> None:
    history = check_history({"a": GOOD}, [Observed("a", "result")])
    first = ScenarioReport.build(
        "demo",
        history,
        resubmissions_emulator=0,
        resubmissions_bridge={"recovery": 2.0, "conversion_lost": 0.0},
        restarts=1,
        leftover_pending=0,
        duration_s=3.14159,
        faults=["kill -9"],
    )
    later = ScenarioReport.build(
        "demo",
        history,
        resubmissions_emulator=1,
        resubmissions_bridge={},
        restarts=0,
        leftover_pending=0,
        duration_s=1.0,
    )
    rows = parse_report_lines([first.to_json(), "", later.to_json()])
    assert rows == [later]
    table = format_table([first])
    assert table.splitlines()[0].startswith("| scenario")
    assert "| demo " in table
    assert "recovery=2" in table
    assert "3.1" in table
