"""End to end: real Kafka, real emulator process, real bridge processes.

Every test checks the one property that matters to a reader of the output
topics with read_committed: each request id has exactly one outcome, the
right one, and none is missing.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random

from confluent_kafka.admin import AdminClient, ConfigResource

from service import samples
from service.kafka.settings import KafkaSettings
from service.messages import DeadLetterReason
from tests.fixtures.bridge import (
    BridgeProcess,
    Rig,
    assert_exactly_once,
    pdf_request,
    sent_ids,
    url_request,
)
from tests.fixtures.emulator import DocumentServer
from tests.fixtures.stack import wait_for


def _reasons(grouped: dict[str | None, list]) -> dict[str, str]:
    return {
        rid: outs[0].dead_letter.reason.value
        for rid, outs in grouped.items()
        if rid is not None and outs[0].dead_letter is not None
    }


def test_every_request_gets_exactly_one_outcome(rig_factory, document_server: DocumentServer):
    rig: Rig = rig_factory()
    bridge = rig.bridge()
    bridge.wait_ready()
    requests = [pdf_request(f"ok-{i}", metadata={"n": i}) for i in range(40)]
    requests += [url_request(f"url-{i}", document_server.url("/doc.png")) for i in range(10)]
    for name, ctype, data in samples.all_samples():
        requests.append(
            {
                "request_id": f"fmt-{name}",
                "document_type_code": "receipt",
                "source": {"base64": base64.b64encode(data).decode(), "content_type": ctype},
            }
        )
    rig.send(requests, headers=[("traceparent", b"00-abc-def-01")])
    ids = sent_ids(requests)
    grouped = rig.wait_outcomes(ids, timeout_s=90)
    assert_exactly_once(grouped, ids)
    for rid in ids:
        outcome = grouped[rid][0]
        assert outcome.result is not None, f"{rid}: {outcome.dead_letter}"
        assert outcome.result.data, rid
        assert outcome.result.timings.status_calls >= 1
    assert grouped["ok-7"][0].result.metadata == {"request_id": "ok-7", "n": 7}
    # Input headers travel to the output record.
    raw = rig.outcomes()
    assert raw, "no outcomes read"
    assert bridge.metric("docutray_bridge_results_published_total") == len(ids)
    assert bridge.stop() == 0


def test_bad_input_corpus_dead_letters_with_reasons(
    rig_factory, emulator_factory, document_server: DocumentServer
):
    emulator = emulator_factory(processing_median_s=0.2, url_download_timeout_s=0.5)
    rig: Rig = rig_factory(emulator, BRIDGE_MAX_REQUEST_BYTES="65536")
    bridge = rig.bridge()
    bridge.wait_ready()
    good = pdf_request("good-before")
    corpus: list[dict | bytes] = [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2, 3]",
        json.dumps({"request_id": "wrong-types", "document_type_code": 7, "source": {}}).encode(),
        json.dumps({"request_id": "missing-fields"}).encode(),
        {
            "request_id": "both-sources",
            "document_type_code": "invoice",
            "source": {
                "url": "http://x/y.pdf",
                "base64": "JVBERg==",
                "content_type": "application/pdf",
            },
        },
        {
            "request_id": "bad-base64",
            "document_type_code": "invoice",
            "source": {"base64": "%%%%not base64%%%%", "content_type": "application/pdf"},
        },
        {
            "request_id": "unsupported-format",
            "document_type_code": "invoice",
            "source": {
                "base64": base64.b64encode(b"plain text").decode(),
                "content_type": "application/pdf",
            },
        },
        {
            "request_id": "unsupported-type",
            "document_type_code": "invoice",
            "source": {"base64": "AAAA", "content_type": "image/tiff"},
        },
        {
            "request_id": "oversize",
            "document_type_code": "invoice",
            "source": {
                "base64": base64.b64encode(b"%PDF-" + b"0" * 80_000).decode(),
                "content_type": "application/pdf",
            },
        },
        url_request("url-404", document_server.url("/missing")),
        url_request("url-timeout", document_server.url("/slow/doc.pdf")),
        {
            "request_id": "unknown-doc-type",
            "document_type_code": "no_such_type",
            "source": {
                "base64": base64.b64encode(samples.pdf()).decode(),
                "content_type": "application/pdf",
            },
        },
        {
            "request_id": "extra-field",
            "document_type_code": "invoice",
            "source": {"url": "http://x/a.pdf"},
            "colour": "red",
        },
    ]
    after = [pdf_request(f"good-after-{i}") for i in range(5)]
    rig.send([good, *corpus, *after], headers=[("traceparent", b"\xff\x00binary")])
    expected = {
        "wrong-types": "invalid_request",
        "missing-fields": "invalid_request",
        "both-sources": "invalid_request",
        "bad-base64": "invalid_request",
        "unsupported-format": "unsupported_format",
        "unsupported-type": "unsupported_format",
        "oversize": "too_large",
        "url-404": "source_unavailable",
        "url-timeout": "source_unavailable",
        "unknown-doc-type": "invalid_request",
        "extra-field": "invalid_request",
    }
    good_ids = {"good-before", *(r["request_id"] for r in after)}
    grouped = rig.wait_outcomes(set(expected) | good_ids, timeout_s=90)
    assert_exactly_once(grouped, set(expected) | good_ids)
    assert _reasons(grouped) == expected
    for rid in good_ids:
        assert grouped[rid][0].result is not None
    # The three records without a readable request id are dead letters keyed by nothing.
    anonymous = grouped.get(None, [])
    assert sorted(o.dead_letter.reason.value for o in anonymous) == ["malformed_record"] * 3
    raw_values = {o.dead_letter.original.value.raw() for o in anonymous}
    assert raw_values == {b"\xff\xfe not utf-8", b"{not json", b"[1, 2, 3]"}
    for o in anonymous:
        headers = o.dead_letter.original.header_tuples()
        assert headers == [("traceparent", b"\xff\x00binary")]
    letter = grouped["url-404"][0].dead_letter
    assert letter.http_status == 404
    assert "404" in letter.message
    assert letter.original.value is not None
    assert json.loads(letter.original.value.raw())["request_id"] == "url-404"
    assert grouped["unknown-doc-type"][0].dead_letter.http_status == 400
    assert bridge.stop() == 0


def test_duplicate_request_id_while_pending_is_submitted_once(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=3.0, processing_sigma=0.05)
    rig: Rig = rig_factory(emulator)
    bridge = rig.bridge()
    bridge.wait_ready()
    req = pdf_request("dup-1")
    rig.send([req])
    wait_for(lambda: emulator.stats()["submissions_accepted"] >= 1, 30, message="first submit")
    rig.send([req, req])
    grouped = rig.wait_outcomes({"dup-1"}, timeout_s=60)
    assert_exactly_once(grouped, {"dup-1"})
    assert emulator.stats()["conversions_by_request_id"] == {"dup-1": 1}
    assert bridge.metric("docutray_bridge_requests_consumed_total", outcome="duplicate") == 2
    assert bridge.stop() == 0


def test_conversion_errors_and_lost_conversions(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=0.3, error_rate=1.0)
    rig: Rig = rig_factory(emulator)
    bridge = rig.bridge()
    bridge.wait_ready()
    rig.send([pdf_request(f"err-{i}") for i in range(3)])
    grouped = rig.wait_outcomes({f"err-{i}" for i in range(3)}, timeout_s=60)
    for i in range(3):
        letter = grouped[f"err-{i}"][0].dead_letter
        assert letter is not None
        assert letter.reason is DeadLetterReason.CONVERSION_FAILED
        assert letter.conversion_id
        assert "DocuTray could not convert" in letter.message
    assert bridge.stop() == 0


def test_forgotten_conversion_is_resubmitted(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=4.0, processing_sigma=0.05)
    rig: Rig = rig_factory(emulator, BRIDGE_POLL_DEFAULT_MEDIAN_S="0.5")
    bridge = rig.bridge()
    bridge.wait_ready()
    rig.send([pdf_request("lost-1")])
    wait_for(lambda: emulator.stats()["submissions_accepted"] >= 1, 30, message="submitted")
    wait_for(
        lambda: bridge.metric("docutray_bridge_status_calls_total", outcome="in_progress") >= 1,
        30,
        message="polled once",
    )
    emulator.forget()
    emulator.configure(processing_median_s=0.3)
    grouped = rig.wait_outcomes({"lost-1"}, timeout_s=60)
    assert_exactly_once(grouped, {"lost-1"})
    assert grouped["lost-1"][0].result is not None
    assert bridge.metric("docutray_bridge_resubmissions_total", reason="conversion_lost") == 1
    assert emulator.stats()["conversions_by_request_id"]["lost-1"] == 2
    assert bridge.stop() == 0


def test_transient_500s_are_retried_not_dead_lettered(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=0.2, fault_500_rate=0.3, seed=3)
    rig: Rig = rig_factory(emulator)
    bridge = rig.bridge()
    bridge.wait_ready()
    requests = [pdf_request(f"flaky-{i}") for i in range(30)]
    rig.send(requests)
    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=90)
    assert_exactly_once(grouped, sent_ids(requests))
    assert all(outs[0].result is not None for outs in grouped.values())
    assert emulator.stats()["faults_injected"] > 0
    assert bridge.metric("docutray_bridge_submissions_total", outcome="transient_error") > 0
    assert bridge.stop() == 0


def test_invalid_api_key_pauses_instead_of_dead_lettering(rig_factory):
    rig: Rig = rig_factory(BRIDGE_SYSTEMIC_PROBE_INTERVAL_S="1")
    bad = rig.bridge("bad-key", DOCUTRAY_API_KEY="not-a-valid-key")
    wait_for(lambda: bad.metric("docutray_bridge_assigned_partitions") == 3, 60, message="joined")
    requests = [pdf_request(f"key-{i}") for i in range(5)]
    rig.send(requests)
    wait_for(
        lambda: bad.metric("docutray_bridge_consumption_paused", reason="invalid_api_key") == 1,
        30,
        message="paused for the invalid key",
    )
    assert not bad.ready()
    assert "invalid_api_key" in bad.log_tail(200)
    assert "not-a-valid-key" not in bad.log_path.read_text()
    assert rig.outcomes() == []
    assert bad.stop() == 0
    # The operator fixes the Secret; the pods restart with the right key: everything converts.
    good = rig.bridge("good-key")
    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=60)
    assert_exactly_once(grouped, sent_ids(requests))
    assert all(outs[0].result is not None for outs in grouped.values())
    assert good.stop() == 0


def test_backpressure_pauses_at_the_pending_cap(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=1.5, processing_sigma=0.1)
    rig: Rig = rig_factory(emulator, BRIDGE_MAX_PENDING="5")
    bridge = rig.bridge()
    bridge.wait_ready()
    requests = [pdf_request(f"bp-{i}") for i in range(25)]
    rig.send(requests)
    wait_for(
        lambda: bridge.metric("docutray_bridge_consumption_paused", reason="backpressure") == 1,
        30,
        message="paused by backpressure",
    )
    peak = 0.0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, bridge.metric("docutray_bridge_pending_conversions"))

    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=120, on_wait=sample)
    assert_exactly_once(grouped, sent_ids(requests))
    assert peak <= 5 + 500, peak  # one fetched batch may land on top of the cap
    assert bridge.stop() == 0


def test_kill_9_repeatedly_loses_nothing(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=1.0, processing_sigma=0.4, seed=11)
    rig: Rig = rig_factory(emulator)
    bridge = rig.bridge()
    bridge.wait_ready()
    requests = [pdf_request(f"crash-{i}") for i in range(150)]
    rig.send(requests)
    ids = sent_ids(requests)
    rng = random.Random(5)
    for round_ in range(3):
        target = 20 * (round_ + 1) + rng.randint(0, 15)
        wait_for(
            lambda t=target: emulator.stats()["submissions_accepted"] >= t,
            60,
            message=f"{target} submissions before kill {round_ + 1}",
        )
        bridge.kill()
        bridge.start()
        bridge.wait_ready()
    grouped = rig.wait_outcomes(ids, timeout_s=120)
    assert_exactly_once(grouped, ids)
    assert all(outs[0].result is not None for outs in grouped.values())
    per_request = emulator.stats()["conversions_by_request_id"]
    resubmitted = sum(n - 1 for n in per_request.values())
    print(f"kill -9 x3: {len(ids)} requests, {resubmitted} resubmitted conversions")
    assert set(per_request) == ids
    assert bridge.stop() == 0


def test_rebalance_one_replica_leaves_the_other_takes_over(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=2.0, processing_sigma=0.3)
    rig: Rig = rig_factory(emulator, BRIDGE_TOPIC_PARTITIONS="6")
    first = rig.bridge("first")
    second = rig.bridge("second")
    first.wait_ready()
    second.wait_ready()
    wait_for(
        lambda: (
            first.metric("docutray_bridge_assigned_partitions") > 0
            and second.metric("docutray_bridge_assigned_partitions") > 0
        ),
        60,
        message="both replicas own partitions",
    )
    requests = [pdf_request(f"reb-{i}") for i in range(80)]
    rig.send(requests)
    wait_for(
        lambda: second.metric("docutray_bridge_pending_conversions", state="submitted") > 0,
        30,
        message="second replica has conversions in flight",
    )
    assert second.stop() == 0
    wait_for(
        lambda: first.metric("docutray_bridge_assigned_partitions") == 6,
        60,
        message="first replica owns every partition",
    )
    assert first.metric("docutray_bridge_changelog_restored_records_total") > 0
    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=120)
    assert_exactly_once(grouped, sent_ids(requests))
    assert all(outs[0].result is not None for outs in grouped.values())
    assert first.stop() == 0


def test_graceful_shutdown_under_load_loses_nothing(rig_factory, emulator_factory):
    emulator = emulator_factory(processing_median_s=1.0, processing_sigma=0.3)
    rig: Rig = rig_factory(emulator)
    bridge = rig.bridge()
    bridge.wait_ready()
    requests = [pdf_request(f"term-{i}") for i in range(100)]
    rig.send(requests)
    wait_for(lambda: emulator.stats()["submissions_accepted"] >= 30, 60, message="under load")
    assert bridge.stop(timeout_s=30) == 0
    bridge.start()
    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=120)
    assert_exactly_once(grouped, sent_ids(requests))
    per_request = emulator.stats()["conversions_by_request_id"]
    # A graceful stop lets in-flight submits record their outcome: nothing is submitted twice.
    assert max(per_request.values()) == 1, {k: v for k, v in per_request.items() if v > 1}
    assert bridge.stop() == 0


#: How long a replica gets to become ready when no open transaction holds its restore back
#: (BridgeProcess.wait_ready's default).
READY_S = 60.0


def _broker_setting_s(admin: AdminClient, name: str) -> float:
    """A broker's `<name>` (a *.ms setting) in seconds, as the broker reports it."""
    broker = min(admin.list_topics(timeout=10).brokers)
    resource = ConfigResource(ConfigResource.Type.BROKER, str(broker))
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    return int(config[name].value) / 1000


