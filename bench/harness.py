"""The benchmark's moving parts: emulator and bridge processes, Kafka topics, requests, outcomes.

Everything runs for real on loopback: the emulator is `python -m service.emulator`,
a bridge replica is a `docutray-bridge run` process configured by environment
variables (as in production), Kafka is the local broker from `KAFKA_BOOTSTRAP_SERVERS`.
Each scenario gets its own topics and consumer group (:class:`Run`), deleted at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
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


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, *, interval_s: float = 0.2
) -> None:
    """Check `predicate` until true; RuntimeError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)  # wait-ok: polling a condition under a deadline


def free_port() -> int:
    """A TCP port on loopback nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _read_line(stream: IO[bytes], *, deadline: float) -> str:
    """One line from a child's stdout, or "" if none arrives before the deadline."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    buffer = b""
    try:
        while not buffer.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(timeout=remaining):
                return ""
            byte = os.read(stream.fileno(), 1)
            if not byte:
                break
            buffer += byte
    finally:
        selector.close()
    return buffer.decode().strip()


def _stop_process(proc: subprocess.Popen[bytes] | None, *, timeout_s: float) -> int | None:
    """SIGTERM, wait, then SIGKILL; the exit code (None if it was not running)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# --------------------------------------------------------------------------- the emulator


@dataclass
class Emulator:
    """One `python -m service.emulator` process on a free loopback port."""

    args: list[str]
    log_path: Path
    api_key: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(12))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """What a DocuTray client takes as base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Emulator:
        """Launch and wait for the `emulator listening on` line and a healthy `/healthz`."""
        env = {**os.environ, "EMULATOR_API_KEYS": self.api_key}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.emulator", "--port", "0", *self.args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        line = _read_line(self.proc.stdout, deadline=time.monotonic() + 30)
        if not line.startswith("emulator listening on http://"):
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r}; see {self.log_path}")
        self.port = int(line.rsplit(":", 1)[1])
        wait_until(self._healthy, 20, "emulator /healthz", interval_s=0.05)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stats(self, *, timestamps: bool = False) -> dict[str, Any]:
        """`GET /_emulator/stats` (`timestamps` adds `counted_call_times_s`, monotonic seconds)."""
        response = httpx.get(
            f"{self.base_url}/_emulator/stats",
            params={"timestamps": "1" if timestamps else "0"},
            timeout=30,
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Terminate the process."""
        proc, self.proc = self.proc, None
        _stop_process(proc, timeout_s=5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------- bridge replicas


def bridge_command() -> list[str]:
    """The installed console script (`docutray-bridge run`), else the module."""
    script = BIN / "docutray-bridge"
    if script.exists():
        return [str(script), "run"]
    return [sys.executable, "-m", "service.cli", "run"]


@dataclass
class Bridge:
    """One `docutray-bridge run` process, configured by its environment."""

    name: str
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> Bridge:
        """Start the process (again, after a stop)."""
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                bridge_command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def url(self, path: str) -> str:
        """A URL on the ops endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def ready(self) -> bool:
        """Whether /readyz answers 200."""
        try:
            return httpx.get(self.url("/readyz"), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 90) -> float:
        """Wait until ready; return seconds since start. Fails early if the process exits."""

        def check() -> bool:
            if not self.alive:
                raise RuntimeError(f"bridge {self.name} exited:\n{self.log_tail()}")
            return self.ready()

        wait_until(check, timeout_s, f"bridge {self.name} ready", interval_s=0.05)
        return time.monotonic() - self.started_at

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the current /metrics scrape, keyed by (name, sorted labels)."""
        text = httpx.get(self.url("/metrics"), timeout=10).text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        total = 0.0
        for (sample, sample_labels), value in self.metrics().items():
            have = dict(sample_labels)
            if sample == name and all(have.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def cpu_s(self) -> float:
        """CPU seconds the process has used so far."""
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        """Resident set size now."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def stop(self, timeout_s: float = 60) -> tuple[int | None, float]:
        """SIGTERM and wait; the exit code and the seconds it took."""
        started = time.monotonic()
        code = _stop_process(self.proc, timeout_s=timeout_s)
        return code, time.monotonic() - started

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log line whose `event` is `event`."""
        found: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return found
        with self.log_path.open(errors="replace") as fh:
            for line in fh:
                if f'"{event}"' not in line:
                    continue
                with contextlib.suppress(json.JSONDecodeError):
                    body = json.loads(line)
                    if body.get("event") == event:
                        found.append(body)
        return found


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

    def bridge_env(self, emulator: Emulator, **overrides: str) -> dict[str, str]:
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

    def bridge(self, name: str, emulator: Emulator, **overrides: str) -> Bridge:
        """A bridge replica of this run (not started)."""
        port = free_port()
        env = self.bridge_env(
            emulator,
            BRIDGE_INSTANCE_ID=f"{name}-{uuid.uuid4().hex[:6]}",
            BRIDGE_METRICS_PORT=str(port),
            **overrides,
        )
        return Bridge(name, env, self.workdir / f"{name}.log", port)


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
    """Produce the requests at a steady rate (each stamped when produced)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    started = time.monotonic()
    for i, rid in enumerate(ids):
        due = started + i / rate_per_s
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # wait-ok: pacing the offered load
        producer.produce(
            topic,
            key=rid.encode(),
            value=request_value(
                rid, document_b64=document_b64, content_type=content_type, produced_at=time.time()
            ),
        )
        producer.poll(0)
    if producer.flush(30):
        raise RuntimeError(f"requests not delivered to {topic}")


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Outcome:
    """One result or dead letter, with the timings the benchmark needs (epoch seconds)."""

    request_id: str | None
    ok: bool
    reason: str | None
    produced_at: float | None
    submitted_at: float | None
    completed_at: float | None
    published_at: float | None
    status_calls: int | None
    seen_at: float


def parse_outcome(raw: bytes, *, seen_at: float) -> Outcome | None:
    """A result/dead-letter value as an :class:`Outcome` (None if unreadable)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if "reason" in body:
        return Outcome(
            body.get("request_id"),
            False,
            str(body.get("reason")),
            None,
            None,
            None,
            parse_ts(body.get("failed_at")),
            body.get("status_calls"),
            seen_at,
        )
    timings = body.get("timings") or {}
    metadata = body.get("metadata") or {}
    produced = metadata.get("bench_produced_at")
    return Outcome(
        body.get("request_id"),
        True,
        None,
        float(produced) if produced is not None else None,
        parse_ts(timings.get("submitted_at")),
        parse_ts(timings.get("completed_at")),
        parse_ts(timings.get("published_at")),
        timings.get("status_calls"),
        seen_at,
    )


class OutcomeCollector:
    """Reads result and dead-letter topics (read_committed, from the beginning) in a thread.

    `seen_at` is when this reader received a record: an upper bound of the
    moment its transaction committed (the reader polls with a short timeout).
    """

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="outcomes", daemon=True)

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "topic.metadata.refresh.interval.ms": 1000,
            }
        )
        try:
            deadline = time.monotonic() + 60
            tps: list[TopicPartition] = []
            while not tps:
                md = consumer.list_topics(timeout=10)
                missing = [t for t in self.topics if t not in md.topics]
                if not missing:
                    for t in self.topics:
                        tps.extend(
                            TopicPartition(t, p, OFFSET_BEGINNING) for p in md.topics[t].partitions
                        )
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"topics never appeared: {missing}")
                else:
                    time.sleep(0.2)  # wait-ok: waiting for topic creation
            consumer.assign(tps)
            self._assigned.set()
            while not self._stop.is_set():
                batch = consumer.consume(num_messages=1000, timeout=0.05)
                now = time.time()
                parsed = []
                for msg in batch:
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise RuntimeError(f"Kafka error: {err.str()}")
                    outcome = parse_outcome(msg.value() or b"", seen_at=now)
                    if outcome is not None:
                        parsed.append(outcome)
                if parsed:
                    with self._lock:
                        self.outcomes.extend(parsed)
        except BaseException as exc:
            self._error = exc
        finally:
            consumer.close()

    def start(self) -> OutcomeCollector:
        """Start reading; returns once the partitions are assigned."""
        self._thread.start()
        wait_until(lambda: self._assigned.is_set() or self._error is not None, 70, "outcome reader")
        self._raise()
        return self

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"outcome reader failed: {self._error}")

    def count(self) -> int:
        """Outcomes seen so far."""
        self._raise()
        with self._lock:
            return len(self.outcomes)

    def snapshot(self) -> list[Outcome]:
        """A copy of every outcome seen so far."""
        with self._lock:
            return list(self.outcomes)

    def wait_count(
        self, n: int, timeout_s: float, *, on_wait: Callable[[], None] | None = None
    ) -> None:
        """Wait until at least `n` outcomes were seen."""

        def enough() -> bool:
            if on_wait is not None:
                on_wait()
            return self.count() >= n

        wait_until(enough, timeout_s, f"{n} outcomes", interval_s=0.02)

    def stop(self) -> None:
        """Stop the reader thread."""
        self._stop.set()
        self._thread.join(15)


# --------------------------------------------------------------------------- Redis


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """`REDIS_URL` from the environment (the local stack), else a private redis-server."""
    url = os.environ.get("REDIS_URL", "")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        raise RuntimeError("REDIS_URL is not set and redis-server is not installed")
    from bench.limiter_share import running_redis

    with running_redis() as server:
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
