"""The engine in-process: its decisions in milliseconds, with Kafka and DocuTray faked.

The Kafka edge is a fake that commits every effect at once (or holds it, on demand);
DocuTray is a fake client whose answers each test scripts. What only real processes
can show stays in the end-to-end suites.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from service import metrics
from service.config import Settings
from service.docutray import ConversionStatus, ServerError, Submission
from service.intake import Accepted, original_record, parse_record
from service.kafkaio import Effect, _committed
from service.messages import PendingRecord
from service.pending import DocumentAt, Entry, new_entry
from service.pipeline import Engine
from service.ratelimit.limiter import build_limiter
from service.scheduler import DurationModel, PollPolicy

Call = Callable[[], Awaitable[Any]]


class FakeKafka:
    """The Kafka edge (service.kafkaio.KafkaEdge): effects commit at once, in order."""

    def __init__(self) -> None:
        self.effects: list[Effect] = []
        self.paused: set[str] = set()

    def submit(self, effect: Effect) -> None:
        self.effects.append(effect)
        asyncio.get_running_loop().call_soon(_committed, effect)

    def pause(self, reason: str) -> None:
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)

    def states(self, request_id: str) -> list[str]:
        """The changelog states written for `request_id`, in order (None: tombstone)."""
        out = []
        for eff in self.effects:
            for rec in eff.records:
                if rec.key == request_id.encode() and rec.topic.endswith(".pending-changelog"):
                    value = rec.value
                    out.append(PendingRecord.model_validate_json(value).state if value else None)
        return out

    def dead_letters(self) -> list[dict[str, Any]]:
        return [
            json.loads(rec.value)
            for eff in self.effects
            for rec in eff.records
            if rec.topic == "dead" and rec.value
        ]

    def results(self) -> list[dict[str, Any]]:
        return [
            json.loads(rec.value)
            for eff in self.effects
            for rec in eff.records
            if rec.topic == "results" and rec.value
        ]


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


class FakeDocuments:
    """The documents topic: original records by offset."""

    def __init__(self) -> None:
        self.values: dict[int, bytes] = {}

    async def read(self, partition: int, offset: int) -> bytes:
        return self.values[offset]


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "DOCUTRAY_API_KEY": "k",
        "BRIDGE_GROUP_ID": "g",
        "BRIDGE_INPUT_TOPIC": "in",
        "BRIDGE_RESULT_TOPIC": "results",
        "BRIDGE_DEAD_LETTER_TOPIC": "dead",
        "BRIDGE_SUBMIT_RATE_PER_MINUTE": "60000",
        "BRIDGE_STATUS_RATE_PER_MINUTE": "60000",
        "BRIDGE_RATE_BURST": "100",
        "BRIDGE_POLL_DEFAULT_MEDIAN_S": "0.01",
        "BRIDGE_POLL_MIN_INTERVAL_S": "0.01",
        "BRIDGE_RETRY_BASE_S": "0.01",
        "BRIDGE_RETRY_CAP_S": "0.02",
    }
    base.update(overrides)
    return Settings(**base)


class Harness:
    def __init__(self, **overrides: Any) -> None:
        self.settings = _settings(**overrides)
        self.kafka = FakeKafka()
        self.client = FakeDocuTray()
        self.documents = FakeDocuments()
        self.engine = Engine(
            settings=self.settings,
            client=self.client,  # type: ignore[arg-type]
            limiter=build_limiter(
                redis_url=None,
                submit_rate_per_minute=self.settings.submit_rate_per_minute,
                status_rate_per_minute=self.settings.status_rate_per_minute,
                shared_budget=False,
                burst=self.settings.rate_burst,
                expected_replicas=1,
                key_prefix="t:",
            ),
            policy=PollPolicy(
                model=DurationModel(default_median_s=0.01),
                first_poll_quantile=0.5,
                min_interval_s=0.01,
                max_interval_s=0.05,
            ),
            kafka=self.kafka,
            documents=self.documents,  # type: ignore[arg-type]
            rng=random.Random(1),
        )

    def entry(self, rid: str, offset: int = 0) -> Entry:
        value = json.dumps(
            {
                "request_id": rid,
                "document_type_code": "invoice",
                "source": {"url": "https://example.com/a.pdf"},
            }
        ).encode()
        verdict = parse_record(value, max_request_bytes=1 << 20, max_document_bytes=1 << 20)
        assert isinstance(verdict, Accepted)
        original = original_record(
            topic="in",
            partition=0,
            offset=offset,
            timestamp_ms=None,
            key=None,
            value=value,
            headers=[("trace", b"t1")],
        )
        self.documents.values[offset] = original.model_dump_json().encode()
        entry = new_entry(
            partition=0, epoch=1, original=original, accepted=verdict, received_at=datetime.now(UTC)
        )
        entry.document = DocumentAt(0, offset, 100)
        return entry

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
    await h.run_until(lambda: bool(h.kafka.results()))
    assert [r["request_id"] for r in h.kafka.results()] == ["r1"]
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
    await h.run_until(lambda: bool(h.kafka.dead_letters()))
    letter = h.kafka.dead_letters()[0]
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
    await h.run_until(lambda: bool(h.kafka.results()))
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
    await h.run_until(lambda: bool(h.kafka.results()))
    assert h.kafka.states("r1")[:3] == ["submitting", "queued", "submitting"]
    assert not h.kafka.dead_letters()


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