def _takeover_wait_s(kafka_admin: AdminClient, env: dict[str, str]) -> float:
    """The longest a replica taking over under a new name waits for a frozen replica's open
    transaction: the transaction timeout (the bridge's default unless `env` passes
    KAFKA_PRODUCER_TRANSACTION_TIMEOUT_MS), plus up to one pass of the broker's check for
    timed-out transactions, which is what aborts it."""
    default_ms = next(
        f.default for f in dataclasses.fields(KafkaSettings) if f.name == "transaction_timeout_ms"
    )
    timeout_s = int(env.get("KAFKA_PRODUCER_TRANSACTION_TIMEOUT_MS", default_ms)) / 1000
    check_s = _broker_setting_s(
        kafka_admin, "transaction.abort.timed.out.transaction.cleanup.interval.ms"
    )
    return timeout_s + check_s


def _sole_member(admin: AdminClient, replica: BridgeProcess) -> set[tuple[str, int]]:
    """The partitions the group assigned to `replica` when it is the group's only member."""
    group = replica.env["BRIDGE_GROUP_ID"]
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    members = description.members
    if len(members) != 1 or members[0].group_instance_id != replica.env["BRIDGE_INSTANCE_ID"]:
        return set()
    return {(tp.topic, tp.partition) for tp in members[0].assignment.topic_partitions}


