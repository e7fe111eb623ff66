"""Sustained status calls per second of one emulator process.

Starts `python -m service.emulator` on loopback (one uvicorn process, no rate
limit, no faults), creates some conversions, then hammers
`GET /api/convert-async/status/{id}` for existing ids from this one client
process (httpx.AsyncClient, bounded concurrency, bounded duration). Prints
requests/second, latency percentiles and the CPU each side used, so the
reader can tell which side was the bottleneck (on 2 cores both compete).

    .venv/bin/python bench/emulator_status_rps.py [--duration-s 10] [--concurrency 64]
        [--conversions 500] [--client httpx|raw] [--json]

`--client raw` swaps httpx for a minimal asyncio HTTP/1.1 client, to see the
emulator's own ceiling when httpx's per-request cost is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from service.devkit.processes import EmulatorProcess  # noqa: E402 - after the path fix

PDF = b"%PDF-1.4\n%bench\n"


def start_emulator(workdir: Path) -> EmulatorProcess:
    """One emulator (no rate limit, finished conversions kept an hour)."""
    return EmulatorProcess(
        log_path=workdir / "emulator.log",
        args=["--processing-median-s", "0.5", "--finished-ttl-s", "3600"],
        cwd=REPO_ROOT,
    ).start()


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def hammer(
    base_url: str,
    api_key: str,
    *,
    conversions: int,
    concurrency: int,
    duration_s: float,
    server: psutil.Process,
    client_kind: str,
) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=30
    ) as client:
        body = {"document_type_code": "invoice", "image_base64": base64.b64encode(PDF).decode()}
        ids = []
        for _ in range(conversions):
            response = await client.post("/api/convert-async", json=body)
            response.raise_for_status()
            ids.append(response.json()["conversion_id"])
        await asyncio.sleep(2.0)  # let most conversions finish: SUCCESS bodies carry data

        latencies_s: list[float] = []
        errors = 0
        stop_at = time.monotonic() + duration_s
        host, port = httpx.URL(base_url).host, httpx.URL(base_url).port

        async def httpx_worker(offset: int) -> None:
            nonlocal errors
            n = offset
            while time.monotonic() < stop_at:
                conversion_id = ids[n % len(ids)]
                n += concurrency
                started = time.perf_counter()
                response = await client.get(f"/api/convert-async/status/{conversion_id}")
                latencies_s.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors += 1

        async def raw_worker(offset: int) -> None:
            # Minimal keep-alive HTTP/1.1 client: shows the emulator's own ceiling
            # when httpx's per-request cost would otherwise be what is measured.
            nonlocal errors
            reader, writer = await asyncio.open_connection(host, port)
            n = offset
            try:
                while time.monotonic() < stop_at:
                    conversion_id = ids[n % len(ids)]
                    n += concurrency
                    started = time.perf_counter()
                    writer.write(
                        f"GET /api/convert-async/status/{conversion_id} HTTP/1.1\r\n"
                        f"Host: {host}\r\nAuthorization: Bearer {api_key}\r\n\r\n".encode()
                    )
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    await reader.readexactly(length)
                    latencies_s.append(time.perf_counter() - started)
                    if not head.startswith(b"HTTP/1.1 200"):
                        errors += 1
            finally:
                writer.close()

        worker = raw_worker if client_kind == "raw" else httpx_worker

        me = psutil.Process()
        server_cpu0, client_cpu0 = _cpu_s(server), _cpu_s(me)
        begun = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed_s = time.monotonic() - begun
        server_share = (_cpu_s(server) - server_cpu0) / elapsed_s
        client_share = (_cpu_s(me) - client_cpu0) / elapsed_s
    latencies_s.sort()
    return {
        "server_cpu_share": server_share,
        "client_cpu_share": client_share,
        "requests": len(latencies_s),
        "errors": errors,
        "elapsed_s": elapsed_s,
        "rps": len(latencies_s) / elapsed_s,
        "p50_ms": statistics.median(latencies_s) * 1000,
        "p99_ms": latencies_s[int(len(latencies_s) * 0.99)] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--conversions", type=int, default=500)
    parser.add_argument(
        "--client",
        choices=["httpx", "raw"],
        default="httpx",
        help="httpx.AsyncClient (default) or a minimal asyncio HTTP/1.1 client",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    emulator = start_emulator(Path(tempfile.mkdtemp(prefix="emulator-status-rps-")))
    try:
        result = asyncio.run(
            hammer(
                emulator.base_url,
                emulator.api_key,
                conversions=args.conversions,
                concurrency=args.concurrency,
                duration_s=args.duration_s,
                server=psutil.Process(emulator.pid),
                client_kind=args.client,
            )
        )
        result["concurrency"] = args.concurrency
        result["cpus"] = os.cpu_count() or 0
    finally:
        emulator.stop()
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"[{args.client}] status calls: {result['rps']:.0f} req/s sustained over {result['elapsed_s']:.1f} s "
        f"({result['requests']:.0f} requests, {result['errors']:.0f} non-200), "
        f"concurrency {args.concurrency}, p50 {result['p50_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms; CPU: emulator {result['server_cpu_share']:.0%}, "
        f"client {result['client_cpu_share']:.0%} of one core ({result['cpus']} cores)"
    )


if __name__ == "__main__":
    main()
