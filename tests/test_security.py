"""Security, end to end: secrets stay secret, fetch mode refuses private addresses, Kafka over
SASL/SCRAM and Redis with a password work, and the service writes nothing outside TMPDIR.

Every test runs real `docutray-bridge run` processes against the real broker (its
PLAINTEXT listener for the test's own producer and reader, its SASL_PLAINTEXT listener
with SCRAM-SHA-512 for the bridge where credentials are under test), the real Redis
(through its password-protected ACL user), and the emulator.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import pytest

from service.cli import main as cli_main
from tests.fixtures.bridge import (
    REPO,
    BridgeProcess,
    Rig,
    assert_exactly_once,
    pdf_request,
    sent_ids,
    start_bridge_in,
    url_request,
)
from tests.fixtures.emulator import PDF_BYTES, DocumentServer, EmulatorStarter, RunningEmulator
from tests.fixtures.stack import consume_all, wait_for

# --------------------------------------------------------------------------- helpers


def _sasl_env(stack_env: dict[str, str], *, password: str | None = None) -> dict[str, str]:
    """Bridge settings for the broker's SCRAM listener (KAFKA_* pass through to librdkafka)."""
    missing = [
        k
        for k in ("STACK_KAFKA_SASL_BOOTSTRAP", "STACK_KAFKA_SASL_PASSWORD")
        if not stack_env.get(k)
    ]
    if missing:
        pytest.fail(
            f"the stack does not describe its SASL listener ({', '.join(missing)} unset): "
            "run the tests through `make test` or against scripts/stack"
        )
    return {
        "KAFKA_BOOTSTRAP_SERVERS": stack_env["STACK_KAFKA_SASL_BOOTSTRAP"],
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": stack_env.get("STACK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        "KAFKA_SASL_USERNAME": stack_env.get("STACK_KAFKA_SASL_USERNAME", "bridge"),
        "KAFKA_SASL_PASSWORD": password or stack_env["STACK_KAFKA_SASL_PASSWORD"],
    }


def _redis_auth_url(stack_env: dict[str, str]) -> tuple[str, str]:
    """The Redis URL with credentials, and its password."""
    url = stack_env.get("STACK_REDIS_AUTH_URL", "")
    password = urlsplit(url).password if url else None
    if not password:
        pytest.fail("the stack does not describe its Redis ACL user (STACK_REDIS_AUTH_URL)")
    return url, password


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and subcommand of the CLI, as argv prefixes."""
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))


@dataclass
class Evidence:
    """Everything a run produced, by where it came from, to be grepped for secrets."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str | bytes | None) -> None:
        if text is None:
            return
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts[where] = self.texts.get(where, "") + text

    def leaks(self, secrets_: dict[str, str]) -> list[str]:
        """`where: secret-name` for every secret found anywhere."""
        return [
            f"{where}: {name}"
            for where, text in self.texts.items()
            for name, value in secrets_.items()
            if value and value in text
        ]


def _http_bodies(proc: BridgeProcess, evidence: Evidence) -> None:
    for path in ("/metrics", "/readyz", "/healthz"):
        evidence.add(f"{proc.name} {path}", httpx.get(proc.url(path), timeout=5).text)


@dataclass
class RecordingServer:
    """An HTTP server on loopback that serves a PDF and records who downloaded what."""

    base_url: str
    hits: list[tuple[str, str]]

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


@pytest.fixture
def recording_server() -> Iterator[RecordingServer]:
    hits: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append((self.path, self.headers.get("User-Agent", "")))
            self.send_response(200)
            self.send_header("Content-Type", "application/pdf")
            self.send_header("Content-Length", str(len(PDF_BYTES)))
            self.end_headers()
            self.wfile.write(PDF_BYTES)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield RecordingServer(f"http://127.0.0.1:{server.server_address[1]}", hits)
    finally:
        server.shutdown()
        server.server_close()


def _reason(grouped: dict[str | None, list[Any]], rid: str) -> str | None:
    letter = grouped[rid][0].dead_letter
    return None if letter is None else str(letter.reason.value)


# --------------------------------------------------------------------------- secrets


