"""The engine in-process: its decisions in milliseconds, with Kafka and DocuTray faked.

The Kafka edge is a fake that commits every effect at once (or holds it, on demand);
DocuTray is a fake client whose answers each test scripts. What only real processes
can show stays in the end-to-end suites.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service import metrics
from service.docutray import (
    ApiTimeout,
    ApiUnreachable,
    ConversionLost,
    ConversionStatus,
    InvalidApiKey,
    QuotaExhausted,
    RateLimited,
    RequestRejected,
    ServerError,
    Submission,
)
from service.pending import Entry
from service.systemic import PausedTime
from tests.fixtures.engine import (
    FakeDocuments,
    FakeKafka,
    engine_settings,
    make_engine,
    stored_entry,
)

Call = Callable[[], Awaitable[Any]]


class FakeDocuTray:
    """Scripted answers: `submit` and `status` are coroutines a test replaces."""

    def __init__(self) -> None:
        self.submits = 0
        self.status_calls = 0
        self.submit_gate: asyncio.Event | None = None

    async def submit_url(self, **_: Any) -> Submission:
        self.submits += 1
        if self.submit_gate is not None:
            await self.submit_gate.wait()
        return await self.submit()

    async def submit(self) -> Submission:
        return Submission(conversion_id=f"c{self.submits}", status_url="/s", status="ENQUEUED")

    async def get_status(self, conversion_id: str) -> ConversionStatus:
        self.status_calls += 1
        return ConversionStatus(conversion_id=conversion_id, status="SUCCESS", data={"x": 1})

    async def list_document_types(self, **_: Any) -> None:
        return None


class Harness:
    def __init__(self, **overrides: str) -> None:
        self.settings = engine_settings(
            BRIDGE_POLL_DEFAULT_MEDIAN_S="0.01", BRIDGE_POLL_MIN_INTERVAL_S="0.01", **overrides
        )
        self.kafka = FakeKafka()
        self.client = FakeDocuTray()
        self.documents = FakeDocuments()
        self.engine = make_engine(
            self.settings, client=self.client, kafka=self.kafka, documents=self.documents
        )

    def entry(self, rid: str, offset: int = 0) -> Entry:
        return stored_entry(self.documents, rid, offset, headers=[("trace", b"t1")])

    async def run_until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        self.engine._stopping = False  # a test may run the engine more than once
        task = asyncio.get_running_loop().create_task(self.engine.run())
        try:
            async with asyncio.timeout(timeout_s):
                while not done():
                    await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
        finally:
            self.engine._stopping = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_request_is_submitted_polled_and_published_once() -> None:
    h = Harness()
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results")))
    assert [r["request_id"] for r in h.kafka.values("results")] == ["r1"]
    assert h.kafka.states("r1") == ["submitting", "submitted", None]
    assert h.client.submits == 1
    out = next(e for e in h.kafka.effects if e.result)
    assert ("trace", b"t1") in (out.records[0].headers or [])


async def test_an_unexpected_exception_in_the_client_is_retried_then_dead_lettered() -> None:
    """Issue 11 item 7: any exception leaves the entry a next step, never a dead task."""
    h = Harness(BRIDGE_RETRY_DEADLINE_S="0.3")

    async def broken() -> Submission:
        raise RuntimeError("bug inside the client")

    h.client.submit = broken  # type: ignore[method-assign]
    before = metrics.UNEXPECTED_ERRORS.labels("submit")._value.get()
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("dead")))
    letter = h.kafka.values("dead")[0]
    assert letter["reason"] == "retries_exhausted"
    assert "RuntimeError" in letter["message"]
    assert h.client.submits >= 2
    assert metrics.UNEXPECTED_ERRORS.labels("submit")._value.get() - before == h.client.submits


async def test_an_unexpected_exception_in_a_status_call_is_retried() -> None:
    h = Harness()
    calls = 0
    real = h.client.get_status

    async def flaky(conversion_id: str) -> ConversionStatus:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ValueError("bad body")
        return await real(conversion_id)

    h.client.get_status = flaky  # type: ignore[method-assign]
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results")))
    assert calls == 3
    assert h.client.submits == 1


async def test_a_drain_lets_calls_under_way_finish_and_requeues_the_waiting_ones() -> None:
    """Issue 11 item 5: a graceful stop resubmits nothing."""
    h = Harness(DOCUTRAY_MAX_CONNECTIONS="2")  # one submit slot: the second submit waits for it
    gate = asyncio.Event()
    h.client.submit_gate = gate
    h.engine.adopt(0, 1, [h.entry("a", 0), h.entry("b", 1)])
    run = asyncio.get_running_loop().create_task(h.engine.run())
    async with asyncio.timeout(5):
        while h.client.submits < 1:
            await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
    drain = asyncio.get_running_loop().create_task(h.engine.drain(grace_s=5))
    await asyncio.sleep(0.05)  # wait-ok: the drain must still be waiting for the call
    assert not drain.done()
    gate.set()
    await drain
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    in_call = "a" if h.kafka.states("a")[-1] == "submitted" else "b"
    waiting = "b" if in_call == "a" else "a"
    assert h.kafka.states(in_call)[-1] == "submitted"  # its outcome was recorded
    assert h.kafka.states(waiting)[-1] == "queued"  # never called: no resubmission later
    assert h.client.submits == 1


async def test_a_revoke_starts_no_new_call_and_reports_when_calls_are_done() -> None:
    h = Harness()
    gate = asyncio.Event()
    h.client.submit_gate = gate
    h.engine.adopt(0, 1, [h.entry("a", 0)])
    run = asyncio.get_running_loop().create_task(h.engine.run())
    async with asyncio.timeout(5):
        while h.client.submits < 1:
            await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
    done = threading.Event()
    h.engine.quiesce([0], done)
    h.engine.adopt(0, 1, [h.entry("late", 1)])  # due now, on the partition being revoked
    await asyncio.sleep(0.05)  # wait-ok: nothing may start meanwhile
    assert not done.is_set()
    assert h.client.submits == 1
    gate.set()
    async with asyncio.timeout(5):
        while not done.is_set():
            await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert h.kafka.states("a")[-1] == "submitted"
    assert h.client.submits == 1


@pytest.mark.parametrize("answer", [ServerError("boom", endpoint="submit", status_code=503)])
async def test_a_transient_error_is_retried_with_backoff(answer: Exception) -> None:
    h = Harness()
    failures = 0
    real = h.client.submit

    async def once_failing() -> Submission:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise answer
        return await real()

    h.client.submit = once_failing  # type: ignore[method-assign]
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results")))
    assert h.kafka.states("r1")[:3] == ["submitting", "queued", "submitting"]
    assert not h.kafka.values("dead")


async def test_an_in_doubt_submit_that_never_made_its_call_stays_in_doubt() -> None:
    """A submit restored in `submitting` (the previous owner may have sent it) and stopped
    before its own call must leave `submitting` behind, so the next owner counts it."""
    h = Harness(DOCUTRAY_MAX_CONNECTIONS="2")  # one submit slot
    gate = asyncio.Event()
    h.client.submit_gate = gate
    doubtful = h.entry("doubtful", 1)
    doubtful.state = "submitting"
    doubtful.in_doubt = True
    h.engine.adopt(0, 1, [h.entry("a", 0)])
    run = asyncio.get_running_loop().create_task(h.engine.run())
    async with asyncio.timeout(5):
        while h.client.submits < 1:
            await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
    h.engine.adopt(0, 1, [doubtful])
    async with asyncio.timeout(5):
        while "submitting" not in h.kafka.states("doubtful"):
            await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
    drain = asyncio.get_running_loop().create_task(h.engine.drain(grace_s=5))
    gate.set()
    await drain
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert h.kafka.states("doubtful") == ["submitting"]
    assert h.client.submits == 1


def _end_to_end_count(outcome: str) -> float:
    """How many outcomes `docutray_bridge_end_to_end_seconds` has observed for `outcome`."""
    for family in metrics.END_TO_END.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels.get("outcome") == outcome:
                return sample.value
    return 0.0


async def test_end_to_end_latency_is_observed_once_when_the_outcome_commits() -> None:
    """Issue 14 gap: a finish whose transaction fails (aborted past its retries, so the
    partition is rebuilt from Kafka and the request finished again) counts once, not twice."""
    h = Harness()
    h.kafka.fail_finishes = 1
    before = _end_to_end_count("result")
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.failed))
    assert _end_to_end_count("result") == before  # nothing committed yet
    # The reset: the partition is dropped and its state restored (still `submitted`).
    h.engine.drop(0)
    restored = h.entry("r1")
    restored.state, restored.conversion_id = "submitted", "c1"
    h.engine.adopt(0, 2, [restored])
    await h.run_until(lambda: bool(h.kafka.values("results")))
    assert [r["request_id"] for r in h.kafka.values("results")] == ["r1"]
    assert _end_to_end_count("result") == before + 1


async def test_time_paused_for_the_quota_does_not_count_against_the_retry_deadline() -> None:
    """Issue 14 gap: a transient failure, then a 402 whose pause outlasts
    BRIDGE_RETRY_DEADLINE_S: when the quota is back the request completes (the pause is the
    plan's fault, not the request's), with one outcome, a result."""
    h = Harness(BRIDGE_RETRY_DEADLINE_S="0.3", BRIDGE_QUOTA_PROBE_INTERVAL_S="1.0")
    answers: list[Exception] = [
        ServerError("boom", endpoint="submit", status_code=503),
        QuotaExhausted(
            "monthly quota",
            endpoint="submit",
            status_code=402,
            reset_at=datetime.now(UTC) + timedelta(days=3),
        ),
    ]
    real = h.client.submit

    async def scripted() -> Submission:
        if answers:
            raise answers.pop(0)
        return await real()

    h.client.submit = scripted  # type: ignore[method-assign]
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results") or h.kafka.values("dead")))
    assert [r["request_id"] for r in h.kafka.values("results")] == ["r1"]
    assert h.kafka.values("dead") == []
    assert h.client.submits == 3


def test_paused_time_counts_only_the_overlap_with_a_requests_life() -> None:
    paused = PausedTime(max_intervals=2)
    paused.note(True, 10.0)
    paused.note(True, 12.0)  # still the same pause
    paused.note(False, 20.0)
    paused.note(False, 25.0)
    paused.note(True, 30.0)  # open: counts up to `end`
    assert paused.within(0.0, 40.0) == 20.0
    assert paused.within(15.0, 35.0) == 10.0
    assert paused.within(20.0, 30.0) == 0.0
    paused.note(False, 31.0)
    paused.note(True, 50.0)
    paused.note(False, 51.0)  # a third interval: the oldest (10-20) is forgotten
    assert paused.within(0.0, 60.0) == 2.0


class ProbeFailingOnce:
    """DocuTray's probe call (``list_document_types``): 401 the first time, fine after."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, **_: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            raise InvalidApiKey("still unauthorized", endpoint="document_types", status_code=401)


