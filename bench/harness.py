"""The benchmark's moving parts: Kafka topics of a run, requests, measurements, profiles.

Everything runs for real on loopback: the emulator and the bridge replicas are the
processes of :mod:`service.devkit.processes` (the same launchers the tests and the demo
use), outcomes are read by :class:`service.devkit.outcomes.OutcomeCollector`, and Kafka is
the local broker from `KAFKA_BOOTSTRAP_SERVERS`. Each scenario gets its own topics and
consumer group (:class:`Run`), deleted at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from service.config import Settings
from service.devkit.outcomes import OutcomeCollector
from service.devkit.processes import BridgeProcess, EmulatorProcess, running_redis
from service.devkit.producing import PacedProducer, Record
from service.kafka.topics import dedupe_topic, documents_topic, topic_specs

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: Environment variables that are bridge settings (the rest of a run's env is not).
_SETTING_PREFIXES = ("BRIDGE_", "KAFKA_", "DOCUTRAY_", "REDIS_URL")


# --------------------------------------------------------------------------- small helpers


@dataclass(frozen=True)
class Context:
    """What every scenario needs: the broker, a scratch directory, and quick or full sizes."""

    bootstrap: str
    workdir: Path
    results_dir: Path
    quick: bool
    parallel: bool = True
    #: Scenario 5's pending count instead of its default (10,000; 200 with --quick).
    big_pending: int | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The `q` quantile (nearest rank) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def mean(values: list[float]) -> float | None:
    """The arithmetic mean, or None when empty."""
    return sum(values) / len(values) if values else None


def parse_ts(value: str | None) -> float | None:
    """An ISO-8601 timestamp (with `Z` or an offset) as epoch seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value).timestamp()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used so far (all its threads)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now."""
    return int(psutil.Process(pid).memory_info().rss)


class RssSampler:
    """Peak resident set size of one process, sampled in a thread every `interval_s`."""

    def __init__(self, pid: int, *, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.last_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        try:
            process = psutil.Process(self.pid)
            while not self._stop.is_set():
                self.last_bytes = int(process.memory_info().rss)
                self.peak_bytes = max(self.peak_bytes, self.last_bytes)
                self._stop.wait(self.interval_s)
        except psutil.Error:
            return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------- a run's topics


@dataclass
class Run:
    """Topics, a consumer group and a work directory for one contender of one scenario."""

    bootstrap: str
    name: str
    workdir: Path
    partitions: int = 6

    @classmethod
    def new(cls, bootstrap: str, label: str, workdir: Path, *, partitions: int = 6) -> Run:
        """Fresh names (never reused: every run starts from empty topics)."""
        name = f"bench-{label}-{uuid.uuid4().hex[:6]}"
        run_dir = workdir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls(bootstrap, name, run_dir, partitions)

    @property
    def input_topic(self) -> str:
        return f"{self.name}.requests"

    @property
    def result_topic(self) -> str:
        return f"{self.name}.results"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.name}.dead-letters"

    @property
    def group(self) -> str:
        return f"{self.name}-group"

    @property
    def changelog_topic(self) -> str:
        return f"{self.group}.pending-changelog"

    @property
    def documents_topic(self) -> str:
        return documents_topic(self.settings())

    @property
    def dedupe_topic(self) -> str:
        return dedupe_topic(self.settings())

    def settings(self, **overrides: str) -> Settings:
        """The bridge's settings for this run (its topic names, plus `overrides`: env names)."""
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "BRIDGE_INPUT_TOPIC": self.input_topic,
            "BRIDGE_RESULT_TOPIC": self.result_topic,
            "BRIDGE_DEAD_LETTER_TOPIC": self.dead_letter_topic,
            "BRIDGE_GROUP_ID": self.group,
            "BRIDGE_TOPIC_PARTITIONS": str(self.partitions),
            **overrides,
        }
        values: dict[str, Any] = {k: v for k, v in env.items() if k.startswith(_SETTING_PREFIXES)}
        return Settings(**values)

    def topic_names(self, **overrides: str) -> dict[str, str]:
        """Every topic a bridge of this run uses, by role (input, results, changelog ...)."""
        return {spec.role: spec.name for spec in topic_specs(self.settings(**overrides))}

    def create_topics(
        self,
        *,
        configs: dict[str, dict[str, str]] | None = None,
        **overrides: str,
    ) -> None:
        """Create the input, result and dead-letter topics with the configs the bridge gives them
        (``service.kafka.topics.topic_specs``; `overrides` are the bridge's env settings that change
        them, e.g. ``BRIDGE_MAX_REQUEST_BYTES``). `configs` (by role) replaces a topic's configs,
        e.g. a results topic at Kafka's default limit. The bridge creates the others."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        topics = [
            NewTopic(
                spec.name,
                num_partitions=self.partitions,
                replication_factor=1,
                config=dict((configs or {}).get(spec.role, spec.config)),
            )
            for spec in topic_specs(self.settings(**overrides))
            if spec.role in ("input", "results", "dead_letters")
        ]
        for fut in admin.create_topics(topics, request_timeout=30).values():
            fut.result()

    def delete_topics(self) -> None:
        """Delete every topic of the run (keeps the shared broker small)."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        names = [
            self.input_topic,
            self.result_topic,
            self.dead_letter_topic,
            self.changelog_topic,
            self.documents_topic,
            self.dedupe_topic,
        ]
        existing = set(admin.list_topics(timeout=10).topics)
        doomed = [n for n in names if n in existing]
        if doomed:
            for fut in admin.delete_topics(doomed, request_timeout=30).values():
                with contextlib.suppress(Exception):
                    fut.result()

    def bridge_env(self, emulator: EmulatorProcess, **overrides: str) -> dict[str, str]:
        """The environment of a bridge replica of this run (overrides win)."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("BRIDGE_", "KAFKA_", "DOCUTRAY_", "REDIS_URL"))
        }
        env.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "DOCUTRAY_API_KEY": emulator.api_key,
                "DOCUTRAY_BASE_URL": emulator.base_url,
                "BRIDGE_INPUT_TOPIC": self.input_topic,
                "BRIDGE_RESULT_TOPIC": self.result_topic,
                "BRIDGE_DEAD_LETTER_TOPIC": self.dead_letter_topic,
                "BRIDGE_GROUP_ID": self.group,
                "BRIDGE_TOPIC_PARTITIONS": str(self.partitions),
                "BRIDGE_METRICS_HOST": "127.0.0.1",
                "BRIDGE_LOG_FORMAT": "json",
                "BRIDGE_LOG_LEVEL": "info",
                "BRIDGE_SHUTDOWN_GRACE_S": "20",
            }
        )
        env.update(overrides)
        return env

    def bridge(self, name: str, emulator: EmulatorProcess, **overrides: str) -> BridgeProcess:
        """A bridge replica of this run (not started)."""
        env = self.bridge_env(emulator, **overrides)
        return BridgeProcess.replica(name, env, self.workdir / f"{name}.log", cwd=REPO)


@dataclass
class Contender:
    """One emulator, one run's topics, a bridge replica ``r1`` (not started yet) and an
    outcome reader (not started yet) for one measured contender."""

    emulator: EmulatorProcess
    run: Run
    bridge: BridgeProcess
    collector: OutcomeCollector

    def start(self, ready_timeout_s: float = 120) -> float:
        """Start the bridge, wait until it is ready, start reading outcomes; the seconds the
        bridge took to be ready."""
        self.bridge.start()
        ready_s = self.bridge.wait_ready(ready_timeout_s)
        self.collector.start()
        return ready_s


@contextlib.contextmanager
def contender(
    ctx: Context,
    label: str,
    *,
    emulator_args: list[str],
    env: dict[str, str],
    topic_configs: dict[str, dict[str, str]] | None = None,
) -> Iterator[Contender]:
    """A :class:`Contender` on fresh topics (created here); on the way out the reader, the
    bridge and the emulator stop and the run's topics are deleted."""
    emulator = EmulatorProcess(
        log_path=ctx.workdir / f"emulator-{label}.log", args=emulator_args, cwd=REPO
    ).start()
    run = Run.new(ctx.bootstrap, label, ctx.workdir)
    collector = OutcomeCollector(ctx.bootstrap, [run.result_topic, run.dead_letter_topic])
    entrant = Contender(emulator, run, run.bridge("r1", emulator, **env), collector)
    try:
        run.create_topics(configs=topic_configs)
        yield entrant
    finally:
        collector.stop()
        if entrant.bridge.alive:
            entrant.bridge.stop_timed(30)
        emulator.stop()
        with contextlib.suppress(Exception):
            run.delete_topics()


