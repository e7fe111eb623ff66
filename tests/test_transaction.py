"""service.kafka.transaction in-process: a fake producer, a fake owner, no broker.

What the guarantee asks of one transaction: effects resolve only after the commit; the
consumer's positions go into the same transaction; an abort writes the live effects again
and fails the stale ones; an abort that repeats rebuilds the partitions from Kafka; a hung
send_offsets replaces the producer; a fatal error ends the thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from service.kafka import calls as calls_module
from service.kafka import transaction as transaction_module
from service.kafka.calls import Calls
from service.kafka.effects import Effect, OutRecord
from service.kafka.errors import FatalKafkaError, StaleEffect
from service.kafka.transaction import ABORT_RETRIES, Transaction
from tests.fixtures.kafka_thread import kafka_settings

SETTINGS = kafka_settings(dedupe_window_s=60.0)


class FakeMessage:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def offset(self) -> int:
        return self._offset


class FakeProducer:
    """Records every call; `fail[name]` raises queued exceptions; `hang` blocks send_offsets."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.produced: list[tuple[str, dict[str, Any]]] = []
        self.sent_offsets: list[list[TopicPartition]] = []
        self.fail: dict[str, list[BaseException]] = {}
        self.hang: threading.Event | None = None
        self._deliveries: list[Any] = []
        self._next_offset = 100

    def _call(self, name: str) -> None:
        self.calls.append(name)
        queued = self.fail.get(name)
        if queued:
            raise queued.pop(0)

    def init_transactions(self, _timeout: float) -> None:
        self._call("init_transactions")

    def begin_transaction(self) -> None:
        self._call("begin_transaction")

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.calls.append("produce")
        self.produced.append((topic, kwargs))
        if "on_delivery" in kwargs:
            self._deliveries.append(kwargs["on_delivery"])

    def flush(self, _timeout: float) -> int:
        for deliver in self._deliveries:
            deliver(None, FakeMessage(self._next_offset))
            self._next_offset += 1
        self._deliveries = []
        return 0

    def poll(self, _timeout: float) -> int:
        return 0

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], _group: Any, _timeout: float
    ) -> None:
        self._call("send_offsets_to_transaction")
        if self.hang is not None:
            self.hang.wait(30)
        self.sent_offsets.append(positions)

    def commit_transaction(self, _timeout: float) -> None:
        self._call("commit_transaction")

    def abort_transaction(self, _timeout: float) -> None:
        self._call("abort_transaction")


class FakeOwner:
    def __init__(self) -> None:
        self.stale: set[int] = set()
        self.resets = 0
        self.offsets = [TopicPartition("in", 0, 7)]

    def positions(self) -> list[TopicPartition]:
        return self.offsets

    def is_live(self, effect: Effect) -> bool:
        return effect.partition not in self.stale

    def reset_all(self) -> None:
        self.resets += 1


class FakeConsumer:
    def consumer_group_metadata(self) -> str:
        return "group-metadata"


class Rig:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop = asyncio.new_event_loop()
        self.owner = FakeOwner()
        self.producers: list[FakeProducer] = []

        def new_producer(conf: dict[str, Any]) -> FakeProducer:
            assert conf["transactional.id"] == "g-i"
            self.producers.append(FakeProducer())
            return self.producers[-1]

        monkeypatch.setattr(transaction_module, "Producer", new_producer)
        self.txn = Transaction(
            SETTINGS,
            loop=self.loop,
            calls=Calls(retry_limit_ms=SETTINGS.transaction_timeout_ms, beat=lambda: None),
            owner=self.owner,
            consumer=lambda: FakeConsumer(),  # type: ignore[arg-type,return-value]
            beat=lambda: None,
        )
        self.txn.open()

    @property
    def producer(self) -> FakeProducer:
        return self.producers[-1]

    def effect(self, partition: int = 0, **kwargs: Any) -> Effect:
        return Effect(
            partition,
            1,
            [OutRecord("out", b"k", b"v", None, partition)],
            future=self.loop.create_future(),
            **kwargs,
        )

    def settle(self) -> None:
        """Run the callbacks the Kafka side handed to the event loop."""
        self.loop.run_until_complete(asyncio.sleep(0))  # wait-ok: one turn of the loop
        self.loop.run_until_complete(asyncio.sleep(0))  # wait-ok: one turn of the loop


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    made = Rig(monkeypatch)
    yield made
    made.loop.close()


def abortable(message: str = "abort me") -> KafkaException:
    return KafkaException(KafkaError(KafkaError._STATE, message, txn_requires_abort=True))


