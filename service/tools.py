"""Tools for people: send requests, read results and dead letters, replay dead letters.

Each function here is what a CLI command does, minus the printing, so the
tests can call them directly against the real broker.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from pydantic import ValidationError

from service.dedupe import REPLAY_HEADER
from service.errors import BridgeError
from service.intake import sniff_content_type
from service.messages import (
    ContentType,
    ConversionResult,
    DeadLetter,
    DocumentRequest,
    DocumentSource,
)


class ToolError(BridgeError):
    """A CLI tool cannot do what was asked (bad argument, unreadable file, Kafka error)."""


def build_request(
    target: str,
    *,
    document_type_code: str,
    metadata: dict[str, Any] | None = None,
    request_id: str | None = None,
    max_bytes: int = 16 * 1024 * 1024,
) -> DocumentRequest:
    """A request for a local file (sent as base64) or an http(s) URL."""
    rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
    if target.startswith(("http://", "https://")):
        source = DocumentSource(url=target)
        filename = target.rstrip("/").rsplit("/", 1)[-1] or None
    else:
        path = Path(target)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ToolError(f"cannot read {target}: {exc.strerror}") from None
        if size * 4 // 3 > max_bytes:
            raise ToolError(
                f"{target} is {size} bytes: too large to send inline; put it behind a URL"
            )
        raw = path.read_bytes()
        content_type = sniff_content_type(raw[:16]) or mimetypes.guess_type(path.name)[0]
        source = DocumentSource.model_construct(
            url=None,
            base64=base64.b64encode(raw).decode("ascii"),
            content_type=cast(ContentType | None, content_type),
        )
        filename = path.name
    try:
        return DocumentRequest.model_validate(
            {
                "request_id": rid,
                "document_type_code": document_type_code,
                "source": source.model_dump(exclude_none=True),
                "metadata": metadata,
                "filename": filename,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ToolError(f"{target}: {loc}: {first.get('msg')}") from None


def produce_requests(
    conf: dict[str, Any], topic: str, requests: list[DocumentRequest], *, timeout_s: float = 30.0
) -> None:
    """Produce requests keyed by request id and wait until Kafka has them all."""
    delivery = _Delivery(conf)
    for req in requests:
        delivery.producer.produce(
            topic,
            key=req.request_id.encode(),
            value=req.model_dump_json(exclude_none=True).encode(),
            on_delivery=delivery.report,
        )
    delivery.wait("could not deliver", timeout_s)


class _Delivery:
    """A producer for the tools that can say why records were not delivered."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.client_errors = _ClientErrors()
        self.errors: list[str] = []
        self.producer = Producer(
            {
                **conf,
                "enable.idempotence": True,
                "message.max.bytes": 33554432,
                "error_cb": self.client_errors,
            }
        )

    def report(self, err: KafkaError | None, _msg: Any) -> None:
        """The delivery callback."""
        if err is not None:
            self.errors.append(err.str())

    def wait(self, what: str, timeout_s: float) -> None:
        """Wait for every record; ToolError with the reason if any was not delivered."""
        left = self.producer.flush(timeout_s)
        if self.errors:
            raise ToolError(f"{what} {len(self.errors)} record(s): {self.errors[0]}")
        if left:
            raise ToolError(
                f"{what} {left} record(s) within {timeout_s:g} s{self.client_errors.why()}; "
                "check KAFKA_BOOTSTRAP_SERVERS, TLS (KAFKA_SSL_CA_LOCATION) and credentials"
            )


