"""Webhook completions: DocuTray's posts become wake-ups for the replica that owns the request.

DocuTray posts ``CONVERSION_STARTED`` / ``_COMPLETED`` / ``_FAILED`` to one URL per
organisation, so any replica may receive a webhook for any request. The path of
one webhook, step by step:

1. Submit: the engine sends ``document_metadata`` with the reserved key
   :data:`~service.messages.ROUTE_METADATA_KEY` holding the request id and the
   input partition (:func:`routed_metadata`); DocuTray returns the metadata in
   its webhooks as sent. Results never carry that key (they echo the request's own
   metadata), and intake rejects a request whose metadata uses it.
2. Receive (:class:`WebhookReceiver`, on ``BRIDGE_WEBHOOK_PORT``, not the ops
   port): the body is capped, each source address is rate-capped, and the JSON
   is read for three things only: the conversion id, whether it finished, and
   the route (:func:`parse_webhook`). Nothing else of the body is kept or
   logged: its ``data`` is never used.
3. Route: a finished conversion becomes one small record (request id, conversion
   id) on ``<group>.completions``, produced with the explicit partition of the
   request (the topic is co-partitioned with the input), and the post is
   answered 2xx only once Kafka acknowledged the record (a 503 makes DocuTray
   retry; polling covers a webhook that is lost anyway).
4. Wake (:class:`CompletionsReader`, a thread per replica): a plain consumer
   assigned to the completions partitions the Kafka thread owns, from their end,
   hands each record to :meth:`Engine.wake <service.pipeline.Engine.wake>` in
   the event loop. The engine makes the conversion's status call due at once;
   that call confirms the webhook and supplies the data, so a forged webhook can
   waste one call, never inject data. Unknown or finished ids are ignored and
   counted; duplicates find the request finished (or its call already due).
5. Fallback: with webhooks on, :class:`FallbackPollPolicy` spaces status calls
   at least ``BRIDGE_WEBHOOK_FALLBACK_POLL_S`` apart, so a lost webhook still
   completes, at a few calls per hour of conversion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics
from service.messages import ROUTE_METADATA_KEY
from service.scheduler import PollPolicy
from service.servers import EmbeddedServer, embedded_server

log = structlog.get_logger(__name__)

WEBHOOK_PATH = "/webhooks/docutray"
#: Statuses and events that mean a conversion finished (worth a status call).
_FINISHED_STATUSES = frozenset({"SUCCESS", "ERROR"})
_FINISHED_EVENTS = frozenset({"CONVERSION_COMPLETED", "CONVERSION_FAILED"})
#: Longest id accepted from a webhook (DocuTray's ids are ~25 characters).
_MAX_ID_CHARS = 256
#: Source addresses whose rate buckets are remembered (oldest forgotten beyond it).
_MAX_SOURCES = 10_000


def routed_metadata(
    metadata: Mapping[str, Any] | None, *, request_id: str, partition: int
) -> dict[str, Any]:
    """The ``document_metadata`` sent to DocuTray: the request's own plus the route back."""
    return {
        **(metadata or {}),
        ROUTE_METADATA_KEY: {"request_id": request_id, "partition": partition},
    }


@dataclass(frozen=True, slots=True)
class Completion:
    """What a webhook tells the owner: this request's conversion finished (unconfirmed)."""

    conversion_id: str
    request_id: str
    partition: int

    def to_json(self) -> bytes:
        """The completions record's value."""
        return json.dumps(
            {"conversion_id": self.conversion_id, "request_id": self.request_id},
            separators=(",", ":"),
        ).encode()


