"""Logging: JSON lines off a terminal, console on one, and no registered secret ever printed."""

from __future__ import annotations

import io
import json
import logging
import warnings
from typing import Any

import pytest
import structlog

from service.logging import configure_logging, register_secret, register_secrets, scrub

SECRET = "dtk_live_Zq8Wm2Lp0Xr5Tn7Vb3Kc"
OTHER_SECRET = "sc4am-pa55w0rd-4d5e6f"


#: Every test gets a clean slate; the process's logging is put back as it was.
pytestmark = pytest.mark.usefixtures("restore_logging")


class TtyBuffer(io.StringIO):
    """A text buffer that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_when_not_a_terminal() -> None:
    buf = io.StringIO()
    configure_logging(fmt="auto", stream=buf)
    structlog.get_logger("t").info("conversion_submitted", request_id="r-1", conversion_id="c-1")
    (line,) = json_lines(buf.getvalue())
    assert line["event"] == "conversion_submitted"
    assert line["request_id"] == "r-1"
    assert line["conversion_id"] == "c-1"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")


def test_console_when_asked_or_on_a_terminal() -> None:
    for fmt, buf in (("console", io.StringIO()), ("auto", TtyBuffer())):
        configure_logging(fmt=fmt, stream=buf)  # type: ignore[arg-type]
        structlog.get_logger("t").info("bridge_started", partitions=3)
        text = buf.getvalue()
        assert "bridge_started" in text
        assert "partitions" in text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_level_filters_events() -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", level="warning", stream=buf)
    log = structlog.get_logger("t")
    log.info("hidden")
    log.warning("shown")
    assert [line["event"] for line in json_lines(buf.getvalue())] == ["shown"]


def test_scrub_replaces_every_registered_secret() -> None:
    register_secrets([SECRET, OTHER_SECRET, None, ""])
    assert scrub(f"a {SECRET} b {OTHER_SECRET} c {SECRET}") == "a *** b *** c ***"
    assert scrub("nothing here") == "nothing here"


def test_tiny_or_empty_values_are_not_registered() -> None:
    register_secret("")
    register_secret(None)
    register_secret("ab")
    assert scrub("ab is fine") == "ab is fine"


def test_secret_never_appears_in_json_fields() -> None:
    register_secret(SECRET)
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    log = structlog.get_logger("t")
    log.info(
        f"event_with_{SECRET}",
        plain=SECRET,
        embedded=f"Authorization: Bearer {SECRET}",
        nested={"a": [SECRET, {"b": (f"x{SECRET}", 1)}], "n": 3},
    )
    log.info("positional %s", SECRET)
    text = buf.getvalue()
    assert SECRET not in text
    first = json_lines(text)[0]
    assert first["embedded"] == "Authorization: Bearer ***"
    assert first["nested"] == {"a": ["***", {"b": ["x***", 1]}], "n": 3}


def test_secret_never_appears_in_a_logged_exception_json() -> None:
    register_secret(SECRET)
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    log = structlog.get_logger("t")
    try:
        raise RuntimeError(f"request failed with key {SECRET}")
    except RuntimeError:
        log.exception("submit_failed", request_id="r-1")
    text = buf.getvalue()
    assert "submit_failed" in text
    assert "RuntimeError" in text
    assert SECRET not in text


def test_secret_never_appears_in_a_logged_exception_console() -> None:
    register_secret(SECRET)
    buf = io.StringIO()
    configure_logging(fmt="console", stream=buf)
    try:
        raise RuntimeError(f"request failed with key {SECRET}")
    except RuntimeError:
        structlog.get_logger("t").exception("submit_failed")
    text = buf.getvalue()
    assert "submit_failed" in text
    assert SECRET not in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secret_never_appears_in_non_string_fields(fmt: str) -> None:
    register_secret(SECRET)
    buf = io.StringIO()
    configure_logging(fmt=fmt, stream=buf)  # type: ignore[arg-type]
    structlog.get_logger("t").error(
        "call_failed", error=RuntimeError(f"bad key {SECRET}"), raw=SECRET.encode()
    )
    assert "call_failed" in buf.getvalue()
    assert SECRET not in buf.getvalue()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_stdlib_logging_goes_through_the_scrubber(fmt: str) -> None:
    register_secret(SECRET)
    buf = io.StringIO()
    configure_logging(fmt=fmt, stream=buf)  # type: ignore[arg-type]
    lib = logging.getLogger("some.library")
    lib.warning("connecting with password=%s", SECRET)
    try:
        raise ConnectionError(f"AUTH {SECRET} refused")
    except ConnectionError:
        lib.exception("connection failed")
    text = buf.getvalue()
    assert "connecting with password=***" in text
    assert "ConnectionError" in text
    assert SECRET not in text


def test_stdlib_and_uvicorn_lines_join_the_json_stream() -> None:
    """A production log is one JSON stream: library lines are JSON objects too."""
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("some.library").exception("it failed")
    first, second = json_lines(buf.getvalue())
    assert first["event"] == "Invalid HTTP request received."
    assert first["logger"] == "uvicorn.error"
    assert first["level"] == "warning"
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "it failed"
    assert "ValueError" in json.dumps(second["exception"])


def test_stdlib_info_is_quiet_by_default() -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", level="info", stream=buf)
    logging.getLogger("httpx").info("HTTP Request: GET http://x")
    assert buf.getvalue() == ""


def test_the_bridge_servers_log_through_the_json_stream() -> None:
    """uvicorn's default log config (installed when a server is built) must not take over."""
    from service.app import _ops_server
    from service.config import load_settings
    from service.health import Probe
    from service.webhooks import WebhookReceiver, webhook_server

    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)

    def probe() -> Probe:
        return Probe(ok=True, details={})

    _ops_server(load_settings(), live=probe, ready=probe)
    receiver = WebhookReceiver(
        topic="t",
        partitions=1,
        producer=None,  # type: ignore[arg-type]  # never called: nothing is served
        max_body_bytes=1024,
        rate_per_source=1.0,
    )
    webhook_server(receiver, host="127.0.0.1", port=0)
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    (line,) = json_lines(buf.getvalue())
    assert line["event"] == "Invalid HTTP request received."
    assert line["logger"] == "uvicorn.error"


def test_python_warnings_join_the_json_stream() -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    warnings.warn("old API", DeprecationWarning, stacklevel=1)
    (line,) = json_lines(buf.getvalue())
    assert "old API" in line["event"]
    assert line["logger"] == "py.warnings"


def test_librdkafka_lines_join_the_json_stream() -> None:
    """librdkafka's own log lines (a broker it cannot reach) come out as JSON, not as plain
    ``%3|...|FAIL|rdkafka#producer-1|`` lines on stderr."""
    import socket
    import time

    from confluent_kafka import Producer

    from service.config import kafka_common_config, load_settings
    from service.devkit.waiting import wait_until

    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    conf = kafka_common_config(load_settings(kafka_bootstrap_servers=closed))
    producer = Producer({**conf, "reconnect.backoff.ms": 50})
    started = time.monotonic()

    def logged() -> bool:
        producer.poll(0.1)
        return any(line.get("logger") == "librdkafka" for line in json_lines(buf.getvalue()))

    wait_until(logged, 20.0, "a librdkafka log line in the JSON stream")
    lines = [line for line in json_lines(buf.getvalue()) if line.get("logger") == "librdkafka"]
    assert lines[0]["level"] in {"error", "warning", "info"}
    assert closed.split(":")[1] in json.dumps(lines), lines
    assert time.monotonic() - started < 20.0