class _ClientErrors:
    """librdkafka's error callback for the tools: keeps the last error, to say why."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, err: KafkaError) -> None:
        # "all brokers are down" follows the real cause (a refused certificate, a bad
        # password): keep the cause.
        if self.last is None or err.code() != KafkaError._ALL_BROKERS_DOWN:
            self.last = err.str()

    def why(self) -> str:
        """The last client error, as a clause to append to a message."""
        return f" (last Kafka error: {self.last})" if self.last else ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """One message from the result or dead-letter topic."""

    topic: str
    partition: int
    offset: int
    result: ConversionResult | None
    dead_letter: DeadLetter | None
    raw: bytes

    @property
    def request_id(self) -> str | None:
        """The request id the outcome belongs to."""
        if self.result is not None:
            return self.result.request_id
        return self.dead_letter.request_id if self.dead_letter is not None else None


def read_outcomes(
    conf: dict[str, Any],
    topics: list[str],
    *,
    follow: bool,
    idle_timeout_s: float = 2.0,
    stop: Callable[[], bool] | None = None,
    batch_timeout_s: float = 0.2,
) -> Iterator[Outcome]:
    """Read result/dead-letter topics from the beginning with read_committed.

    Without `follow`, stops at the end of every partition; with it, goes on
    until `stop()` says so. `batch_timeout_s` bounds how long a record may wait in a batch
    (a benchmark that times arrivals wants it short).
    """
    client_errors = _ClientErrors()
    consumer = Consumer(
        {
            **conf,
            "error_cb": client_errors,
            "group.id": f"docutray-bridge-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        try:
            md = consumer.list_topics(timeout=10)
        except KafkaException as exc:
            consumer.poll(0)  # serves the error callback: it knows why
            raise ToolError(
                f"cannot read from Kafka: {exc.args[0].str()}{client_errors.why()}; check "
                "KAFKA_BOOTSTRAP_SERVERS, TLS (KAFKA_SSL_CA_LOCATION) and credentials"
            ) from None
        tps: list[TopicPartition] = []
        for t in topics:
            tmd = md.topics.get(t)
            if tmd is None or tmd.error is not None:
                continue
            tps.extend(TopicPartition(t, p, OFFSET_BEGINNING) for p in tmd.partitions)
        if not tps:
            return
        consumer.assign(tps)
        at_end: set[tuple[str, int]] = set()
        last_msg = time.monotonic()
        while True:
            if stop is not None and stop():
                return
            msgs = consumer.consume(num_messages=500, timeout=batch_timeout_s)
            for msg in msgs:
                err = msg.error()
                topic, part = msg.topic() or "", msg.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end.add((topic, part))
                        continue
                    raise ToolError(f"Kafka error: {err.str()}")
                at_end.discard((topic, part))
                last_msg = time.monotonic()
                yield _outcome(msg.topic() or "", part, msg.offset() or 0, msg.value() or b"")
            if not follow and (
                len(at_end) >= len(tps) or time.monotonic() - last_msg > max(idle_timeout_s, 10)
            ):
                return
    finally:
        consumer.close()


def _outcome(topic: str, partition: int, offset: int, raw: bytes) -> Outcome:
    result: ConversionResult | None = None
    letter: DeadLetter | None = None
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and "reason" in data and "original" in data:
            letter = DeadLetter.model_validate(data)
        else:
            result = ConversionResult.model_validate(data)
    except (ValueError, ValidationError):
        pass
    return Outcome(topic, partition, offset, result, letter, raw)


def format_outcome(outcome: Outcome) -> str:
    """One readable line for a person."""
    if outcome.result is not None:
        r = outcome.result
        t = r.timings
        secs = (t.published_at - t.received_at).total_seconds()
        fields = ", ".join(f"{k}={v!r}" for k, v in list(r.data.items())[:4])
        return (
            f"OK   {r.request_id}  {r.document_type_code}  conversion={r.conversion_id}  "
            f"{secs:.1f}s  {t.status_calls} status call(s)  {fields}"
        )
    if outcome.dead_letter is not None:
        d = outcome.dead_letter
        return f"DEAD {d.request_id or '(no id)'}  {d.reason.value}: {d.message}"
    return f"???  {outcome.topic}[{outcome.partition}]@{outcome.offset}: unreadable message"


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What a replay would send (or sent)."""

    selected: list[DeadLetter]
    skipped: int


def replay_dead_letters(
    conf: dict[str, Any],
    dead_letter_topic: str,
    *,
    input_topic: str | None,
    reason: str | None = None,
    since: datetime | None = None,
    request_ids: set[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ReplayPlan:
    """Put dead-lettered requests back on their input topic (original key, value and headers)."""
    selected: list[tuple[DeadLetter, str]] = []
    skipped = 0
    for outcome in read_outcomes(conf, [dead_letter_topic], follow=False):
        letter = outcome.dead_letter
        if letter is None:
            skipped += 1
            continue
        if reason is not None and letter.reason.value != reason:
            continue
        if since is not None and letter.failed_at < since:
            continue
        if request_ids is not None and letter.request_id not in request_ids:
            continue
        if (
            letter.original.value is None
            or letter.original.value_truncated  # only a prefix was kept: cannot be resent
            or letter.original.key_truncated
        ):
            skipped += 1
            continue
        selected.append((letter, f"{outcome.topic}/{outcome.partition}/{outcome.offset}"))
    if dry_run or not selected:
        return ReplayPlan([letter for letter, _ in selected], skipped)
    delivery = _Delivery(conf)
    for n, (letter, where) in enumerate(selected, 1):
        orig = letter.original
        headers = [(k, v) for k, v in orig.header_tuples() if k != REPLAY_HEADER]
        headers.append((REPLAY_HEADER, where.encode()))
        delivery.producer.produce(
            input_topic or orig.topic,
            key=orig.key.raw() if orig.key is not None else None,
            value=orig.value.raw() if orig.value is not None else None,
            headers=headers,
            on_delivery=delivery.report,
        )
        if progress is not None:
            progress(n)
    delivery.wait("replay incomplete: could not deliver", 30)
    return ReplayPlan([letter for letter, _ in selected], skipped)
