"""The composition root: wire settings, Kafka, DocuTray, the limiter and the engine; run until told to stop.

Shutdown, step by step (SIGTERM or SIGINT):

1. Stop fetching input (pause every partition).
2. Stop dispatching new work; let in-flight submits record their outcome for
   up to ``BRIDGE_SHUTDOWN_GRACE_S`` minus a margin; cancel status polls
   (their conversions stay ``submitted`` in the changelog).
3. Commit the last transaction, leave the group (the revoke callback commits
   anything left), close the producer.
4. Exit 0, within the grace period Kubernetes gives (it sends SIGTERM, waits
   ``terminationGracePeriodSeconds``, then kills).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import urlsplit

import structlog
import uvicorn

from service import __version__, metrics
from service.config import (
    Settings,
    is_secret_property,
    kafka_common_config,
    kafka_passthrough,
    redacted,
)
from service.documents import DocumentReader
from service.docutray import DocuTrayClient
from service.health import Probe, create_ops_app, liveness, readiness
from service.kafka.topics import (
    completions_topic,
    dedupe_topic,
    documents_topic,
    ensure_topics,
    producer_max_message_bytes,
    record_limits,
)
from service.kafkaio import Channel, KafkaErrorLog, KafkaIO, KafkaSettings
from service.logging import register_secrets
from service.pipeline import Engine
from service.ratelimit import build_limiter
from service.redis_url import parse_redis_url
from service.scheduler import DurationModel, PollPolicy
from service.usage import UsageWatcher
from service.webhooks import (
    CompletionProducer,
    CompletionsReader,
    FallbackPollPolicy,
    WebhookReceiver,
    webhook_server,
)

log = structlog.get_logger(__name__)


def instance_id(settings: Settings) -> str:
    """This replica's name (transactional id suffix): the setting, else host name and pid."""
    return settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"


def kafka_settings(settings: Settings) -> KafkaSettings:
    """The Kafka edge's slice of the settings."""
    return KafkaSettings(
        common=kafka_common_config(settings),
        extra_consumer={
            "queued.max.messages.kbytes": settings.kafka_buffer_kbytes,
            **kafka_passthrough(kind="consumer"),
        },
        extra_producer={
            "queue.buffering.max.kbytes": settings.kafka_buffer_kbytes,
            **kafka_passthrough(kind="producer"),
        },
        group_id=settings.group_id,
        instance_id=instance_id(settings),
        input_topic=settings.input_topic,
        result_topic=settings.result_topic,
        dead_letter_topic=settings.dead_letter_topic,
        changelog_topic=settings.changelog,
        documents_topic=documents_topic(settings),
        dedupe_topic=dedupe_topic(settings),
        dedupe_window_s=settings.dedupe_window_s,
        restore_timeout_s=settings.restore_timeout_s,
        revoke_grace_s=settings.shutdown_grace_s,
        # Only an id that outlives the process (BRIDGE_INSTANCE_ID: the StatefulSet's pod name)
        # makes static membership pay; host name + pid would only delay every handover.
        static_membership=bool(os.environ.get("BRIDGE_INSTANCE_ID")),
        commit_interval_s=settings.commit_interval_ms / 1000,
        max_pending=settings.max_pending,
        max_pending_bytes=settings.pending_bytes_cap,
        max_header_bytes=settings.max_header_bytes,
        max_batch_bytes=settings.kafka_buffer_kbytes * 1024 // 2,
        producer_max_bytes=producer_max_message_bytes(settings),
        max_request_bytes=settings.max_request_bytes,
        max_document_bytes=settings.max_document_bytes,
    )


