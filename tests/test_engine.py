"""The engine in-process: its decisions in milliseconds, with Kafka and DocuTray faked.

The Kafka edge is a fake that commits every effect at once (or holds it, on demand);
DocuTray is a fake client whose answers each test scripts. What only real processes
can show stays in the end-to-end suites.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from service import metrics
from service.docutray import ConversionStatus, ServerError, Submission
from service.pending import Entry
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
