"""The DocuTray client: error mapping, request forms, secrets, and end to end on the emulator."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import structlog
from python_multipart.multipart import MultipartParser

from service import __version__
from service.docutray import (
    AccessDenied,
    ApiTimeout,
    ApiUnreachable,
    ConversionLost,
    ConversionStatus,
    DocuTrayClient,
    DocuTrayError,
    EndpointNotFound,
    InvalidApiKey,
    QuotaExhausted,
    RateLimited,
    RequestRejected,
    ServerError,
    Submission,
    SystemicError,
    TransientError,
    UnexpectedResponse,
    UploadSizeMismatch,
    Usage,
    error_from_response,
    parse_quota,
    parse_rate_limit,
    parse_reset_time,
    parse_retry_after_header,
)

API_KEY = "sk-test-7f3c1e9a-very-secret"
PDF = b"%PDF-1.4\n" + b"0123456789" * 100 + b"\n%%EOF\n"
SUBMITTED = {
    "conversion_id": "cm5vm9hx30001m5cgh0p9v8qa",
    "status_url": "https://api.docutray.com/api/convert-async/status/cm5vm9hx30001m5cgh0p9v8qa",
    "status": "ENQUEUED",
}


# --------------------------------------------------------------------------- helpers


@dataclass
class Recorder:
    """A MockTransport handler that records requests and answers one canned response."""

    status_code: int = 202
    json_body: Any = field(default_factory=lambda: dict(SUBMITTED))
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.content is not None:
            return httpx.Response(self.status_code, content=self.content, headers=self.headers)
        return httpx.Response(self.status_code, json=self.json_body, headers=self.headers)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def make_client(handler: Callable[[httpx.Request], Any], **kwargs: Any) -> DocuTrayClient:
    return DocuTrayClient(
        base_url="https://app.docutray.test",
        api_key=API_KEY,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


@dataclass
class Part:
    headers: dict[str, str]
    data: bytes

    @property
    def disposition(self) -> str:
        return self.headers["content-disposition"]


def parse_multipart(request: httpx.Request) -> list[Part]:
    """Parse the body with python-multipart (an independent parser), in part order."""
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    boundary = content_type.split("boundary=", 1)[1]
    parts: list[Part] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers={}, data=bytearray(), field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode().lower()] = state["value"].decode()
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        parts.append(Part(headers=state["headers"], data=bytes(state["data"])))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    parser.write(request.content)
    parser.finalize()
    return parts


def field_named(parts: list[Part], name: str) -> Part:
    matches = [p for p in parts if f'name="{name}"' in p.disposition]
    assert len(matches) == 1, [p.disposition for p in parts]
    return matches[0]


def assert_common_headers(request: httpx.Request) -> None:
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["user-agent"] == f"docutray-bridge/{__version__}"
    assert request.headers["accept"] == "application/json"


def mapped(
    status: int,
    body: Any = None,
    *,
    endpoint: Any = "submit",
    form: Any = "upload",
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    now_s: float = 1_700_000_000.0,
) -> DocuTrayError:
    raw = content if content is not None else json.dumps(body).encode()
    return error_from_response(
        endpoint=endpoint,
        status_code=status,
        headers=httpx.Headers(headers or {}),
        content=raw,
        form=form,
        now_s=now_s,
        secrets=(API_KEY,),
    )


# --------------------------------------------------------------------------- models


def test_status_parses_contract_timestamps_and_ignores_unknown_fields() -> None:
    status = ConversionStatus.model_validate(
        {
            "conversion_id": "c1",
            "status": "SUCCESS",
            "request_timestamp": "2024-01-15T10:30:00.000Z",
            "response_timestamp": "2024-01-15T10:30:04.250Z",
            "document_type_code": "invoice",
            "original_filename": "a.pdf",
            "data": {"total": 1160},
            "a_field_from_the_future": [1, 2],
        }
    )
    assert status.terminal
    assert status.request_timestamp == datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert status.response_timestamp is not None
    assert status.response_timestamp.microsecond == 250_000
    assert status.data == {"total": 1160}
    assert not ConversionStatus(conversion_id="c", status="PROCESSING").terminal
    assert ConversionStatus(conversion_id="c", status="ERROR", error="boom").terminal


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "body", "endpoint", "form", "cls", "reason"),
    [
        (
            400,
            {"message": "Validation error", "errors": ["x"]},
            "submit",
            "url",
            RequestRejected,
            "invalid_request",
        ),
        (
            400,
            {"message": "Validation error", "errors": ["Unsupported file format: text/plain"]},
            "submit",
            "upload",
            RequestRejected,
            "unsupported_format",
        ),
        (
            400,
            {"message": "Invalid file type"},
            "submit",
            "base64",
            RequestRejected,
            "unsupported_format",
        ),
        (
            400,
            {"message": "Validation error", "errors": ["Invalid document type: nope"]},
            "submit",
            "upload",
            RequestRejected,
            "invalid_request",
        ),
        (
            400,
            {"message": "Validation error", "errors": ["invalid JSON format"]},
            "submit",
            "base64",
            RequestRejected,
            "invalid_request",
        ),
        (401, {"error": "Invalid API key"}, "submit", "upload", InvalidApiKey, None),
        (401, {"error": "Invalid API key"}, "status", None, InvalidApiKey, None),
        (403, {"error": "Access denied to this conversion"}, "status", None, ConversionLost, None),
        (403, {"error": "Forbidden"}, "submit", "url", AccessDenied, None),
        (
            404,
            {"message": "Error accessing URL: 404 Not Found"},
            "submit",
            "url",
            RequestRejected,
            "source_unavailable",
        ),
        (404, {"message": "Not found"}, "submit", "upload", EndpointNotFound, None),
        (404, {"error": "Conversion not found"}, "status", None, ConversionLost, None),
        (404, {"error": "Not found"}, "document_types", None, EndpointNotFound, None),
        (
            408,
            {"message": "URL download timeout (30000ms)"},
            "submit",
            "url",
            RequestRejected,
            "source_unavailable",
        ),
        (
            413,
            {"message": "File exceeds maximum allowed size (100MB)"},
            "submit",
            "upload",
            RequestRejected,
            "too_large",
        ),
        (
            415,
            {"message": "Unsupported Content-Type. Use multipart/form-data or application/json."},
            "submit",
            "upload",
            RequestRejected,
            "invalid_request",
        ),
        (429, {"error": "Rate limit exceeded"}, "status", None, RateLimited, None),
        (
            500,
            {"message": "Internal server error: Failed to start conversion"},
            "submit",
            "url",
            ServerError,
            None,
        ),
        (503, {"message": "busy"}, "status", None, ServerError, None),
        (418, {"message": "teapot"}, "submit", "url", UnexpectedResponse, None),
        (302, {}, "status", None, UnexpectedResponse, None),
    ],
)
def test_every_contract_status_maps_to_its_class(
    status: int, body: Any, endpoint: Any, form: Any, cls: type[DocuTrayError], reason: str | None
) -> None:
    error = mapped(status, body, endpoint=endpoint, form=form, headers={"X-Request-ID": "req-42"})
    assert type(error) is cls
    assert error.status_code == status
    assert error.endpoint == endpoint
    assert error.request_id == "req-42"
    assert error.body == body
    assert error.api_message == (body.get("error") or body.get("message"))
    if reason is not None:
        assert isinstance(error, RequestRejected)
        assert error.reason == reason
    if error.api_message:
        assert error.api_message in str(error)


def test_taxonomy_groups_what_the_pipeline_acts_on() -> None:
    assert issubclass(RateLimited, TransientError)
    assert issubclass(ServerError, TransientError)
    assert issubclass(ApiTimeout, TransientError)
    assert issubclass(ApiUnreachable, TransientError)
    assert issubclass(UnexpectedResponse, TransientError)
    assert issubclass(InvalidApiKey, SystemicError)
    assert issubclass(EndpointNotFound, SystemicError)
    assert not issubclass(ConversionLost, TransientError | SystemicError | RequestRejected)
    for cls in (RequestRejected, TransientError, SystemicError, ConversionLost):
        assert issubclass(cls, DocuTrayError)


def test_400_keeps_the_errors_list() -> None:
    error = mapped(
        400,
        {
            "message": "Validation error",
            "errors": ["document_type_code is required", "image is required"],
        },
    )
    assert isinstance(error, RequestRejected)
    assert error.errors == ["document_type_code is required", "image is required"]
    assert error.api_message == "Validation error"


def test_non_json_502_does_not_crash_parsing() -> None:
    error = mapped(
        502, content=b"<html><body>Bad gateway</body></html>", headers={"content-type": "text/html"}
    )
    assert type(error) is ServerError
    assert error.body is None
    assert error.api_message is None
    assert error.status_code == 502


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"\xff\xfe not utf8", b"null", b"{trunc"])
def test_odd_bodies_are_tolerated(content: bytes) -> None:
    error = mapped(400, content=content)
    assert isinstance(error, RequestRejected)
    assert error.body is None
    assert error.errors == []


def test_404_on_url_submit_with_html_body_is_a_wrong_route_not_a_bad_url() -> None:
    error = mapped(404, content=b"<html>Not Found</html>", form="url")
    assert type(error) is EndpointNotFound


# --------------------------------------------------------------------------- 429 details

NOW = 1_700_000_000.0


def test_429_full_body_and_numeric_header_takes_the_larger_wait() -> None:
    body = {
        "error": "Rate limit exceeded",
        "limitType": "minute",
        "limit": 60,
        "remaining": 0,
        "resetTime": NOW + 12,
        "retryAfter": 12,
    }
    error = mapped(429, body, headers={"Retry-After": "20"}, now_s=NOW)
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == pytest.approx(20.0)
    assert error.limit_type == "minute"
    assert error.limit == 60
    assert error.reset_at == datetime.fromtimestamp(NOW + 12, tz=UTC)
    error = mapped(429, body, headers={"Retry-After": "3"}, now_s=NOW)
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == pytest.approx(12.0)


def test_429_http_date_retry_after() -> None:
    header = email.utils.formatdate(NOW + 45, usegmt=True)
    error = mapped(
        429, {"error": "Rate limit exceeded"}, headers={"Retry-After": header}, now_s=NOW
    )
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == pytest.approx(45.0)
    assert parse_retry_after_header(email.utils.formatdate(NOW - 5, usegmt=True), now_s=NOW) == 0
    assert parse_retry_after_header("soon", now_s=NOW) is None
    assert parse_retry_after_header("", now_s=NOW) is None
    assert parse_retry_after_header("1.5", now_s=NOW) == 1.5


def test_reset_time_in_seconds_and_milliseconds() -> None:
    in_seconds = parse_reset_time(NOW + 30)
    in_ms = parse_reset_time((NOW + 30) * 1000)
    assert in_seconds == in_ms == datetime.fromtimestamp(NOW + 30, tz=UTC)
    assert parse_reset_time(0) is None
    assert parse_reset_time("not a number") is None
    assert parse_reset_time(True) is None
    fields = parse_rate_limit({"resetTime": int((NOW + 30) * 1000)}, {}, now_s=NOW)
    assert fields["retry_after_s"] == pytest.approx(30.0)


def test_429_with_nothing_to_go_on_and_the_documented_zero_example() -> None:
    error = mapped(429, content=b"slow down", now_s=NOW)
    assert isinstance(error, RateLimited)
    assert error.retry_after_s is None
    assert error.reset_at is None
    documented = {
        "error": "Rate limit exceeded",
        "limitType": "minute",
        "limit": 0,
        "remaining": 0,
        "resetTime": 0,
        "retryAfter": 0,
    }
    error = mapped(429, documented, now_s=NOW)
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == 0.0
    assert error.reset_at is None
    assert error.limit == 0


# --------------------------------------------------------------------------- client (MockTransport)


async def test_submit_url_sends_the_json_form() -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        submission = await client.submit_url(
            url="https://files.example/invoice.pdf",
            document_type_code="invoice",
            content_type="application/pdf",
            metadata={"request_id": "r-1", "n": 2},
        )
    assert submission == Submission.model_validate(SUBMITTED)
    request = recorder.last
    assert request.method == "POST"
    assert request.url == "https://app.docutray.test/api/convert-async"
    assert request.headers["content-type"] == "application/json"
    assert_common_headers(request)
    assert json.loads(request.content) == {
        "image_url": "https://files.example/invoice.pdf",
        "document_type_code": "invoice",
        "image_content_type": "application/pdf",
        "document_metadata": {"request_id": "r-1", "n": 2},
    }


@pytest.mark.parametrize("prefix", ["", "data:application/pdf;base64,"])
async def test_submit_base64_sends_the_value_as_is(prefix: str) -> None:
    recorder = Recorder()
    value = prefix + base64.b64encode(PDF).decode()
    async with make_client(recorder) as client:
        await client.submit_base64(
            data_b64=value, document_type_code="receipt", metadata={"ü": "ñ"}
        )
    request = recorder.last
    assert request.headers["content-type"] == "application/json"
    assert int(request.headers["content-length"]) == len(request.content)
    assert json.loads(request.content) == {
        "image_base64": value,
        "document_type_code": "receipt",
        "document_metadata": {"ü": "ñ"},
    }


async def test_submit_base64_with_line_breaks_is_escaped_properly() -> None:
    recorder = Recorder()
    value = base64.encodebytes(PDF).decode()  # MIME style, with newlines
    assert "\n" in value
    async with make_client(recorder) as client:
        await client.submit_base64(
            data_b64=value, document_type_code="invoice", content_type="application/pdf"
        )
    body = json.loads(recorder.last.content)
    assert body == {
        "image_base64": value,
        "document_type_code": "invoice",
        "image_content_type": "application/pdf",
    }


async def test_submit_upload_multipart_fields_from_a_file_object() -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        await client.submit_upload(
            file=io.BytesIO(PDF),
            filename='in"voice.pdf',
            document_type_code="invoice",
            metadata={"request_id": "r-9", "tags": ["a"]},
        )
    request = recorder.last
    assert_common_headers(request)
    assert int(request.headers["content-length"]) == len(request.content)
    assert "transfer-encoding" not in request.headers
    parts = parse_multipart(request)
    image = field_named(parts, "image")
    assert image.data == PDF
    assert 'filename="in%22voice.pdf"' in image.disposition
    assert image.headers["content-type"] == "application/pdf"
    assert field_named(parts, "document_type_code").data == b"invoice"
    metadata = field_named(parts, "document_metadata")
    assert "content-type" not in metadata.headers
    assert json.loads(metadata.data) == {"request_id": "r-9", "tags": ["a"]}


async def test_submit_upload_from_bytes_without_metadata() -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        await client.submit_upload(
            file=PDF, filename="scan", document_type_code="other", content_type="image/png"
        )
    parts = parse_multipart(recorder.last)
    assert [p.disposition.split("name=")[1].split(";")[0] for p in parts] == [
        '"document_type_code"',
        '"image"',
    ]
    assert field_named(parts, "image").headers["content-type"] == "image/png"
    assert field_named(parts, "image").data == PDF


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_submit_upload_from_an_async_iterator_with_and_without_size() -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        await client.submit_upload(
            file=_chunks(PDF, 7),
            filename="a.pdf",
            document_type_code="invoice",
            size_bytes=len(PDF),
        )
        sized = recorder.last
        await client.submit_upload(
            file=_chunks(PDF, 7), filename="a.pdf", document_type_code="invoice"
        )
        chunked = recorder.last
    assert int(sized.headers["content-length"]) == len(sized.content)
    assert chunked.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in chunked.headers
    for request in (sized, chunked):
        assert field_named(parse_multipart(request), "image").data == PDF


async def test_submit_upload_reads_a_file_from_its_current_position() -> None:
    recorder = Recorder()
    file = io.BytesIO(b"JUNK" + PDF)
    file.seek(4)
    async with make_client(recorder) as client:
        await client.submit_upload(file=file, filename="a.pdf", document_type_code="invoice")
    assert field_named(parse_multipart(recorder.last), "image").data == PDF
    assert int(recorder.last.headers["content-length"]) == len(recorder.last.content)


@pytest.mark.parametrize("declared", [len(PDF) - 1, len(PDF) + 1])
async def test_upload_size_mismatch_is_a_caller_error(declared: int) -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        with pytest.raises(UploadSizeMismatch):
            await client.submit_upload(
                file=_chunks(PDF, 100),
                filename="a.pdf",
                document_type_code="invoice",
                size_bytes=declared,
            )


async def test_get_status_quotes_the_id_and_parses() -> None:
    recorder = Recorder(
        status_code=200,
        json_body={
            "conversion_id": "a/b",
            "status": "PROCESSING",
            "request_timestamp": "2024-01-15T10:30:00.000Z",
            "document_type_code": "invoice",
            "original_filename": None,
        },
    )
    async with make_client(recorder) as client:
        status = await client.get_status("a/b")
    assert recorder.last.method == "GET"
    assert recorder.last.url.raw_path == b"/api/convert-async/status/a%2Fb"
    assert_common_headers(recorder.last)
    assert status.status == "PROCESSING"
    assert not status.terminal


@pytest.mark.parametrize(
    ("status_code", "content"),
    [
        (202, b"<html>accepted</html>"),
        (202, b'{"status": "ENQUEUED"}'),
        (200, b'{"conversion_id": "c", "status_url": "u", "status": "DONE"}'),
        (204, b""),
    ],
)
async def test_a_2xx_outside_the_contract_is_unexpected(status_code: int, content: bytes) -> None:
    recorder = Recorder(status_code=status_code, content=content)
    async with make_client(recorder) as client:
        with pytest.raises(UnexpectedResponse) as caught:
            await client.submit_url(url="https://x.example/a.pdf", document_type_code="invoice")
    assert caught.value.status_code == status_code


async def test_errors_over_the_wire_carry_request_id_and_body() -> None:
    recorder = Recorder(
        status_code=400,
        json_body={"message": "Validation error", "errors": ["image is required"]},
        headers={"X-Request-ID": "abc-123"},
    )
    async with make_client(recorder) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.submit_base64(data_b64="", document_type_code="invoice")
    assert caught.value.request_id == "abc-123"
    assert caught.value.errors == ["image is required"]
    assert caught.value.reason == "invalid_request"


async def test_document_types_listing() -> None:
    recorder = Recorder(
        status_code=200,
        json_body={
            "data": [
                {
                    "id": "dt1",
                    "name": "Invoice",
                    "codeType": "invoice",
                    "description": "d",
                    "isPublic": True,
                    "isDraft": False,
                    "createdAt": "x",
                    "updatedAt": "y",
                }
            ],
            "pagination": {"total": 1, "page": 1, "limit": 20},
        },
    )
    async with make_client(recorder) as client:
        page = await client.list_document_types(search="inv")
    assert [t.code_type for t in page.items] == ["invoice"]
    assert page.total == 1
    assert recorder.last.url.params["search"] == "inv"


async def test_on_response_hook_sees_every_call() -> None:
    seen: list[tuple[str, int | None]] = []
    recorder = Recorder(status_code=500, json_body={"message": "boom"})
    async with make_client(recorder, on_response=lambda e, s, d: seen.append((e, s))) as client:
        with pytest.raises(ServerError):
            await client.get_status("c1")
    assert seen == [("status", 500)]


# --------------------------------------------------------------------------- transport failures


@pytest.mark.parametrize(
    ("exc", "cls", "maybe_processed"),
    [
        (httpx.ConnectTimeout("t"), ApiTimeout, False),
        (httpx.PoolTimeout("t"), ApiTimeout, False),
        (httpx.WriteTimeout("t"), ApiTimeout, True),
        (httpx.ReadTimeout("t"), ApiTimeout, True),
        (httpx.ConnectError("refused"), ApiUnreachable, False),
        (httpx.ReadError("reset"), ApiUnreachable, True),
        (httpx.RemoteProtocolError("closed"), ApiUnreachable, True),
    ],
)
async def test_transport_failures_map(
    exc: Exception, cls: type[DocuTrayError], maybe_processed: bool
) -> None:
    def raiser(request: httpx.Request) -> httpx.Response:
        raise exc

    async with make_client(raiser) as client:
        with pytest.raises(cls) as caught:
            await client.submit_url(url="https://x.example/a.pdf", document_type_code="invoice")
    assert caught.value.maybe_processed is maybe_processed
    assert caught.value.status_code is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_is_unreachable() -> None:
    async with DocuTrayClient(
        base_url=f"http://127.0.0.1:{_closed_port()}", api_key=API_KEY
    ) as client:
        with pytest.raises(ApiUnreachable) as caught:
            await client.get_status("c1")
    assert caught.value.maybe_processed is False
    assert API_KEY not in str(caught.value)


async def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    accepted = asyncio.Event()
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with DocuTrayClient(
            base_url=f"http://127.0.0.1:{port}", api_key=API_KEY, read_timeout_s=0.2
        ) as client:
            started = time.monotonic()
            with pytest.raises(ApiTimeout) as caught:
                await client.get_status("c1")
        assert accepted.is_set()
        assert caught.value.maybe_processed is True
        assert time.monotonic() - started < 5
    finally:
        release.set()
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- secrets


async def test_the_api_key_never_leaks() -> None:
    echo = {
        "error": f"Invalid API key {API_KEY}",
        "apiKey": API_KEY,
        "detail": {"authorization": f"Bearer {API_KEY}", "note": f"key={API_KEY}"},
    }
    recorder = Recorder(status_code=401, json_body=echo)
    client = make_client(recorder)
    assert API_KEY not in repr(client)
    assert API_KEY not in str(vars(client))
    with structlog.testing.capture_logs() as logs, pytest.raises(InvalidApiKey) as caught:
        await client.get_status("c1")
    error = caught.value
    for text in (
        str(error),
        repr(error),
        repr(vars(error)),
        json.dumps(error.body),
        str(error.api_message),
        repr(logs),
    ):
        assert API_KEY not in text
    assert error.body is not None
    assert error.body["apiKey"] == "[REDACTED]"

    def raiser(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"failed for {request.headers}")

    client2 = make_client(raiser)
    with structlog.testing.capture_logs() as logs, pytest.raises(ApiUnreachable) as caught2:
        await client2.get_status("c1")
    assert API_KEY not in str(caught2.value) + repr(caught2.value) + repr(logs)
    await client.aclose()
    await client2.aclose()


def test_empty_api_key_is_refused() -> None:
    with pytest.raises(ValueError, match="api_key"):
        DocuTrayClient(base_url="http://127.0.0.1:1", api_key="")


# --------------------------------------------------------------------------- keep-alive


async def test_one_pool_reuses_connections() -> None:
    """Against a real HTTP server: many calls, one TCP connection (keep-alive)."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        body = json.dumps({"conversion_id": "c1", "status": "ENQUEUED"}).encode()
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with DocuTrayClient(base_url=f"http://127.0.0.1:{port}", api_key=API_KEY) as client:
            for _ in range(5):
                assert (await client.get_status("c1")).status == "ENQUEUED"
        assert connections == 1
    finally:
        server.close()


