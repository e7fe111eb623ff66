"""Usage gauges read by one replica at a time (real Redis), and pages on results."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from service import metrics
from service.docutray import ConversionStatus, Usage
from service.outcomes import build_result
from service.ratelimit import build_limiter
from service.usage import UsageWatcher
from tests.fixtures.stack import new_id

pytestmark = pytest.mark.redis


class FakeClient:
    """Counts GET /api/usage calls; answers fixed figures."""

    def __init__(self, pages: int, conversions: int) -> None:
        self.calls = 0
        self.pages = pages
        self.conversions = conversions

    async def get_usage(self, **_: Any) -> Usage:
        self.calls += 1
        await asyncio.sleep(0.01)  # wait-ok: the fake answers with some latency (not a wait)
        return Usage(
            year=2026,
            month=12,
            successful_pages=self.pages,
            successful_conversions=self.conversions,
        )


def watcher(redis_url: str, prefix: str, client: FakeClient, name: str) -> UsageWatcher:
    limiter = build_limiter(
        redis_url=None,
        submit_rate_per_minute=600,
        status_rate_per_minute=600,
        shared_budget=False,
        burst=5,
        expected_replicas=1,
        key_prefix=prefix,
    )
    return UsageWatcher(
        client=client,  # type: ignore[arg-type]
        limiter=limiter,
        redis_url=redis_url,
        key_prefix=prefix,
        instance=name,
        interval_s=30.0,
        page_budget=1000,
    )


async def test_one_replica_at_a_time_reads_usage_and_every_replica_exports_it(
    redis_url: str,
) -> None:
    prefix = f"{new_id('usage')}:"
    clients = [FakeClient(850, 40) for _ in range(3)]
    watchers = [watcher(redis_url, prefix, c, f"r{i}") for i, c in enumerate(clients)]
    called = await asyncio.gather(*(w.turn() for w in watchers))
    assert sorted(called) == [False, False, True]
    assert sum(c.calls for c in clients) == 1
    assert metrics.USAGE_PAGES._value.get() == 850
    assert metrics.USAGE_CONVERSIONS._value.get() == 40
    assert metrics.MONTHLY_PAGE_BUDGET._value.get() == 1000
    # Within the interval nobody calls again; the stored figures are still exported.
    metrics.USAGE_PAGES.set(0)
    called = await asyncio.gather(*(w.turn() for w in watchers))
    assert not any(called)
    assert sum(c.calls for c in clients) == 1
    assert metrics.USAGE_PAGES._value.get() == 850
    for w in watchers:
        await w.aclose()


def test_pages_appear_on_a_result_only_when_docutray_reports_them() -> None:
    def result(**status: Any) -> dict[str, Any]:
        built = build_result(
            request_id="r",
            status=ConversionStatus(conversion_id="c", status="SUCCESS", data={}, **status),
            document_type_code="invoice",
            metadata=None,
            filename=None,
            received_at=datetime.now(UTC),
            submitted_at=None,
            status_calls=1,
            submit_attempts=1,
        )
        out: dict[str, Any] = json.loads(built.model_dump_json())
        return out

    assert result(pages=3)["pages"] == 3
    assert result(pageCount=2)["pages"] == 2
    assert "pages" not in result()
