"""service.kafka.ownership in-process: taking partitions over and letting them go, no broker.

The order is the guarantee: the committed input offset is read before the state topics'
high watermarks, and the state is restored (and handed to the engine) only once the
stable offsets reach those watermarks; until then the partition is restoring (paused).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from service.dedupe import content_hash
from service.intake import Accepted, original_record, parse_record
from service.kafka import ownership as ownership_module
from service.kafka.calls import Calls
from service.kafka.effects import Effect, EngineHooks
from service.kafka.ownership import Ownership
from service.pending import DocumentAt, Entry, Unreadable, new_entry
from tests.fixtures.kafka_thread import kafka_settings

SETTINGS = kafka_settings()


def changelog_value(rid: str, partition: int) -> tuple[bytes, str]:
    """A pending request's changelog value, and its content hash."""
    value = json.dumps(
        {"request_id": rid, "document_type_code": "invoice", "source": {"url": "https://e/a.pdf"}}
    ).encode()
    verdict = parse_record(value, max_request_bytes=1 << 20, max_document_bytes=1 << 20)
    assert isinstance(verdict, Accepted)
    content = content_hash(verdict.request.model_dump(mode="json"))
    original = original_record(
        topic="in",
        partition=partition,
        offset=0,
        timestamp_ms=None,
        key=rid.encode(),
        value=value,
        headers=[],
    )
    entry = new_entry(
        partition=partition,
        epoch=1,
        original=original,
        accepted=verdict,
        received_at=datetime.now(UTC),
        content_hash=content,
    )
    entry.document = DocumentAt(partition, 0, 100)  # where the documents topic keeps it
    return entry.changelog_value(), content


class FakeConsumer:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.committed_at = {0: 5, 1: -1001}  # partition 1 has no committed offset yet
        self.seeks: list[tuple[int, int]] = []

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.log.append("committed")
        return [
            TopicPartition(tp.topic, tp.partition, self.committed_at[tp.partition]) for tp in tps
        ]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self.log.append("low_watermark")
        return (2, 9)

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, tp.offset))

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("in", 0), TopicPartition("in", 1)]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in tps]