def test_a_commit_writes_effects_and_offsets_then_resolves_the_futures(rig: Rig) -> None:
    committed: list[int] = []
    first = rig.effect(0, on_commit=lambda: committed.append(0))
    second = rig.effect(1)
    rig.txn.add(first)
    rig.txn.add(second)
    assert first.future is not None
    assert second.future is not None
    assert rig.txn.has_work()

    rig.txn.commit()
    assert not first.future.done(), "resolved before the event loop ran: never before commit"
    rig.settle()

    assert first.future.done()
    assert second.future.done()
    assert first.future.exception() is None
    assert committed == [0]
    assert rig.producer.calls == [
        "init_transactions",
        "begin_transaction",
        "produce",
        "produce",
        "send_offsets_to_transaction",
        "commit_transaction",
    ]
    assert rig.producer.sent_offsets == [rig.owner.offsets]
    assert not rig.txn.has_work()


def test_late_records_name_the_offsets_of_delivered_ones(rig: Rig) -> None:
    seen: list[int] = []
    record = OutRecord("documents", b"k", b"doc", None, 0, delivered=seen.append)
    effect = Effect(
        0,
        1,
        [record],
        late=lambda: [OutRecord("changelog", b"k", str(seen[0]).encode(), None, 0)],
    )
    rig.txn.add(effect, weigh=True)
    assert rig.txn.batch_bytes == 3

    rig.txn.commit()

    assert seen == [100]
    assert [(topic, kw["value"]) for topic, kw in rig.producer.produced] == [
        ("documents", b"doc"),
        ("changelog", b"100"),
    ]


def test_an_abort_writes_live_effects_again_and_fails_stale_ones(rig: Rig) -> None:
    live, stale = rig.effect(0), rig.effect(2)
    rig.txn.add(live)
    rig.txn.add(stale)
    rig.owner.stale = {2}
    rig.producer.fail["commit_transaction"] = [abortable()]

    rig.txn.commit()
    rig.settle()

    assert "abort_transaction" in rig.producer.calls
    assert rig.txn.batch == [live], "the live effect goes into the next transaction"
    assert rig.txn.offsets_dirty
    assert stale.future is not None
    assert isinstance(stale.future.exception(), StaleEffect)
    assert live.future is not None
    assert not live.future.done()
    assert rig.owner.resets == 0

    rig.txn.commit()  # the retry passes
    rig.settle()
    assert live.future.done()
    assert live.future.exception() is None


def test_aborts_that_repeat_rebuild_the_partitions_from_kafka(rig: Rig) -> None:
    effect = rig.effect(0)
    rig.txn.add(effect)
    rig.producer.fail["commit_transaction"] = [abortable() for _ in range(ABORT_RETRIES + 1)]

    for _ in range(ABORT_RETRIES):
        rig.txn.commit()
        assert rig.txn.batch == [effect]
    rig.txn.commit()
    rig.settle()

    assert rig.owner.resets == 1
    assert rig.txn.batch == []
    assert effect.future is not None
    assert isinstance(effect.future.exception(), StaleEffect)


def test_a_hung_send_offsets_replaces_the_producer_and_retries(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calls_module, "CALL_LIMIT_S", 0.2)
    stuck = rig.producer
    stuck.hang = threading.Event()
    effect = rig.effect(0)
    rig.txn.add(effect)
    try:
        rig.txn.commit()
    finally:
        stuck.hang.set()

    assert len(rig.producers) == 2, "a new producer (same transactional id) took over"
    assert rig.producer.calls == ["init_transactions"]
    assert rig.txn.batch == [effect]
    rig.txn.commit()
    rig.settle()
    assert effect.future is not None
    assert effect.future.exception() is None


def test_a_fatal_error_ends_the_thread(rig: Rig) -> None:
    rig.txn.add(rig.effect(0))
    fenced = KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True)
    rig.producer.fail["commit_transaction"] = [KafkaException(fenced)]
    with pytest.raises(FatalKafkaError, match="fenced"):
        rig.txn.commit()


def test_discard_fails_every_batched_effect(rig: Rig) -> None:
    first, second = rig.effect(0), rig.effect(1)
    rig.txn.add(first)
    rig.txn.add(second)
    rig.txn.offsets_dirty = True

    assert rig.txn.discard("partitions lost") == {0, 1}
    rig.settle()

    assert not rig.txn.has_work()
    for effect in (first, second):
        assert effect.future is not None
        assert isinstance(effect.future.exception(), StaleEffect)