async def test_a_systemic_error_pauses_probes_and_resumes_without_charging_the_request() -> None:
    """A 401 pauses consumption (no dead letter); the probe fails once, then DocuTray
    answers again and consumption resumes; the pause outlasted BRIDGE_RETRY_DEADLINE_S after
    a transient failure, yet the request completes."""
    h = Harness(BRIDGE_RETRY_DEADLINE_S="0.3", BRIDGE_SYSTEMIC_PROBE_INTERVAL_S="0.2")
    answers: list[Exception] = [
        ServerError("boom", endpoint="submit", status_code=503),
        InvalidApiKey("unauthorized", endpoint="submit", status_code=401),
    ]
    real = h.client.submit

    async def scripted() -> Submission:
        if answers:
            raise answers.pop(0)
        return await real()

    probe = ProbeFailingOnce()

    h.client.submit = scripted  # type: ignore[method-assign]
    h.client.list_document_types = probe  # type: ignore[method-assign]
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: "invalid_api_key" in h.kafka.paused)
    assert h.engine.paused_reasons == frozenset({"invalid_api_key"})
    await h.run_until(lambda: bool(h.kafka.values("results") or h.kafka.values("dead")))
    assert [r["request_id"] for r in h.kafka.values("results")] == ["r1"]
    assert h.kafka.values("dead") == []
    assert probe.calls == 2
    assert h.kafka.paused == set()
    assert h.engine.paused_reasons == frozenset()


