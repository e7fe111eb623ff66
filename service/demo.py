"""`docutray-bridge demo`: the whole thing end to end on one machine.

Starts the DocuTray emulator and one bridge as real processes against the
Kafka and Redis named in the environment (``make demo`` starts them), sends
one sample document of each supported format in each request form, plus two
that must fail, and prints every result and dead letter as it arrives.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service import samples
from service.messages import DocumentRequest
from service.tools import Outcome, format_outcome, produce_requests, read_outcomes


class DemoError(RuntimeError):
    """The demo could not run (a part did not start)."""


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serve_files(files: dict[str, bytes]) -> Iterator[str]:
    """Serve `files` over HTTP on loopback (anything else is 404); yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def start_emulator(
    *, api_key: str, log_path: Path, extra: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the emulator process; return it and its base URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "service.emulator",
        "--port",
        str(port),
        "--api-key",
        api_key,
        *(extra or []),
    ]
    log = log_path.open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    wait_http(f"{base_url}/healthz", timeout_s=20, proc=proc, what="emulator", log_path=log_path)
    return proc, base_url


def wait_http(
    url: str,
    *,
    timeout_s: float,
    proc: subprocess.Popen[bytes] | None,
    what: str,
    log_path: Path,
    ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
) -> None:
    """Wait until `url` answers as `ok` says, or raise DemoError pointing at the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if ok(httpx.get(url, timeout=1)):
                return
        time.sleep(0.2)
    raise DemoError(f"{what} not ready after {timeout_s:.0f} s; see {log_path}")


def stop_process(proc: subprocess.Popen[bytes], *, timeout_s: float = 30) -> int:
    """SIGTERM, wait, then SIGKILL; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def demo_requests(files_url: str, run: str) -> list[DocumentRequest]:
    """Every sample in base64, one by URL, and two that must fail."""
    reqs: list[DocumentRequest] = []
    doc_types = ["invoice", "receipt", "receipt", "id_card", "other", "receipt"]
    for (name, ctype, data), dtype in zip(samples.all_samples(), doc_types, strict=True):
        reqs.append(
            DocumentRequest.model_validate(
                {
                    "request_id": f"{run}-{name}",
                    "document_type_code": dtype,
                    "source": {"base64": base64.b64encode(data).decode(), "content_type": ctype},
                    "metadata": {"demo": run, "file": name},
                    "filename": name,
                }
            )
        )
    reqs.append(
        DocumentRequest.model_validate(
            {
                "request_id": f"{run}-by-url.pdf",
                "document_type_code": "invoice",
                "source": {"url": f"{files_url}/invoice.pdf"},
                "filename": "invoice.pdf",
            }
        )
    )
    reqs.append(
        DocumentRequest.model_validate(
            {
                "request_id": f"{run}-not-a-pdf",
                "document_type_code": "invoice",
                "source": {
                    "base64": base64.b64encode(b"just some text, not a PDF").decode(),
                    "content_type": "application/pdf",
                },
            }
        )
    )
    reqs.append(
        DocumentRequest.model_validate(
            {
                "request_id": f"{run}-missing-url",
                "document_type_code": "invoice",
                "source": {"url": f"{files_url}/no-such-file.pdf"},
            }
        )
    )
    return reqs


def _workdir() -> Path:
    """Where the demo's logs go: DEMO_DIR, else .stack/demo, else under TMPDIR (read-only roots)."""
    explicit = os.environ.get("DEMO_DIR")
    candidates = [Path(explicit)] if explicit else [Path(".stack/demo"), _tmp_demo_dir()]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            last = exc
            continue
        return candidate
    raise DemoError(f"cannot create the demo's directory {candidates[-1]}: {last.strerror}")


def _tmp_demo_dir() -> Path:
    return Path(tempfile.gettempdir()) / "docutray-demo"