def _text_id(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= _MAX_ID_CHARS else None


def parse_webhook(body: bytes) -> Completion | str:
    """Read a webhook body: a :class:`Completion`, or the outcome to count instead.

    ``invalid`` (not a JSON object with a conversion id), ``ignored`` (a status that
    is not final, e.g. CONVERSION_STARTED), ``unrouted`` (no route of ours in
    ``document_metadata``: a conversion another client made). A wrapper
    ``{"event": ..., "data": {...}}`` is tolerated [the payload's shape is documented
    without one]. A body with neither status nor event counts as finished (one status
    call tells).
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return "invalid"
    if not isinstance(payload, dict):
        return "invalid"
    event = payload.get("event") if isinstance(payload.get("event"), str) else None
    if "conversion_id" not in payload and isinstance(payload.get("data"), dict):
        payload = payload["data"]
    conversion_id = _text_id(payload.get("conversion_id"))
    if conversion_id is None:
        return "invalid"
    status = payload.get("status")
    if isinstance(status, str):
        if status.upper() not in _FINISHED_STATUSES:
            return "ignored"
    elif event is not None and event.upper() not in _FINISHED_EVENTS:
        return "ignored"
    meta = payload.get("document_metadata")
    if isinstance(meta, str):  # an upload sends it as a JSON string; tolerate it coming back so
        try:
            meta = json.loads(meta)
        except (ValueError, RecursionError):
            return "unrouted"
    route = meta.get(ROUTE_METADATA_KEY) if isinstance(meta, dict) else None
    if not isinstance(route, dict):
        return "unrouted"
    request_id = _text_id(route.get("request_id"))
    partition = route.get("partition")
    if request_id is None or not isinstance(partition, int) or isinstance(partition, bool):
        return "unrouted"
    if partition < 0:
        return "unrouted"
    return Completion(conversion_id, request_id, partition)


def parse_completion(value: bytes | None, partition: int) -> Completion | None:
    """A completions record back (None if it is not one of ours)."""
    if not value:
        return None
    try:
        raw = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    cid, rid = _text_id(raw.get("conversion_id")), _text_id(raw.get("request_id"))
    if cid is None or rid is None:
        return None
    return Completion(cid, rid, partition)


class FallbackPollPolicy(PollPolicy):
    """The poll policy with webhooks on: status calls at least ``floor_s`` apart (the
    webhook wakes a conversion earlier), so polling is the slow fallback for lost ones."""

    def __init__(self, *, floor_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._floor_s = floor_s

    def first_delay_s(
        self, document_type: str, *, rng: random.Random, remaining_s: float | None = None
    ) -> float:
        delay = max(super().first_delay_s(document_type, rng=rng), self._floor_s)
        return delay if remaining_s is None else min(delay, max(remaining_s, 0.0))

    def next_delay_s(
        self,
        document_type: str,
        *,
        elapsed_s: float,
        polls_done: int,
        remaining_s: float,
        rng: random.Random,
    ) -> float:
        delay = super().next_delay_s(
            document_type,
            elapsed_s=elapsed_s,
            polls_done=polls_done,
            remaining_s=remaining_s,
            rng=rng,
        )
        floor = self._floor_s if polls_done > 0 else self._floor_s - elapsed_s
        return min(max(delay, floor), max(remaining_s, 0.0))


class _SourceLimiter:
    """A token bucket per source address (``rate_per_s``, burst twice as many)."""

    def __init__(self, rate_per_s: float) -> None:
        self._rate = rate_per_s
        self._burst = max(1.0, 2 * rate_per_s)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, source: str, now: float) -> bool:
        tokens, at = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)  # most recent last
        if len(self._buckets) > _MAX_SOURCES:
            del self._buckets[next(iter(self._buckets))]
        return allowed


class CompletionProducer:
    """An idempotent producer for completion records, polled by its own thread."""

    def __init__(self, common: Mapping[str, Any], *, timeout_s: float = 10.0) -> None:
        self._producer = Producer(
            {
                **common,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "message.timeout.ms": int(timeout_s * 1000),
            }
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-producer", daemon=True)

    def start(self) -> None:
        """Start serving delivery reports."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    async def produce(self, topic: str, completion: Completion) -> None:
        """Produce one completion to its partition; return once Kafka acknowledged it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def report(err: KafkaError | None, _msg: Message) -> None:
            def settle() -> None:
                if done.done():
                    return
                if err is None:
                    done.set_result(None)
                else:
                    done.set_exception(RuntimeError(err.str()))

            loop.call_soon_threadsafe(settle)

        self._producer.produce(
            topic,
            value=completion.to_json(),
            key=completion.request_id.encode(),
            partition=completion.partition,
            on_delivery=report,
        )
        await done

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (bounded), then stop the thread."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._producer.flush(timeout_s)


class WebhookReceiver:
    """``POST /webhooks/docutray``: route finished conversions to their owner (steps 2-3)."""

    def __init__(
        self,
        *,
        topic: str,
        partitions: int,
        producer: CompletionProducer,
        max_body_bytes: int,
        rate_per_source: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._topic = topic
        self._partitions = partitions
        self._producer = producer
        self._max_body = max_body_bytes
        self._sources = _SourceLimiter(rate_per_source)
        self._clock = clock

    def app(self) -> Starlette:
        """The Starlette app served on ``BRIDGE_WEBHOOK_PORT``."""
        return Starlette(routes=[Route(WEBHOOK_PATH, self.handle, methods=["POST"])])

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None once it passes the cap (declared or actual)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: Request) -> Response:
        """One webhook post (never logs the body: it may carry customer data)."""
        source = request.client.host if request.client else "unknown"
        if not self._sources.allow(source, self._clock()):
            return self._answer("rate_limited", 429, headers={"Retry-After": "1"})
        try:
            body = await self._body(request)
        except ClientDisconnect:
            return self._answer("invalid", 400)
        if body is None:
            return self._answer("too_large", 413)
        parsed = parse_webhook(body)
        del body
        if isinstance(parsed, str):
            # 2xx for what is not ours or not final: DocuTray must not retry those.
            return self._answer(parsed, 400 if parsed == "invalid" else 200)
        if parsed.partition >= self._partitions:
            return self._answer("unrouted", 200)
        try:
            await self._producer.produce(self._topic, parsed)
        except (RuntimeError, BufferError, ValueError, KafkaException) as exc:
            log.warning(
                "webhook_produce_failed",
                conversion_id=parsed.conversion_id,
                request_id=parsed.request_id,
                partition=parsed.partition,
                error=str(exc),
                action="none: DocuTray retries the post; polling completes it anyway",
            )
            return self._answer("produce_failed", 503)
        log.debug(
            "webhook_routed",
            conversion_id=parsed.conversion_id,
            request_id=parsed.request_id,
            partition=parsed.partition,
        )
        return self._answer("routed", 200)

    @staticmethod
    def _answer(outcome: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
        metrics.WEBHOOKS.labels(outcome).inc()
        return JSONResponse({"outcome": outcome}, status_code=status, headers=headers)


def webhook_server(receiver: WebhookReceiver, *, host: str, port: int) -> EmbeddedServer:
    """The webhook endpoint's own HTTP server (a port apart from /metrics and the probes)."""
    return embedded_server(
        receiver.app(), host=host, port=port, limit_concurrency=256, timeout_keep_alive=30
    )


class CompletionsReader:
    """Step 4: a thread reading the completions partitions this replica owns, from their
    end; each record becomes ``on_completion(partition, request_id, conversion_id)`` in
    the event loop."""

    def __init__(
        self,
        common: Mapping[str, Any],
        *,
        topic: str,
        group_id: str,
        owned: Callable[[], frozenset[int]],
        on_completion: Callable[[int, str, str], object],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._conf = {
            **common,
            # Required by librdkafka; never joined (partitions are assigned by hand).
            "group.id": f"{group_id}.completions-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "latest",
        }
        self._topic = topic
        self._owned = owned
        self._on_completion = on_completion
        self._loop = loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completions-reader", daemon=True)
        self.heartbeat = time.monotonic()

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop and close the consumer."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)

    def _end(self, consumer: Consumer, partition: int) -> TopicPartition:
        """The partition from its end as of now (an exact offset: a lazily resolved
        OFFSET_END would skip what arrives before the first fetch)."""
        try:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(self._topic, partition), timeout=5.0, cached=False
            )
        except KafkaException as exc:
            log.warning("completions_offset_unknown", partition=partition, error=str(exc))
            return TopicPartition(self._topic, partition, OFFSET_END)
        return TopicPartition(self._topic, partition, high)

    def _run(self) -> None:
        consumer = Consumer(self._conf)
        have: frozenset[int] = frozenset()
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                want = self._owned()
                if want != have:
                    gone, new = have - want, want - have
                    if gone:
                        consumer.incremental_unassign(
                            [TopicPartition(self._topic, p) for p in sorted(gone)]
                        )
                    if new:
                        consumer.incremental_assign([self._end(consumer, p) for p in sorted(new)])
                    have = want
                if not have:
                    self._stop.wait(0.2)
                    continue
                for msg in consumer.consume(num_messages=500, timeout=0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("completions_read_error", error=err.str())
                        continue
                    part = msg.partition()
                    if part is None or part not in have:
                        continue
                    completion = parse_completion(msg.value(), part)
                    if completion is None:
                        continue
                    self._loop.call_soon_threadsafe(
                        self._on_completion,
                        completion.partition,
                        completion.request_id,
                        completion.conversion_id,
                    )
        except Exception as exc:  # the fallback polls still complete everything
            log.error(
                "completions_reader_failed",
                error=repr(exc),
                action="webhooks no longer speed up completions on this replica; "
                "polling completes them; restart the replica",
            )
        finally:
            with contextlib.suppress(Exception):
                consumer.close()