async def test_time_paused_does_not_count_against_the_conversion_deadline() -> None:
    """Issue 14 gap: status calls stop while consumption is paused (here a 401 on a status
    call); a pause that outlasts BRIDGE_CONVERSION_DEADLINE_S must not turn the conversion
    into a `timeout` dead letter without asking DocuTray: its result is published."""
    h = Harness(BRIDGE_CONVERSION_DEADLINE_S="0.3", BRIDGE_SYSTEMIC_PROBE_INTERVAL_S="0.25")
    answers: list[Exception] = [
        InvalidApiKey("unauthorized", endpoint="status", status_code=401),
    ]
    real = h.client.get_status

    async def scripted(conversion_id: str) -> ConversionStatus:
        if answers:
            raise answers.pop(0)
        return await real(conversion_id)

    probe = ProbeFailingOnce()

    h.client.get_status = scripted  # type: ignore[method-assign]
    h.client.list_document_types = probe  # type: ignore[method-assign]
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results") or h.kafka.values("dead")))
    assert h.kafka.values("dead") == []
    assert [r["request_id"] for r in h.kafka.values("results")] == ["r1"]
    assert probe.calls == 2


def _scripted_submits(h: Harness, answers: list[Exception]) -> None:
    """The client's submits raise `answers` in turn, then succeed."""
    real = h.client.submit

    async def scripted() -> Submission:
        if answers:
            raise answers.pop(0)
        return await real()

    h.client.submit = scripted  # type: ignore[method-assign]