def run_demo(*, echo: Callable[[str], None], timeout_s: float = 120.0) -> int:
    """Run the demo; return the exit code (0 when every request got its expected outcome)."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise DemoError("KAFKA_BOOTSTRAP_SERVERS is not set; run `make demo` (it starts Kafka)")
    redis_url = os.environ.get("REDIS_URL", "")
    run = f"demo-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"
    workdir = _workdir()
    api_key = f"demo-{secrets.token_hex(8)}"
    topics = {
        "BRIDGE_INPUT_TOPIC": f"{run}.requests",
        "BRIDGE_RESULT_TOPIC": f"{run}.results",
        "BRIDGE_DEAD_LETTER_TOPIC": f"{run}.dead-letters",
    }
    echo(f"[1/5] starting the DocuTray emulator (log: {workdir / 'emulator.log'})")
    emulator, base_url = start_emulator(
        api_key=api_key,
        log_path=workdir / "emulator.log",
        extra=["--processing-median-s", "1.5", "--seed", "7"],
    )
    bridge: subprocess.Popen[bytes] | None = None
    try:
        metrics_port = free_port()
        env = {
            **os.environ,
            **topics,
            "DOCUTRAY_API_KEY": api_key,
            "DOCUTRAY_BASE_URL": base_url,
            "REDIS_URL": redis_url,
            "BRIDGE_GROUP_ID": f"{run}-bridge",
            "BRIDGE_METRICS_PORT": str(metrics_port),
            "BRIDGE_TOPIC_PARTITIONS": "3",
            "BRIDGE_SUBMIT_RATE_PER_MINUTE": "600",
            "BRIDGE_STATUS_RATE_PER_MINUTE": "1200",
            "BRIDGE_POLL_DEFAULT_MEDIAN_S": "1.5",
            "BRIDGE_LOG_FORMAT": "json",
            "BRIDGE_INSTANCE_ID": f"{run}-1",
        }
        bridge_log = workdir / "bridge.log"
        echo(f"[2/5] starting the bridge (log: {bridge_log}, metrics :{metrics_port}/metrics)")
        bridge = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"],
            env=env,
            stdout=bridge_log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_http(
            f"http://127.0.0.1:{metrics_port}/readyz",
            timeout_s=60,
            proc=bridge,
            what="bridge",
            log_path=bridge_log,
        )
        conf = {"bootstrap.servers": bootstrap}
        with serve_files({"invoice.pdf": samples.pdf("Invoice by URL")}) as files_url:
            requests = demo_requests(files_url, run)
            echo(f"[3/5] sending {len(requests)} requests to {topics['BRIDGE_INPUT_TOPIC']}")
            produce_requests(conf, topics["BRIDGE_INPUT_TOPIC"], requests)
            echo("[4/5] waiting for results and dead letters (read_committed)")
            wanted = {r.request_id for r in requests}
            seen: dict[str, Outcome] = {}
            deadline = time.monotonic() + timeout_s
            for outcome in read_outcomes(
                conf,
                [topics["BRIDGE_RESULT_TOPIC"], topics["BRIDGE_DEAD_LETTER_TOPIC"]],
                follow=True,
                stop=lambda: len(seen) >= len(wanted) or time.monotonic() > deadline,
            ):
                rid = outcome.request_id
                if rid in wanted and rid not in seen:
                    seen[rid] = outcome
                    echo(f"  ({len(seen)}/{len(wanted)}) {format_outcome(outcome)}")
        missing = wanted - set(seen)
        echo("[5/5] stopping the bridge and the emulator")
        code = stop_process(bridge)
        bridge = None
        ok = sum(1 for o in seen.values() if o.result is not None)
        dead = sum(1 for o in seen.values() if o.dead_letter is not None)
        echo(
            f"done: {ok} results, {dead} dead letters (2 expected: not-a-pdf, missing-url), "
            f"{len(missing)} missing; bridge exit code {code}"
        )
        echo(
            f"inspect again with: KAFKA_BOOTSTRAP_SERVERS={bootstrap} docutray-bridge results "
            f"--result-topic {topics['BRIDGE_RESULT_TOPIC']} "
            f"--dead-letter-topic {topics['BRIDGE_DEAD_LETTER_TOPIC']}"
        )
        return 0 if not missing and dead == 2 and code == 0 else 1
    finally:
        if bridge is not None:
            stop_process(bridge)
        stop_process(emulator, timeout_s=10)
