"""Raw HTTP tests of the emulator process: exact bodies, headers and the /_emulator routes."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from service.emulator.cli import emulator_command
from service.emulator.config import EmulatorConfig
from tests.fixtures.emulator import (
    GIF_BYTES,
    PDF_BYTES,
    DocumentServer,
    EmulatorStarter,
    RunningEmulator,
)

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
VALIDATION = "Validation error"


@pytest.fixture
def http(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, headers=emulator.auth_headers, timeout=10) as c:
        yield c


def _client(emu: RunningEmulator) -> httpx.Client:
    return httpx.Client(base_url=emu.base_url, headers=emu.auth_headers, timeout=10)


def _submit_json(client: httpx.Client, **fields: Any) -> httpx.Response:
    body = {"document_type_code": "invoice", "image_base64": base64.b64encode(PDF_BYTES).decode()}
    body.update(fields)
    return client.post("/api/convert-async", json={k: v for k, v in body.items() if v is not None})


def _wait_for(
    predicate: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # wait-ok: polling a condition under a deadline


def _final_status(client: httpx.Client, conversion_id: str) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def finished() -> bool:
        body = client.get(f"/api/convert-async/status/{conversion_id}").json()
        result.update(body)
        return body["status"] in ("SUCCESS", "ERROR")

    _wait_for(finished, what=f"conversion {conversion_id} to finish")
    return result


# --- health, auth, routing -------------------------------------------------------------


def test_healthz_needs_no_key(emulator: RunningEmulator) -> None:
    response = httpx.get(f"{emulator.base_url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": ""}],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/convert-async"),
        ("GET", "/api/convert-async/status/cabc"),
        ("GET", "/api/document-types"),
        ("GET", "/api/document-types/dt_invoice"),
    ],
)
def test_every_api_route_needs_a_valid_key(
    emulator: RunningEmulator, headers: dict[str, str], method: str, path: str
) -> None:
    response = httpx.request(
        method, f"{emulator.base_url}{path}", headers=headers, json={"document_type_code": "x"}
    )
    assert response.status_code == 401
    assert response.json() == {"error": "Invalid API key"}
    assert response.headers["x-request-id"]


def test_bearer_scheme_is_case_insensitive(emulator: RunningEmulator) -> None:
    response = httpx.get(
        f"{emulator.base_url}/api/document-types",
        headers={"Authorization": f"bearer {emulator.api_key}"},
    )
    assert response.status_code == 200


def test_answers_are_not_held_back_by_delayed_acks(http: httpx.Client) -> None:
    # Without TCP_NODELAY on accepted sockets each answer took ~40 ms on loopback.
    http.get("/api/document-types")
    started = time.monotonic()
    for _ in range(20):
        assert http.get("/api/document-types").status_code == 200
    assert time.monotonic() - started < 0.4


def test_unknown_route_and_wrong_method_answer_json(http: httpx.Client) -> None:
    assert http.get("/api/nope").json() == {"error": "Not Found"}
    wrong = http.get("/api/convert-async")
    assert wrong.status_code == 405
    assert wrong.json() == {"error": "Method Not Allowed"}


# --- submit: success ----------------------------------------------------------------------


def test_202_body_is_exactly_the_contract(http: httpx.Client, emulator: RunningEmulator) -> None:
    response = _submit_json(http)
    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"conversion_id", "status_url", "status"}
    assert body["status"] == "ENQUEUED"
    assert re.fullmatch(r"c[0-9a-z]{24}", body["conversion_id"])
    assert body["status_url"] == (
        f"{emulator.base_url}/api/convert-async/status/{body['conversion_id']}"
    )


def test_public_base_url_shapes_the_status_url(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory(public_base_url="https://docutray.example.test/")
    with _client(emu) as client:
        body = _submit_json(client).json()
    assert body["status_url"] == (
        f"https://docutray.example.test/api/convert-async/status/{body['conversion_id']}"
    )


def test_per_type_median_overrides_the_default(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory(
        processing_median_s=60, processing_sigma=0, processing_median_s_by_type={"receipt": 0.05}
    )
    with _client(emu) as client:
        slow_id = _submit_json(client, document_type_code="invoice").json()["conversion_id"]
        fast_id = _submit_json(client, document_type_code="receipt").json()["conversion_id"]
        assert _final_status(client, fast_id)["status"] == "SUCCESS"
        slow = client.get(f"/api/convert-async/status/{slow_id}").json()
    assert slow["status"] in ("ENQUEUED", "PROCESSING")


def test_status_bodies_have_exactly_the_contract_fields(http: httpx.Client) -> None:
    conversion_id = _submit_json(http, document_type_code="receipt").json()["conversion_id"]
    first = http.get(f"/api/convert-async/status/{conversion_id}").json()
    assert set(first) == {
        "conversion_id",
        "status",
        "request_timestamp",
        "document_type_code",
        "original_filename",
    }
    assert first["status"] in ("ENQUEUED", "PROCESSING")
    assert ISO_MS.match(first["request_timestamp"])
    final = _final_status(http, conversion_id)
    assert set(final) == set(first) | {"response_timestamp", "data"}
    assert ISO_MS.match(final["response_timestamp"])
    assert final["response_timestamp"] >= final["request_timestamp"]
    assert final["document_type_code"] == "receipt"
    assert final["original_filename"] == "document.pdf"


def test_multipart_with_metadata_string(http: httpx.Client) -> None:
    response = http.post(
        "/api/convert-async",
        files={"image": ("scan.gif", GIF_BYTES, "image/gif")},
        data={"document_type_code": "other", "document_metadata": json.dumps({"k": 1})},
    )
    assert response.status_code == 202, response.text
    status = _final_status(http, response.json()["conversion_id"])
    assert status["original_filename"] == "scan.gif"


# --- submit: errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("text/plain", b"hello"), ("application/x-www-form-urlencoded", b"a=b"), (None, b"x")],
)
def test_wrong_content_type_is_415(
    emulator: RunningEmulator, content_type: str | None, body: bytes
) -> None:
    headers = dict(emulator.auth_headers)
    if content_type:
        headers["Content-Type"] = content_type
    response = httpx.post(f"{emulator.base_url}/api/convert-async", headers=headers, content=body)
    assert response.status_code == 415
    assert response.json() == {
        "message": "Unsupported Content-Type. Use multipart/form-data or application/json."
    }


def _post_raw(client: httpx.Client, body: bytes, content_type: str) -> httpx.Response:
    return client.post("/api/convert-async", content=body, headers={"Content-Type": content_type})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", ["Malformed JSON body"]),
        (b"[1, 2]", ["Request body must be a JSON object"]),
        (
            b"{}",
            [
                "document_type_code is required",
                "One of image (multipart), image_base64 or image_url is required",
            ],
        ),
        (
            b'{"document_type_code": "invoice", "image_base64": "QUJD", "image_url": "http://x/a"}',
            ["Send only one of image_base64 or image_url"],
        ),
        (
            b'{"document_type_code": "invoice", "image_url": "ftp://host/a.pdf"}',
            ["image_url must be an http or https URL"],
        ),
        (
            b'{"document_type_code": "invoice", "image_base64": "JVBERi0=", '
            b'"document_metadata": "x"}',
            ["document_metadata must be a JSON object"],
        ),
        (
            b'{"document_type_code": "invoice", "image_base64": "aGVsbG8gd29ybGQ="}',
            [
                "Unsupported file format. Accepted formats: image/jpeg, image/png, image/gif, "
                "image/bmp, image/webp, application/pdf"
            ],
        ),
        (
            b'{"document_type_code": "invoice", "image_base64": "data:image/png;base64,"}',
            ["image_base64 is empty"],
        ),
    ],
)
def test_json_validation_errors_are_400_with_the_errors_list(
    http: httpx.Client, body: bytes, expected: list[str]
) -> None:
    response = _post_raw(http, body, "application/json")
    assert response.status_code == 400
    assert response.json() == {"message": VALIDATION, "errors": expected}


def test_multipart_validation_errors(http: httpx.Client) -> None:
    no_image = http.post("/api/convert-async", data={"document_type_code": "invoice"}, files={})
    # httpx sends a urlencoded form when there are no files: that is a 415.
    assert no_image.status_code == 415
    only_fields = http.post(
        "/api/convert-async",
        files={"other": ("a.pdf", PDF_BYTES, "application/pdf")},
        data={"document_metadata": "{bad json"},
    )
    assert only_fields.status_code == 400
    assert only_fields.json()["errors"] == [
        "document_type_code is required",
        "document_metadata must be a JSON object encoded as a string",
        "image is required: send the document as the file part 'image'",
    ]
    no_boundary = _post_raw(http, b"--x--", "multipart/form-data")
    assert no_boundary.status_code == 400
    assert no_boundary.json()["message"] == VALIDATION


def test_upload_over_the_limit_is_413_without_reading_it_all(
    emulator_factory: EmulatorStarter,
) -> None:
    small = emulator_factory(max_upload_bytes=4096)
    with _client(small) as client:
        started = time.monotonic()
        response = client.post(
            "/api/convert-async",
            files={
                "image": ("big.pdf", PDF_BYTES + b"\x00" * (64 * 1024 * 1024), "application/pdf")
            },
            data={"document_type_code": "invoice"},
        )
        elapsed_s = time.monotonic() - started
        assert response.status_code == 413
        assert response.json() == {"message": "File exceeds maximum allowed size (4KB)"}
        # The emulator stops reading after ~1 MiB of draining, not after 64 MiB.
        assert elapsed_s < 5
        just_fits = client.post(
            "/api/convert-async",
            files={"image": ("ok.pdf", PDF_BYTES + b"\x00" * (4096 - len(PDF_BYTES)))},
            data={"document_type_code": "invoice"},
        )
        assert just_fits.status_code == 202
        over_json = _submit_json(
            client, image_base64=base64.b64encode(PDF_BYTES + b"\x00" * 4096).decode()
        )
        assert over_json.status_code == 413
    assert small.healthy()
    assert small.stats()["submissions_rejected"] == {"413": 2}


def test_url_form_errors_have_the_contract_bodies(
    emulator_factory: EmulatorStarter, document_server: DocumentServer
) -> None:
    quick = emulator_factory(url_download_timeout_s=0.3)
    with _client(quick) as client:
        missing = _submit_json(
            client, image_base64=None, image_url=document_server.url("/nope.pdf")
        )
        assert missing.status_code == 404
        assert missing.json() == {"message": "Error accessing URL: 404 Not Found"}
        slow = _submit_json(client, image_base64=None, image_url=document_server.url("/slow/a"))
        assert slow.status_code == 408
        assert slow.json() == {"message": "URL download timeout (300ms)"}
        refused = _submit_json(client, image_base64=None, image_url="http://127.0.0.1:1/a.pdf")
        assert refused.status_code == 404
        assert refused.json()["message"].startswith("Error accessing URL: ")
        ok = _submit_json(client, image_base64=None, image_url=document_server.url("/doc.pdf"))
        assert ok.status_code == 202


# --- rate limit --------------------------------------------------------------------------------


def test_429_has_the_full_body_and_retry_after_header(emulator_factory: EmulatorStarter) -> None:
    limited = emulator_factory(rate_limit_per_minute=3)
    with _client(limited) as client:
        codes = [client.get("/api/document-types").status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        before_s = time.time()
        response = _submit_json(client)
    assert response.status_code == 429
    body = response.json()
    assert set(body) == {"error", "limitType", "limit", "remaining", "resetTime", "retryAfter"}
    assert body["error"] == "Rate limit exceeded"
    assert body["limitType"] == "minute"
    assert body["limit"] == 3
    assert body["remaining"] == 0
    assert isinstance(body["resetTime"], int)
    assert isinstance(body["retryAfter"], int)
    assert 55 <= body["retryAfter"] <= 60
    assert response.headers["retry-after"] == str(body["retryAfter"])
    assert abs(body["resetTime"] - (before_s + body["retryAfter"])) <= 2
    stats = limited.stats()
    assert stats["rate_limited"] == 1
    assert stats["submissions_rejected"] == {"429": 1}


def test_submit_scope_leaves_status_calls_free(emulator_factory: EmulatorStarter) -> None:
    limited = emulator_factory(rate_limit_per_minute=2, rate_limit_scope="submit")
    with _client(limited) as client:
        conversion_id = _submit_json(client).json()["conversion_id"]
        for _ in range(10):
            assert client.get(f"/api/convert-async/status/{conversion_id}").status_code == 200
        assert _submit_json(client).status_code == 202
        assert _submit_json(client).status_code == 429
    stats = limited.stats(timestamps=True)
    assert stats["counted_calls_total"] == 2  # only the accepted submissions spend budget
    assert stats["max_calls_per_60s"] == 2
    assert len(stats["counted_call_times_s"]) == 2


def test_limit_can_be_switched_at_runtime(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory()
    with _client(emu) as client:
        assert all(client.get("/api/document-types").status_code == 200 for _ in range(5))
        emu.configure(rate_limit_per_minute=1)
        assert client.get("/api/document-types").status_code == 200
        assert client.get("/api/document-types").status_code == 429
        emu.configure(rate_limit_per_minute=None)
        assert client.get("/api/document-types").status_code == 200
    assert emu.stats()["max_calls_per_60s"] == 7


# --- faults ----------------------------------------------------------------------------------


def _fault_run(emulator_factory: EmulatorStarter, seed: int) -> tuple[list[int], list[Any]]:
    emu = emulator_factory(seed=seed, fault_500_rate=0.4, error_rate=0.5, processing_median_s=0.05)
    with _client(emu) as client:
        codes = [client.get("/api/convert-async/status/cnone").status_code for _ in range(40)]
        emu.configure(fault_500_rate=0.0)
        ids = [_submit_json(client).json()["conversion_id"] for _ in range(8)]
        finals = [_final_status(client, i) for i in ids]
    emu.stop()
    return codes, [(f["status"], f.get("data"), f.get("error")) for f in finals]


def test_faults_and_outcomes_are_reproducible_from_the_seed(
    emulator_factory: EmulatorStarter,
) -> None:
    codes, outcomes = _fault_run(emulator_factory, seed=1234)
    assert set(codes) == {404, 500}
    assert {status for status, _, _ in outcomes} == {"SUCCESS", "ERROR"}
    same_codes, same_outcomes = _fault_run(emulator_factory, seed=1234)
    assert same_codes == codes
    assert same_outcomes == outcomes
    other_codes, other_outcomes = _fault_run(emulator_factory, seed=99)
    assert (other_codes, other_outcomes) != (codes, outcomes)


def test_slow_responses_are_delayed(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory()
    emu.configure(slow_response_rate=1.0, slow_response_s=0.4)
    with _client(emu) as client:
        started = time.monotonic()
        assert client.get("/api/document-types").status_code == 200
        assert time.monotonic() - started >= 0.4
    assert emu.stats()["slow_responses"] == 1


def test_config_route_validates_and_reports_knobs(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory()
    bad = httpx.post(f"{emu.base_url}/_emulator/config", json={"error_rate": 3})
    assert bad.status_code == 400
    assert bad.json()["message"] == VALIDATION
    unknown = httpx.post(f"{emu.base_url}/_emulator/config", json={"api_keys": ["x"]})
    assert unknown.status_code == 400
    knobs = emu.configure(processing_median_s_by_type={"invoice": 0.5}, error_rate=0.25)
    assert knobs["processing_median_s_by_type"] == {"invoice": 0.5}
    assert knobs["error_rate"] == 0.25
    assert httpx.get(f"{emu.base_url}/_emulator/config").json() == knobs
    assert emu.api_key not in json.dumps(knobs)


# --- lifetime of conversions -------------------------------------------------------------------


def test_forget_makes_every_conversion_404(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory()
    with _client(emu) as client:
        conversion_id = _submit_json(client).json()["conversion_id"]
        assert client.get(f"/api/convert-async/status/{conversion_id}").status_code == 200
        assert emu.forget() == 1
        gone = client.get(f"/api/convert-async/status/{conversion_id}")
    assert gone.status_code == 404
    assert gone.json() == {"error": "Conversion not found"}
    assert emu.stats()["conversions_live"] == 0


def test_restart_keeps_the_port_and_loses_conversions(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory()
    port = emu.port
    with _client(emu) as client:
        conversion_id = _submit_json(client).json()["conversion_id"]
    emu.restart()
    assert emu.port == port
    with _client(emu) as client:
        assert client.get(f"/api/convert-async/status/{conversion_id}").status_code == 404
        assert _submit_json(client).json()["conversion_id"] != conversion_id


def test_finished_conversions_expire_after_the_ttl(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory(processing_median_s=0.05, processing_sigma=0, finished_ttl_s=0.3)
    with _client(emu) as client:
        conversion_id = _submit_json(client).json()["conversion_id"]
        assert _final_status(client, conversion_id)["status"] == "SUCCESS"
        _wait_for(
            lambda: client.get(f"/api/convert-async/status/{conversion_id}").status_code == 404,
            what="expiry",
        )
    assert emu.stats()["conversions_live"] == 0


# --- stats ------------------------------------------------------------------------------------


def test_stats_count_resubmissions_per_request_id(emulator_factory: EmulatorStarter) -> None:
    emu = emulator_factory()
    with _client(emu) as client:
        for _ in range(3):
            assert (
                _submit_json(client, document_metadata={"request_id": "req-a"}).status_code == 202
            )
        multipart = client.post(
            "/api/convert-async",
            files={"image": ("a.pdf", PDF_BYTES)},
            data={"document_type_code": "invoice", "document_metadata": '{"request_id": "req-b"}'},
        )
        assert multipart.status_code == 202
        assert _submit_json(client).status_code == 202
        assert _submit_json(client, document_type_code="nope").status_code == 400
        client.get("/api/convert-async/status/cunknown")
    stats = emu.stats(timestamps=True)
    assert stats["conversions_by_request_id"] == {"req-a": 3, "req-b": 1}
    assert stats["submissions_accepted"] == 5
    assert stats["submissions_rejected"] == {"400": 1}
    assert stats["status_calls"] == 1
    assert stats["status_responses"] == {"404": 1}
    assert stats["conversions_live"] == 5
    assert stats["counted_calls_total"] == 7
    times = stats["counted_call_times_s"]
    assert times == sorted(times)
    assert len(times) == 7
    emu.reset_stats()
    assert emu.stats()["submissions_accepted"] == 0


# --- document types -------------------------------------------------------------------------------


def test_document_types_paging_parameters(http: httpx.Client) -> None:
    page = http.get("/api/document-types", params={"page": 2, "limit": 2}).json()
    assert [t["codeType"] for t in page["data"]] == ["id_card", "other"]
    assert page["pagination"] == {"total": 4, "page": 2, "limit": 2}
    for bad in ({"page": 0}, {"limit": 101}, {"limit": "x"}):
        response = http.get("/api/document-types", params=bad)
        assert response.status_code == 400
        assert response.json()["message"] == VALIDATION
    detail = http.get("/api/document-types/dt_id_card").json()
    assert detail["codeType"] == "id_card"
    assert detail["jsonSchema"]["type"] == "object"
    missing = http.get("/api/document-types/dt_none")
    assert missing.status_code == 404


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_help_documents_every_knob() -> None:
    result = CliRunner().invoke(emulator_command, ["--help"])
    assert result.exit_code == 0
    options = {opt for param in emulator_command.params for opt in param.opts}
    for name in EmulatorConfig.model_fields:
        if name == "api_keys":
            assert "--api-key" in options
        elif name == "processing_median_s_by_type":
            assert "--processing-median-for" in options
        elif name in ("webhook_urls", "webhook_events"):
            assert "--" + name[:-1].replace("_", "-") in options, name
        else:
            assert "--" + name.replace("_", "-") in options, name
    for param in emulator_command.params:
        assert getattr(param, "help", None), param.name
        assert str(getattr(param, "envvar", "")).startswith("EMULATOR_"), param.name


def test_cli_rejects_bad_values() -> None:
    result = CliRunner().invoke(emulator_command, ["--processing-median-for", "invoice"])
    assert result.exit_code == 2
    assert "TYPE=SECONDS" in result.output