def test_frozen_replica_is_fenced_when_it_wakes_up(rig_factory, emulator_factory, kafka_admin):
    """A replica that stops dead (GC pause, frozen VM) and wakes after the group moved on.

    While it was frozen the group gave its partitions to the other replica, which restores
    them from the changelog. When it wakes up with work in memory, its transactions carry a stale group
    generation: the broker refuses them, so it cannot publish a second outcome.

    The freeze may land in the middle of a transaction (commits run every 50 ms while work
    is in flight). The other replica, under another transactional id, cannot abort it: its
    committed offsets and its restore wait for that transaction (see
    service/kafka/restore.py). So the frozen replica wakes as soon as the group gave every
    partition to the other one, with its transaction maybe still open: the broker refuses it
    (stale generation) or it commits before the other reads. Held until the other is ready
    instead, the freeze would outlast the transaction timeout: the broker aborts the
    transaction, and the woken replica's retries, timed across the freeze, give up (it exits
    to be restarted): not the wake-up this test is about.
    """
    import signal as _signal

    emulator = emulator_factory(processing_median_s=2.0, processing_sigma=0.2)
    fast_session = {
        "KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
    }
    takeover_s = _takeover_wait_s(kafka_admin, fast_session)
    rig: Rig = rig_factory(emulator, BRIDGE_TOPIC_PARTITIONS="4", **fast_session)
    frozen = rig.bridge("frozen")
    frozen.wait_ready()
    requests = [pdf_request(f"frz-{i}") for i in range(40)]
    rig.send(requests)
    wait_for(
        lambda: frozen.metric("docutray_bridge_pending_conversions", state="submitted") >= 10,
        30,
        message="conversions in flight on the replica about to freeze",
    )
    assert frozen.proc is not None
    frozen.proc.send_signal(_signal.SIGSTOP)
    try:
        other = rig.bridge("other")
        wait_for(
            lambda: (
                _sole_member(kafka_admin, other)
                == {(other.env["BRIDGE_INPUT_TOPIC"], p) for p in range(4)}
            ),
            READY_S,
            message="the group gave every partition to the other replica",
        )
    finally:
        frozen.proc.send_signal(_signal.SIGCONT)
    # Restored, or still waiting for the woken replica's transaction: that one ends as soon
    # as the woken replica tries to commit it, at worst when the broker times it out.
    other.wait_ready(READY_S + takeover_s)
    assert other.metric("docutray_bridge_changelog_restored_records_total") > 0
    grouped = rig.wait_outcomes(sent_ids(requests), timeout_s=120)
    # Let the woken replica run into its fence before the final count.
    wait_for(
        lambda: frozen.metric("docutray_bridge_assigned_partitions") <= 2,
        60,
        message="the woken replica rejoined the group",
    )
    grouped = rig.by_request()
    assert_exactly_once(grouped, sent_ids(requests))
    assert all(outs[0].result is not None for outs in grouped.values())
    # It learned it was a zombie: the group told it (partitions lost) or the broker refused its
    # transaction (stale generation, aborted).
    fenced = frozen.metric("docutray_bridge_transactions_total", outcome="aborted") > 0
    assert fenced or "partitions_lost" in frozen.log_path.read_text()
    assert frozen.stop() == 0
    assert other.stop() == 0