# --------------------------------------------------------------------------- end to end (emulator)


async def wait_terminal(
    client: DocuTrayClient, conversion_id: str, *, timeout_s: float = 15.0
) -> ConversionStatus:
    """Poll until the conversion is SUCCESS or ERROR, failing after timeout_s."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while True:
        status = await client.get_status(conversion_id)
        seen.append(status.status)
        if status.terminal:
            assert set(seen) <= {"ENQUEUED", "PROCESSING", "SUCCESS"}, seen
            return status
        assert time.monotonic() < deadline, f"still {status.status} after {timeout_s} s"
        await asyncio.sleep(0.05)  # wait-ok: polling under a deadline


async def test_e2e_all_three_forms_reach_success(emulator: Any, document_server: Any) -> None:
    from tests.fixtures.emulator import PDF_BYTES, PNG_BYTES

    async with DocuTrayClient(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        uploaded = await client.submit_upload(
            file=io.BytesIO(PDF_BYTES),
            filename="invoice-7.pdf",
            document_type_code="invoice",
            metadata={"request_id": "r-upload"},
        )
        inline = await client.submit_base64(
            data_b64="data:image/png;base64," + base64.b64encode(PNG_BYTES).decode(),
            document_type_code="receipt",
        )
        raw_inline = await client.submit_base64(
            data_b64=base64.b64encode(PDF_BYTES).decode(),
            document_type_code="invoice",
            content_type="application/pdf",
        )
        by_url = await client.submit_url(
            url=document_server.url("/doc.pdf"), document_type_code="invoice"
        )
        submissions = [uploaded, inline, raw_inline, by_url]
        for submission in submissions:
            assert submission.status == "ENQUEUED"
            assert submission.status_url.endswith(f"/status/{submission.conversion_id}")
        assert len({s.conversion_id for s in submissions}) == 4
        results = [await wait_terminal(client, s.conversion_id) for s in submissions]
    for submission, result in zip(submissions, results, strict=True):
        assert result.status == "SUCCESS"
        assert result.conversion_id == submission.conversion_id
        assert result.data
        assert result.request_timestamp is not None
        assert result.response_timestamp is not None
        assert result.response_timestamp >= result.request_timestamp
    assert results[0].original_filename == "invoice-7.pdf"
    assert results[0].document_type_code == "invoice"
    assert results[1].document_type_code == "receipt"


async def test_e2e_upload_streams_from_an_async_iterator(emulator: Any) -> None:
    from tests.fixtures.emulator import PDF_BYTES

    body = PDF_BYTES + b"\x00" * 300_000
    async with DocuTrayClient(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        sized = await client.submit_upload(
            file=_chunks(body, 65536),
            filename="a.pdf",
            document_type_code="invoice",
            size_bytes=len(body),
        )
        chunked = await client.submit_upload(
            file=_chunks(body, 65536), filename="b.pdf", document_type_code="invoice"
        )
        for submission in (sized, chunked):
            assert (await wait_terminal(client, submission.conversion_id)).status == "SUCCESS"


async def test_e2e_wrong_key_is_systemic(emulator: Any) -> None:
    async with DocuTrayClient(base_url=emulator.base_url, api_key="not-the-key") as client:
        with pytest.raises(InvalidApiKey) as caught:
            await client.submit_url(url="http://127.0.0.1:1/a.pdf", document_type_code="invoice")
        assert caught.value.status_code == 401
        assert caught.value.api_message == "Invalid API key"
        assert caught.value.request_id
        with pytest.raises(InvalidApiKey):
            await client.get_status("anything")


async def test_e2e_unknown_and_foreign_conversions_are_lost(emulator: Any) -> None:
    from tests.fixtures.emulator import PDF_BYTES

    async with DocuTrayClient(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        with pytest.raises(ConversionLost) as caught:
            await client.get_status("cm_does_not_exist")
        assert caught.value.status_code == 404
        assert caught.value.api_message == "Conversion not found"
        mine = await client.submit_upload(
            file=PDF_BYTES, filename="a.pdf", document_type_code="invoice"
        )
    async with DocuTrayClient(base_url=emulator.base_url, api_key=emulator.second_api_key) as other:
        with pytest.raises(ConversionLost) as caught:
            await other.get_status(mine.conversion_id)
        assert caught.value.status_code == 403


async def test_e2e_rejections(emulator: Any, document_server: Any) -> None:
    async with DocuTrayClient(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.submit_url(
                url=document_server.url("/missing"), document_type_code="invoice"
            )
        assert (caught.value.status_code, caught.value.reason) == (404, "source_unavailable")
        with pytest.raises(RequestRejected) as caught:
            await client.submit_upload(
                file=b"plain text, not a document", filename="a.txt", document_type_code="invoice"
            )
        assert (caught.value.status_code, caught.value.reason) == (400, "unsupported_format")
        assert caught.value.errors
        with pytest.raises(RequestRejected) as caught:
            await client.submit_base64(data_b64="!!!not base64!!!", document_type_code="invoice")
        assert (caught.value.status_code, caught.value.reason) == (400, "invalid_request")
        from tests.fixtures.emulator import PDF_BYTES

        with pytest.raises(RequestRejected) as caught:
            await client.submit_upload(
                file=PDF_BYTES, filename="a.pdf", document_type_code="no_such_type_code"
            )
        assert (caught.value.status_code, caught.value.reason) == (400, "invalid_request")
        page = await client.list_document_types()
        assert {"invoice", "receipt"} <= {t.code_type for t in page.items}


async def test_e2e_too_large_and_rate_limited(emulator_factory: Any) -> None:
    from tests.fixtures.emulator import PDF_BYTES

    small = emulator_factory(max_upload_bytes=4096, processing_median_s=0.2)
    async with DocuTrayClient(base_url=small.base_url, api_key=small.api_key) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.submit_upload(
                file=PDF_BYTES + b"\x00" * 8192, filename="a.pdf", document_type_code="invoice"
            )
        assert (caught.value.status_code, caught.value.reason) == (413, "too_large")
        small.configure(rate_limit_per_minute=1)
        outcomes: list[DocuTrayError] = []
        for _ in range(3):  # the first call may still be in budget (404 for an unknown id)
            with pytest.raises(DocuTrayError) as caught_any:
                await client.get_status("cm_any")
            outcomes.append(caught_any.value)
        limited = [e for e in outcomes if isinstance(e, RateLimited)]
        assert len(limited) >= 2, outcomes
        assert all(isinstance(e, RateLimited | ConversionLost) for e in outcomes)
        error = limited[-1]
        assert error.status_code == 429
        assert error.limit_type == "minute"
        assert error.limit == 1
        assert error.retry_after_s is not None
        assert 0 < error.retry_after_s <= 61


async def test_e2e_upload_memory_stays_at_a_few_chunks(emulator: Any, tmp_path: Any) -> None:
    """A 32 MiB upload from a file must not allocate anything near the file's size."""
    import tracemalloc

    size = 32 * 1024 * 1024
    path = tmp_path / "big.pdf"
    with path.open("wb") as out:
        out.write(b"%PDF-1.4\n")
        out.truncate(size)
    async with DocuTrayClient(base_url=emulator.base_url, api_key=emulator.api_key) as client:
        await client.submit_upload(
            file=b"%PDF-1.4\n", filename="warm.pdf", document_type_code="invoice"
        )
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            with path.open("rb") as file:
                submission = await client.submit_upload(
                    file=file, filename="big.pdf", document_type_code="invoice"
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert submission.conversion_id
    assert peak - baseline < 4 * 1024 * 1024, f"peak grew by {(peak - baseline) / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- issue 14: the plan


@pytest.mark.parametrize(
    ("body", "quota", "used", "reset_at"),
    [
        (
            {
                "error": "Monthly quota exceeded",
                "quota": 500,
                "used": 500,
                "resetDate": "2027-01-01",
            },
            500,
            500,
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            {"quota": 100.0, "used": "101", "resetDate": "2027-01-01T00:00:00.000Z"},
            100,
            101,
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        ({"quota": 10, "resetDate": 1_798_761_600_000}, 10, None, datetime(2027, 1, 1, tzinfo=UTC)),
        ({"quota": "lots", "used": -3, "resetDate": "next month"}, None, None, None),
        ({"quota": 2.5, "used": True, "resetDate": {"y": 2027}}, None, None, None),
        ({"error": {"code": "quota"}}, None, None, None),
        ({}, None, None, None),
    ],
)
def test_402_is_quota_exhausted_with_whatever_the_body_says(
    body: dict[str, Any], quota: int | None, used: int | None, reset_at: datetime | None
) -> None:
    error = mapped(402, body, headers={"X-Request-ID": "req-402"})
    assert type(error) is QuotaExhausted
    assert isinstance(error, SystemicError)
    assert not isinstance(error, TransientError)
    assert (error.quota, error.used, error.reset_at) == (quota, used, reset_at)
    assert error.status_code == 402
    assert error.request_id == "req-402"


@pytest.mark.parametrize("content", [b"", b"Payment Required", b"[402]", b"{broken"])
def test_402_without_a_json_object_body_is_still_quota_exhausted(content: bytes) -> None:
    error = mapped(402, content=content)
    assert type(error) is QuotaExhausted
    assert (error.quota, error.used, error.reset_at, error.body) == (None, None, None, None)


@pytest.mark.parametrize("endpoint", ["submit", "status", "document_types", "usage"])
def test_402_maps_the_same_on_every_endpoint(endpoint: Any) -> None:
    error = mapped(402, {"error": "Quota exceeded", "quota": 1, "used": 1}, endpoint=endpoint)
    assert type(error) is QuotaExhausted
    assert error.endpoint == endpoint
    assert error.api_message == "Quota exceeded"


@pytest.mark.parametrize(
    ("limit_type", "expected", "long_window"),
    [
        ("minute", "minute", False),
        ("hour", "hour", True),
        ("day", "day", True),
        ("DAY ", "day", True),
        ("month", "month", False),
        (None, None, False),
        ("", None, False),
        (["hour"], None, False),
    ],
)
def test_429_limit_type_is_normalised(
    limit_type: Any, expected: str | None, long_window: bool
) -> None:
    body: dict[str, Any] = {"error": "Rate limit exceeded", "limit": 100, "remaining": 0}
    if limit_type is not None:
        body["limitType"] = limit_type
    error = mapped(429, body, now_s=NOW)
    assert isinstance(error, RateLimited)
    assert error.limit_type == expected
    assert error.long_window is long_window
    assert (error.limit, error.remaining) == (100, 0)


@pytest.mark.parametrize(
    "reset_time",
    [
        int(NOW + 1800),
        int(NOW + 1800) * 1000,
        str(int(NOW + 1800)),
        datetime.fromtimestamp(NOW + 1800, tz=UTC).isoformat(),
        datetime.fromtimestamp(NOW + 1800, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    ],
)
def test_an_hour_window_429_waits_until_its_reset_time(reset_time: Any) -> None:
    body = {"error": "Rate limit exceeded", "limitType": "hour", "resetTime": reset_time}
    error = mapped(429, body, headers={"Retry-After": "60"}, now_s=NOW)
    assert isinstance(error, RateLimited)
    assert error.long_window
    assert error.reset_at == datetime.fromtimestamp(NOW + 1800, tz=UTC)
    assert error.retry_after_s == pytest.approx(1800.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-05-01", datetime(2026, 5, 1, tzinfo=UTC)),
        ("2026-05-01T00:00:00Z", datetime(2026, 5, 1, tzinfo=UTC)),
        ("2026-05-01T02:00:00+02:00", datetime(2026, 5, 1, tzinfo=UTC)),
        ("2026-05-01T00:00:00", datetime(2026, 5, 1, tzinfo=UTC)),
        ("2026-13-01", None),
        ("   ", None),
        (-5, None),
        (float("nan"), None),
        (None, None),
        ([1], None),
    ],
)
def test_parse_reset_time_reads_iso_and_rejects_the_odd(value: Any, expected: Any) -> None:
    assert parse_reset_time(value) == expected


def test_parse_quota_is_pure_and_tolerant() -> None:
    assert parse_quota(None) == {"quota": None, "used": None, "reset_at": None}
    assert parse_quota({"quota": 3, "used": 0}) == {"quota": 3, "used": 0, "reset_at": None}


def test_status_pages_are_read_when_present_and_never_fail_the_parse() -> None:
    base = {"conversion_id": "c1", "status": "SUCCESS", "data": {}}
    assert ConversionStatus.model_validate(base).pages is None
    assert ConversionStatus.model_validate({**base, "pages": 3}).pages == 3
    assert ConversionStatus.model_validate({**base, "page_count": "2"}).pages == 2
    assert ConversionStatus.model_validate({**base, "pageCount": 4.0}).pages == 4
    for odd in ("many", -1, 2.5, True, {"n": 1}, None):
        assert ConversionStatus.model_validate({**base, "pages": odd}).pages is None


USAGE = {"year": 2026, "month": 4, "successful_pages": 1234, "successful_conversions": 89}


async def test_get_usage_for_the_current_month_and_a_given_one() -> None:
    recorder = Recorder(status_code=200, json_body={**USAGE, "plan": "pro"})
    async with make_client(recorder) as client:
        usage = await client.get_usage()
        assert usage == Usage(**USAGE)
        assert recorder.last.method == "GET"
        assert recorder.last.url.path == "/api/usage"
        assert recorder.last.url.query == b""
        assert_common_headers(recorder.last)
        await client.get_usage(year=2025, month=12)
        assert dict(recorder.last.url.params) == {"year": "2025", "month": "12"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"year": 2026}, "together"),
        ({"month": 4}, "together"),
        ({"year": 2026, "month": 13}, "1..12"),
        ({"year": 2026, "month": 0}, "1..12"),
    ],
)
async def test_get_usage_refuses_half_a_month(kwargs: dict[str, int], message: str) -> None:
    recorder = Recorder(status_code=200, json_body=USAGE)
    async with make_client(recorder) as client:
        with pytest.raises(ValueError, match=message):
            await client.get_usage(**kwargs)
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("status_code", "body", "cls"),
    [
        (200, {"year": 2026, "month": 4}, UnexpectedResponse),
        (200, {**USAGE, "successful_pages": -1}, UnexpectedResponse),
        (200, {**USAGE, "month": 13}, UnexpectedResponse),
        (200, [USAGE], UnexpectedResponse),
        (401, {"error": "Invalid API key"}, InvalidApiKey),
        (404, {"error": "Not found"}, EndpointNotFound),
        (429, {"error": "Rate limit exceeded", "limitType": "day"}, RateLimited),
        (500, {"message": "Internal server error"}, ServerError),
    ],
)
async def test_get_usage_errors_map_like_the_catalogue(
    status_code: int, body: Any, cls: type[DocuTrayError]
) -> None:
    seen: list[tuple[str, int | None]] = []
    recorder = Recorder(status_code=status_code, json_body=body)
    async with make_client(recorder, on_response=lambda e, s, d: seen.append((e, s))) as client:
        with pytest.raises(cls) as caught:
            await client.get_usage()
    assert caught.value.endpoint == "usage"
    assert seen == [("usage", status_code)]


