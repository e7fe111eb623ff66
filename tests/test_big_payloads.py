"""Documents and results of real size, on a broker with Kafka's default limits (issue 12).

The local broker runs with Kafka's defaults (1 MB records unless a topic says more), as
users' clusters do. Real processes throughout.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from service import samples
from tests.fixtures.bridge import BridgeProcess, Rig, assert_exactly_once, pdf_request
from tests.fixtures.emulator import EmulatorStarter
from tests.fixtures.stack import wait_for

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588


def _rss_mb(proc: BridgeProcess) -> float:
    assert proc.proc is not None
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


def _send_to_partition(rig: Rig, requests: list[dict[str, Any]], partition: int) -> None:
    producer = Producer({"bootstrap.servers": rig.bootstrap, "message.max.bytes": 33554432})
    for req in requests:
        value = json.dumps(req).encode()
        producer.produce(
            rig.input_topic, key=req["request_id"].encode(), value=value, partition=partition
        )
    assert producer.flush(60) == 0


def test_a_result_over_the_topic_limit_is_dead_lettered_and_nothing_else_is_touched(
    rig_factory: Any,
) -> None:
    """A 3 MB result on a results topic at Kafka's default 1 MB: `result_too_large`, once.

    Before: the broker refused the record, the transaction aborted, every partition was
    reset, and the same result was polled and refused again, forever.
    """
    rig: Rig = rig_factory()
    admin = AdminClient({"bootstrap.servers": rig.bootstrap})
    created = admin.create_topics(
        [
            NewTopic(
                rig.result_topic,
                num_partitions=3,
                replication_factor=1,
                config={"max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)},
            )
        ]
    )
    created[rig.result_topic].result(30)
    bridge = rig.bridge("b1")
    bridge.wait_ready()
    big = pdf_request("big-0", metadata={"echoed": "x" * 3_000_000})  # echoed in the result
    small = [pdf_request(f"small-{i}") for i in range(5)]
    _send_to_partition(rig, [big, *small], partition=0)
    ids = {"big-0"} | {r["request_id"] for r in small}
    grouped = rig.wait_outcomes(ids, 90)
    assert_exactly_once(grouped, ids)
    letter = grouped["big-0"][0].dead_letter
    assert letter is not None
    assert letter.reason == "result_too_large"
    assert letter.conversion_id
    assert "bytes the results topic" in letter.message
    assert "max.message.bytes" in letter.message
    assert all(grouped[rid][0].result is not None for rid in ids - {"big-0"})
    assert bridge.metric("docutray_bridge_transactions_total", outcome="aborted") == 0
    assert bridge.metric("docutray_bridge_dead_letters_total", reason="result_too_large") == 1


@pytest.mark.timeout(900)  # 1.2 GB through Kafka on two cores
def test_megabyte_documents_wait_in_kafka_not_in_memory(
    rig_factory: Any, emulator_factory: EmulatorStarter
) -> None:
    """600 pending requests of 1 MB inline documents: the replica stays small, and a
    kill -9 brings it back ready at once (it restores states, not documents).

    Before: each pending entry kept its whole document; 600 of 1.33 MB took 1.76 GB.
    """
    emulator = emulator_factory(processing_median_s=0.2)
    rig: Rig = rig_factory(
        emulator,
        BRIDGE_SUBMIT_RATE_PER_MINUTE="1",
        BRIDGE_RATE_BURST="1",
        BRIDGE_MEMORY_BUDGET_MB="256",
        BRIDGE_MAX_REQUEST_BYTES=str(4 * 1024 * 1024),
    )
    bridge = rig.bridge("b1")
    bridge.wait_ready()
    document = base64.b64encode(samples.pdf("big") + os.urandom(1024 * 1024)).decode()
    requests = [
        {
            **pdf_request(f"mb-{i}"),
            "source": {"base64": document, "content_type": "application/pdf"},
        }
        for i in range(600)
    ]
    for start in range(0, 600, 100):  # a producer's batches: not 800 MB in this process at once
        rig.send(requests[start : start + 100])
    peak = 0.0

    def all_pending() -> bool:
        nonlocal peak
        peak = max(peak, _rss_mb(bridge))
        return bridge.metric("docutray_bridge_pending_conversions") >= 599

    wait_for(all_pending, 300, interval_s=0.5, message="600 requests pending")
    assert peak < 256, f"RSS peaked at {peak:.0f} MB while 600 MB of documents arrived"

    bridge.kill()
    again = rig.bridge("b1-again", BRIDGE_INSTANCE_ID=bridge.env["BRIDGE_INSTANCE_ID"])
    again.wait_ready(60)
    wait_for(  # the pending gauges refresh twice a second
        lambda: again.metric("docutray_bridge_pending_conversions") >= 599,
        10,
        message="the restarted replica holds the 600 pending requests again",
    )
    assert _rss_mb(again) < 256
    assert again.metric("docutray_bridge_memory_held_bytes", kind="pending") < 2 * 1024 * 1024
