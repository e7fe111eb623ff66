"""A rate-limiter replica in its own process, and :class:`ReplicaProcess` to drive one.

    python -m service.devkit.limiter_replica '<cfg json>'

The replica builds a limiter (``service.ratelimit.build_limiter``) with `concurrency`
callers, prints ``{"event": "ready"}`` on stdout, waits for a go line on stdin
(``{"start_at": <epoch s>}``), then spends permits for ``duration_s`` and reports each as a
JSON line (``grant``, or ``call`` with the emulator's status), then ``done``. The limiter
tests and ``bench/limiter_share.py`` run several of them against one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import structlog

from service.ratelimit import Budget, LimiterTimeout, build_limiter


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
                [sys.executable, "-m", "service.devkit.limiter_replica", json.dumps(cfg)],
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


if __name__ == "__main__":
    replica_main(sys.argv[1])