class _Boom(Exception):
    pass


async def _call(client: DocuTrayClient, call: str) -> object:
    if call == "submit":
        return await client.submit_url(url="https://x.example/a.pdf", document_type_code="invoice")
    if call == "status":
        return await client.get_status("c1")
    if call == "usage":
        return await client.get_usage()
    return await client.list_document_types()


@pytest.mark.parametrize(
    "exc",
    [
        httpx.DecodingError("bad gzip"),
        httpx.TooManyRedirects("loop"),
        httpx.StreamConsumed(),
        httpx.InvalidURL("bad"),
        RuntimeError("a custom transport broke"),
        _Boom("anything at all"),
    ],
)
@pytest.mark.parametrize("call", ["submit", "status", "usage", "document_types"])
async def test_no_http_stack_exception_escapes_raw(exc: Exception, call: str) -> None:
    """Issue 11 item 7: the engine catches DocuTrayError, so nothing else may leave the client."""

    def raiser(request: httpx.Request) -> httpx.Response:
        raise exc

    seen: list[tuple[str, int | None]] = []
    async with make_client(raiser, on_response=lambda e, s, d: seen.append((e, s))) as client:
        with pytest.raises(DocuTrayError) as caught:
            await _call(client, call)
    assert type(caught.value) is UnexpectedResponse
    assert isinstance(caught.value, TransientError)
    assert caught.value.__cause__ is exc
    assert type(exc).__name__ in str(caught.value)
    assert caught.value.endpoint == call
    assert seen == [(call, None)]