def test_secrets_never_appear_anywhere(
    rig_factory: Callable[..., Rig],
    emulator: RunningEmulator,
    stack_env: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    redis_url, redis_password = _redis_auth_url(stack_env)
    sasl = _sasl_env(stack_env)
    wrong_key = f"wrong-key-{secrets.token_hex(12)}"
    secret_values = {
        "DOCUTRAY_API_KEY": emulator.api_key,
        "wrong DOCUTRAY_API_KEY": wrong_key,
        "Redis password": redis_password,
        "Kafka SASL password": sasl["KAFKA_SASL_PASSWORD"],
    }
    rig: Rig = rig_factory(REDIS_URL=redis_url, BRIDGE_SYSTEMIC_PROBE_INTERVAL_S="1", **sasl)
    evidence = Evidence()

    # A good run over SASL/SCRAM with the Redis limiter behind a password.
    bridge = rig.bridge("good")
    bridge.wait_ready()
    good = [pdf_request(f"sec-{i}") for i in range(5)]
    bad = {"request_id": "sec-bad", "document_type_code": "invoice", "source": {}}
    rig.send([*good, bad, b"not json at all"])
    grouped = rig.wait_outcomes({*sent_ids(good), "sec-bad"}, timeout_s=60)
    assert_exactly_once(grouped, {*sent_ids(good), "sec-bad"})
    assert all(grouped[rid][0].result is not None for rid in sent_ids(good))
    assert _reason(grouped, "sec-bad") == "invalid_request"
    # The limiter really used Redis (with the password), not its local fallback.
    ready = httpx.get(bridge.url("/readyz"), timeout=5).json()
    assert ready["limiter"]["mode"] == "redis", ready
    assert ready["limiter"]["degraded"] is False, ready
    assert bridge.metric("docutray_bridge_limiter_degraded") == 0
    _http_bodies(bridge, evidence)
    assert bridge.stop() == 0

    # The exception path: DocuTray answers 401, the bridge pauses and says so loudly.
    paused = rig.bridge("wrong-key", DOCUTRAY_API_KEY=wrong_key)
    rig.send([pdf_request("sec-after-401")])
    wait_for(
        lambda: paused.metric("docutray_bridge_consumption_paused", reason="invalid_api_key") == 1,
        60,
        message="paused on the 401",
    )
    assert not paused.ready()
    _http_bodies(paused, evidence)
    assert paused.stop() == 0
    log_401 = paused.log_path.read_text(errors="replace")
    assert "invalid_api_key" in log_401

    # Everything the run produced.
    for proc in rig.processes:
        evidence.add(f"log {proc.name}", proc.log_path.read_text(errors="replace"))
    for outcome in rig.outcomes():
        evidence.add(f"outcome {outcome.topic}", outcome.raw)
    changelog = f"{rig.base_env['BRIDGE_GROUP_ID']}.pending-changelog"
    for record in consume_all(kafka_bootstrap, changelog, isolation="read_uncommitted"):
        evidence.add("changelog", record.value)
    cli_env = {**rig.base_env, **sasl, "REDIS_URL": redis_url, "DOCUTRAY_API_KEY": emulator.api_key}
    settings = _cli("settings", env=cli_env)
    assert settings.returncode == 0, settings.stderr
    shown = json.loads(settings.stdout)
    assert shown["docutray_api_key"] == "***"
    assert shown["redis_url"] == "***"
    assert shown["kafka"]["sasl.password"] == "***"
    evidence.add("settings", settings.stdout + settings.stderr)
    paths = [(), *_command_paths(cli_main)]
    assert ("dead-letters", "replay") in paths
    for path in paths:
        result = _cli(*path, "--help", env=cli_env)
        assert result.returncode == 0, (path, result.stderr)
        evidence.add(f"docutray-bridge {' '.join(path)} --help", result.stdout + result.stderr)

    for name in ("log good", "log wrong-key", "good /metrics", "settings"):
        assert evidence.texts.get(name), f"no evidence collected from {name}"
    assert not evidence.leaks(secret_values), evidence.leaks(secret_values)


def test_kafka_sasl_wrong_password_is_refused_clearly(
    rig_factory: Callable[..., Rig], stack_env: dict[str, str]
) -> None:
    """Never ready; says "authentication" in its own words (not only librdkafka's raw
    `%3|...` line), exits (if it exits) with one line and no traceback, shows no password."""
    right = _sasl_env(stack_env)["KAFKA_SASL_PASSWORD"]
    wrong = f"wrong-{secrets.token_hex(12)}"
    rig: Rig = rig_factory(**_sasl_env(stack_env, password=wrong))
    bridge = rig.bridge("wrong-password")

    def own_lines() -> list[str]:
        text = bridge.log_path.read_text(errors="replace")
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("%")]

    def settled() -> bool:
        said_auth = any("authentication" in ln.lower() for ln in own_lines())
        return not bridge.alive or said_auth

    ever_ready = False

    def watch() -> bool:
        nonlocal ever_ready
        ever_ready = ever_ready or bridge.ready()
        return settled()

    wait_for(watch, 60, interval_s=0.2, message="the bridge gives up or reports the failure")
    assert not ever_ready
    assert not bridge.ready()
    raw = bridge.log_path.read_text(errors="replace")
    bridge.kill()
    assert wrong not in raw
    assert right not in raw
    assert "SASL authentication error" in raw, "librdkafka reports the refusal"
    lines = [ln for ln in raw.splitlines() if ln.strip() and not ln.startswith("%")]
    assert "Traceback" not in raw, "a crash instead of a clear error:\n" + "\n".join(lines[-8:])
    assert any("authentication" in ln.lower() for ln in lines), (
        "the bridge never says the Kafka credentials were refused:\n" + "\n".join(lines[-8:])
    )


