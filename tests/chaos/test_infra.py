"""Chaos 2 and 3: the Kafka broker, then Redis, stopped and restarted mid-run.

Both run against a Kafka and a Redis of this module's own (`private_stack`), so the
tests sharing the main stack never see the outage.
"""

from __future__ import annotations

from tests.chaos.conftest import PrivateStack
from tests.chaos.harness import ChaosFactory, Scenario
from tests.fixtures.bridge import pdf_request


def test_kafka_broker_stopped_and_restarted(
    chaos: ChaosFactory, private_stack: PrivateStack
) -> None:
    s: Scenario = chaos(
        "kafka broker restart",
        emulator_knobs={"processing_median_s": 1.0, "processing_sigma": 0.4, "seed": 8},
        # A bridge whose producer hits a fatal error exits non-zero; one whose Kafka thread
        # hangs fails /healthz. The harness restarts both as Kubernetes would, and counts.
        max_restarts=6,
        liveness_probe=True,
        BRIDGE_HEARTBEAT_TIMEOUT_S="10",
        KAFKA_BOOTSTRAP_SERVERS=private_stack.bootstrap,
        REDIS_URL=private_stack.redis_url,
        BRIDGE_TOPIC_PARTITIONS="4",
    )
    b1 = s.bridge("b1")
    b2 = s.bridge("b2")
    s.ready(b1)
    s.ready(b2)
    s.send([pdf_request(f"kb-{i}") for i in range(100)])
    s.wait_until(lambda: len(s.outcomes()) >= 20, 60, "a first part of the results is published")
    s.fault("kafka broker stopped")
    private_stack.ctl("stop", "kafka")
    s.hold(8.0, "broker down: the bridge keeps polling DocuTray, Kafka calls fail")
    private_stack.ctl("start", "kafka")
    s.note("kafka broker started again")
    s.send([pdf_request(f"ka-{i}") for i in range(40)])
    s.finish(timeout_s=150)


def test_redis_stopped_and_restarted(chaos: ChaosFactory, private_stack: PrivateStack) -> None:
    s: Scenario = chaos(
        "redis restart",
        emulator_knobs={"processing_median_s": 0.5, "processing_sigma": 0.3, "seed": 9},
        KAFKA_BOOTSTRAP_SERVERS=private_stack.bootstrap,
        REDIS_URL=private_stack.redis_url,
        BRIDGE_SUBMIT_RATE_PER_MINUTE="1200",
        BRIDGE_STATUS_RATE_PER_MINUTE="2400",
        BRIDGE_EXPECTED_REPLICAS="2",
    )
    b1 = s.bridge("b1")
    s.ready(b1)
    s.send([pdf_request(f"rb-{i}") for i in range(40)])
    s.wait_until(lambda: len(s.outcomes()) >= 10, 60, "results flow with Redis up")
    assert s.metric(b1, "docutray_bridge_limiter_degraded") == 0
    s.fault("redis stopped")
    private_stack.ctl("stop", "redis")
    s.send([pdf_request(f"rd-{i}") for i in range(40)])
    s.wait_until(
        lambda: s.metric(b1, "docutray_bridge_limiter_degraded") == 1,
        30,
        "limiter degraded while Redis is down",
    )
    during = {f"rd-{i}" for i in range(40)}
    s.wait_until(
        lambda: len(during & {o.request_id for o in s.outcomes()}) >= 20,
        60,
        "requests keep converting on the local share while Redis is down",
    )
    assert s.metric(b1, "docutray_bridge_limiter_degraded") == 1, "Redis came back by itself?"
    private_stack.ctl("start", "redis")
    s.note("redis started again")
    s.wait_until(
        lambda: s.metric(b1, "docutray_bridge_limiter_degraded") == 0,
        30,
        "limiter back on Redis",
    )
    s.send([pdf_request(f"ra-{i}") for i in range(40)])
    s.finish(timeout_s=90)
