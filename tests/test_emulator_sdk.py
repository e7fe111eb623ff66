"""Contract tests: the official `docutray` SDK (0.2.1) against a real emulator process.

The SDK is a client nobody here wrote, so it checks that the emulator speaks
the API as DocuTray's own client expects: every request form, every status,
and each error surfacing as the SDK's own exception class. Where the SDK and
the contract page differ, the contract wins; the differences are asserted
here (see the `# SDK:` comments) so a new SDK version that changes them fails
loudly.
"""

from __future__ import annotations

import base64
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docutray
import jsonschema
import pytest
from docutray import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConversionStatus,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)

from tests.fixtures.emulator import (
    JPEG_BYTES,
    PDF_BYTES,
    PNG_BYTES,
    DocumentServer,
    EmulatorStarter,
    RunningEmulator,
)

POLL_S = 0.05
WAIT_S = 15.0


def test_sdk_version_is_the_one_the_contract_was_read_from() -> None:
    assert docutray.__version__ == "0.2.1"


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[Client]:
    with Client(api_key=emulator.api_key, base_url=emulator.base_url, max_retries=0) as c:
        yield c


def _schema(client: Client, code: str) -> dict[str, Any]:
    doc_type = client.document_types.get(f"dt_{code}")
    assert doc_type.codeType == code
    assert doc_type.jsonSchema is not None
    return doc_type.jsonSchema


def _assert_success(client: Client, status: ConversionStatus, code: str) -> ConversionStatus:
    assert status.status == "ENQUEUED"
    assert len(status.conversion_id) == 25
    assert status.status_url is not None
    assert status.status_url.endswith(f"/api/convert-async/status/{status.conversion_id}")
    final = status.wait(poll_interval=POLL_S, timeout=WAIT_S)
    assert final.status == "SUCCESS", final
    assert final.is_success()
    assert final.document_type_code == code
    assert final.request_timestamp is not None
    assert final.response_timestamp is not None
    assert final.response_timestamp >= final.request_timestamp
    assert final.error is None
    assert final.data is not None
    jsonschema.validate(final.data, _schema(client, code))
    return final


# --- request forms -------------------------------------------------------------------


