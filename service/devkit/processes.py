"""Child processes for tests, benchmarks and the demo: the emulator, a bridge, a redis-server.

Every launcher works the same way: ``start()`` returns once the child is usable (or raises
with the end of its log), ``stop()`` sends SIGTERM and escalates to SIGKILL after a
deadline, ``kill()`` is ``kill -9``. Logs go to a file the caller names, so a failure can
quote them. Nothing here knows about pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.devkit.ports import HOST, free_port
from service.devkit.waiting import GiveUp, wait_until

#: Sample key of a /metrics scrape: (name, sorted label pairs).
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class ProcessExited(GiveUp):
    """A child exited while something waited for it."""


class ProcessError(RuntimeError):
    """A child did not start, or did not stop when asked."""


def read_line(stream: IO[bytes], *, deadline: float) -> str:
    """One line from a child's stdout (stripped), or what arrived of it when the stream
    closes or the monotonic `deadline` passes ("" when nothing came)."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    buffer = b""
    try:
        while not buffer.endswith(b"\n"):
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not selector.select(timeout=remaining_s):
                break
            byte = os.read(stream.fileno(), 1)
            if not byte:
                break
            buffer += byte
    finally:
        selector.close()
    return buffer.decode(errors="replace").strip()


def stop_process(
    proc: subprocess.Popen[bytes] | None,
    *,
    timeout_s: float,
    must_exit: bool = False,
    name: str = "process",
) -> int | None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; the exit code (None without a process).

    With `must_exit`, a process that had to be killed raises :class:`ProcessError` (it
    ignored SIGTERM), after it is gone.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            if must_exit:
                raise ProcessError(f"{name} ignored SIGTERM for {timeout_s:g} s") from None
    return proc.returncode


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" when it does not exist)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _get_ok(url: str, *, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- a bridge


