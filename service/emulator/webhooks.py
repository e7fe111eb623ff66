"""Webhook deliveries: DocuTray's conversion events POSTed to configured URLs.

DocuTray posts `CONVERSION_STARTED`, `CONVERSION_COMPLETED` and
`CONVERSION_FAILED` as JSON to one HTTPS endpoint per organisation and wants
a 2xx within 30 s (docs/docutray-api.md). The emulator does the same, to
every URL in `webhook_urls`, with faults a receiver must survive:

- `webhook_drop_rate`: an event is never delivered to a URL (a lost webhook);
- `webhook_duplicate_rate`: it is delivered twice;
- `webhook_delay_s`: the first attempt waits this long after the event;
- a non-2xx answer, a timeout or a refused connection is retried up to
  `webhook_max_attempts` in all, `webhook_retry_delay_s` doubling between
  attempts; each failure and the final give-up are logged. (Whether DocuTray
  retries is [unknown].)

When: STARTED when the conversion turns PROCESSING, COMPLETED/FAILED when it
ends (the same instants its status calls observe). Payloads are the status
body at that instant plus `document_metadata` when the submit carried any,
with no wrapper and no signature (DocuTray's signature scheme is not
documented). Every knob is read when the event fires, so a
`POST /_emulator/config` takes effect for events not yet fired; conversions
accepted while no URL was configured never send webhooks. A conversion
forgotten (`/_emulator/forget`) before its event sends nothing.

Determinism: whether an event is dropped or duplicated for a URL is drawn
from a random source seeded by the run's seed, the conversion's sequence
number, the event and the URL, so it does not depend on timing.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
import structlog

from service.emulator.config import EmulatorConfig, WebhookEvent
from service.emulator.conversions import Conversion
from service.emulator.stats import EmulatorStats

log = structlog.get_logger(__name__)

USER_AGENT: Final = "docutray-emulator-webhooks"


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    """What happens to one event at one URL, drawn before it is sent."""

    dropped: bool
    copies: int


def draw_delivery(
    seed: int, sequence: int, event: WebhookEvent, url: str, *, drop_rate: float, dup_rate: float
) -> DeliveryPlan:
    """Drop or duplicate one event for one URL; always two draws, whatever the rates."""
    rng = random.Random(f"docutray-emulator-webhook:{seed}:{sequence}:{event}:{url}")
    drop_draw = rng.random()
    dup_draw = rng.random()
    return DeliveryPlan(dropped=drop_draw < drop_rate, copies=2 if dup_draw < dup_rate else 1)


def event_payload(
    conversion: Conversion,
    event: WebhookEvent,
    *,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    """The documented payload of `event` for `conversion` (no wrapper, snake_case keys)."""
    if event == "CONVERSION_STARTED":
        body = conversion.body_in("PROCESSING")
    else:
        body = conversion.final_body()
    if metadata is not None:
        body["document_metadata"] = metadata
    return body


class WebhookDispatcher:
    """Schedules each conversion's events and delivers them to the configured URLs."""

    def __init__(
        self,
        *,
        config: Callable[[], EmulatorConfig],
        stats: Callable[[], EmulatorStats],
        is_live: Callable[[Conversion], bool],
    ) -> None:
        self._config = config
        self._stats = stats
        self._is_live = is_live
        self._client: httpx.AsyncClient | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open the connection pool (the app's lifespan calls this)."""
        self._client = httpx.AsyncClient(
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        """Cancel every pending event and delivery, then close the pool."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def pending(self) -> int:
        """Events not yet fired plus deliveries in progress."""
        return len(self._timers) + len(self._tasks)

    def schedule(
        self, conversion: Conversion, *, metadata: dict[str, Any] | None, now_s: float
    ) -> None:
        """Arrange the conversion's events; a no-op while no webhook URL is configured."""
        if not self._config().webhook_urls or self._client is None:
            return
        final: WebhookEvent = (
            "CONVERSION_COMPLETED" if conversion.plan.outcome == "SUCCESS" else "CONVERSION_FAILED"
        )
        started_at_s = conversion.submitted_at_s + conversion.plan.queue_s
        events: tuple[tuple[WebhookEvent, float], ...] = (
            ("CONVERSION_STARTED", started_at_s),
            (final, conversion.ends_at_s),
        )
        for event, at_s in events:
            self._at(max(0.0, at_s - now_s), conversion, event, metadata)

    def _at(
        self,
        delay_s: float,
        conversion: Conversion,
        event: WebhookEvent,
        metadata: dict[str, Any] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        holder: list[asyncio.TimerHandle] = []

        def fire() -> None:
            self._timers.discard(holder[0])
            self._fire(conversion, event, metadata)

        timer = loop.call_later(delay_s, fire)
        holder.append(timer)
        self._timers.add(timer)

    def _fire(
        self, conversion: Conversion, event: WebhookEvent, metadata: dict[str, Any] | None
    ) -> None:
        config = self._config()
        if event not in config.webhook_events or not config.webhook_urls:
            return
        if not self._is_live(conversion):
            self._stats().webhooks_skipped_forgotten += 1
            return
        self._stats().webhook_events[event] += 1
        body = json.dumps(
            event_payload(conversion, event, metadata=metadata),
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        for url in config.webhook_urls:
            plan = draw_delivery(
                config.seed,
                conversion.sequence,
                event,
                url,
                drop_rate=config.webhook_drop_rate,
                dup_rate=config.webhook_duplicate_rate,
            )
            if plan.dropped:
                self._stats().webhooks_dropped += 1
                log.debug(
                    "webhook_dropped",
                    webhook_event=event,
                    conversion_id=conversion.conversion_id,
                    url=url,
                )
                continue
            task = asyncio.create_task(
                self._deliver(url, body, plan.copies, event, conversion.conversion_id)
            )
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook_delivery_crashed", error=type(exc).__name__, detail=str(exc))

    async def _deliver(
        self, url: str, body: bytes, copies: int, event: WebhookEvent, conversion_id: str
    ) -> None:
        config = self._config()
        if config.webhook_delay_s > 0:
            await asyncio.sleep(config.webhook_delay_s)
        if copies > 1:
            self._stats().webhooks_duplicated += copies - 1
        for _ in range(copies):
            await self._deliver_once(url, body, event, conversion_id)

    async def _deliver_once(
        self, url: str, body: bytes, event: WebhookEvent, conversion_id: str
    ) -> None:
        client = self._client
        if client is None:
            return
        config = self._config()
        for attempt in range(1, config.webhook_max_attempts + 1):
            stats = self._stats()
            stats.webhook_attempts += 1
            outcome: str
            try:
                response = await client.post(
                    url,
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=config.webhook_timeout_s,
                )
                outcome = str(response.status_code)
                ok = 200 <= response.status_code <= 299
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
                ok = False
            stats = self._stats()
            stats.webhook_answers[outcome] += 1
            if ok:
                stats.webhooks_delivered += 1
                return
            last = attempt == config.webhook_max_attempts
            log.warning(
                "webhook_delivery_failed",
                webhook_event=event,
                conversion_id=conversion_id,
                url=url,
                attempt=attempt,
                outcome=outcome,
                action="giving up" if last else "retrying",
            )
            if last:
                stats.webhooks_failed += 1
                return
            stats.webhook_retries += 1
            await asyncio.sleep(config.webhook_retry_delay_s * 2 ** (attempt - 1))
