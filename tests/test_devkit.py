"""The process toolkit (service/devkit): waits, ports, child processes, outcome rows.

No Kafka and no Redis: the processes are small Python children and the emulator.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.devkit.outcomes import SeenOutcome
from service.devkit.ports import free_port, free_ports, port_is_free
from service.devkit.processes import (
    EmulatorProcess,
    OpsEndpoint,
    ProcessError,
    ProcessExited,
    emulator_args,
    read_line,
    stop_process,
    sum_samples,
)
from service.devkit.waiting import GiveUp, wait_until
from service.messages import ConversionResult, DeadLetter
from service.tools import Outcome


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", 7])
    assert wait_until(lambda: next(values), 1.0, "a value", interval_s=0.001) == 7


def test_wait_until_times_out_naming_what_and_the_last_retried_error() -> None:
    def broken() -> bool:
        raise ValueError("still broken")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timed out: the thing within 0\.1 s.*still broken"):
        wait_until(broken, 0.1, "the thing", interval_s=0.01, retry_on=(ValueError,))
    assert time.monotonic() - started < 2.0


def test_wait_until_lets_unlisted_errors_and_give_up_through_at_once() -> None:
    def boom() -> bool:
        raise KeyError("not retried")

    with pytest.raises(KeyError):
        wait_until(boom, 5.0, "x")

    def give_up() -> bool:
        raise ProcessExited("gone")

    started = time.monotonic()
    with pytest.raises(GiveUp, match="gone"):
        wait_until(give_up, 5.0, "x", retry_on=(Exception,))
    assert time.monotonic() - started < 1.0


def test_wait_until_runs_between_after_each_failed_check() -> None:
    ticks: list[int] = []
    assert wait_until(lambda: len(ticks) >= 3, 2.0, "ticks", between=lambda: ticks.append(1))
    assert len(ticks) == 3


def test_free_ports_are_free_and_consecutive() -> None:
    port = free_port()
    assert port_is_free(port)
    ports = free_ports(3, with_bus=True)
    assert ports == list(range(ports[0], ports[0] + 3))
    assert all(port_is_free(p) and port_is_free(p + 10000) for p in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not port_is_free(port)


def test_emulator_args_spell_the_config_as_options() -> None:
    args = emulator_args(
        processing_median_s=0.5,
        rate_limit_per_minute=None,
        processing_median_s_by_type={"invoice": 1},
        access_log=False,
        webhook_urls=["http://a", "http://b"],
        seed=None,
    )
    assert args == [
        *("--processing-median-s", "0.5", "--rate-limit-per-minute", "0"),
        *("--processing-median-for", "invoice=1", "--no-access-log"),
        *("--webhook-url", "http://a", "--webhook-url", "http://b"),
    ]


def _child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def test_read_line_returns_a_line_or_nothing_by_the_deadline() -> None:
    # The children idle (a sleep inside them, wait-ok) until the test kills them.
    talker = _child("import sys, time; print('hello', flush=True); time.sleep(30)")  # wait-ok
    silent = _child("import time; time.sleep(30)")  # wait-ok
    try:
        assert talker.stdout is not None
        assert silent.stdout is not None
        assert read_line(talker.stdout, deadline=time.monotonic() + 20) == "hello"
        started = time.monotonic()
        assert read_line(silent.stdout, deadline=time.monotonic() + 0.3) == ""
        assert time.monotonic() - started < 5
    finally:
        for proc in (talker, silent):
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def test_stop_process_escalates_and_says_so_when_asked() -> None:
    polite = _child("import time; time.sleep(30)")  # wait-ok: the child idles until stopped
    assert stop_process(polite, timeout_s=10) == -15
    stubborn = _child(
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(30)"  # wait-ok: the child idles until killed
    )
    assert stubborn.stdout is not None
    assert read_line(stubborn.stdout, deadline=time.monotonic() + 20) == "ready"
    with pytest.raises(ProcessError, match="ignored SIGTERM"):
        stop_process(stubborn, timeout_s=0.3, must_exit=True, name="stubborn")
    assert stubborn.returncode == -9
    assert stop_process(None, timeout_s=1) is None
    for proc in (polite, stubborn):
        assert proc.stdout is not None
        proc.stdout.close()


def test_sum_samples_adds_the_matching_labels() -> None:
    samples_ = {
        ("m", (("reason", "a"),)): 1.0,
        ("m", (("reason", "b"),)): 2.0,
        ("other", ()): 5.0,
    }
    assert sum_samples(samples_, "m") == 3.0
    assert sum_samples(samples_, "m", reason="b") == 2.0
    assert sum_samples(samples_, "missing") == 0.0


def test_the_emulator_process_starts_answers_and_stops(tmp_path: Path) -> None:
    emulator = EmulatorProcess(log_path=tmp_path / "emulator.log", args=["--seed", "3"]).start()
    try:
        assert emulator.port > 0
        assert emulator.healthy()
        assert emulator.usage().status_code == 200
        assert emulator.usage(api_key=emulator.second_api_key).status_code == 200
        assert emulator.usage(api_key="wrong").status_code == 401
        assert "submissions_accepted" in emulator.stats()
    finally:
        emulator.close()
    assert emulator.proc is None
    assert not emulator.healthy()


def test_an_emulator_that_cannot_start_is_one_error_with_its_log(tmp_path: Path) -> None:
    emulator = EmulatorProcess(log_path=tmp_path / "emulator.log", args=["--no-such-option"])
    with pytest.raises(ProcessError, match="emulator did not start"):
        emulator.start()
    assert emulator.proc is None


def _result(rid: str) -> bytes:
    at = "2026-12-01T18:00:0{}Z"
    return json.dumps(
        {
            "request_id": rid,
            "conversion_id": "c-1",
            "document_type_code": "invoice",
            "data": {},
            "metadata": {"bench_produced_at": 1.5},
            "timings": {
                "received_at": at.format(0),
                "submitted_at": at.format(1),
                "completed_at": at.format(2),
                "published_at": at.format(3),
                "status_calls": 2,
            },
        }
    ).encode()


def test_seen_outcomes_keep_ids_verdicts_and_timings() -> None:
    raw = _result("r1")
    result = ConversionResult.model_validate_json(raw)
    seen = SeenOutcome.of(Outcome("t", 0, 0, result, None, raw), seen_at=9.0)
    published = datetime(2026, 12, 1, 18, 0, 3, tzinfo=UTC).timestamp()
    assert (seen.request_id, seen.ok, seen.reason, seen.status_calls) == ("r1", True, None, 2)
    assert (seen.produced_at, seen.published_at, seen.seen_at) == (1.5, published, 9.0)
    assert seen.completed_at == published - 1

    letter = DeadLetter.model_validate(
        {
            "request_id": "r2",
            "reason": "timeout",
            "message": "too slow",
            "status_calls": 4,
            "failed_at": "2026-12-01T18:00:05Z",
            "original": {"topic": "in", "partition": 0, "offset": 1},
        }
    )
    dead = SeenOutcome.of(Outcome("t", 0, 1, None, letter, b""), seen_at=10.0)
    assert (dead.request_id, dead.ok, dead.reason, dead.status_calls) == ("r2", False, "timeout", 4)
    assert dead.published_at == published + 2

    junk = SeenOutcome.of(Outcome("t", 0, 2, None, None, b"junk"), seen_at=11.0)
    assert (junk.request_id, junk.ok, junk.reason) == (None, False, "unreadable")


def test_ops_endpoint_readiness_fails_at_once_on_exit_and_quotes_the_log() -> None:
    ops = OpsEndpoint(free_port())  # nothing listens there
    assert not ops.ready()
    started = time.monotonic()
    with pytest.raises(ProcessExited, match="bridge b1 exited:\nthe log"):
        ops.wait_ready(30, name="b1", alive=lambda: False, tail=lambda: "the log")
    assert time.monotonic() - started < 5
    with pytest.raises(TimeoutError, match=r"bridge b1 ready within 0\.3 s\nthe log"):
        ops.wait_ready(0.3, name="b1", alive=lambda: True, tail=lambda: "the log")
