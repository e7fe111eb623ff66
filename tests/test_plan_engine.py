"""The engine's part of the plan, in-process (Kafka and DocuTray faked): a 402 pauses
submissions through the limiter's shared gate while status calls go on, and a webhook
wake-up makes one status call due at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from service.docutray import ConversionStatus, QuotaExhausted, Submission
from service.pending import Entry
from service.pipeline import Engine
from tests.fixtures.engine import (
    FakeDocuments,
    FakeKafka,
    engine_settings,
    make_engine,
    stored_entry,
)


class FakeDocuTray:
    def __init__(self) -> None:
        self.submits = 0
        self.status_calls = 0
        self.quota_spent = False
        self.done = False
        self.metadata: list[Any] = []
        self.in_call = 0
        #: The most submits under way at once while the quota was spent.
        self.max_in_call = 0

    async def submit_url(self, **kwargs: Any) -> Submission:
        self.submits += 1
        self.metadata.append(kwargs.get("metadata"))
        if self.quota_spent:
            self.in_call += 1
            self.max_in_call = max(self.max_in_call, self.in_call)
            try:
                await asyncio.sleep(0.02)  # wait-ok: the call's latency, so overlaps show
            finally:
                self.in_call -= 1
            raise QuotaExhausted("monthly quota", endpoint="submit", status_code=402, quota=5)
        return Submission(conversion_id=f"c{self.submits}", status_url="/s", status="ENQUEUED")

    async def get_status(self, conversion_id: str) -> ConversionStatus:
        self.status_calls += 1
        status = "SUCCESS" if self.done else "PROCESSING"
        return ConversionStatus(conversion_id=conversion_id, status=status, data={"x": 1})


def make(**overrides: str) -> tuple[Engine, FakeKafka, FakeDocuTray, FakeDocuments]:
    kafka, client, documents = FakeKafka(), FakeDocuTray(), FakeDocuments()
    # Status calls 60 s apart unless woken (the webhook fallback's shape).
    engine = make_engine(
        engine_settings(**overrides),
        client=client,
        kafka=kafka,
        documents=documents,
        poll_interval_s=60.0,
    )
    return engine, kafka, client, documents


def entry(documents: FakeDocuments, rid: str, offset: int) -> Entry:
    return stored_entry(documents, rid, offset, metadata={"own": 1})


async def run_until(engine: Engine, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
    tasks = [
        asyncio.get_running_loop().create_task(engine.run()),
        asyncio.get_running_loop().create_task(engine.watch_submit_hold(every_s=0.05)),
    ]
    try:
        async with asyncio.timeout(timeout_s):
            while not done():
                await asyncio.sleep(0.005)  # wait-ok: polling a condition under a deadline
    finally:
        for task in tasks:
            task.cancel()
        # Bounded: a task that does not end on cancel must fail the test, not hang it.
        _, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending, f"engine tasks did not stop when cancelled: {pending}"


async def test_a_402_pauses_submissions_and_polls_go_on() -> None:
    engine, kafka, client, documents = make(BRIDGE_QUOTA_PROBE_INTERVAL_S="0.5")
    engine.adopt(0, 1, [entry(documents, "r1", 0)])
    await run_until(
        engine, lambda: client.submits == 1 and engine._entries[(0, "r1")].state == "submitted"
    )
    client.quota_spent = True
    engine.adopt(0, 1, [entry(documents, "r2", 1), entry(documents, "r3", 2)])
    await run_until(engine, lambda: "quota_exhausted" in engine.hold_reasons)
    held_at = client.submits
    assert engine._limiter.submit_hold is not None
    assert engine._limiter.submit_hold.reason == "quota_exhausted"
    # While paused: no submit, the submitted conversion is still polled (woken here).
    engine.wake(0, "r1", "c1")
    await run_until(engine, lambda: client.status_calls >= 1)
    assert client.submits == held_at
    assert "dead" not in kafka.topics()
    # The quota is back: after the pause (0.5 s) the next submits go through.
    client.quota_spent = False
    client.done = True

    def submitted() -> bool:
        return all(e.state == "submitted" for e in engine._entries.values())

    await run_until(engine, submitted)
    for (partition, rid), pending in list(engine._entries.items()):
        assert pending.conversion_id is not None
        assert engine.wake(partition, rid, pending.conversion_id) == "woke"
    await run_until(engine, lambda: kafka.topics().count("results") == 3)
    assert "dead" not in kafka.topics()
    assert engine.hold_reasons == frozenset()


async def test_a_wake_up_makes_one_status_call_due_now() -> None:
    engine, kafka, client, documents = make(BRIDGE_WEBHOOKS_ENABLED="true")
    engine.adopt(0, 1, [entry(documents, "r1", 0)])
    await run_until(engine, lambda: engine._entries[(0, "r1")].state == "submitted")
    # The route to this request went to DocuTray with the request's own metadata.
    assert client.metadata[0] == {
        "own": 1,
        "_docutray_bridge": {"request_id": "r1", "partition": 0},
    }
    assert engine.wake(0, "nobody", "c1") == "unknown"
    assert engine.wake(0, "r1", "forged") == "mismatch"
    await asyncio.sleep(0.05)  # wait-ok: showing that nothing was called for them
    assert client.status_calls == 0
    client.done = True
    assert engine.wake(0, "r1", "c1") == "woke"
    await run_until(engine, lambda: "results" in kafka.topics(), timeout_s=10.0)
    assert client.status_calls == 1
    assert engine.wake(0, "r1", "c1") == "unknown"  # a duplicate after the result
    result = next(
        json.loads(rec.value)
        for eff in kafka.effects
        for rec in eff.records
        if rec.topic == "results" and rec.value
    )
    assert result["metadata"] == {"own": 1}


async def test_after_a_402_one_submit_at_a_time_probes_the_quota() -> None:
    """Issue 14 gap: when the quota pause ends, the first submit is the probe; a backlog
    must not send a burst of submits that each get a 402 while the quota is still spent."""
    engine, kafka, client, documents = make(BRIDGE_QUOTA_PROBE_INTERVAL_S="0.2")
    client.quota_spent = True
    engine.adopt(0, 1, [entry(documents, "r0", 0)])
    await run_until(engine, lambda: "quota_exhausted" in engine.hold_reasons)
    engine.adopt(0, 1, [entry(documents, f"r{i}", i) for i in range(1, 10)])
    await run_until(engine, lambda: client.submits >= 4)  # three probes after the first 402
    assert client.max_in_call == 1
    assert "dead" not in kafka.topics()
    client.quota_spent = False
    await run_until(engine, lambda: all(e.state == "submitted" for e in engine._entries.values()))
    assert engine.hold_reasons == frozenset()


async def test_a_replica_that_only_saw_the_shared_quota_hold_probes_one_at_a_time() -> None:
    """Issue 14 gap: another replica got the 402; this one only sees the shared gate's
    ``quota_exhausted`` hold. When the hold ends with the quota still spent, it must probe
    one submit at a time like the replica that got the 402, not send a burst of submits
    that all get 402."""
    engine, kafka, client, documents = make(BRIDGE_QUOTA_PROBE_INTERVAL_S="0.3")
    client.quota_spent = True
    # Another replica's 402, as the shared gate holds it (no 402 reached this replica).
    await engine._limiter.pause_submissions("quota_exhausted", until=time.time() + 0.3)
    engine.adopt(0, 1, [entry(documents, f"r{i}", i) for i in range(10)])
    await run_until(engine, lambda: client.submits >= 3)
    assert client.max_in_call == 1
    assert "dead" not in kafka.topics()
    client.quota_spent = False
    await run_until(engine, lambda: all(e.state == "submitted" for e in engine._entries.values()))
    assert engine.hold_reasons == frozenset()


async def test_after_the_shared_quota_hold_ends_the_replica_is_unready_until_a_submit() -> None:
    """Readiness as on the replica that got the 402: ``quota_exhausted`` until a submit is
    accepted (the hold's end alone does not say the quota is back)."""
    engine, _, client, documents = make(BRIDGE_QUOTA_PROBE_INTERVAL_S="0.1")
    await engine._limiter.pause_submissions("quota_exhausted", until=time.time() + 0.1)
    engine.adopt(0, 1, [entry(documents, "r1", 0)])
    engine._systemic.tick()  # a dispatcher turn sees the shared hold
    async with asyncio.timeout(5):
        while engine._limiter.submit_hold is not None:
            await asyncio.sleep(0.01)  # wait-ok: polling a condition under a deadline
    assert engine.hold_reasons == frozenset({"quota_exhausted"})
    await run_until(engine, lambda: engine._entries[(0, "r1")].state == "submitted")
    assert client.submits == 1
    assert engine.hold_reasons == frozenset()
