"""Exactly once in the shapes production has: dangling transactions, re-sends, id reuse.

Real processes throughout: the broker, Redis, the emulator and `docutray-bridge run`
replicas. Each test is the shape that exposed a bug (issue 11): it failed before the fix.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
from confluent_kafka import KafkaException, Producer

from tests.fixtures.bridge import (
    BridgeProcess,
    Rig,
    assert_exactly_once,
    pdf_request,
    sent_ids,
)
from tests.fixtures.emulator import EmulatorStarter
from tests.fixtures.stack import wait_for


def _pending(proc: BridgeProcess) -> int:
    body = httpx.get(proc.url("/readyz"), timeout=5).json()
    return sum(body.get("pending", {}).values())


def _conversions(rig: Rig, ids: set[str]) -> dict[str, int]:
    counts: dict[str, int] = rig.emulator.stats()["conversions_by_request_id"]
    return {rid: n for rid, n in counts.items() if rid in ids}


def _dangling_transaction(rig: Rig, changelog: str, partitions: int) -> Producer:
    """Another producer opens a transaction on every changelog partition and never ends it.

    That is what a replica killed inside a commit and replaced under another name leaves
    behind, until Kafka aborts it after transaction.timeout.ms (60 s here).
    """
    producer = Producer(
        {
            "bootstrap.servers": rig.bootstrap,
            "transactional.id": f"{changelog}-dangler",
            "transaction.timeout.ms": 60_000,
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for p in range(partitions):
        producer.produce(changelog, key=b"dangler", value=b"{}", partition=p)
    assert producer.flush(30) == 0
    return producer


def test_restore_waits_for_a_dangling_transaction(
    rig_factory: Any, emulator_factory: EmulatorStarter
) -> None:
    """A replica joining while a transaction is open reads everything committed after it.

    Before the fix a restore stopped at the last stable offset: requests finished after the
    dangling transaction came back as pending (second outcome), and requests accepted after
    it had committed offsets but no state (no outcome at all).
    """
    emulator = emulator_factory(
        processing_median_s=0.2, processing_median_s_by_type={"receipt": 6.0}
    )
    rig: Rig = rig_factory(emulator, BRIDGE_RESTORE_TIMEOUT_S="30")
    changelog = f"{rig.base_env['BRIDGE_GROUP_ID']}.pending-changelog"
    first = rig.bridge("b1")
    first.wait_ready()

    batch_a = [pdf_request(f"a-{i}", document_type_code="receipt") for i in range(12)]
    rig.send(batch_a)
    wait_for(lambda: _pending(first) == 12, 30, message="batch A pending on b1")
    dangler = _dangling_transaction(rig, changelog, 3)
    try:
        rig.wait_outcomes(sent_ids(batch_a), 90)  # A finishes above the open transaction
        batch_b = [pdf_request(f"b-{i}", document_type_code="receipt") for i in range(12)]
        rig.send(batch_b)
        wait_for(lambda: _pending(first) == 12, 30, message="batch B pending on b1")

        second = rig.bridge("b2")  # a new name: nothing aborts the dangling transaction early
        ids = sent_ids(batch_a) | sent_ids(batch_b)
        grouped = rig.wait_outcomes(ids, 150)
        wait_for(
            lambda: second.ready() and first.ready() and _pending(first) + _pending(second) == 0,
            120,
            message="both replicas ready and idle",
        )
        assert_exactly_once(rig.by_request(), ids)
        assert all(len(grouped[rid]) == 1 for rid in ids)
        assert "restore_waiting_for_open_transaction" in second.log_path.read_text(), (
            "b2 never waited for the open transaction: the test did not exercise the shape"
        )
        conversions = _conversions(rig, ids)
        assert conversions == dict.fromkeys(ids, 1), "a request was converted twice"
    finally:
        # Kafka has aborted it by now (the producer is fenced): nothing left to end.
        with contextlib.suppress(KafkaException):
            dangler.abort_transaction(5)


def test_resends_cost_nothing_and_id_reuse_is_named(rig_factory: Any) -> None:
    """Re-sent requests (byte for byte) cost no conversion and no second outcome, across a
    restart under a new name; a different request reusing an id gets request_id_conflict."""
    rig: Rig = rig_factory()
    first = rig.bridge("b1")
    first.wait_ready()
    requests = [pdf_request(f"r-{i}") for i in range(10)]
    ids = sent_ids(requests)
    rig.send(requests)
    rig.wait_outcomes(ids, 60)
    before = _conversions(rig, ids)
    assert before == dict.fromkeys(ids, 1)

    conflicting = pdf_request("r-0", metadata={"note": "a different request, same id"})
    assert json.dumps(conflicting) != json.dumps(requests[0])
    rig.send([*requests, conflicting])
    wait_for(
        lambda: (
            first.metric("docutray_bridge_requests_consumed_total", outcome="duplicate") == 10
            and len(rig.by_request().get("r-0", [])) == 2
        ),
        60,
        message="10 re-sends ignored and one conflict dead-lettered",
    )
    grouped = rig.by_request()
    assert sum(o.result is not None for o in grouped["r-0"]) == 1
    letter = next(o.dead_letter for o in grouped["r-0"] if o.dead_letter is not None)
    assert letter.reason == "request_id_conflict"
    assert "BRIDGE_DEDUPE_WINDOW_S" in letter.message
    assert all(len(grouped[rid]) == 1 for rid in ids - {"r-0"})
    assert _conversions(rig, ids) == before

    # The window lives in Kafka: a replacement under another name still knows the ids.
    first.kill()
    second = rig.bridge("b2")
    second.wait_ready(90)
    rig.send(requests)
    wait_for(
        lambda: second.metric("docutray_bridge_requests_consumed_total", outcome="duplicate") == 10,
        60,
        message="the re-sends after a restart are recognised",
    )
    assert second.metric("docutray_bridge_dedupe_remembered_requests") == 10
    assert _conversions(rig, ids) == before
    assert {rid: len(v) for rid, v in rig.by_request().items() if rid in ids} == {
        rid: 2 if rid == "r-0" else 1 for rid in ids
    }