def test_file_upload_from_path(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "scan.pdf"
    path.write_bytes(PDF_BYTES)
    status = client.convert.run_async(
        file=path, document_type_code="invoice", document_metadata={"request_id": "sdk-path"}
    )
    final = _assert_success(client, status, "invoice")
    assert final.original_filename == "scan.pdf"


def test_file_upload_from_bytes_with_wrong_declared_type(client: Client) -> None:
    # SDK: bytes default to application/pdf whatever they hold; the format is sniffed.
    status = client.convert.run_async(file=PNG_BYTES, document_type_code="receipt")
    _assert_success(client, status, "receipt")


def test_base64_raw_with_content_type(client: Client) -> None:
    status = client.convert.run_async(
        file_base64=base64.b64encode(JPEG_BYTES).decode(),
        content_type="image/jpeg",
        document_type_code="id_card",
    )
    final = _assert_success(client, status, "id_card")
    assert final.original_filename == "document.jpg"


def test_base64_data_uri(client: Client) -> None:
    uri = "data:application/pdf;base64," + base64.b64encode(PDF_BYTES).decode()
    status = client.convert.run_async(file_base64=uri, document_type_code="other")
    _assert_success(client, status, "other")


def test_url_form(client: Client, document_server: DocumentServer) -> None:
    status = client.convert.run_async(
        url=document_server.url("/doc.png"), document_type_code="receipt"
    )
    final = _assert_success(client, status, "receipt")
    assert final.original_filename == "doc.png"


async def test_async_client_run_async_and_wait(emulator: RunningEmulator) -> None:
    async with AsyncClient(
        api_key=emulator.api_key, base_url=emulator.base_url, max_retries=0
    ) as client:
        status = await client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        final = await status.wait_async(poll_interval=POLL_S, timeout=WAIT_S)
        assert final.status == "SUCCESS"
        again = await client.convert.get_status(status.conversion_id)
        assert again.data == final.data  # a finished conversion is stable


# --- statuses -------------------------------------------------------------------------


def test_every_intermediate_status_is_observed(emulator_factory: EmulatorStarter) -> None:
    # ENQUEUED for 0.375-0.75 s, PROCESSING until 1.5 s: wide windows for 50 ms polls.
    slow = emulator_factory(processing_median_s=1.5, processing_sigma=0, enqueued_fraction=0.5)
    with Client(api_key=slow.api_key, base_url=slow.base_url, max_retries=0) as client:
        seen: list[str] = []
        status = client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        seen.append(status.status)
        final = status.wait(
            poll_interval=POLL_S, timeout=WAIT_S, on_status=lambda s: seen.append(s.status)
        )
    assert final.status == "SUCCESS"
    order = list(dict.fromkeys(seen))
    assert order == ["ENQUEUED", "PROCESSING", "SUCCESS"], seen


def test_error_status_carries_the_error_text(emulator_factory: EmulatorStarter) -> None:
    failing = emulator_factory(processing_median_s=0.1, error_rate=1.0)
    with Client(api_key=failing.api_key, base_url=failing.base_url, max_retries=0) as client:
        status = client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        final = status.wait(poll_interval=POLL_S, timeout=WAIT_S)
    assert final.status == "ERROR"
    assert final.is_error()
    assert final.error
    assert final.data is None
    assert final.response_timestamp is not None


# --- errors as the SDK's exception classes -----------------------------------------------


def test_invalid_key_is_authentication_error(emulator: RunningEmulator) -> None:
    with Client(api_key="wrong-key", base_url=emulator.base_url, max_retries=0) as client:
        with pytest.raises(AuthenticationError) as caught:
            client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        with pytest.raises(AuthenticationError):
            client.convert.get_status("c" * 25)
    exc = caught.value
    assert exc.status_code == 401
    assert exc.body == {"error": "Invalid API key"}
    assert exc.request_id is not None
    assert exc.request_id.startswith("req_")
    # SDK: it reads `message`/`detail`/`error.message`, never a string `error`, so the
    # exception message of every {"error": "..."} body is the raw JSON text.
    assert exc.message == '{"error":"Invalid API key"}'
    assert "wrong-key" not in repr(exc)


@pytest.mark.parametrize(
    ("kwargs", "expected_error"),
    [
        ({"document_type_code": "payslip", "file": PDF_BYTES}, "Unknown document type: payslip"),
        ({"document_type_code": "invoice", "file": b"plain text"}, "Unsupported file format"),
        ({"document_type_code": "invoice", "file": b""}, "image is empty"),
        ({"document_type_code": "invoice", "file_base64": "%%%"}, "not valid base64"),
        ({"document_type_code": "", "file": PDF_BYTES}, "document_type_code is required"),
    ],
)
def test_validation_errors_are_bad_request(
    client: Client, kwargs: dict[str, Any], expected_error: str
) -> None:
    with pytest.raises(BadRequestError) as caught:
        client.convert.run_async(**kwargs)
    exc = caught.value
    assert exc.status_code == 400
    assert exc.message == "Validation error"
    assert isinstance(exc.body, dict)
    assert any(expected_error in e for e in exc.body["errors"]), exc.body


def test_other_keys_conversion_is_permission_denied(emulator: RunningEmulator) -> None:
    with Client(api_key=emulator.api_key, base_url=emulator.base_url, max_retries=0) as owner:
        conversion_id = owner.convert.run_async(
            file=PDF_BYTES, document_type_code="invoice"
        ).conversion_id
    with (
        Client(api_key=emulator.second_api_key, base_url=emulator.base_url, max_retries=0) as other,
        pytest.raises(PermissionDeniedError) as caught,
    ):
        other.convert.get_status(conversion_id)
    assert caught.value.status_code == 403
    assert caught.value.body == {"error": "Access denied to this conversion"}


def test_unknown_conversion_is_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.convert.get_status("cunknownconversion0000000")
    assert caught.value.body == {"error": "Conversion not found"}


def test_unknown_document_type_is_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError):
        client.document_types.get("dt_nope")


@pytest.fixture(scope="module")
def strict_emulator(emulator_factory: EmulatorStarter) -> RunningEmulator:
    """Small upload limit and a short URL timeout (never reconfigured)."""
    return emulator_factory(
        processing_median_s=0.2, max_upload_bytes=4096, url_download_timeout_s=0.5
    )


