"""N limiter replicas (separate processes) sharing one Redis budget against the emulator.

Measures what the issue asks: the share of the emulator's per-minute limit the
replicas achieve together, and how many 429s they get, over a long run.

    .venv/bin/python bench/limiter_share.py [--duration-s 180] [--limit 600]
        [--overdrive 1.0] [--replicas 3] [--redis-url URL] [--json PATH]

``--overdrive 1.5`` configures the limiter 50 % above the emulator's limit to
watch the 429 feedback (AIMD + shared block) bring 429s down. Without
``--redis-url`` a private redis-server is started on a free port.

The module also holds the replica itself (``limiter_share.py replica CFG``) and
:class:`ReplicaProcess`, the harness the tests use to run replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- the replica


def _out(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def _replica(cfg: dict[str, Any]) -> None:
    """One replica: a limiter plus `concurrency` callers, for `duration_s` after the go line.

    cfg: redis_url, rate, burst, replicas, prefix, duration_s, concurrency, shared (bool),
    probe_interval_s; mode "grants" (report each permit) or "emulator" (spend each permit
    on a status call: base_url, api_key, conversion_id); optional block_at_s/block_s
    (report a 429 at that time).
    """
    import httpx

    from service.ratelimit import Budget, LimiterTimeout, build_limiter

    budget: Budget = "status"
    limiter = build_limiter(
        redis_url=cfg["redis_url"],
        submit_rate_per_minute=cfg["rate"],
        status_rate_per_minute=cfg["rate"],
        shared_budget=cfg.get("shared", True),
        burst=cfg["burst"],
        expected_replicas=cfg["replicas"],
        key_prefix=cfg["prefix"],
        on_event=lambda e, f: _out(event=e, at=time.time(), **f) if e == "degraded" else None,
        probe_interval_s=cfg.get("probe_interval_s", 2.0),
    )
    _out(event="ready", at=time.time())
    go = json.loads(await asyncio.to_thread(sys.stdin.readline))
    await asyncio.sleep(max(0.0, go["start_at"] - time.time()))
    stop_at = time.monotonic() + cfg["duration_s"]
    client = None
    if cfg["mode"] == "emulator":
        client = httpx.AsyncClient(
            base_url=cfg["base_url"],
            headers={"Authorization": f"Bearer {cfg['api_key']}"},
            timeout=10.0,
        )

    async def caller() -> None:
        while True:
            try:
                await limiter.acquire(budget, deadline=stop_at)
            except LimiterTimeout:
                return
            if client is None:
                _out(event="grant", at=time.time())
                continue
            response = await client.get(f"/api/convert-async/status/{cfg['conversion_id']}")
            _out(event="call", at=time.time(), status=response.status_code)
            if response.status_code == 429:
                retry_after = response.json().get("retryAfter")
                if retry_after is None:
                    retry_after = response.headers.get("retry-after")
                await limiter.on_rate_limited(
                    budget, retry_after_s=float(retry_after) if retry_after else None
                )
            else:
                limiter.on_success(budget)

    async def blocker() -> None:
        await asyncio.sleep(cfg["block_at_s"])
        _out(event="blocking", at=time.time())
        await limiter.on_rate_limited(budget, retry_after_s=cfg["block_s"])

    tasks = [caller() for _ in range(cfg["concurrency"])]
    if cfg.get("block_at_s") is not None:
        tasks.append(blocker())
    await asyncio.gather(*tasks)
    _out(
        event="done",
        at=time.time(),
        effective_per_minute=limiter.effective_rate_per_minute(budget),
        degraded=limiter.degraded,
    )
    if client is not None:
        await client.aclose()
    await limiter.close()


def replica_main(cfg_json: str) -> None:
    """Entry point of a replica process; logs go to stderr, events (JSON lines) to stdout."""
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(_replica(json.loads(cfg_json)))


class ReplicaProcess:
    """A replica in its own process; its JSON events are collected by a reader thread."""

    def __init__(self, cfg: dict[str, Any], *, log_dir: Path) -> None:
        self.log_path = log_dir / f"replica-{os.getpid()}-{id(self)}.log"
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "replica", json.dumps(cfg)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                with self._lock:
                    self.events.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events named `kind` so far."""
        with self._lock:
            return [e for e in self.events if e.get("event") == kind]

    def go(self, start_at: float) -> None:
        """Let the replica start its run at wall-clock `start_at`."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"start_at": start_at}).encode() + b"\n")
        self.process.stdin.flush()

    def log_text(self) -> str:
        """What the replica logged (stderr)."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the replica to finish its run (kill it if it overruns)."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=timeout_s)