class FakeReader:
    """The state topics: `records[topic][partition]` and a stable end that can lag."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.records: dict[str, dict[int, list[tuple[bytes, bytes | None]]]] = {
            "changelog": {0: [], 1: []},
            "dedupe": {0: [], 1: []},
        }
        self.lagging = 0  # how far the stable offsets trail the high watermarks

    def high_watermarks(self, topic: str, parts: list[int], *_: Any) -> dict[int, int]:
        self.log.append(f"high_watermarks:{topic}")
        return {p: len(self.records[topic][p]) for p in parts}

    def stable_offsets(self, topic: str, parts: list[int], *_: Any) -> dict[int, int]:
        return {p: len(self.records[topic][p]) - self.lagging for p in parts}

    def read(self, topic: str, until: dict[int, int], on_record: Any, **_: Any) -> None:
        self.log.append(f"read:{topic}")
        for p, end in until.items():
            for key, value in self.records[topic][p][:end]:
                on_record(p, key, value, 0)

    def close(self) -> None:
        pass


class Hooks(EngineHooks):
    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, list[str], list[str]]] = []
        self.dropped: list[int] = []

    def adopt(
        self,
        partition: int,
        epoch: int,
        entries: list[Entry],
        unreadable: list[Unreadable] | None = None,
    ) -> None:
        self.adopted.append(
            (
                partition,
                epoch,
                [e.request_id for e in entries],
                [u.request_id for u in unreadable or []],
            )
        )

    def drop(self, partition: int) -> None:
        self.dropped.append(partition)

    def fatal(self, exc: BaseException) -> None:
        raise AssertionError(exc)


class Rig:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.hooks = Hooks()
        self.consumer = FakeConsumer(self.log)
        self.reader = FakeReader(self.log)
        self.pauses = 0
        monkeypatch.setattr(ownership_module, "StateReader", lambda _conf: self.reader)

        def apply_pause() -> None:
            self.pauses += 1

        self.own = Ownership(
            SETTINGS,
            loop=self.loop,
            hooks=self.hooks,
            calls=Calls(retry_limit_ms=2000, beat=lambda: None),
            consumer=lambda: self.consumer,  # type: ignore[arg-type,return-value]
            beat=lambda: None,
            apply_pause=apply_pause,
        )
        self.own.open()

    def settle(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))  # wait-ok: one turn of the loop


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    made = Rig(monkeypatch)
    yield made
    made.loop.close()


def test_committed_offsets_are_read_before_the_state_ends_and_the_state_is_adopted(
    rig: Rig,
) -> None:
    value, _ = changelog_value("r-1", 0)
    rig.reader.records["changelog"][0] = [(b"r-1", value), (b"r-2", b"not json"), (b"r-3", value)]
    rig.reader.records["changelog"][0].append((b"r-3", None))  # finished: tombstoned

    rig.own.assign([0, 1])
    rig.own.acquire([0, 1], seek=False)
    rig.settle()

    assert rig.log.index("committed") < rig.log.index("high_watermarks:changelog")
    assert rig.log.index("high_watermarks:dedupe") < rig.log.index("read:changelog")
    assert rig.own.restoring == frozenset()
    assert sorted(rig.hooks.adopted) == [(0, 1, ["r-1"], ["r-2"]), (1, 1, [], [])]
    assert rig.own.pending_count() == 2, "the unreadable one stays pending (dead-lettered later)"
    assert rig.own.held_bytes > 0
    assert rig.consumer.seeks == [], "a first acquire does not seek"


def test_a_partition_waits_while_a_transaction_below_its_end_is_open(rig: Rig) -> None:
    value, _ = changelog_value("r-1", 0)
    rig.reader.records["changelog"][0] = [(b"r-1", value)]
    rig.reader.lagging = 1  # an open transaction holds the stable offset back

    rig.own.assign([0])
    rig.own.acquire([0], seek=False)
    rig.settle()

    assert rig.own.restoring == frozenset({0})
    assert rig.own.is_restoring(0)
    assert rig.hooks.adopted == [], "nothing is handed over while the state may be incomplete"
    assert rig.pauses >= 1

    rig.reader.lagging = 0  # the transaction ended
    rig.own.advance_restores(force=True)
    rig.settle()
    assert rig.own.restoring == frozenset()
    assert rig.hooks.adopted == [(0, 1, ["r-1"], [])]


def test_every_partition_gets_a_position_even_before_it_is_fetched(rig: Rig) -> None:
    rig.own.assign([0, 1])
    rig.own.acquire([0, 1], seek=True)

    assert rig.consumer.seeks == [(0, 5), (1, 2)], "no committed offset: the low watermark"
    assert [(tp.partition, tp.offset) for tp in rig.own.positions()] == [(0, 5), (1, 2)]


def test_a_finished_request_moves_to_the_window_and_a_resend_is_known(rig: Rig) -> None:
    rig.own.assign([0])
    rig.own.acquire([0], seek=False)
    _, content = changelog_value("r-9", 0)
    rig.own.admit(0, "r-9", content, 500)
    assert rig.own.known(0).pending_content("r-9") == content
    held = rig.own.held_bytes

    effect = Effect(0, rig.own.epoch(0), [], finishes="r-9")
    rig.own.remember(effect)

    assert rig.own.known(0).pending_content("r-9") is None
    assert rig.own.held_bytes == held - 500
    finished = rig.own.known(0).finished("r-9")
    assert finished is not None
    assert finished.outcome == "result"
    assert [(r.topic, r.key, r.partition) for r in effect.records] == [("dedupe", b"r-9", 0)]


def test_released_partitions_are_dropped_and_their_effects_go_stale(rig: Rig) -> None:
    rig.own.assign([0, 1])
    rig.own.acquire([0, 1], seek=False)
    effect = Effect(1, rig.own.epoch(1), [])
    assert rig.own.is_live(effect)

    rig.own.release([1])
    rig.settle()

    assert rig.own.assigned == frozenset({0})
    assert rig.hooks.dropped == [1]
    assert not rig.own.is_live(effect)
    assert rig.own.pending_count() == 0


def test_reset_drops_and_restores_again_under_a_new_epoch(rig: Rig) -> None:
    value, _ = changelog_value("r-1", 0)
    rig.reader.records["changelog"][0] = [(b"r-1", value)]
    rig.own.assign([0])
    rig.own.acquire([0], seek=False)
    first_epoch = rig.own.epoch(0)

    rig.own.reset_all()
    rig.settle()

    assert rig.hooks.dropped == [0]
    assert rig.own.epoch(0) == first_epoch + 1
    assert rig.hooks.adopted[-1] == (0, first_epoch + 1, ["r-1"], [])
    assert (0, 5) in rig.consumer.seeks, "a reset seeks back to the committed offset"


def test_a_takeover_waits_past_the_transaction_timeout_for_stable_offsets(rig: Rig) -> None:
    """A replica that died in a transaction leaves its offsets unstable until the broker
    aborts it: up to the transaction timeout plus the broker's 10 s check interval. The
    committed look-up keeps trying that long (it gave up, fatally, at the timeout)."""
    # Unstable past the attempt that follows the timeout (backoff 0.1, 0.2, ... 1.6 s: 3.1 s).
    unstable_until = time.monotonic() + SETTINGS.transaction_timeout_ms / 1000 + 1.5
    stable = rig.consumer.committed

    def committed(tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if time.monotonic() < unstable_until:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return stable(tps, timeout)

    rig.consumer.committed = committed  # type: ignore[method-assign]
    rig.own.assign([0])
    rig.own.acquire([0], seek=False)
    rig.settle()
    assert time.monotonic() >= unstable_until
    assert rig.own.restoring == frozenset()
    assert [a[0] for a in rig.hooks.adopted] == [0]
