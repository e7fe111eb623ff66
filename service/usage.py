"""DocuTray's monthly usage as gauges, read by one replica at a time.

Every ``BRIDGE_USAGE_POLL_INTERVAL_S`` (jittered), each replica tries to take a
Redis lock (``SET NX PX``, held for most of the interval). The one that gets it
spends one status permit on ``GET /api/usage`` (never refused with 429/402 [doc];
whether it spends budget is [unknown], so it takes a permit) and stores the answer
in a Redis hash; every replica then exports the stored figures, so dashboards and
alerts see the same numbers whichever replica they scrape. Without Redis (one
replica, in-process limiter) the replica reads usage itself.

The optional ``BRIDGE_MONTHLY_PAGE_BUDGET`` is exported beside the usage; the
``DocuTrayPageBudget80`` alert compares the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import structlog
from redis.exceptions import RedisError

from service import metrics
from service.docutray import DocuTrayClient, DocuTrayError
from service.ratelimit import LimiterTimeout, RateLimiter
from service.ratelimit.redis_backend import RedisClient, connect

log = structlog.get_logger(__name__)

_REDIS_FAILURES = (RedisError, OSError)


class UsageWatcher:
    """Reads ``GET /api/usage`` now and then (one replica at a time) into gauges."""

    def __init__(
        self,
        *,
        client: DocuTrayClient,
        limiter: RateLimiter,
        redis_url: str | None,
        key_prefix: str,
        instance: str,
        interval_s: float,
        page_budget: int,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._redis: RedisClient | None = connect(redis_url) if redis_url else None
        self._lock_key = f"{key_prefix}usage:lock"
        self._data_key = f"{key_prefix}usage"
        self._instance = instance
        self._interval_s = interval_s
        self._rng = rng or random.Random()
        metrics.MONTHLY_PAGE_BUDGET.set(page_budget)

    async def run(self) -> None:
        """Until cancelled: take a turn, export the figures, sleep about one interval."""
        delay = self._rng.uniform(1.0, 5.0)  # soon after start, not all replicas at once
        try:
            while True:
                await asyncio.sleep(delay)
                delay = self._interval_s * self._rng.uniform(0.9, 1.1)
                try:
                    await self.turn()
                except Exception as exc:  # gauges only: never end the replica for them
                    log.warning("usage_read_failed", error=repr(exc))
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis connection (if any)."""
        if self._redis is not None:
            await self._redis.aclose()

    async def turn(self) -> bool:
        """One turn; True when this replica called DocuTray."""
        if self._redis is None:
            pages, conversions = await self._read_usage()
            self._export(pages, conversions, time.time())
            return True
        called = False
        try:
            mine = await self._redis.set(
                self._lock_key,
                self._instance,
                nx=True,
                px=max(1000, int(self._interval_s * 900)),
            )
        except _REDIS_FAILURES as exc:
            log.warning("usage_lock_failed", error=repr(exc), action="none: tried next turn")
            return False
        if mine:
            pages, conversions = await self._read_usage()
            called = True
            try:
                await self._redis.hset(
                    self._data_key,
                    mapping={"pages": pages, "conversions": conversions, "at": time.time()},
                )
            except _REDIS_FAILURES as exc:
                log.warning("usage_store_failed", error=repr(exc))
                self._export(pages, conversions, time.time())
                return called
        try:
            stored = await self._redis.hgetall(self._data_key)
        except _REDIS_FAILURES as exc:
            log.warning("usage_load_failed", error=repr(exc))
            return called
        if stored:
            self._export(
                int(stored.get(b"pages", 0)),
                int(stored.get(b"conversions", 0)),
                float(stored.get(b"at", 0)),
            )
        return called

    async def _read_usage(self) -> tuple[int, int]:
        # Never refused for rate [doc]: a busy budget must not starve the gauges for long.
        with contextlib.suppress(LimiterTimeout):
            await self._limiter.acquire("status", deadline=time.monotonic() + 30.0)
        try:
            usage = await self._client.get_usage()
        except DocuTrayError as exc:
            raise RuntimeError(f"GET /api/usage failed: {exc}") from None
        log.info(
            "usage_read",
            year=usage.year,
            month=usage.month,
            pages=usage.successful_pages,
            conversions=usage.successful_conversions,
        )
        return usage.successful_pages, usage.successful_conversions

    @staticmethod
    def _export(pages: int, conversions: int, at: float) -> None:
        metrics.USAGE_PAGES.set(pages)
        metrics.USAGE_CONVERSIONS.set(conversions)
        metrics.USAGE_UPDATED.set(at)
