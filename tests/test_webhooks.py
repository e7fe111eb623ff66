"""Unit tests of the plan's pure pieces: webhook parsing and routing, the endpoint's hardening,
the fallback poll policy, the reserved metadata key at intake, a 402's verdict."""

from __future__ import annotations

import base64
import json
import random
import warnings
from typing import Any

import pytest

from service import samples
from service.docutray import QuotaExhausted
from service.intake import Accepted, Rejected, parse_record
from service.messages import ROUTE_METADATA_KEY, DeadLetterReason
from service.outcomes import SYSTEMIC_PAUSES, classify_status_error, classify_submit_error
from service.scheduler import DurationModel
from service.webhooks import (
    Completion,
    FallbackPollPolicy,
    WebhookReceiver,
    _SourceLimiter,
    parse_completion,
    parse_webhook,
    routed_metadata,
)

with warnings.catch_warnings():
    # Starlette 1.x nags about preferring `httpx2`; httpx is what the project pins.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient

ROUTE = {ROUTE_METADATA_KEY: {"request_id": "req-1", "partition": 2}}


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_a_completed_webhook_routes_to_its_request_and_partition() -> None:
    parsed = parse_webhook(
        body(
            conversion_id="cv1",
            status="SUCCESS",
            data={"total": 1},
            document_metadata={"mine": 1, **ROUTE},
        )
    )
    assert parsed == Completion("cv1", "req-1", 2)
    assert parse_completion(parsed.to_json(), 2) == parsed


def test_failed_wrapped_and_string_metadata_webhooks_route_too() -> None:
    assert parse_webhook(
        body(conversion_id="cv", status="ERROR", document_metadata=ROUTE)
    ) == Completion("cv", "req-1", 2)
    wrapped = body(
        event="CONVERSION_COMPLETED",
        data={"conversion_id": "cv", "document_metadata": ROUTE},
    )
    assert parse_webhook(wrapped) == Completion("cv", "req-1", 2)
    as_text = body(conversion_id="cv", status="SUCCESS", document_metadata=json.dumps(ROUTE))
    assert parse_webhook(as_text) == Completion("cv", "req-1", 2)


@pytest.mark.parametrize(
    ("raw", "outcome"),
    [
        (b"not json", "invalid"),
        (b"[1, 2]", "invalid"),
        (body(status="SUCCESS"), "invalid"),
        (body(conversion_id="x" * 300, status="SUCCESS"), "invalid"),
        (body(conversion_id="cv", status="PROCESSING", document_metadata=ROUTE), "ignored"),
        (body(event="CONVERSION_STARTED", data={"conversion_id": "cv"}), "ignored"),
        (body(conversion_id="cv", status="SUCCESS"), "unrouted"),
        (body(conversion_id="cv", status="SUCCESS", document_metadata={"a": 1}), "unrouted"),
        (
            body(
                conversion_id="cv",
                status="SUCCESS",
                document_metadata={ROUTE_METADATA_KEY: {"request_id": "r", "partition": True}},
            ),
            "unrouted",
        ),
        (
            body(
                conversion_id="cv",
                status="SUCCESS",
                document_metadata={ROUTE_METADATA_KEY: {"request_id": "r", "partition": -1}},
            ),
            "unrouted",
        ),
    ],
)
def test_what_is_not_a_routable_completion_is_counted(raw: bytes, outcome: str) -> None:
    assert parse_webhook(raw) == outcome


def test_routed_metadata_keeps_the_requests_own_keys() -> None:
    out = routed_metadata({"a": 1}, request_id="r", partition=4)
    assert out == {"a": 1, ROUTE_METADATA_KEY: {"request_id": "r", "partition": 4}}
    assert routed_metadata(None, request_id="r", partition=0)[ROUTE_METADATA_KEY]["partition"] == 0


def test_a_request_using_the_reserved_key_is_rejected_at_intake() -> None:
    request = {
        "request_id": "r1",
        "document_type_code": "invoice",
        "source": {
            "base64": base64.b64encode(samples.pdf("x")).decode(),
            "content_type": "application/pdf",
        },
        "metadata": {ROUTE_METADATA_KEY: "mine"},
    }
    verdict = parse_record(
        json.dumps(request).encode(), max_request_bytes=10**7, max_document_bytes=10**7
    )
    assert isinstance(verdict, Rejected)
    assert verdict.reason is DeadLetterReason.INVALID_REQUEST
    assert ROUTE_METADATA_KEY in verdict.message
    request["metadata"] = {"other": 1}
    ok = parse_record(
        json.dumps(request).encode(), max_request_bytes=10**7, max_document_bytes=10**7
    )
    assert isinstance(ok, Accepted)