async def test_a_body_that_does_not_decode_is_unexpected_not_a_raw_decoding_error() -> None:
    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=b"this is not gzip at all",
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async with make_client(garbled) as client:
        with pytest.raises(UnexpectedResponse) as caught:
            await client.get_status("c1")
    assert isinstance(caught.value.__cause__, httpx.DecodingError)


@pytest.mark.parametrize("depth", [50, 600, 100_000])
async def test_deeply_nested_bodies_never_raise_recursion_errors(depth: int) -> None:
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    async with make_client(lambda r: httpx.Response(200, content=nested)) as client:
        with pytest.raises(UnexpectedResponse):
            await client.get_status("c1")
    async with make_client(lambda r: httpx.Response(429, content=nested)) as client:
        with pytest.raises(RateLimited) as limited:
            await client.get_status("c1")
    body = limited.value.body
    if body is not None:  # kept, but cut at a bounded depth
        assert len(json.dumps(body)) < 1000


async def test_an_upload_size_mismatch_is_still_the_callers_error() -> None:
    async with make_client(Recorder()) as client:
        with pytest.raises(UploadSizeMismatch):
            await client.submit_upload(
                file=_chunks(PDF, 100),
                filename="a.pdf",
                document_type_code="invoice",
                size_bytes=len(PDF) + 1,
            )