# --------------------------------------------------------------------------- fetch mode


def test_fetch_mode_refuses_loopback_unless_allowed(
    rig_factory: Callable[..., Rig],
    emulator_factory: EmulatorStarter,
    document_server: DocumentServer,
    recording_server: RecordingServer,
    tmp_path: Path,
) -> None:
    emulator = emulator_factory(processing_median_s=0.2)
    refusing: Rig = rig_factory(
        emulator, BRIDGE_FETCH_MODE="true", BRIDGE_FETCH_ALLOW_PRIVATE="false"
    )
    allowing: Rig = rig_factory(
        emulator,
        BRIDGE_FETCH_MODE="true",
        BRIDGE_FETCH_ALLOW_PRIVATE="true",
        BRIDGE_MAX_DOCUMENT_BYTES=str(1024 * 1024),
        TMPDIR=str(tmp_path / "tmpdir"),
    )
    (tmp_path / "tmpdir").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    refuser = refusing.bridge("refuse")
    # Started in an empty directory: a read-only root filesystem must be enough.
    allower = start_bridge_in(allowing.bridge("allow", start=False), cwd)
    refuser.wait_ready()
    allower.wait_ready()

    refusing.send(
        [
            url_request("ssrf-loopback", document_server.url("/doc.pdf")),
            url_request(
                "ssrf-localhost", document_server.url("/doc.pdf").replace("127.0.0.1", "localhost")
            ),
            url_request("ssrf-metadata", "http://169.254.169.254/latest/meta-data/"),
        ]
    )
    allowing.send(
        [
            url_request("fetched", recording_server.url("/invoice.pdf")),
            url_request("fetched-big", document_server.url("/big.pdf")),
        ]
    )
    refused = refusing.wait_outcomes({"ssrf-loopback", "ssrf-localhost", "ssrf-metadata"}, 60)
    assert_exactly_once(refused, {"ssrf-loopback", "ssrf-localhost", "ssrf-metadata"})
    for rid in ("ssrf-loopback", "ssrf-localhost", "ssrf-metadata"):
        assert _reason(refused, rid) == "forbidden_source", refused[rid][0]
    allowed = allowing.wait_outcomes({"fetched", "fetched-big"}, 60)
    assert_exactly_once(allowed, {"fetched", "fetched-big"})
    assert allowed["fetched"][0].result is not None, allowed["fetched"][0].dead_letter
    assert _reason(allowed, "fetched-big") == "too_large"
    # The bridge downloaded the document itself and uploaded it; DocuTray never fetched it.
    agents = {agent for path, agent in recording_server.hits if path == "/invoice.pdf"}
    assert agents, recording_server.hits
    assert all(a.startswith("docutray-bridge/") for a in agents), agents
    assert emulator.stats()["conversions_by_request_id"].get("fetched") == 1

    assert allower.stop() == 0
    assert refuser.stop() == 0
    assert sorted(os.listdir(cwd)) == [], "the bridge wrote into its working directory"
    assert sorted(os.listdir(tmp_path / "tmpdir")) == [], "spooled documents were left behind"