def test_a_402_pauses_submissions_for_the_quota_not_consumption() -> None:
    exc = QuotaExhausted("quota", endpoint="submit", status_code=402)
    verdict = classify_submit_error(exc, url_timeouts=0)
    assert verdict.action == "pause"
    assert verdict.pause == "quota_exhausted"
    assert classify_status_error(exc).pause == "quota_exhausted"
    assert "quota_exhausted" not in SYSTEMIC_PAUSES  # the systemic probe does not clear it


def test_fallback_policy_spaces_status_calls_at_least_the_floor() -> None:
    policy = FallbackPollPolicy(floor_s=30.0, model=DurationModel(default_median_s=5.0))
    rng = random.Random(1)
    assert policy.first_delay_s("invoice", rng=rng) >= 30.0
    assert policy.first_delay_s("invoice", rng=rng, remaining_s=10.0) == 10.0
    later = policy.next_delay_s(
        "invoice", elapsed_s=31.0, polls_done=1, remaining_s=1000.0, rng=rng
    )
    assert later >= 30.0
    # Restored before its first call, 20 s after submit: the first call 10 s from now.
    restored = policy.next_delay_s(
        "invoice", elapsed_s=20.0, polls_done=0, remaining_s=1000.0, rng=rng
    )
    assert restored == pytest.approx(10.0, abs=0.01)


def test_source_limiter_caps_each_source_and_refills() -> None:
    limiter = _SourceLimiter(rate_per_s=2.0)
    allowed = [limiter.allow("a", 0.0) for _ in range(10)]
    assert allowed.count(True) == 4  # burst: twice the rate
    assert limiter.allow("b", 0.0)  # another source has its own bucket
    assert limiter.allow("a", 0.6)  # refilled one token after 0.5 s


class FakeProducer:
    def __init__(self, *, fail: bool = False) -> None:
        self.sent: list[tuple[str, Completion]] = []
        self.fail = fail

    async def produce(self, topic: str, completion: Completion) -> None:
        if self.fail:
            raise RuntimeError("Local: Message timed out")
        self.sent.append((topic, completion))


def client_for(producer: FakeProducer, **kwargs: Any) -> TestClient:
    receiver = WebhookReceiver(
        topic="g.completions",
        partitions=3,
        producer=producer,  # type: ignore[arg-type]
        max_body_bytes=kwargs.pop("max_body_bytes", 4096),
        rate_per_source=kwargs.pop("rate_per_source", 100.0),
    )
    return TestClient(receiver.app())


def test_endpoint_produces_a_routed_completion_then_answers_200() -> None:
    producer = FakeProducer()
    client = client_for(producer)
    good = {"conversion_id": "cv", "status": "SUCCESS", "document_metadata": ROUTE}
    response = client.post("/webhooks/docutray", json=good)
    assert response.status_code == 200
    assert response.json() == {"outcome": "routed"}
    assert producer.sent == [("g.completions", Completion("cv", "req-1", 2))]
    # A partition this topic does not have: not ours, nothing produced.
    beyond = {ROUTE_METADATA_KEY: {"request_id": "r", "partition": 7}}
    response = client.post("/webhooks/docutray", json={**good, "document_metadata": beyond})
    assert response.json() == {"outcome": "unrouted"}
    assert len(producer.sent) == 1
    assert client.get("/webhooks/docutray").status_code == 405


def test_endpoint_answers_503_when_kafka_did_not_take_it() -> None:
    client = client_for(FakeProducer(fail=True))
    good = {"conversion_id": "cv", "status": "SUCCESS", "document_metadata": ROUTE}
    assert client.post("/webhooks/docutray", json=good).status_code == 503


def test_endpoint_caps_body_size_and_rate() -> None:
    producer = FakeProducer()
    client = client_for(producer, max_body_bytes=1024, rate_per_source=1.0)
    assert client.post("/webhooks/docutray", content=b"x" * 2000).status_code == 413
    assert client.post("/webhooks/docutray", content=b"{}").status_code == 400
    assert client.post("/webhooks/docutray", content=b"{}").status_code == 429
    assert producer.sent == []