@pytest.fixture
def strict_client(strict_emulator: RunningEmulator) -> Iterator[Client]:
    with Client(
        api_key=strict_emulator.api_key, base_url=strict_emulator.base_url, max_retries=0
    ) as c:
        yield c


def test_too_large_is_a_generic_api_error_413(strict_client: Client) -> None:
    # SDK: no class for 413, so the generic APIError.
    for kwargs in (
        {"file": PDF_BYTES + b"\x00" * 5000},
        {"file_base64": base64.b64encode(PDF_BYTES + b"\x00" * 5000).decode()},
    ):
        with pytest.raises(APIError) as caught:
            strict_client.convert.run_async(document_type_code="invoice", **kwargs)
        exc = caught.value
        assert type(exc) is APIError
        assert exc.status_code == 413
        assert exc.message == "File exceeds maximum allowed size (4KB)"


def test_url_errors(strict_client: Client, document_server: DocumentServer) -> None:
    with pytest.raises(NotFoundError) as missing:
        strict_client.convert.run_async(
            url=document_server.url("/missing.pdf"), document_type_code="invoice"
        )
    assert missing.value.message == "Error accessing URL: 404 Not Found"
    with pytest.raises(NotFoundError) as forbidden:
        strict_client.convert.run_async(
            url=document_server.url("/forbidden"), document_type_code="invoice"
        )
    assert forbidden.value.message == "Error accessing URL: 403 Forbidden"
    # SDK: 408 has no class and is not retried (the contract treats it as transient).
    with pytest.raises(APIError) as slow:
        strict_client.convert.run_async(
            url=document_server.url("/slow/doc.pdf"), document_type_code="invoice"
        )
    assert type(slow.value) is APIError
    assert slow.value.status_code == 408
    assert slow.value.message == "URL download timeout (500ms)"
    with pytest.raises(APIError) as big:
        strict_client.convert.run_async(
            url=document_server.url("/big.pdf"), document_type_code="invoice"
        )
    assert big.value.status_code == 413
    with pytest.raises(BadRequestError):
        strict_client.convert.run_async(
            url=document_server.url("/notes.txt"), document_type_code="invoice"
        )


def test_rate_limit_is_rate_limit_error_with_retry_after(
    emulator_factory: EmulatorStarter,
) -> None:
    limited = emulator_factory(processing_median_s=0.2, rate_limit_per_minute=2)
    with Client(api_key=limited.api_key, base_url=limited.base_url, max_retries=0) as client:
        status = client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        client.convert.get_status(status.conversion_id)  # status calls spend the budget too
        with pytest.raises(RateLimitError) as caught:
            client.convert.get_status(status.conversion_id)
    exc = caught.value
    assert exc.status_code == 429
    assert exc.retry_after is not None
    assert 1 <= exc.retry_after <= 60
    assert exc.retry_after == float(exc.headers["retry-after"])
    assert exc.limit_type == "minute"
    assert exc.limit == 2
    assert exc.remaining == 0
    assert exc.reset_time is not None
    assert exc.reset_time > 1_600_000_000
    assert limited.stats()["rate_limited"] == 1


def test_injected_500s_are_internal_server_errors_and_the_sdk_retries_posts(
    emulator_factory: EmulatorStarter,
) -> None:
    chaos = emulator_factory(processing_median_s=0.2)
    with Client(api_key=chaos.api_key, base_url=chaos.base_url, max_retries=0) as client:
        conversion_id = client.convert.run_async(
            file=PDF_BYTES, document_type_code="invoice"
        ).conversion_id
        chaos.configure(fault_500_rate=1.0)
        with pytest.raises(InternalServerError) as on_status:
            client.convert.get_status(conversion_id)
        with pytest.raises(InternalServerError) as on_submit:
            client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
    assert on_status.value.message == "Internal server error: Failed to retrieve conversion status"
    assert on_submit.value.message == "Internal server error: Failed to start conversion"
    assert chaos.stats()["faults_injected"] == 2

    # SDK: by default it retries a failed POST twice (3 attempts).
    with (
        Client(api_key=chaos.api_key, base_url=chaos.base_url) as retrying,
        pytest.raises(InternalServerError),
    ):
        retrying.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
    stats = chaos.stats()
    assert stats["faults_injected"] == 5
    assert stats["submissions_rejected"]["500"] == 4
    assert stats["submissions_accepted"] == 1  # an injected 500 never creates a conversion


