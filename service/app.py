"""The composition root: wire settings, Kafka, DocuTray, the limiter and the engine; run until told to stop.

:class:`Bridge` is one replica: ``Bridge.build`` checks the topics and creates every
part (nothing started), ``run`` starts them and serves until stopped or failed,
``shutdown`` drains and stops them in order. ``run_bridge`` (the ``run`` command)
adds the signal handlers; tests run the same object in their own event loop.

Shutdown, step by step (SIGTERM, SIGINT or :meth:`Bridge.shutdown`; marked
``# Step N.`` in ``Bridge._shutdown``):

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
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import structlog

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
from service.kafka.effects import Channel
from service.kafka.io import KafkaIO
from service.kafka.settings import KafkaErrorLog, KafkaSettings
from service.kafka.topics import (
    TopicLayout,
    completions_topic,
    dedupe_topic,
    documents_topic,
    ensure_topics,
    producer_max_message_bytes,
    record_limits,
)
from service.logging import register_secrets
from service.pipeline import Engine, EngineSettings
from service.ratelimit import RateLimiter, build_limiter
from service.redis_url import parse_redis_url
from service.scheduler import DurationModel, PollPolicy
from service.servers import EmbeddedServer, embedded_server
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


def register_settings_secrets(settings: Settings) -> None:
    """Register every secret the settings carry, so that no log line can ever print one."""
    redis_url = settings.redis
    passthrough = {
        **kafka_passthrough(),
        **kafka_passthrough(kind="consumer"),
        **kafka_passthrough(kind="producer"),
    }
    register_secrets(
        [
            settings.docutray_api_key.get_secret_value(),
            redis_url,
            urlsplit(redis_url).password if redis_url else None,
            *(parse_redis_url(redis_url).secrets() if redis_url else ()),
            *(v for k, v in passthrough.items() if is_secret_property(k)),
        ]
    )


def docutray_client(settings: Settings) -> DocuTrayClient:
    """The DocuTray client the settings describe, timing every call into the metrics."""
    return DocuTrayClient(
        base_url=settings.docutray_base_url,
        api_key=settings.docutray_api_key.get_secret_value(),
        connect_timeout_s=settings.docutray_connect_timeout_s,
        read_timeout_s=settings.docutray_read_timeout_s,
        write_timeout_s=settings.docutray_write_timeout_s,
        max_connections=settings.docutray_max_connections,
        on_response=_on_response,
    )


def rate_limiter(settings: Settings) -> RateLimiter:
    """The shared limiter (Redis when REDIS_URL is set, else in-process), its rates exported."""
    limiter = build_limiter(
        redis_url=settings.redis,
        submit_rate_per_minute=settings.submit_rate_per_minute,
        status_rate_per_minute=settings.status_rate_per_minute,
        shared_budget=settings.shared_budget,
        burst=settings.rate_burst,
        expected_replicas=settings.expected_replicas,
        key_prefix=_key_prefix(settings),
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
    return limiter


def poll_policy(settings: Settings) -> PollPolicy:
    """When to poll: the learned durations, or (webhooks on) a slower fallback for lost ones."""
    model = DurationModel(default_median_s=settings.poll_default_median_s)
    if settings.webhooks_enabled:
        # Webhooks wake conversions; polling is the slower fallback for lost ones.
        return FallbackPollPolicy(
            floor_s=settings.webhook_fallback_poll_s,
            model=model,
            first_poll_quantile=settings.poll_first_quantile,
            min_interval_s=settings.poll_min_interval_s,
            max_interval_s=max(settings.poll_max_interval_s, settings.webhook_fallback_poll_s),
        )
    return PollPolicy(
        model=model,
        first_poll_quantile=settings.poll_first_quantile,
        min_interval_s=settings.poll_min_interval_s,
        max_interval_s=settings.poll_max_interval_s,
    )


def usage_watcher(
    settings: Settings, *, client: DocuTrayClient, limiter: RateLimiter, instance: str
) -> UsageWatcher | None:
    """The monthly usage watcher, unless BRIDGE_USAGE_POLL_INTERVAL_S is 0."""
    if settings.usage_poll_interval_s <= 0:
        return None
    return UsageWatcher(
        client=client,
        limiter=limiter,
        redis_url=settings.redis,
        key_prefix=_key_prefix(settings),
        instance=instance,
        interval_s=settings.usage_poll_interval_s,
        page_budget=settings.monthly_page_budget,
    )


def _key_prefix(settings: Settings) -> str:
    """The Redis key prefix the replicas of one group share (one hash slot in a cluster)."""
    return f"docutray-bridge:{{{settings.group_id}}}:"


def _ops_server(
    settings: Settings, *, live: Callable[[], Probe], ready: Callable[[], Probe]
) -> EmbeddedServer:
    """The /metrics, /livez and /readyz server (not started)."""
    return embedded_server(
        create_ops_app(live=live, ready=ready),
        host=settings.metrics_host,
        port=settings.metrics_port,
    )


class _Webhooks:
    """The webhook path: the receiver's server, the producer behind it, the completions reader."""

    def __init__(
        self,
        settings: Settings,
        ks: KafkaSettings,
        *,
        partitions: int,
        owned: Callable[[], frozenset[int]],
        on_completion: Callable[[int, str, str], object],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.topic = completions_topic(settings)
        self.port = settings.webhook_port
        self.producer = CompletionProducer(ks.common)
        self.server = webhook_server(
            WebhookReceiver(
                topic=self.topic,
                partitions=partitions,
                producer=self.producer,
                max_body_bytes=settings.webhook_max_body_bytes,
                rate_per_source=settings.webhook_rate_per_source,
            ),
            host=settings.webhook_host,
            port=settings.webhook_port,
        )
        self.reader = CompletionsReader(
            ks.common,
            topic=self.topic,
            group_id=settings.group_id,
            owned=owned,
            on_completion=on_completion,
            loop=loop,
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        """Start the producer, the server and the reader; return the server's task."""
        self.producer.start()
        task = loop.create_task(self.server.serve())
        self.reader.start()
        log.info("webhooks_listening", port=self.port, topic=self.topic)
        return task

    async def stop(self) -> None:
        """Stop taking webhooks, stop reading completions, deliver what is queued (bounded)."""
        self.server.should_exit = True
        await asyncio.to_thread(self.reader.stop)
        await asyncio.to_thread(self.producer.close)


class Bridge:
    """One replica, wired from the settings: built, run and shut down in the caller's loop.

    ::

        bridge = await Bridge.build(settings)  # topics checked, parts created; nothing started
        code = await bridge.run()              # serves until request_stop(), shutdown() or a
                                               # fatal error, then shuts down; the exit code

    ``run_bridge`` (the CLI) adds the signal handlers; a test runs the same object
    in its own process and calls :meth:`shutdown`.
    """

    def __init__(self, settings: Settings, *, layout: TopicLayout) -> None:
        """Create every part; start nothing (use :meth:`build`, which checks the topics first)."""
        loop = asyncio.get_running_loop()
        self.settings = settings
        self.ks = kafka_settings(settings)
        self.client = docutray_client(settings)
        self.limiter = rate_limiter(settings)
        output_limits = record_limits(layout, producer_max_bytes=self.ks.producer_max_bytes)
        self.ks.dead_letter_max_bytes = output_limits.get(
            self.ks.dead_letter_topic, self.ks.dead_letter_max_bytes
        )
        self.documents = DocumentReader(self.ks.common, self.ks.documents_topic)
        self.channel = Channel()
        self.engine = Engine(
            settings=EngineSettings.from_settings(settings),
            kafka=self.channel,
            client=self.client,
            limiter=self.limiter,
            policy=poll_policy(settings),
            documents=self.documents,
            output_limits=output_limits,
            rng=random.Random(),
        )
        self.kafka = KafkaIO(self.ks, loop=loop, hooks=self.engine, channel=self.channel)
        self.ops_server = _ops_server(settings, live=self.live, ready=self.ready)
        self.webhooks = (
            _Webhooks(
                settings,
                self.ks,
                partitions=layout.partitions,
                owned=lambda: self.kafka.assigned,
                on_completion=self.engine.wake,
                loop=loop,
            )
            if settings.webhooks_enabled
            else None
        )
        self.usage = usage_watcher(
            settings, client=self.client, limiter=self.limiter, instance=self.ks.instance_id
        )
        # Not ready when a Kafka call has blocked this long (the broker is gone, or librdkafka
        # hangs): every single call is bounded by 30 s, so longer means something is wrong.
        self._stall_ready_s = min(45.0, settings.heartbeat_timeout_s / 2)
        self._stopping = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._shutdown_task: asyncio.Task[int] | None = None

    @classmethod
    async def build(cls, settings: Settings) -> Bridge:
        """Register the secrets, export the metric series, create or check the topics, wire."""
        register_settings_secrets(settings)
        metrics.init_series()
        ks = kafka_settings(settings)
        log.info(
            "bridge_starting",
            version=__version__,
            instance=ks.instance_id,
            kafka=redacted(ks.common),
            docutray_base_url=settings.docutray_base_url,
            limiter="redis" if settings.redis else "in-process",
        )
        layout = await asyncio.to_thread(
            ensure_topics, settings, common=ks.common, errors=KafkaErrorLog("admin")
        )
        log.info("topics_ready", input_partitions=layout.partitions, changelog=ks.changelog_topic)
        return cls(settings, layout=layout)

    async def run(self) -> int:
        """Start every part, serve until stopped or failed, shut down; return the exit code."""
        self._start()
        log.info("bridge_running", metrics_port=self.settings.metrics_port)
        await asyncio.wait(
            {self._tasks["stop_wait"], self._tasks["fatal_wait"], self._tasks["engine"]},
            return_when=asyncio.FIRST_COMPLETED,
        )
        return await self.shutdown()

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (what SIGTERM and SIGINT do); returns at once."""
        self._stopping.set()

    async def shutdown(self) -> int:
        """Drain gracefully and stop every part in order; the exit code (0: a clean stop).

        Safe to call more than once and from outside :meth:`run`: every caller waits for
        the one shutdown and gets its exit code.
        """
        self._stopping.set()
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown())
        return await asyncio.shield(self._shutdown_task)

    def live(self) -> Probe:
        """Liveness: the engine's and the Kafka thread's heartbeats are recent."""
        return liveness(
            now=time.monotonic(),
            heartbeats={"engine": self.engine.heartbeat, "kafka": self.kafka.heartbeat},
            timeout_s=self.settings.heartbeat_timeout_s,
        )

    def ready(self) -> Probe:
        """Readiness (and the docutray_bridge_ready gauge): joined, not stopping, not paused."""
        engine, kafka = self.engine, self.kafka
        failure = engine.failure or kafka.error
        stalled = time.monotonic() - kafka.heartbeat > self._stall_ready_s
        probe = readiness(
            joined=kafka.joined.is_set(),
            stopping=self._stopping.is_set(),
            paused=engine.paused_reasons
            | engine.hold_reasons
            | ({"kafka_stalled"} if stalled else set())
            | ({"restoring"} if kafka.restoring else set()),
            failure=str(failure) if failure else None,
            extra={
                "assigned_partitions": sorted(kafka.assigned),
                "pending": engine.counts(),
                "limiter": self.limiter.describe(),
            },
        )
        metrics.READY.set(1 if probe.ok else 0)
        return probe

    def _start(self) -> None:
        """Start the Kafka thread, the servers, the engine and the watchers, in that order."""
        if self._tasks:
            raise RuntimeError("a Bridge runs once")
        loop = asyncio.get_running_loop()
        self.kafka.start()
        tasks = self._tasks
        tasks["ops_server"] = loop.create_task(self.ops_server.serve())
        tasks["submit_hold"] = loop.create_task(self.engine.watch_submit_hold())
        if self.usage is not None:
            tasks["usage"] = loop.create_task(self.usage.run())
        if self.webhooks is not None:
            tasks["webhooks"] = self.webhooks.start(loop)
        tasks["engine"] = loop.create_task(self.engine.run())
        tasks["fatal_wait"] = loop.create_task(self.engine.wait_failed())
        tasks["watchdog"] = loop.create_task(self._watch())
        tasks["stop_wait"] = loop.create_task(self._stopping.wait())

    async def _watch(self) -> None:
        """Keep the readiness gauge current, and end the process if the Kafka thread hangs.

        A librdkafka call that never returns (seen after a broker restart, in
        `send_offsets_to_transaction`) would leave the replica holding partitions
        and doing nothing; exiting hands them to another replica, and a restart
        restores everything from the changelog.
        """
        timeout_s = self.settings.heartbeat_timeout_s
        while not self._stopping.is_set():
            self.ready()  # updates docutray_bridge_ready even when nobody probes
            age = time.monotonic() - self.kafka.heartbeat
            if age > timeout_s and not self.kafka.stopped.is_set():
                log.critical(
                    "kafka_thread_stalled",
                    seconds=round(age, 1),
                    action="exiting so that another replica (or the restarted one) takes over; "
                    "nothing is lost",
                )
                self.engine.fatal(TimeoutError(f"Kafka thread stalled for {age:.0f} s"))
                return
            await asyncio.sleep(1.0)

    async def _shutdown(self) -> int:
        """The steps of the module docstring, in order; the exit code."""
        started = time.monotonic()
        grace_s = self.settings.shutdown_grace_s
        log.info("bridge_stopping", action="draining in-flight work; committing; leaving the group")
        # Step 1. Stop fetching input.
        self.channel.pause("shutdown")
        # Step 2. Let in-flight submits record their outcome: the grace but for the final
        # commit and close (a second or two; the chart gives the pod
        # BRIDGE_SHUTDOWN_GRACE_S + 5 s before it is killed).
        margin_s = min(2.0, grace_s / 5)
        await self.engine.drain(grace_s=max(0.5, grace_s - margin_s))
        # Step 3. Commit the last transaction, leave the group, close the producer.
        joined = True
        if self._tasks:
            self.kafka.stop()
            left_s = max(1.0, grace_s - (time.monotonic() - started))
            joined = await asyncio.to_thread(self.kafka.join, left_s)
        await self._stop_parts()
        # Step 4. The exit code.
        return self._exit_code(joined=joined, started=started)

    async def _stop_parts(self) -> None:
        """Stop the servers, the webhook path and every task; close the clients."""
        self.ops_server.should_exit = True
        if self.webhooks is not None:
            await self.webhooks.stop()
        ops_task = self._tasks.pop("ops_server", None)
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:  # bounded: a task that ignored its cancel must not hold the exit up
            await asyncio.wait(self._tasks.values(), timeout=2.0)
        if ops_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(ops_task, timeout=2)
        await self.client.aclose()
        await self.limiter.close()
        self.documents.close()

    def _exit_code(self, *, joined: bool, started: float) -> int:
        failure = self.engine.failure or self.kafka.error
        if failure is not None:
            log.critical(
                "bridge_failed", error=str(failure), action="restarting restores all state"
            )
            return 1
        if not joined:
            log.error(
                "bridge_stop_timeout", action="Kafka did not close in time; pending work is safe"
            )
            return 1
        log.info("bridge_stopped", seconds=round(time.monotonic() - started, 2))
        return 0


def _on_response(endpoint: str, status_code: int | None, duration_s: float) -> None:
    if endpoint in metrics.ENDPOINTS:
        metrics.HTTP_DURATION.labels(endpoint).observe(duration_s)


def _on_limiter_event(kind: str, fields: dict[str, Any]) -> None:
    if kind == "effective_rate":
        metrics.LIMITER_EFFECTIVE_RATE.labels(fields["budget"]).set(fields["per_minute"] / 60)
    elif kind == "degraded":
        metrics.LIMITER_DEGRADED.set(1 if fields["degraded"] else 0)


async def run_bridge(settings: Settings) -> int:
    """Run the bridge until SIGTERM/SIGINT; return the process exit code."""
    bridge = await Bridge.build(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bridge.request_stop)
    return await bridge.run()
