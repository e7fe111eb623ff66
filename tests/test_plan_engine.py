"""The engine's part of the plan, in-process (Kafka and DocuTray faked): a 402 pauses
submissions through the limiter's shared gate while status calls go on, and a webhook
wake-up makes one status call due at once."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from service.config import Settings
from service.docutray import ConversionStatus, QuotaExhausted, Submission
from service.intake import Accepted, original_record, parse_record
from service.kafkaio import Effect, _committed
from service.pending import DocumentAt, Entry, new_entry
from service.pipeline import Engine
from service.ratelimit import build_limiter
from service.scheduler import DurationModel, PollPolicy


class FakeKafka:
    def __init__(self) -> None:
        self.effects: list[Effect] = []

    def submit(self, effect: Effect) -> None:
        self.effects.append(effect)
        asyncio.get_running_loop().call_soon(_committed, effect)

    def pause(self, reason: str) -> None:
        pass

    def resume(self, reason: str) -> None:
        pass

    def topics(self) -> list[str]:
        return [rec.topic for eff in self.effects for rec in eff.records if rec.value]


class FakeDocuTray:
    def __init__(self) -> None:
        self.submits = 0
        self.status_calls = 0
        self.quota_spent = False
        self.done = False
        self.metadata: list[Any] = []

    async def submit_url(self, **kwargs: Any) -> Submission:
        self.submits += 1
        self.metadata.append(kwargs.get("metadata"))
        if self.quota_spent:
            raise QuotaExhausted("monthly quota", endpoint="submit", status_code=402, quota=5)
        return Submission(conversion_id=f"c{self.submits}", status_url="/s", status="ENQUEUED")

    async def get_status(self, conversion_id: str) -> ConversionStatus:
        self.status_calls += 1
        status = "SUCCESS" if self.done else "PROCESSING"
        return ConversionStatus(conversion_id=conversion_id, status=status, data={"x": 1})


class FakeDocuments:
    def __init__(self) -> None:
        self.values: dict[int, bytes] = {}

    async def read(self, partition: int, offset: int) -> bytes:
        return self.values[offset]


def make(**overrides: str) -> tuple[Engine, FakeKafka, FakeDocuTray, FakeDocuments]:
    settings = Settings(
        **{
            "DOCUTRAY_API_KEY": "k",
            "BRIDGE_GROUP_ID": "g",
            "BRIDGE_INPUT_TOPIC": "in",
            "BRIDGE_RESULT_TOPIC": "results",
            "BRIDGE_DEAD_LETTER_TOPIC": "dead",
            "BRIDGE_SUBMIT_RATE_PER_MINUTE": "60000",
            "BRIDGE_STATUS_RATE_PER_MINUTE": "60000",
            "BRIDGE_RATE_BURST": "100",
            "BRIDGE_RETRY_BASE_S": "0.01",
            "BRIDGE_RETRY_CAP_S": "0.02",
            **overrides,
        }
    )
    kafka, client, documents = FakeKafka(), FakeDocuTray(), FakeDocuments()
    engine = Engine(
        settings=settings,
        client=client,  # type: ignore[arg-type]
        limiter=build_limiter(
            redis_url=None,
            submit_rate_per_minute=60000,
            status_rate_per_minute=60000,
            shared_budget=False,
            burst=100,
            expected_replicas=1,
            key_prefix="t:",
        ),
        # Status calls 60 s apart unless woken (the webhook fallback's shape).
        policy=PollPolicy(
            model=DurationModel(default_median_s=60.0),
            first_poll_quantile=0.5,
            min_interval_s=60.0,
            max_interval_s=60.0,
        ),
        kafka=kafka,
        documents=documents,  # type: ignore[arg-type]
        rng=random.Random(1),
    )
    return engine, kafka, client, documents


def entry(documents: FakeDocuments, rid: str, offset: int) -> Entry:
    value = json.dumps(
        {
            "request_id": rid,
            "document_type_code": "invoice",
            "source": {"url": "https://example.com/a.pdf"},
            "metadata": {"own": 1},
        }
    ).encode()
    verdict = parse_record(value, max_request_bytes=1 << 20, max_document_bytes=1 << 20)
    assert isinstance(verdict, Accepted)
    original = original_record(
        topic="in", partition=0, offset=offset, timestamp_ms=None, key=None, value=value, headers=[]
    )
    documents.values[offset] = original.model_dump_json().encode()
    out = new_entry(
        partition=0, epoch=1, original=original, accepted=verdict, received_at=datetime.now(UTC)
    )
    out.document = DocumentAt(0, offset, 100)
    return out


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
        await asyncio.gather(*tasks, return_exceptions=True)


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