def _scripted_statuses(h: Harness, answers: list[Exception | str]) -> None:
    """The client's status calls raise (or answer with the status in) `answers` in turn,
    then answer SUCCESS."""
    real = h.client.get_status

    async def scripted(conversion_id: str) -> ConversionStatus:
        if answers:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            h.client.status_calls += 1
            return ConversionStatus(conversion_id=conversion_id, status=answer, error="bad scan")
        return await real(conversion_id)

    h.client.get_status = scripted  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            RequestRejected("bad", reason="invalid_request", endpoint="submit", status_code=400),
            "invalid_request",
        ),
        (
            RequestRejected("big", reason="too_large", endpoint="submit", status_code=413),
            "too_large",
        ),
    ],
)
async def test_a_refused_submit_is_dead_lettered_once(answer: Exception, reason: str) -> None:
    h = Harness()
    _scripted_submits(h, [answer])
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("dead")))
    assert [d["reason"] for d in h.kafka.values("dead")] == [reason]
    assert h.kafka.values("results") == []
    assert h.kafka.states("r1") == ["submitting", None]
    assert h.client.submits == 1


@pytest.mark.parametrize(
    "answer",
    [
        RateLimited(
            "slow down", retry_after_s=0.01, limit_type="minute", endpoint="submit", status_code=429
        ),
        ApiTimeout("timed out", maybe_processed=True, endpoint="submit"),
    ],
)
async def test_a_429_or_a_timeout_on_submit_is_retried(answer: Exception) -> None:
    h = Harness()
    _scripted_submits(h, [answer])
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results")))
    assert h.kafka.values("dead") == []
    assert h.kafka.states("r1") == ["submitting", "queued", "submitting", "submitted", None]
    assert h.client.submits == 2


async def test_an_hour_window_429_holds_submits_until_its_reset() -> None:
    """Issue 14 item 2: an hour-window 429 holds submissions until its resetTime (not the
    minute's retry), and the hold is not charged to the request's retry deadline."""
    h = Harness(BRIDGE_RETRY_DEADLINE_S="0.2")
    reset_at = datetime.now(UTC) + timedelta(seconds=0.8)
    _scripted_submits(
        h,
        [
            RateLimited(
                "hour spent",
                retry_after_s=0.01,
                limit_type="hour",
                reset_at=reset_at,
                endpoint="submit",
                status_code=429,
            )
        ],
    )
    submitted_at: list[datetime] = []
    real = h.client.submit

    async def stamped() -> Submission:
        submitted_at.append(datetime.now(UTC))
        return await real()

    h.client.submit = stamped  # type: ignore[method-assign]
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results") or h.kafka.values("dead")))
    assert h.kafka.values("dead") == []
    assert [r["request_id"] for r in h.kafka.values("results")] == ["r1"]
    assert len(submitted_at) == 2
    assert submitted_at[1] >= reset_at - timedelta(seconds=0.05)


async def test_a_failed_conversion_is_dead_lettered() -> None:
    h = Harness()
    _scripted_statuses(h, ["PROCESSING", "ERROR"])
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("dead")))
    letter = h.kafka.values("dead")[0]
    assert letter["reason"] == "conversion_failed"
    assert "bad scan" in letter["message"]
    assert h.kafka.values("results") == []


@pytest.mark.parametrize(("max_lost", "outcome"), [("1", "results"), ("0", "dead")])
async def test_a_lost_conversion_is_resubmitted_within_its_budget(
    max_lost: str, outcome: str
) -> None:
    h = Harness(BRIDGE_MAX_LOST_RESUBMITS=max_lost)
    _scripted_statuses(h, [ConversionLost("unknown", endpoint="status", status_code=404)])
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("results") or h.kafka.values("dead")))
    assert len(h.kafka.values(outcome)) == 1
    if outcome == "dead":
        assert h.kafka.values("dead")[0]["reason"] == "conversion_lost"
        assert h.client.submits == 1
    else:
        assert h.client.submits == 2
        assert h.kafka.values("dead") == []


