"""The emulator's plan behaviours (issue 14) on a real process: usage, quota, hour/day
windows and webhooks, plus the pure pieces behind them."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service.emulator.config import EmulatorConfig, KnobsPatch
from service.emulator.conversions import Conversion, ConversionPlan, new_conversion_id
from service.emulator.limits import PlanRateLimiter, rate_limited_body
from service.emulator.usage import (
    UsageLedger,
    month_of,
    next_month_start_s,
    quota_exceeded_body,
)
from service.emulator.webhooks import draw_delivery, event_payload
from tests.fixtures.emulator import (
    PDF_BYTES,
    PNG_BYTES,
    EmulatorStarter,
    RunningEmulator,
    WebhookReceiver,
)

# --------------------------------------------------------------------------- pure: limits


def test_an_hour_window_denies_with_its_own_limit_type_and_reset() -> None:
    limiter = PlanRateLimiter(per_minute=10, per_hour=3)
    for i in range(3):
        assert limiter.acquire("k", now_s=1000.0 + i * 100).allowed
    denied = limiter.acquire("k", now_s=1500.0)
    assert not denied.allowed
    assert (denied.limit_type, denied.limit, denied.remaining) == ("hour", 3, 0)
    assert denied.reset_at_s == 1000.0 + 3600
    assert limiter.acquire("k", now_s=4600.0).allowed  # the first call left the hour
    assert limiter.acquire("other", now_s=1500.0).allowed  # budgets are per key


def test_a_denied_call_spends_nothing_in_any_window() -> None:
    limiter = PlanRateLimiter(per_minute=2, per_hour=2)
    assert limiter.acquire("k", now_s=0.0).allowed
    assert limiter.acquire("k", now_s=1.0).allowed
    for t in range(2, 50):
        assert not limiter.acquire("k", now_s=float(t)).allowed
    # 48 refused calls spent nothing: the hour still holds exactly the two accepted ones.
    assert limiter.windows["hour"].check("k", now_s=61.0).remaining == 0
    assert limiter.acquire("k", now_s=3600.0).allowed


def test_when_several_windows_are_spent_the_latest_reset_is_named() -> None:
    limiter = PlanRateLimiter(per_minute=1, per_hour=1, per_day=1)
    assert limiter.acquire("k", now_s=10.0).allowed
    denied = limiter.acquire("k", now_s=20.0)
    assert (denied.limit_type, denied.reset_at_s) == ("day", 10.0 + 86400)


def test_fixed_day_windows_align_to_midnight_utc() -> None:
    limiter = PlanRateLimiter(per_day=1, algorithm="fixed")
    midnight = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
    assert limiter.acquire("k", now_s=midnight - 10).allowed
    denied = limiter.acquire("k", now_s=midnight - 5)
    assert (denied.allowed, denied.limit_type, denied.reset_at_s) == (False, "day", midnight)
    assert limiter.acquire("k", now_s=midnight).allowed


def test_limits_change_at_runtime_and_none_switches_a_window_off() -> None:
    limiter = PlanRateLimiter(per_hour=1)
    assert limiter.acquire("k", now_s=0.0).allowed
    assert not limiter.acquire("k", now_s=1.0).allowed
    limiter.set_limits(per_minute=None, per_hour=None, per_day=None)
    assert all(limiter.acquire("k", now_s=2.0 + i).allowed for i in range(100))


def test_429_body_names_the_hour_window() -> None:
    limiter = PlanRateLimiter(per_hour=1)
    limiter.acquire("k", now_s=1_000.0)
    body, retry_after_s = rate_limited_body(limiter.acquire("k", now_s=1_100.0), now_s=1_100.0)
    assert body == {
        "error": "Rate limit exceeded",
        "limitType": "hour",
        "limit": 1,
        "remaining": 0,
        "resetTime": 4600,
        "retryAfter": 3500,
    }
    assert retry_after_s == 3500


# --------------------------------------------------------------------------- pure: usage ledger


def test_months_and_their_resets_are_utc_calendar_months() -> None:
    assert month_of(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()) == (2026, 12)
    assert next_month_start_s((2026, 12)) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert next_month_start_s((2026, 4)) == datetime(2026, 5, 1, tzinfo=UTC).timestamp()


def test_quota_counts_accepted_submissions_per_owner_and_month() -> None:
    ledger = UsageLedger()
    april = datetime(2026, 4, 30, 23, 0, tzinfo=UTC).timestamp()
    for _ in range(2):
        assert ledger.check_quota("a", 2, now_s=april).allowed
        ledger.record_accepted("a", now_s=april, succeeds_at_s=None, pages=1)
    spent = ledger.check_quota("a", 2, now_s=april)
    assert (spent.allowed, spent.quota, spent.used) == (False, 2, 2)
    assert spent.reset_at_s == datetime(2026, 5, 1, tzinfo=UTC).timestamp()
    assert quota_exceeded_body(spent) == {
        "error": "Monthly conversion quota exceeded",
        "quota": 2,
        "used": 2,
        "resetDate": "2026-05-01T00:00:00.000Z",
    }
    assert ledger.check_quota("b", 2, now_s=april).allowed  # another key, another organisation
    assert ledger.check_quota("a", 2, now_s=april + 3600).allowed  # May
    assert ledger.check_quota("a", None, now_s=april).allowed  # no quota
    assert not ledger.check_quota("a", 0, now_s=april + 3600).allowed  # a zero quota


def test_usage_counts_successes_in_the_month_they_finish() -> None:
    ledger = UsageLedger()
    late_april = datetime(2026, 4, 30, 23, 59, 58, tzinfo=UTC).timestamp()
    ledger.record_accepted("a", now_s=late_april, succeeds_at_s=late_april + 1, pages=2)
    ledger.record_accepted("a", now_s=late_april, succeeds_at_s=late_april + 5, pages=3)
    ledger.record_accepted("a", now_s=late_april, succeeds_at_s=None, pages=9)  # will fail
    assert ledger.usage("a", (2026, 4), now_s=late_april)["successful_conversions"] == 0
    now = late_april + 10
    assert ledger.usage("a", (2026, 4), now_s=now) == {
        "year": 2026,
        "month": 4,
        "successful_pages": 2,
        "successful_conversions": 1,
    }
    may = ledger.usage("a", (2026, 5), now_s=now)
    assert (may["successful_conversions"], may["successful_pages"]) == (1, 3)
    assert ledger.usage("b", (2026, 5), now_s=now)["successful_conversions"] == 0


# --------------------------------------------------------------------------- pure: webhooks


def test_delivery_draws_are_seeded_and_follow_the_rates() -> None:
    plans = [
        draw_delivery(7, seq, "CONVERSION_COMPLETED", "http://h/x", drop_rate=0.3, dup_rate=0.2)
        for seq in range(2000)
    ]
    again = [
        draw_delivery(7, seq, "CONVERSION_COMPLETED", "http://h/x", drop_rate=0.3, dup_rate=0.2)
        for seq in range(2000)
    ]
    assert plans == again
    dropped = sum(p.dropped for p in plans) / len(plans)
    duplicated = sum(p.copies == 2 for p in plans) / len(plans)
    assert 0.25 < dropped < 0.35
    assert 0.15 < duplicated < 0.25
    other_seed = [
        draw_delivery(8, seq, "CONVERSION_COMPLETED", "http://h/x", drop_rate=0.3, dup_rate=0.2)
        for seq in range(2000)
    ]
    assert other_seed != plans


def _plan(outcome: str = "SUCCESS") -> ConversionPlan:
    return ConversionPlan(
        queue_s=1.0,
        duration_s=3.0,
        outcome="SUCCESS" if outcome == "SUCCESS" else "ERROR",
        error=None if outcome == "SUCCESS" else "Failed to extract data from document",
        data_seed=5,
    )


def _conversion(plan: ConversionPlan) -> Conversion:
    return Conversion(
        conversion_id=new_conversion_id(now_s=1000.0, counter=1),
        sequence=1,
        owner="owner",
        document_type_code="invoice",
        original_filename="a.pdf",
        submitted_at_s=1000.0,
        plan=plan,
    )


def test_event_payloads_have_exactly_the_documented_fields() -> None:
    conversion = _conversion(_plan())
    metadata = {"request_id": "r-1", "department": "finance"}
    started = event_payload(conversion, "CONVERSION_STARTED", metadata=metadata)
    assert set(started) == {
        "conversion_id",
        "status",
        "request_timestamp",
        "document_type_code",
        "original_filename",
        "document_metadata",
    }
    assert started["status"] == "PROCESSING"
    assert started["document_metadata"] == metadata
    completed = event_payload(conversion, "CONVERSION_COMPLETED", metadata=metadata)
    assert set(completed) == set(started) | {"response_timestamp", "data"}
    assert completed["status"] == "SUCCESS"
    assert completed["data"] == conversion.data()
    failed = event_payload(_conversion(_plan("ERROR")), "CONVERSION_FAILED", metadata=None)
    assert failed["status"] == "ERROR"
    assert failed["error"] == "Failed to extract data from document"
    assert "document_metadata" not in failed
    assert "data" not in failed


def test_knobs_patch_takes_the_plan_and_webhook_knobs() -> None:
    config = EmulatorConfig()
    patched = config.patched(
        KnobsPatch.model_validate(
            {
                "monthly_quota": 5,
                "rate_limit_per_hour": 100,
                "rate_limit_per_day": 1000,
                "webhook_urls": ["http://127.0.0.1:9/a", "http://127.0.0.1:9/a"],
                "webhook_drop_rate": 0.3,
                "webhook_events": ["CONVERSION_COMPLETED"],
            }
        )
    )
    assert patched.monthly_quota == 5
    assert (patched.rate_limit_per_hour, patched.rate_limit_per_day) == (100, 1000)
    assert patched.webhook_urls == ["http://127.0.0.1:9/a"]
    assert patched.webhook_events == ["CONVERSION_COMPLETED"]
    off = patched.patched(
        KnobsPatch.model_validate(
            {"monthly_quota": None, "rate_limit_per_hour": None, "webhook_urls": []}
        )
    )
    assert (off.monthly_quota, off.rate_limit_per_hour, off.webhook_urls) == (None, None, [])
    for bad in (
        {"webhook_urls": ["ftp://x/y"]},
        {"webhook_urls": ["not a url"]},
        {"webhook_drop_rate": 1.5},
        {"webhook_events": ["CONVERSION_EXPLODED"]},
        {"webhook_delay_s": None},
        {"monthly_quota": -1},
    ):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            KnobsPatch.model_validate(bad)


# --------------------------------------------------------------------------- HTTP helpers


def _client(emu: RunningEmulator, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key or emu.api_key}"}
    return httpx.Client(base_url=emu.base_url, headers=headers, timeout=10)


def _submit(client: httpx.Client, *, data: bytes = PDF_BYTES, **metadata: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "document_type_code": "invoice",
        "image_base64": base64.b64encode(data).decode(),
    }
    if metadata:
        body["document_metadata"] = metadata
    return client.post("/api/convert-async", json=body)


def _wait_for(predicate: Any, *, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # wait-ok: polling a condition under a deadline


def _final(client: httpx.Client, conversion_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.update(client.get(f"/api/convert-async/status/{conversion_id}").json())
        return seen["status"] in ("SUCCESS", "ERROR")

    _wait_for(done, what=f"{conversion_id} to finish")
    return seen


# --------------------------------------------------------------------------- /api/usage


def test_usage_counts_successful_conversions_and_pages(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory(processing_median_s=0.05, processing_sigma=0)
    assert emu.usage(api_key="wrong").status_code == 401
    empty = emu.usage()
    assert empty.status_code == 200
    now = datetime.now(tz=UTC)
    assert empty.json() == {
        "year": now.year,
        "month": now.month,
        "successful_pages": 0,
        "successful_conversions": 0,
    }
    with _client(emu) as client:
        ids = [_submit(client, data=PNG_BYTES).json()["conversion_id"] for _ in range(3)]
        ids += [_submit(client, data=PDF_BYTES).json()["conversion_id"] for _ in range(3)]
        assert all(_final(client, i)["status"] == "SUCCESS" for i in ids)
    body = emu.usage().json()
    assert body["successful_conversions"] == 6
    assert 3 + 3 <= body["successful_pages"] <= 3 + 3 * 3  # an image is 1 page, a PDF 1..3
    # Another key is another organisation; another month has nothing.
    assert emu.usage(api_key=emu.second_api_key).json()["successful_conversions"] == 0
    past = emu.usage(year=2020, month=1).json()
    assert past == {"year": 2020, "month": 1, "successful_pages": 0, "successful_conversions": 0}
    assert emu.usage(year=now.year, month=now.month).json() == body
    assert emu.stats()["usage_calls"] == 6


@pytest.mark.parametrize(
    "params", [{"year": 2026}, {"month": 4}, {"year": 2026, "month": 13}, {"year": 0, "month": 1}]
)
def test_usage_rejects_half_or_odd_months(emulator: RunningEmulator, params: Any) -> None:
    response = emulator.usage(**params)
    assert response.status_code == 400
    assert response.json()["message"] == "Validation error"


def test_usage_is_never_blocked_by_429_or_402(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory(rate_limit_per_minute=1, monthly_quota=0)
    with _client(emu) as client:
        assert client.get("/api/document-types").status_code == 200
        assert client.get("/api/document-types").status_code == 429
        for _ in range(5):
            assert emu.usage().status_code == 200
        emu.configure(rate_limit_per_minute=None)
        assert _submit(client).status_code == 402
        assert emu.usage().status_code == 200
    assert emu.stats()["counted_calls_total"] == 2  # usage spends no budget


# --------------------------------------------------------------------------- monthly quota


def test_a_spent_quota_answers_402_and_status_calls_go_on(
    emulator_factory: EmulatorStarter,
) -> None:
    emu = emulator_factory(monthly_quota=2, processing_median_s=0.05)
    with _client(emu) as client:
        first = _submit(client).json()["conversion_id"]
        assert _submit(client).status_code == 202
        refused = _submit(client)
        assert refused.status_code == 402
        body = refused.json()
        assert set(body) == {"error", "quota", "used", "resetDate"}
        assert (body["quota"], body["used"]) == (2, 2)
        now = datetime.now(tz=UTC)
        next_month = (now.year + now.month // 12, now.month % 12 + 1)
        assert body["resetDate"] == f"{next_month[0]:04d}-{next_month[1]:02d}-01T00:00:00.000Z"
        assert refused.headers["x-request-id"]
        assert _final(client, first)["status"] == "SUCCESS"  # status calls keep working
        with _client(emu, emu.second_api_key) as other:  # another organisation
            assert _submit(other).status_code == 202
        assert emu.configure(monthly_quota=3)["monthly_quota"] == 3
        assert _submit(client).status_code == 202
        assert _submit(client).status_code == 402
        emu.configure(monthly_quota=None)
        assert _submit(client).status_code == 202
    stats = emu.stats()
    assert stats["quota_exceeded"] == 2
    assert stats["submissions_rejected"] == {"402": 2}


def test_concurrent_submits_never_overshoot_the_quota(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory(monthly_quota=3)
    with _client(emu) as client, ThreadPoolExecutor(max_workers=12) as pool:
        codes = Counter(pool.map(lambda _: _submit(client).status_code, range(12)))
    assert codes == {202: 3, 402: 9}


# --------------------------------------------------------------------------- hour and day windows


@pytest.mark.parametrize(
    ("knob", "limit_type", "window_s"), [("hour", "hour", 3600), ("day", "day", 86400)]
)
def test_hour_and_day_windows_answer_429_with_their_limit_type(
    emulator_factory: EmulatorStarter, knob: str, limit_type: str, window_s: int
) -> None:
    emu = emulator_factory(
        **{f"rate_limit_per_{knob}": 2}, rate_limit_per_minute=100, rate_limit_scope="submit"
    )
    with _client(emu) as client:
        started_s = time.time()
        assert [_submit(client).status_code for _ in range(2)] == [202, 202]
        response = _submit(client)
        for _ in range(3):  # status calls are outside the submit scope
            assert client.get("/api/convert-async/status/cnone").status_code == 404
    assert response.status_code == 429
    body = response.json()
    assert (body["limitType"], body["limit"], body["remaining"]) == (limit_type, 2, 0)
    assert abs(body["resetTime"] - (started_s + window_s)) <= 3
    assert window_s - 5 <= body["retryAfter"] <= window_s
    assert response.headers["retry-after"] == str(body["retryAfter"])
    assert emu.stats()["rate_limited_by_window"] == {limit_type: 1}
    emu.configure(**{f"rate_limit_per_{knob}": None})
    with _client(emu) as client:
        assert _submit(client).status_code == 202


# --------------------------------------------------------------------------- webhooks


def _webhook_emulator(
    emulator_factory: EmulatorStarter, receiver: WebhookReceiver, **knobs: Any
) -> RunningEmulator:
    defaults: dict[str, Any] = {
        "processing_median_s": 0.1,
        "processing_sigma": 0,
        "webhook_retry_delay_s": 0.05,
    }
    return emulator_factory(webhook_urls=[receiver.url], **{**defaults, **knobs})


def test_webhooks_carry_the_documented_payloads_and_metadata(
    emulator_factory: EmulatorStarter, webhook_receiver: WebhookReceiver
) -> None:
    emu = _webhook_emulator(emulator_factory, webhook_receiver)
    with _client(emu) as client:
        conversion_id = _submit(client, request_id="r-1", tenant="acme").json()["conversion_id"]
        final = _final(client, conversion_id)
    # Two deliveries in flight at once may arrive in either order (so may DocuTray's).
    by_status = {b["status"]: b for b in webhook_receiver.wait_for(2)}
    started, completed = by_status["PROCESSING"], by_status["SUCCESS"]
    for hook in webhook_receiver.received:
        assert hook.path == "/webhooks/docutray"
        assert hook.headers["Content-Type"] == "application/json"
    assert started["status"] == "PROCESSING"
    assert started["conversion_id"] == conversion_id
    assert started["document_metadata"] == {"request_id": "r-1", "tenant": "acme"}
    assert set(completed) == {
        "conversion_id",
        "status",
        "request_timestamp",
        "response_timestamp",
        "document_type_code",
        "original_filename",
        "document_metadata",
        "data",
    }
    assert {k: v for k, v in completed.items() if k != "document_metadata"} == final
    assert emu.stats()["webhooks"]["delivered"] == 2


def test_failed_conversions_send_conversion_failed(
    emulator_factory: EmulatorStarter, webhook_receiver: WebhookReceiver
) -> None:
    emu = _webhook_emulator(
        emulator_factory, webhook_receiver, error_rate=1.0, webhook_events=["CONVERSION_FAILED"]
    )
    with _client(emu) as client:
        conversion_id = _submit(client).json()["conversion_id"]
    (failed,) = webhook_receiver.wait_for(1)
    assert failed["conversion_id"] == conversion_id
    assert failed["status"] == "ERROR"
    assert failed["error"]
    assert "document_metadata" not in failed
    assert emu.stats()["webhooks"]["events"] == {"CONVERSION_FAILED": 1}


def test_dropped_and_duplicated_webhooks(
    emulator_factory: EmulatorStarter, webhook_receiver: WebhookReceiver
) -> None:
    emu = _webhook_emulator(emulator_factory, webhook_receiver, webhook_drop_rate=1.0)
    with _client(emu) as client:
        _submit(client)
        _wait_for(lambda: emu.stats()["webhooks"]["dropped"] == 2, what="two dropped events")
        assert webhook_receiver.bodies() == []
        emu.configure(webhook_drop_rate=0.0, webhook_duplicate_rate=1.0)
        conversion_id = _submit(client).json()["conversion_id"]
    bodies = webhook_receiver.wait_for(4)
    assert Counter(b["status"] for b in bodies) == {"PROCESSING": 2, "SUCCESS": 2}
    assert {b["conversion_id"] for b in bodies} == {conversion_id}
    assert emu.stats()["webhooks"]["duplicated"] == 2


def test_non_2xx_answers_are_retried_a_limited_number_of_times(
    emulator_factory: EmulatorStarter, webhook_receiver: WebhookReceiver
) -> None:
    emu = _webhook_emulator(
        emulator_factory,
        webhook_receiver,
        webhook_events=["CONVERSION_COMPLETED"],
        webhook_max_attempts=3,
    )
    webhook_receiver.fail_next(2, status=503)
    with _client(emu) as client:
        _submit(client)
        bodies = webhook_receiver.wait_for(3)
        assert [b["status"] for b in bodies] == ["SUCCESS"] * 3
        _wait_for(lambda: emu.stats()["webhooks"]["delivered"] == 1, what="the delivery")
        webhook_receiver.fail_next(3, status=500)
        _submit(client)
        _wait_for(lambda: emu.stats()["webhooks"]["failed"] == 1, what="the give-up")
    hooks = emu.stats()["webhooks"]
    assert hooks["attempts"] == 6
    assert hooks["retries"] == 4
    assert hooks["answers"] == {"200": 1, "500": 3, "503": 2}
    assert "webhook_delivery_failed" in emu.log_text()
    assert len(webhook_receiver.bodies()) == 6


def test_an_unreachable_receiver_is_retried_then_given_up(
    emulator_factory: EmulatorStarter,
) -> None:
    emu = emulator_factory(
        webhook_urls=["http://127.0.0.1:9/nothing-listens"],
        webhook_events=["CONVERSION_COMPLETED"],
        webhook_max_attempts=2,
        webhook_retry_delay_s=0.01,
        processing_median_s=0.05,
    )
    with _client(emu) as client:
        assert _submit(client).status_code == 202
    _wait_for(lambda: emu.stats()["webhooks"]["failed"] == 1, what="the give-up")
    assert emu.stats()["webhooks"]["answers"] == {"ConnectError": 2}


def test_webhook_delay_and_runtime_configuration(
    emulator_factory: EmulatorStarter, webhook_receiver: WebhookReceiver
) -> None:
    emu = emulator_factory(processing_median_s=0.05, processing_sigma=0)
    with _client(emu) as client:
        _submit(client)  # no URL configured yet: never sends anything
        emu.configure(
            webhook_urls=[webhook_receiver.url],
            webhook_events=["CONVERSION_COMPLETED"],
            webhook_delay_s=0.6,
        )
        conversion_id = _submit(client).json()["conversion_id"]
        final = _final(client, conversion_id)
    (completed,) = webhook_receiver.wait_for(1)
    assert completed["conversion_id"] == conversion_id
    finished_s = datetime.fromisoformat(final["response_timestamp"]).timestamp()
    assert webhook_receiver.received[0].at_s - finished_s >= 0.55
    assert emu.configure()["webhook_urls"] == [webhook_receiver.url]


def test_forgotten_conversions_send_nothing(
    emulator_factory: EmulatorStarter, webhook_receiver: WebhookReceiver
) -> None:
    emu = _webhook_emulator(emulator_factory, webhook_receiver, processing_median_s=1.0)
    with _client(emu) as client:
        _submit(client)
    assert emu.forget() == 1
    _wait_for(lambda: emu.stats()["webhooks"]["skipped_forgotten"] == 2, what="both events skipped")
    assert webhook_receiver.bodies() == []


def test_webhook_drops_are_reproducible_from_the_seed(
    emulator_factory: EmulatorStarter, webhook_receiver: WebhookReceiver
) -> None:
    def run() -> list[str]:
        emu = _webhook_emulator(
            emulator_factory,
            webhook_receiver,
            seed=11,
            webhook_drop_rate=0.5,
            webhook_events=["CONVERSION_COMPLETED"],
            processing_median_s=0.05,
        )
        with _client(emu) as client:
            for i in range(12):
                _submit(client, request_id=f"r{i}")
        _wait_for(
            lambda: emu.stats()["webhooks"]["dropped"] + emu.stats()["webhooks"]["delivered"] == 12,
            what="every event decided",
        )
        emu.stop()
        delivered = sorted(json.dumps(b["document_metadata"]) for b in webhook_receiver.bodies())
        webhook_receiver.received.clear()
        return delivered

    first = run()
    assert 0 < len(first) < 12
    assert run() == first


def test_a_shortened_hour_window_frees_up_at_its_reset_time(
    emulator_factory: EmulatorStarter,
) -> None:
    """Tests of clients that wait for `resetTime` shorten the window instead of waiting an hour."""
    emu = emulator_factory(
        rate_limit_per_hour=1, rate_limit_hour_window_s=2.0, rate_limit_scope="submit"
    )
    with _client(emu) as client:
        assert _submit(client).status_code == 202
        refused = _submit(client)
        assert refused.status_code == 429
        body = refused.json()
        assert body["limitType"] == "hour"
        assert body["retryAfter"] <= 2
        _wait_for(lambda: time.time() >= body["resetTime"], timeout_s=5, what="resetTime")
        assert _submit(client).status_code == 202
    assert emu.configure(rate_limit_hour_window_s=3600)["rate_limit_hour_window_s"] == 3600


def test_a_short_quota_period_resets_at_its_reset_date(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory(monthly_quota=1, monthly_quota_period_s=2.0)
    with _client(emu) as client:
        _wait_for(lambda: time.time() % 2.0 < 1.0, timeout_s=3, what="the start of a period")
        assert _submit(client).status_code == 202
        refused = _submit(client)
        assert refused.status_code == 402
        reset_s = datetime.fromisoformat(refused.json()["resetDate"]).timestamp()
        assert 0 < reset_s - time.time() <= 2.0
        _wait_for(lambda: time.time() >= reset_s, timeout_s=5, what="resetDate")
        assert _submit(client).status_code == 202
    off = emu.configure(monthly_quota_period_s=None)
    assert off["monthly_quota_period_s"] is None