# --------------------------------------------------------------------------- requests


def request_value(
    request_id: str,
    *,
    document_b64: str,
    content_type: str,
    document_type_code: str = "invoice",
    produced_at: float | None = None,
) -> bytes:
    """One input record value (the bridge's DocumentRequest JSON)."""
    metadata: dict[str, Any] = {"request_id": request_id}
    if produced_at is not None:
        metadata["bench_produced_at"] = produced_at
    return json.dumps(
        {
            "request_id": request_id,
            "document_type_code": document_type_code,
            "source": {"base64": document_b64, "content_type": content_type},
            "metadata": metadata,
        },
        separators=(",", ":"),
    ).encode()


def b64(raw: bytes) -> str:
    """Base64 text of raw bytes."""
    return base64.b64encode(raw).decode("ascii")


def produce_requests(
    bootstrap: str,
    topic: str,
    ids: Iterable[str],
    *,
    document_b64: str,
    content_type: str,
    stamp: bool = True,
) -> int:
    """Produce one request per id (key = request id); return how many. Waits for delivery."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"}
    )
    count = 0
    for rid in ids:
        value = request_value(
            rid,
            document_b64=document_b64,
            content_type=content_type,
            produced_at=time.time() if stamp else None,
        )
        while True:
            try:
                producer.produce(topic, key=rid.encode(), value=value)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        if count % 1000 == 0:
            producer.poll(0)
    left = producer.flush(60)
    if left:
        raise RuntimeError(f"{left} requests not delivered to {topic}")
    return count


def paced_produce(
    bootstrap: str,
    topic: str,
    ids: list[str],
    *,
    rate_per_s: float,
    document_b64: str,
    content_type: str,
) -> None:
    """Produce the requests at a steady rate (each stamped when produced); returns once all
    are delivered."""

    def make(i: int) -> Record:
        value = request_value(
            ids[i], document_b64=document_b64, content_type=content_type, produced_at=time.time()
        )
        return ids[i], value, None

    producer = PacedProducer(
        bootstrap, topic, make, rate_per_s=rate_per_s, count=len(ids), config={"linger.ms": 0}
    )
    producer.start().finish(len(ids) / rate_per_s + 60)


# --------------------------------------------------------------------------- Redis


@contextlib.contextmanager
def redis_url(workdir: Path | None = None) -> Iterator[str]:
    """`REDIS_URL` from the environment (the local stack), else a private redis-server."""
    url = os.environ.get("REDIS_URL", "")
    if url:
        yield url
        return
    with running_redis(workdir or Path(tempfile.mkdtemp(prefix="bench-redis-"))) as server:
        yield server.url


# --------------------------------------------------------------------------- py-spy


def py_spy_binary() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    candidate = BIN / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


class PySpy:
    """`py-spy record` of one process (all threads, non-blocking) into collapsed stacks."""

    def __init__(self, pid: int, out_path: Path, *, rate_hz: int = 200) -> None:
        self.pid = pid
        self.out_path = out_path
        self.rate_hz = rate_hz
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"py-spy-{pid}.log"

    def __enter__(self) -> PySpy:
        binary = py_spy_binary()
        if binary is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "record",
                    "--pid",
                    str(self.pid),
                    "--format",
                    "raw",
                    "--output",
                    str(self.out_path),
                    "--rate",
                    str(self.rate_hz),
                    "--threads",
                    "--nonblocking",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        time.sleep(0.5)  # wait-ok: py-spy attaches before the measured work starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def summarize_profile(collapsed: Path, *, top: int = 15) -> dict[str, Any]:
    """Top functions by own samples and by inclusive samples, and samples per thread.

    `collapsed` holds py-spy's raw output: one line per stack, frames separated
    by `;` (root first; with --threads the root is the thread), then the count.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    by_package: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        thread = frames[0]
        threads[thread] = threads.get(thread, 0) + count
        names = [_frame_name(f) for f in frames[1:]] or [thread]
        own[names[-1]] = own.get(names[-1], 0) + count
        package = _package(frames[-1]) if len(frames) > 1 else "(thread only)"
        by_package[package] = by_package.get(package, 0) + count
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + count

    def ranked(table: dict[str, int]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [{"function": k, "samples": v, "share": round(v / total, 4)} for k, v in rows]

    service_inclusive = {k: v for k, v in inclusive.items() if "service/" in k}
    return {
        "samples": total,
        "threads": ranked(threads),
        "own_by_package": ranked(by_package),
        "top_own": ranked(own),
        "top_inclusive": ranked(inclusive),
        "top_inclusive_service": ranked(service_inclusive),
    }


def _package(frame: str) -> str:
    """The top-level package (or service module, or stdlib module) a frame's code lives in."""
    where = frame.partition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    if where.startswith("service/"):
        return where
    if where.startswith("<frozen importlib"):
        return "importlib (failed imports)"
    return where.split("/", 1)[0].removesuffix(".py")


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` → `func (service/x.py)`, shortened for reading."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name