async def test_a_conversion_past_its_deadline_is_dead_lettered_as_timeout() -> None:
    h = Harness(BRIDGE_CONVERSION_DEADLINE_S="0.2")
    _scripted_statuses(h, ["PROCESSING"] * 10_000)
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.values("dead")))
    assert h.kafka.values("dead")[0]["reason"] == "timeout"
    assert h.kafka.values("results") == []


async def test_a_dropped_partition_publishes_nothing_more() -> None:
    """A revoked or lost partition: its entries are forgotten, their tasks cancelled."""
    h = Harness()
    gate = asyncio.Event()
    h.client.submit_gate = gate
    h.engine.adopt(0, 1, [h.entry("r1")])
    run = asyncio.get_running_loop().create_task(h.engine.run())
    async with asyncio.timeout(5):
        while h.client.submits < 1:
            await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
    h.engine.drop(0)
    gate.set()
    await asyncio.sleep(0.1)  # wait-ok: showing that nothing is written after the drop
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert h.kafka.states("r1") == ["submitting"]
    assert h.engine.counts() == dict.fromkeys(metrics.PENDING_STATES, 0)


async def test_a_stale_intent_makes_no_call() -> None:
    """The `submitting` record could not be committed (the partition changed owner): the
    HTTP call must not happen, its next owner submits."""
    h = Harness()
    h.kafka.fail_waited = 1
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: bool(h.kafka.failed))
    await asyncio.sleep(0.05)  # wait-ok: showing that no call follows
    assert h.client.submits == 0
    assert h.kafka.effects == []


async def test_a_restored_submitted_entry_is_polled_not_submitted() -> None:
    h = Harness()
    restored = h.entry("r1")
    restored.state, restored.conversion_id = "submitted", "c7"
    restored.submitted_at = datetime.now(UTC)
    h.engine.adopt(0, 1, [restored])
    await h.run_until(lambda: bool(h.kafka.values("results")))
    assert h.client.submits == 0
    assert h.client.status_calls == 1


async def test_an_in_doubt_entry_is_submitted_again_and_counted() -> None:
    """Restored in `submitting`: the previous owner may have sent it; it is sent again and
    counted as a resubmission (reason `recovery`)."""
    h = Harness()
    doubtful = h.entry("r1")
    doubtful.state, doubtful.in_doubt = "submitting", True
    before = metrics.RESUBMISSIONS.labels("recovery")._value.get()
    h.engine.adopt(0, 1, [doubtful])
    await h.run_until(lambda: bool(h.kafka.values("results")))
    assert h.client.submits == 1
    assert metrics.RESUBMISSIONS.labels("recovery")._value.get() - before == 1


async def test_transport_failures_past_the_unreachable_window_pause_then_resume() -> None:
    """DocuTray unreachable for longer than BRIDGE_UNREACHABLE_PAUSE_AFTER_S: consumption
    pauses as `api_unreachable` (no dead letter, the retry deadline is not charged for the
    pause), the probe resumes it, and the request completes."""
    h = Harness(
        BRIDGE_UNREACHABLE_PAUSE_AFTER_S="0.05",
        BRIDGE_SYSTEMIC_PROBE_INTERVAL_S="0.3",
        BRIDGE_RETRY_DEADLINE_S="0.25",
    )
    down = True
    real = h.client.submit

    async def unreachable() -> Submission:
        if down:
            await asyncio.sleep(0.02)  # wait-ok: the failed connection's latency
            raise ApiUnreachable("connection refused", maybe_processed=False, endpoint="submit")
        return await real()

    async def probe(**_: Any) -> None:
        if down:
            raise ApiUnreachable("connection refused", maybe_processed=False, endpoint="submit")

    h.client.submit = unreachable  # type: ignore[method-assign]
    h.client.list_document_types = probe  # type: ignore[method-assign]
    h.engine.adopt(0, 1, [h.entry("r1")])
    await h.run_until(lambda: "api_unreachable" in h.kafka.paused)
    assert h.engine.paused_reasons == frozenset({"api_unreachable"})
    down = False
    await h.run_until(lambda: bool(h.kafka.values("results") or h.kafka.values("dead")))
    assert h.kafka.values("dead") == []
    assert [r["request_id"] for r in h.kafka.values("results")] == ["r1"]
    assert h.kafka.paused == set()