class _OpsServer(uvicorn.Server):
    """uvicorn without its own signal handling: the bridge owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _watch(
    kafka: KafkaIO,
    engine: Engine,
    ready: Callable[[], Probe],
    *,
    timeout_s: float,
    stopping: asyncio.Event,
) -> None:
    """Keep the readiness gauge current, and end the process if the Kafka thread hangs.

    A librdkafka call that never returns (seen after a broker restart, in
    `send_offsets_to_transaction`) would leave the replica holding partitions
    and doing nothing; exiting hands them to another replica, and a restart
    restores everything from the changelog.
    """
    while not stopping.is_set():
        ready()  # updates docutray_bridge_ready even when nobody probes
        age = time.monotonic() - kafka.heartbeat
        if age > timeout_s and not kafka.stopped.is_set():
            log.critical(
                "kafka_thread_stalled",
                seconds=round(age, 1),
                action="exiting so that another replica (or the restarted one) takes over; "
                "nothing is lost",
            )
            engine.fatal(TimeoutError(f"Kafka thread stalled for {age:.0f} s"))
            return
        await asyncio.sleep(1.0)


def _on_response(endpoint: str, status_code: int | None, duration_s: float) -> None:
    if endpoint in metrics.ENDPOINTS:
        metrics.HTTP_DURATION.labels(endpoint).observe(duration_s)


def _on_limiter_event(kind: str, fields: dict[str, Any]) -> None:
    if kind == "effective_rate":
        metrics.LIMITER_EFFECTIVE_RATE.labels(fields["budget"]).set(fields["per_minute"] / 60)
    elif kind == "degraded":
        metrics.LIMITER_DEGRADED.set(1 if fields["degraded"] else 0)


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once.

    Documents pass through in megabyte strings. glibc's default raises its mmap
    threshold after the first such block is freed, and from then on keeps them in
    the heap, where freed memory is rarely returned: RSS ratchets up with every
    document. A fixed threshold (which turns the adjustment off) keeps blocks over
    128 KiB in their own mappings, unmapped when freed. Other C libraries: no-op.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


async def run_bridge(settings: Settings) -> int:
    """Run the bridge until SIGTERM/SIGINT; return the process exit code."""
    api_key = settings.docutray_api_key.get_secret_value()
    redis_url = settings.redis
    passthrough = {
        **kafka_passthrough(),
        **kafka_passthrough(kind="consumer"),
        **kafka_passthrough(kind="producer"),
    }
    redis_password = urlsplit(redis_url).password if redis_url else None
    register_secrets(
        [
            api_key,
            redis_url,
            redis_password,
            *(parse_redis_url(redis_url).secrets() if redis_url else ()),
            *(v for k, v in passthrough.items() if is_secret_property(k)),
        ]
    )
    metrics.init_series()
    ks = kafka_settings(settings)
    log.info(
        "bridge_starting",
        version=__version__,
        instance=ks.instance_id,
        kafka=redacted(ks.common),
        docutray_base_url=settings.docutray_base_url,
        limiter="redis" if redis_url else "in-process",
    )
    layout = await asyncio.to_thread(
        ensure_topics, settings, common=ks.common, errors=KafkaErrorLog("admin")
    )
    log.info("topics_ready", input_partitions=layout.partitions, changelog=ks.changelog_topic)

    client = DocuTrayClient(
        base_url=settings.docutray_base_url,
        api_key=api_key,
        connect_timeout_s=settings.docutray_connect_timeout_s,
        read_timeout_s=settings.docutray_read_timeout_s,
        write_timeout_s=settings.docutray_write_timeout_s,
        max_connections=settings.docutray_max_connections,
        on_response=_on_response,
    )
    limiter = build_limiter(
        redis_url=redis_url,
        submit_rate_per_minute=settings.submit_rate_per_minute,
        status_rate_per_minute=settings.status_rate_per_minute,
        shared_budget=settings.shared_budget,
        burst=settings.rate_burst,
        expected_replicas=settings.expected_replicas,
        key_prefix=f"docutray-bridge:{{{settings.group_id}}}:",
        on_event=_on_limiter_event,
        submit_rate_per_hour=settings.submit_rate_per_hour or None,
        submit_rate_per_day=settings.submit_rate_per_day or None,
    )
    for budget in metrics.BUDGETS:
        metrics.LIMITER_CONFIGURED_RATE.labels(budget).set(
            limiter.configured_rate_per_minute(budget) / 60
        )
        metrics.LIMITER_EFFECTIVE_RATE.labels(budget).set(
            limiter.effective_rate_per_minute(budget) / 60
        )
    model = DurationModel(default_median_s=settings.poll_default_median_s)
    policy: PollPolicy
    if settings.webhooks_enabled:
        # Webhooks wake conversions; polling is the slower fallback for lost ones.
        policy = FallbackPollPolicy(
            floor_s=settings.webhook_fallback_poll_s,
            model=model,
            first_poll_quantile=settings.poll_first_quantile,
            min_interval_s=settings.poll_min_interval_s,
            max_interval_s=max(settings.poll_max_interval_s, settings.webhook_fallback_poll_s),
        )
    else:
        policy = PollPolicy(
            model=model,
            first_poll_quantile=settings.poll_first_quantile,
            min_interval_s=settings.poll_min_interval_s,
            max_interval_s=settings.poll_max_interval_s,
        )
    output_limits = record_limits(layout, producer_max_bytes=ks.producer_max_bytes)
    ks.dead_letter_max_bytes = output_limits.get(ks.dead_letter_topic, ks.dead_letter_max_bytes)
    documents = DocumentReader(ks.common, ks.documents_topic)
    channel = Channel()
    engine = Engine(
        settings=settings,
        kafka=channel,
        client=client,
        limiter=limiter,
        policy=policy,
        documents=documents,
        output_limits=output_limits,
        rng=random.Random(),
    )
    loop = asyncio.get_running_loop()
    kafka = KafkaIO(ks, loop=loop, hooks=engine, channel=channel)
    stopping = asyncio.Event()
    # Not ready when a Kafka call has blocked this long (the broker is gone, or librdkafka
    # hangs): every single call is bounded by 30 s, so longer means something is wrong.
    stall_ready_s = min(45.0, settings.heartbeat_timeout_s / 2)

    def live() -> Probe:
        return liveness(
            now=time.monotonic(),
            heartbeats={"engine": engine.heartbeat, "kafka": kafka.heartbeat},
            timeout_s=settings.heartbeat_timeout_s,
        )

    def ready() -> Probe:
        failure = engine.failure or kafka.error
        kafka_age = time.monotonic() - kafka.heartbeat
        stalled = kafka_age > stall_ready_s
        probe = readiness(
            joined=kafka.joined.is_set(),
            stopping=stopping.is_set(),
            paused=engine.paused_reasons
            | engine.hold_reasons
            | ({"kafka_stalled"} if stalled else set())
            | ({"restoring"} if kafka.restoring else set()),
            failure=str(failure) if failure else None,
            extra={
                "assigned_partitions": sorted(kafka.assigned),
                "pending": engine.counts(),
                "limiter": limiter.describe(),
            },
        )
        metrics.READY.set(1 if probe.ok else 0)
        return probe

    server = _OpsServer(
        uvicorn.Config(
            create_ops_app(live=live, ready=ready),
            host=settings.metrics_host,
            port=settings.metrics_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    kafka.start()
    server_task = loop.create_task(server.serve())
    side_tasks = [loop.create_task(engine.watch_submit_hold())]
    if settings.usage_poll_interval_s > 0:
        usage = UsageWatcher(
            client=client,
            limiter=limiter,
            redis_url=redis_url,
            key_prefix=f"docutray-bridge:{{{settings.group_id}}}:",
            instance=ks.instance_id,
            interval_s=settings.usage_poll_interval_s,
            page_budget=settings.monthly_page_budget,
        )
        side_tasks.append(loop.create_task(usage.run()))
    webhook_producer: CompletionProducer | None = None
    reader: CompletionsReader | None = None
    webhooks: uvicorn.Server | None = None
    if settings.webhooks_enabled:
        topic = completions_topic(settings)
        webhook_producer = CompletionProducer(ks.common)
        webhook_producer.start()
        webhooks = webhook_server(
            WebhookReceiver(
                topic=topic,
                partitions=layout.partitions,
                producer=webhook_producer,
                max_body_bytes=settings.webhook_max_body_bytes,
                rate_per_source=settings.webhook_rate_per_source,
            ),
            host=settings.webhook_host,
            port=settings.webhook_port,
        )
        side_tasks.append(loop.create_task(webhooks.serve()))
        reader = CompletionsReader(
            ks.common,
            topic=topic,
            group_id=settings.group_id,
            owned=lambda: kafka.assigned,
            on_completion=engine.wake,
            loop=loop,
        )
        reader.start()
        log.info("webhooks_listening", port=settings.webhook_port, topic=topic)
    engine_task = loop.create_task(engine.run())
    fatal_wait = loop.create_task(engine.wait_failed())
    watchdog = loop.create_task(
        _watch(kafka, engine, ready, timeout_s=settings.heartbeat_timeout_s, stopping=stopping)
    )
    stop_wait = loop.create_task(stopping.wait())
    log.info("bridge_running", metrics_port=settings.metrics_port)
    await asyncio.wait({stop_wait, fatal_wait, engine_task}, return_when=asyncio.FIRST_COMPLETED)
    started = time.monotonic()
    stopping.set()
    log.info("bridge_stopping", action="draining in-flight work; committing; leaving the group")
    channel.pause("shutdown")
    # Calls under way get the grace but for the final commit and close (a second or two; the
    # chart gives the pod BRIDGE_SHUTDOWN_GRACE_S + 5 s before it is killed).
    margin = min(2.0, settings.shutdown_grace_s / 5)
    await engine.drain(grace_s=max(0.5, settings.shutdown_grace_s - margin))
    kafka.stop()
    left = max(1.0, settings.shutdown_grace_s - (time.monotonic() - started))
    joined = await asyncio.to_thread(kafka.join, left)
    server.should_exit = True
    if webhooks is not None:
        webhooks.should_exit = True
    if reader is not None:
        await asyncio.to_thread(reader.stop)
    if webhook_producer is not None:
        await asyncio.to_thread(webhook_producer.close)
    for task in (engine_task, fatal_wait, stop_wait, watchdog, *side_tasks):
        task.cancel()
    await asyncio.gather(*side_tasks, return_exceptions=True)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.wait_for(server_task, timeout=2)
    await client.aclose()
    await limiter.close()
    documents.close()
    failure = engine.failure or kafka.error
    if failure is not None:
        log.critical("bridge_failed", error=str(failure), action="restarting restores all state")
        return 1
    if not joined:
        log.error("bridge_stop_timeout", action="Kafka did not close in time; pending work is safe")
        return 1
    log.info("bridge_stopped", seconds=round(time.monotonic() - started, 2))
    return 0