@dataclass(frozen=True)
class OpsEndpoint:
    """A bridge's ops port (/readyz, /healthz, /metrics), wherever the bridge runs."""

    port: int
    host: str = HOST

    def url(self, path: str) -> str:
        """A URL on the ops endpoint."""
        return f"http://{self.host}:{self.port}{path}"

    def ready(self) -> bool:
        """Whether /readyz answers 200 now."""
        return _get_ok(self.url("/readyz"))

    def metrics_text(self, *, timeout_s: float = 10.0) -> str:
        """The current /metrics scrape (raises httpx.HTTPError when it does not answer)."""
        return httpx.get(self.url("/metrics"), timeout=timeout_s).text

    def metrics(self, *, timeout_s: float = 10.0) -> dict[SampleKey, float]:
        """Every sample of one scrape, keyed by (name, sorted labels)."""
        out: dict[SampleKey, float] = {}
        for family in text_string_to_metric_families(self.metrics_text(timeout_s=timeout_s)):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (one scrape)."""
        return sum_samples(self.metrics(), name, **labels)

    def wait_ready(
        self,
        timeout_s: float,
        *,
        name: str,
        alive: Callable[[], bool],
        tail: Callable[[], str],
        interval_s: float = 0.05,
    ) -> None:
        """Wait for /readyz; :class:`ProcessExited` at once when ``alive()`` turns false,
        TimeoutError after `timeout_s`; both carry ``tail()`` (the end of the log)."""

        def check() -> bool:
            if not alive():
                raise ProcessExited(f"bridge {name} exited:\n{tail()}")
            return self.ready()

        try:
            wait_until(check, timeout_s, f"bridge {name} ready", interval_s=interval_s)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{tail()}") from None


def sum_samples(samples: Mapping[SampleKey, float], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    total = 0.0
    for (sample, sample_labels), value in samples.items():
        have = dict(sample_labels)
        if sample == name and all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def bridge_command() -> list[str]:
    """``docutray-bridge run`` as this Python runs it: ``python -m service.cli run`` (run from
    a checkout's root, that checkout's code; from anywhere else, the installed package)."""
    return [sys.executable, "-m", "service.cli", "run"]


@dataclass
class BridgeProcess:
    """One ``docutray-bridge run`` process, configured by its environment (as in production).

    `env` is the whole environment of the child; `metrics_port` must match its
    ``BRIDGE_METRICS_PORT``. ``start()`` may be called again after a stop or a kill.
    """

    name: str
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    cwd: Path | None = None
    command: list[str] = field(default_factory=bridge_command)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @classmethod
    def replica(
        cls, name: str, env: Mapping[str, str], log_path: Path, *, cwd: Path | None = None
    ) -> BridgeProcess:
        """A replica (not started) with its own ops port (``BRIDGE_METRICS_PORT``, free
        unless `env` sets it) and instance id (``<name>-<random>`` unless `env` sets it)."""
        port = int(env.get("BRIDGE_METRICS_PORT") or free_port())
        full_env = {
            "BRIDGE_INSTANCE_ID": f"{name}-{secrets.token_hex(3)}",
            **env,
            "BRIDGE_METRICS_PORT": str(port),
        }
        return cls(name, full_env, log_path, port, cwd=cwd)

    @property
    def ops(self) -> OpsEndpoint:
        """Its ops endpoint."""
        return OpsEndpoint(self.metrics_port)

    def start(self, *, cwd: Path | None = None) -> BridgeProcess:
        """Start the process (again, after a kill or stop); `cwd` overrides the default."""
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.cwd,
            )
        return self

    @property
    def pid(self) -> int:
        """The process id (of the current incarnation)."""
        if self.proc is None:
            raise ProcessError(f"bridge {self.name} was never started")
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code of the last incarnation (None while it runs)."""
        return self.proc.poll() if self.proc is not None else None

    def check_alive(self) -> None:
        """:class:`ProcessExited` (with the end of its log) unless the process runs."""
        if not self.alive:
            raise ProcessExited(f"bridge {self.name} exited {self.returncode}:\n{self.log_tail()}")

    def url(self, path: str) -> str:
        """A URL on the ops endpoint."""
        return self.ops.url(path)

    def ready(self) -> bool:
        """Whether /readyz answers 200 now."""
        return self.ops.ready()

    def wait_ready(self, timeout_s: float = 60) -> float:
        """Wait until ready; seconds since start. :class:`ProcessExited` at once if it exits."""
        self.ops.wait_ready(timeout_s, name=self.name, alive=lambda: self.alive, tail=self.log_tail)
        return time.monotonic() - self.started_at

    def kill(self) -> None:
        """``kill -9``: no goodbye, no commit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 40, *, must_exit: bool = True) -> int | None:
        """SIGTERM and wait; the exit code. A process that outlives `timeout_s` is killed;
        with `must_exit` that raises :class:`ProcessError` (it ignored SIGTERM)."""
        return stop_process(
            self.proc, timeout_s=timeout_s, must_exit=must_exit, name=f"bridge {self.name}"
        )

    def stop_timed(self, timeout_s: float = 60) -> tuple[int | None, float]:
        """:meth:`stop` (killing it after `timeout_s`); the exit code and the seconds taken."""
        started = time.monotonic()
        code = self.stop(timeout_s, must_exit=False)
        return code, time.monotonic() - started

    def metrics_text(self) -> str:
        """The current /metrics scrape."""
        return self.ops.metrics_text()

    def metrics(self) -> dict[SampleKey, float]:
        """Every sample of one scrape, keyed by (name, sorted labels)."""
        return self.ops.metrics()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        return self.ops.metric(name, **labels)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process log (every incarnation writes to it)."""
        return log_tail(self.log_path, lines)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log line whose ``event`` is `event`, oldest first."""
        found: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return found
        with self.log_path.open(errors="replace") as handle:
            for line in handle:
                if f'"{event}"' not in line:
                    continue
                with contextlib.suppress(json.JSONDecodeError):
                    body = json.loads(line)
                    if isinstance(body, dict) and body.get("event") == event:
                        found.append(body)
        return found


# --------------------------------------------------------------------------- the emulator


def emulator_args(**config: Any) -> list[str]:
    """``EmulatorConfig`` field values as ``python -m service.emulator`` options
    (``rate_limit_per_minute=30``, ``processing_median_s_by_type={"invoice": 1}`` ...)."""
    args: list[str] = []
    for name, value in config.items():
        flag = "--" + name.replace("_", "-")
        if name == "processing_median_s_by_type":
            for code, median_s in dict(value).items():
                args += ["--processing-median-for", f"{code}={median_s}"]
        elif name == "rate_limit_per_minute":
            args += [flag, str(value or 0)]
        elif name == "access_log":
            args.append("--access-log" if value else "--no-access-log")
        elif name in ("webhook_urls", "webhook_events"):
            for item in value:
                args += ["--" + name[:-1].replace("_", "-"), str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def _api_key() -> str:
    return f"dev-{secrets.token_urlsafe(12)}"


@dataclass
class EmulatorProcess:
    """One ``python -m service.emulator`` process on loopback, with helpers for its
    ``/_emulator/*`` routes. Port 0 (the default) lets it pick one; ``start()`` reads the
    port from its ``emulator listening on`` line. It knows two API keys (two organisations).
    """

    log_path: Path
    args: list[str] = field(default_factory=list)
    api_key: str = field(default_factory=_api_key)
    second_api_key: str = field(default_factory=_api_key)
    port: int = 0
    #: The child's environment (default: this process's); the API keys are added to it.
    env: dict[str, str] | None = None
    cwd: Path | None = None
    start_timeout_s: float = 20.0
    stop_timeout_s: float = 5.0
    proc: subprocess.Popen[bytes] | None = None
    _client: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: what a DocuTray client takes as base URL."""
        return f"http://{HOST}:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for `api_key`."""
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def client(self) -> httpx.Client:
        """An HTTP client for the helper routes (closed by :meth:`close`)."""
        if self._client is None:
            self._client = httpx.Client(timeout=30.0)
        return self._client

    @property
    def pid(self) -> int:
        """The process id."""
        if self.proc is None:
            raise ProcessError("the emulator is not running")
        return self.proc.pid

    def log_text(self) -> str:
        """Everything the process wrote to stderr (for failure messages)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200 now."""
        return _get_ok(f"{self.base_url}/healthz", timeout_s=1.0)

    def start(self) -> EmulatorProcess:
        """Launch on `port` (0 = any) and wait for a healthy ``/healthz``."""
        env = dict(self.env if self.env is not None else os.environ)
        env.pop("EMULATOR_PORT", None)
        env["EMULATOR_API_KEYS"] = f"{self.api_key} {self.second_api_key}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.emulator", "--port", str(self.port), *self.args],
                cwd=self.cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        deadline = time.monotonic() + self.start_timeout_s
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, deadline=deadline)
        if not line.startswith("emulator listening on http://"):
            self.stop()
            raise ProcessError(f"emulator did not start: {line!r}\n{self.log_text()[-3000:]}")
        self.port = int(line.rsplit(":", 1)[1])
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise ProcessExited(f"emulator exited\n{self.log_text()[-3000:]}")
            return self.healthy()

        try:
            wait_until(healthy, max(0.1, deadline - time.monotonic()), "emulator /healthz")
        except (TimeoutError, ProcessExited) as exc:
            self.stop()
            raise ProcessError(f"emulator not healthy: {exc}") from None
        return self

    def stop(self) -> None:
        """Terminate the process (SIGKILL after `stop_timeout_s`)."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout_s=self.stop_timeout_s)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def restart(self) -> None:
        """Stop and start again on the same port: every conversion is lost."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the process and release the helper client."""
        self.stop()
        if self._client is not None:
            self._client.close()
            self._client = None

    def stats(self, *, timestamps: bool = False) -> dict[str, Any]:
        """``GET /_emulator/stats``; `timestamps` adds ``counted_call_times_s``."""
        response = self.client.get(
            f"{self.base_url}/_emulator/stats", params={"timestamps": "1" if timestamps else "0"}
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """``POST /_emulator/config`` with these knobs; the knobs now in force."""
        response = self.client.post(f"{self.base_url}/_emulator/config", json=knobs)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def usage(self, *, api_key: str | None = None, **params: int) -> httpx.Response:
        """``GET /api/usage`` with the key (default `api_key`) and optional year/month."""
        return self.client.get(
            f"{self.base_url}/api/usage",
            params=params,
            headers={"Authorization": f"Bearer {api_key or self.api_key}"},
        )

    def forget(self) -> int:
        """Drop every conversion (as a restart that lost state would); how many were dropped."""
        response = self.client.post(f"{self.base_url}/_emulator/forget")
        response.raise_for_status()
        return int(response.json()["forgotten"])

    def reset_stats(self) -> None:
        """Zero the emulator's counters."""
        self.client.post(f"{self.base_url}/_emulator/reset-stats").raise_for_status()


# --------------------------------------------------------------------------- redis-server


def find_program(name: str, package: str, *, install: bool = False) -> str:
    """The path of a program from Debian's packages. Missing: with `install` (and root),
    ``apt-get install -y <package>``; otherwise ProcessError naming the package."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if found:
        return found
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ProcessError(f"{name} is missing: apt-get install -y {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
    return shutil.which(name) or f"/usr/bin/{name}"


@dataclass
class RedisServer:
    """A private ``redis-server`` on loopback (no persistence unless `conf_lines` say so),
    configured by a file in `workdir`; it can be killed and started again on its port.

    ``url`` is ``redis://127.0.0.1:<port>/0``. With ``sentinel`` it runs as a Sentinel;
    `args` are extra command-line options (e.g. ``--replicaof``, TLS ports).
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    args: Sequence[str] = ()
    conf_lines: Sequence[str] = ()
    sentinel: bool = False
    install: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect to (plain TCP)."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """Where the server logs."""
        return self.workdir / "log"

    def launch(self) -> RedisServer:
        """Start the process without waiting for it (a topology waits for all at once)."""
        binary = find_program("redis-server", "redis-server", install=self.install)
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / ("sentinel.conf" if self.sentinel else "redis.conf")
        lines = [f"bind {HOST}", f"dir {self.workdir}", f"logfile {self.log_path}"]
        if "--port" not in self.args:
            lines.append(f"port {self.port}")
        if not self.sentinel:
            lines += ['save ""', "appendonly no"]
        conf.write_text("\n".join([*lines, *self.conf_lines]) + "\n")
        cmd = [binary, str(conf), *(["--sentinel"] if self.sentinel else []), *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
        )
        return self

    def start(self, *, timeout_s: float = 15.0) -> RedisServer:
        """Start and wait until it answers PING."""
        self.launch()
        self.wait_ping(timeout_s=timeout_s)
        return self

    def wait_ping(self, *, timeout_s: float = 15.0, **client_options: Any) -> None:
        """Wait until the server answers PING (`client_options` go to ``redis.Redis``)."""
        import redis

        def pong() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ProcessExited(f"redis-server on {self.port} exited: {self.log_tail()}")
            with redis.Redis(
                host=HOST, port=self.port, socket_timeout=2.0, **client_options
            ) as client:
                return bool(client.ping())

        wait_until(
            pong,
            timeout_s,
            f"redis-server on {self.port} answers PING",
            interval_s=0.05,
            retry_on=(redis.RedisError, OSError),
        )

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost node would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout_s`)."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout_s=timeout_s)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log."""
        path = self.log_path
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """A private Redis for the duration of the block (killed at the end)."""
    server = RedisServer(workdir).start()
    try:
        yield server
    finally:
        server.kill()