# --- the plan: quota, hour/day windows, usage (issue 14) --------------------------------------


def test_402_is_a_generic_api_error_that_the_sdk_does_not_retry(
    emulator_factory: EmulatorStarter,
) -> None:
    spent = emulator_factory(monthly_quota=0)
    # SDK: 402 has no class of its own and is not in its retryable set (default 2 retries).
    with Client(api_key=spent.api_key, base_url=spent.base_url) as retrying:
        with pytest.raises(APIError) as caught:
            retrying.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        exc = caught.value
        assert type(exc) is APIError
        assert exc.status_code == 402
        assert exc.request_id
        assert isinstance(exc.body, dict)
        assert set(exc.body) == {"error", "quota", "used", "resetDate"}
        assert (exc.body["quota"], exc.body["used"]) == (0, 0)
        # SDK: a string `error` is not taken as the message; the raw body text is.
        assert '"resetDate"' in exc.message
        # Status calls of earlier conversions are not blocked (none exist here: 404, not 402).
        with pytest.raises(NotFoundError):
            retrying.convert.get_status("cm_unknown")
    assert spent.stats()["submissions_rejected"] == {"402": 1}


@pytest.mark.parametrize(("window", "window_s"), [("hour", 3600), ("day", 86400)])
def test_hour_and_day_429s_are_rate_limit_errors_naming_the_window(
    emulator_factory: EmulatorStarter, window: str, window_s: int
) -> None:
    limited = emulator_factory(**{f"rate_limit_per_{window}": 1}, rate_limit_scope="submit")
    with Client(api_key=limited.api_key, base_url=limited.base_url, max_retries=0) as client:
        client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        before_s = time.time()
        with pytest.raises(RateLimitError) as caught:
            client.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
    exc = caught.value
    assert exc.limit_type == window
    assert (exc.limit, exc.remaining) == (1, 0)
    assert exc.reset_time is not None
    assert abs(exc.reset_time - (before_s + window_s)) <= 3
    assert exc.retry_after is not None
    assert window_s - 5 <= exc.retry_after <= window_s


@pytest.mark.parametrize(("window", "window_s"), [("hour", 3600), ("day", 86400)])
def test_the_sdk_would_sleep_through_a_whole_hour_or_day_window(
    emulator_factory: EmulatorStarter, monkeypatch: pytest.MonkeyPatch, window: str, window_s: int
) -> None:
    """SDK: it honours Retry-After with no cap, so a retrying client blocks for the window."""
    slept: list[float] = []
    fake_time = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    fake_time.sleep = slept.append
    monkeypatch.setattr(docutray._http, "time", fake_time)
    limited = emulator_factory(**{f"rate_limit_per_{window}": 1}, rate_limit_scope="submit")
    with Client(api_key=limited.api_key, base_url=limited.base_url) as retrying:
        retrying.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
        with pytest.raises(RateLimitError):
            retrying.convert.run_async(file=PDF_BYTES, document_type_code="invoice")
    assert len(slept) == 2  # two retries, each after the full Retry-After
    assert all(window_s - 10 <= s <= window_s for s in slept), slept
    assert limited.stats()["rate_limited_by_window"] == {window: 3}


def test_the_sdk_has_no_usage_call(client: Client) -> None:
    """SDK 0.2.1: GET /api/usage is not wrapped; a bridge calls it over plain HTTP."""
    assert not [name for name in dir(client) if "usage" in name.lower()]
    assert not [name for name in dir(docutray) if "usage" in name.lower()]


# --- document types ------------------------------------------------------------------------


def test_document_types_list_search_and_paging(client: Client) -> None:
    page = client.document_types.list(limit=3)
    assert page.total == 4
    assert page.has_next_page()
    codes = [t.codeType for t in page.auto_paging_iter()]
    assert codes == ["invoice", "receipt", "id_card", "other"]
    assert all(t.jsonSchema is None for t in page.data)  # the list has no schemas
    found = client.document_types.list(search="receipt")
    assert [t.codeType for t in found.data] == ["receipt"]
    assert found.data[0].isPublic is True
    assert found.data[0].createdAt is not None