def wait_until(predicate: Any, timeout_s: float, message: str) -> None:
    """Poll `predicate` until true; AssertionError with `message` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout_s} s")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server (no persistence) that can be killed and restarted on its port."""

    def __init__(self, *, port: int | None = None) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def accepts() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(accepts, 10.0, f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost node would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A private Redis for the duration of the block."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --------------------------------------------------------------------------- the benchmark


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from tests.fixtures.emulator import PDF_BYTES, RunningEmulator

    log_dir = Path(tempfile.mkdtemp(prefix="limiter-share-"))
    api_key = "bench-" + os.urandom(8).hex()
    emulator = RunningEmulator(
        port=0,
        api_key=api_key,
        second_api_key=api_key + "-2",
        args=["--rate-limit-per-minute", str(args.limit), "--processing-median-s", "0.2"],
        env={**os.environ, "EMULATOR_API_KEYS": f"{api_key} {api_key}-2"},
        log_path=log_dir / "emulator.log",
    )
    emulator.start()
    with contextlib.ExitStack() as stack:
        stack.callback(emulator.close)
        redis_url = args.redis_url or stack.enter_context(running_redis()).url
        answer = httpx.post(
            f"{emulator.base_url}/api/convert-async",
            headers=emulator.auth_headers,
            json={
                "image_base64": base64.b64encode(PDF_BYTES).decode(),
                "document_type_code": "invoice",
            },
            timeout=10,
        )
        answer.raise_for_status()
        conversion_id = answer.json()["conversion_id"]
        emulator.reset_stats()
        cfg = {
            "mode": "emulator",
            "redis_url": redis_url,
            "rate": args.limit * args.overdrive,
            "burst": args.burst,
            "replicas": args.replicas,
            "prefix": f"bench-{os.urandom(4).hex()}:",
            "duration_s": args.duration_s,
            "concurrency": 4,
            "base_url": emulator.base_url,
            "api_key": api_key,
            "conversion_id": conversion_id,
        }
        replicas = [ReplicaProcess(cfg, log_dir=log_dir) for _ in range(args.replicas)]
        wait_until(lambda: all(r.of("ready") for r in replicas), 30, "replicas not ready")
        start_at = time.time() + 0.5
        for r in replicas:
            r.go(start_at)
        for r in replicas:
            r.stop(timeout_s=args.duration_s + 60)
        stats = emulator.stats()
    calls = [e for r in replicas for e in r.of("call")]
    buckets: dict[int, list[int]] = {}
    for e in calls:
        bucket = int((e["at"] - start_at) // 30)
        counts = buckets.setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += e["status"] == 429
    ok = stats["counted_calls_total"]
    result = {
        "limit_per_minute": args.limit,
        "limiter_per_minute": args.limit * args.overdrive,
        "replicas": args.replicas,
        "duration_s": args.duration_s,
        "accepted_calls": ok,
        "share_of_limit": round(ok / (args.limit * args.duration_s / 60), 4),
        "rate_limited_429": stats["rate_limited"],
        "max_calls_in_any_60s": stats["max_calls_per_60s"],
        "per_replica_calls": [len(r.of("call")) for r in replicas],
        "final_effective_per_minute": [
            r.of("done")[-1]["effective_per_minute"] for r in replicas if r.of("done")
        ],
        "per_30s": {
            f"{b * 30}-{b * 30 + 30}s": {"calls": c, "429": n}
            for b, (c, n) in sorted(buckets.items())
        },
    }
    return result


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "replica":
        replica_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--limit", type=int, default=600, help="emulator limit per minute")
    parser.add_argument("--overdrive", type=float, default=1.0, help="limiter rate / limit")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = bench(args)
    print(
        f"{args.replicas} replicas, {args.duration_s:.0f} s, emulator limit {args.limit}/min, "
        f"limiter {result['limiter_per_minute']:.0f}/min"
    )
    print(f"  accepted calls       {result['accepted_calls']}")
    print(f"  share of the limit   {result['share_of_limit'] * 100:.1f} %")
    print(f"  429 answers          {result['rate_limited_429']}")
    print(f"  max in any 60 s      {result['max_calls_in_any_60s']} (limit {args.limit})")
    print(f"  per replica          {result['per_replica_calls']}")
    print(f"  final effective rate {result['final_effective_per_minute']}")
    for span, row in result["per_30s"].items():
        print(f"  {span:>10}: {row['calls']:5d} calls, {row['429']:4d} x 429")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
