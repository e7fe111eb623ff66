"""`docutray-bridge demo`: the whole thing end to end on one machine.

Starts the DocuTray emulator and one bridge as real processes against the
Kafka and Redis named in the environment (``make demo`` starts them), sends
one sample document of each supported format in each request form, plus two
that must fail, and prints every result and dead letter as it arrives.
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service import samples
from service.devkit.processes import BridgeProcess, EmulatorProcess, ProcessError, ProcessExited
from service.devkit.serving import serve_files
from service.messages import DocumentRequest
from service.tools import Outcome, format_outcome, produce_requests, read_outcomes

#: What the demo's bridge runs with, besides its topics, group and emulator.
BRIDGE_SETTINGS = {
    "BRIDGE_TOPIC_PARTITIONS": "3",
    "BRIDGE_SUBMIT_RATE_PER_MINUTE": "600",
    "BRIDGE_STATUS_RATE_PER_MINUTE": "1200",
    "BRIDGE_POLL_DEFAULT_MEDIAN_S": "1.5",
    "BRIDGE_LOG_FORMAT": "json",
}


class DemoError(RuntimeError):
    """The demo could not run (a part did not start)."""


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


@dataclass(frozen=True)
class DemoRun:
    """One demo run's names: its topics, group and where its logs go."""

    name: str
    workdir: Path
    bootstrap: str

    @property
    def topics(self) -> dict[str, str]:
        """The bridge's topic settings."""
        return {
            "BRIDGE_INPUT_TOPIC": f"{self.name}.requests",
            "BRIDGE_RESULT_TOPIC": f"{self.name}.results",
            "BRIDGE_DEAD_LETTER_TOPIC": f"{self.name}.dead-letters",
        }

    @property
    def outcome_topics(self) -> list[str]:
        """Where results and dead letters arrive."""
        return [self.topics["BRIDGE_RESULT_TOPIC"], self.topics["BRIDGE_DEAD_LETTER_TOPIC"]]


@contextmanager
def _started(what: str, log_path: Path) -> Iterator[None]:
    """Turn a part that did not start into one DemoError pointing at its log."""
    try:
        yield
    except (ProcessError, ProcessExited, TimeoutError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DemoError(f"{what} did not start ({first}); see {log_path}") from None


def start_emulator(run: DemoRun) -> EmulatorProcess:
    """The emulator, slow enough (median 1.5 s) to watch conversions complete."""
    emulator = EmulatorProcess(
        log_path=run.workdir / "emulator.log",
        args=["--processing-median-s", "1.5", "--seed", "7"],
        api_key=f"demo-{secrets.token_hex(8)}",
    )
    with _started("the emulator", emulator.log_path):
        emulator.start()
    return emulator


def start_bridge(
    run: DemoRun, emulator: EmulatorProcess, *, echo: Callable[[str], None]
) -> BridgeProcess:
    """One bridge replica on the run's topics, ready."""
    env = {
        **os.environ,
        **run.topics,
        **BRIDGE_SETTINGS,
        "DOCUTRAY_API_KEY": emulator.api_key,
        "DOCUTRAY_BASE_URL": emulator.base_url,
        "REDIS_URL": os.environ.get("REDIS_URL", ""),
        "BRIDGE_GROUP_ID": f"{run.name}-bridge",
        "BRIDGE_INSTANCE_ID": f"{run.name}-1",
    }
    env.pop("BRIDGE_METRICS_PORT", None)
    bridge = BridgeProcess.replica("bridge", env, run.workdir / "bridge.log")
    port = bridge.metrics_port
    echo(f"[2/5] starting the bridge (log: {bridge.log_path}, metrics :{port}/metrics)")
    with _started("the bridge", bridge.log_path):
        bridge.start().wait_ready(60)
    return bridge


def collect_outcomes(
    run: DemoRun, wanted: set[str], *, timeout_s: float, echo: Callable[[str], None]
) -> dict[str, Outcome]:
    """Follow the outcome topics until every wanted request has one (or time is up)."""
    seen: dict[str, Outcome] = {}
    deadline = time.monotonic() + timeout_s
    for outcome in read_outcomes(
        {"bootstrap.servers": run.bootstrap},
        run.outcome_topics,
        follow=True,
        stop=lambda: len(seen) >= len(wanted) or time.monotonic() > deadline,
    ):
        rid = outcome.request_id
        if rid in wanted and rid not in seen:
            seen[rid] = outcome
            echo(f"  ({len(seen)}/{len(wanted)}) {format_outcome(outcome)}")
    return seen


def run_demo(*, echo: Callable[[str], None], timeout_s: float = 120.0) -> int:
    """Run the demo; return the exit code (0 when every request got its expected outcome)."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise DemoError("KAFKA_BOOTSTRAP_SERVERS is not set; run `make demo` (it starts Kafka)")
    name = f"demo-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"
    run = DemoRun(name, _workdir(), bootstrap)
    echo(f"[1/5] starting the DocuTray emulator (log: {run.workdir / 'emulator.log'})")
    emulator = start_emulator(run)
    bridge: BridgeProcess | None = None
    try:
        bridge = start_bridge(run, emulator, echo=echo)
        with serve_files({"invoice.pdf": samples.pdf("Invoice by URL")}) as files_url:
            requests = demo_requests(files_url, name)
            echo(f"[3/5] sending {len(requests)} requests to {run.topics['BRIDGE_INPUT_TOPIC']}")
            produce_requests(
                {"bootstrap.servers": bootstrap}, run.topics["BRIDGE_INPUT_TOPIC"], requests
            )
            echo("[4/5] waiting for results and dead letters (read_committed)")
            wanted = {r.request_id for r in requests}
            seen = collect_outcomes(run, wanted, timeout_s=timeout_s, echo=echo)
        echo("[5/5] stopping the bridge and the emulator")
        code = bridge.stop(30, must_exit=False)
        return _summary(run, seen, missing=wanted - set(seen), code=code, echo=echo)
    finally:
        if bridge is not None:
            bridge.stop(30, must_exit=False)
        emulator.stop()


def _summary(
    run: DemoRun,
    seen: dict[str, Outcome],
    *,
    missing: set[str],
    code: int | None,
    echo: Callable[[str], None],
) -> int:
    """Print the tally and how to look again; the exit code."""
    ok = sum(1 for o in seen.values() if o.result is not None)
    dead = sum(1 for o in seen.values() if o.dead_letter is not None)
    echo(
        f"done: {ok} results, {dead} dead letters (2 expected: not-a-pdf, missing-url), "
        f"{len(missing)} missing; bridge exit code {code}"
    )
    echo(
        f"inspect again with: KAFKA_BOOTSTRAP_SERVERS={run.bootstrap} docutray-bridge results "
        f"--result-topic {run.topics['BRIDGE_RESULT_TOPIC']} "
        f"--dead-letter-topic {run.topics['BRIDGE_DEAD_LETTER_TOPIC']}"
    )
    return 0 if not missing and dead == 2 and code == 0 else 1