async def test_e2e_quota_hour_window_and_usage_on_the_emulator(emulator_factory: Any) -> None:
    from tests.fixtures.emulator import PDF_BYTES

    emu = emulator_factory(
        monthly_quota=1, rate_limit_per_hour=3, rate_limit_scope="submit", processing_median_s=0.05
    )
    async with DocuTrayClient(base_url=emu.base_url, api_key=emu.api_key) as client:
        submission = await client.submit_upload(
            file=PDF_BYTES, filename="a.pdf", document_type_code="invoice"
        )
        with pytest.raises(QuotaExhausted) as spent:
            await client.submit_upload(
                file=PDF_BYTES, filename="a.pdf", document_type_code="invoice"
            )
        now = datetime.now(tz=UTC)
        next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
        assert (spent.value.quota, spent.value.used, spent.value.reset_at) == (1, 1, next_month)
        assert spent.value.endpoint == "submit"
        await wait_terminal(client, submission.conversion_id)  # status calls go on
        usage = await client.get_usage()
        assert (usage.year, usage.month, usage.successful_conversions) == (now.year, now.month, 1)
        assert 1 <= usage.successful_pages <= 3
        assert (await client.get_usage(year=2020, month=1)).successful_conversions == 0
        emu.configure(monthly_quota=None)
        await client.submit_upload(file=PDF_BYTES, filename="a.pdf", document_type_code="invoice")
        with pytest.raises(RateLimited) as limited:
            await client.submit_upload(
                file=PDF_BYTES, filename="a.pdf", document_type_code="invoice"
            )
    error = limited.value
    assert (error.limit_type, error.long_window, error.limit, error.remaining) == (
        "hour",
        True,
        3,
        0,
    )
    assert error.reset_at is not None
    assert 3500 <= (error.reset_at - now).total_seconds() <= 3610
    assert error.retry_after_s is not None
    assert error.retry_after_s > 3500
