"""Peak memory of a 100 MiB multipart upload through DocuTrayClient.submit_upload.

Starts a real emulator process on loopback, writes a 100 MiB "PDF" (valid
header, zero padding) to a temp dir, uploads it and samples the resident set
size (RSS) of this client process and of the emulator every few ms. Prints
the peak increase over the RSS just before each upload, per source:

- file:  a file object opened "rb" (the bridge's fetch mode and the usual case)
- async: an async iterator of 1 MiB chunks with size_bytes (Content-Length)
- bytes: the document already in memory as bytes (increase beyond that copy)
- control: reads the whole file into bytes inside the measured call, to show
  the sampler does see a 100 MiB allocation (expect about +100 MiB)

Run:  .venv/bin/python bench/upload_memory.py [--size-mib 100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.devkit.processes import EmulatorProcess  # noqa: E402
from service.docutray import DocuTrayClient, Submission  # noqa: E402

MIB = 1024 * 1024


class PeakSampler:
    """Samples RSS of several processes in a thread; keeps the maximum of each."""

    def __init__(self, processes: dict[str, psutil.Process], interval_s: float = 0.002) -> None:
        self.processes = processes
        self.interval_s = interval_s
        self.peaks = {name: p.memory_info().rss for name, p in processes.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                rss = process.memory_info().rss
                if rss > self.peaks[name]:
                    self.peaks[name] = rss
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Result:
    source: str
    size_mib: float
    seconds: float
    client_baseline_mib: float
    client_peak_increase_mib: float
    emulator_baseline_mib: float
    emulator_peak_increase_mib: float
    conversion_id: str


def start_emulator(workdir: Path, max_upload_bytes: int) -> EmulatorProcess:
    """One emulator that accepts uploads up to `max_upload_bytes`."""
    return EmulatorProcess(
        log_path=workdir / "emulator.log",
        args=["--max-upload-bytes", str(max_upload_bytes), "--processing-median-s", "0.2"],
        cwd=ROOT,
    ).start()


def make_document(directory: Path, size_bytes: int) -> Path:
    path = directory / "big.pdf"
    header, trailer = b"%PDF-1.4\n", b"\n%%EOF\n"
    with path.open("wb") as out:
        out.write(header)
        remaining = size_bytes - len(header) - len(trailer)
        block = b"\x00" * MIB
        while remaining > 0:
            out.write(block[: min(MIB, remaining)])
            remaining -= MIB
        out.write(trailer)
    assert path.stat().st_size == size_bytes
    return path


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, MIB):
            yield chunk


async def measure(
    source: str,
    upload: Callable[[DocuTrayClient], Any],
    client: DocuTrayClient,
    me: psutil.Process,
    emulator: psutil.Process,
    size_bytes: int,
) -> Result:
    gc.collect()
    before = {"client": me.memory_info().rss, "emulator": emulator.memory_info().rss}
    with PeakSampler({"client": me, "emulator": emulator}) as sampler:
        started = time.monotonic()
        submission: Submission = await upload(client)
        seconds = time.monotonic() - started
    return Result(
        source=source,
        size_mib=size_bytes / MIB,
        seconds=round(seconds, 3),
        client_baseline_mib=round(before["client"] / MIB, 1),
        client_peak_increase_mib=round((sampler.peaks["client"] - before["client"]) / MIB, 1),
        emulator_baseline_mib=round(before["emulator"] / MIB, 1),
        emulator_peak_increase_mib=round((sampler.peaks["emulator"] - before["emulator"]) / MIB, 1),
        conversion_id=submission.conversion_id,
    )


async def main_async(size_bytes: int, as_json: bool) -> None:
    server = start_emulator(
        Path(tempfile.mkdtemp(prefix="upload-bench-emulator-")),
        max_upload_bytes=max(size_bytes, 100 * MIB),
    )
    me, emulator = psutil.Process(), psutil.Process(server.pid)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
            path = make_document(Path(tmp), size_bytes)
            async with DocuTrayClient(
                base_url=server.base_url, api_key=server.api_key, write_timeout_s=120
            ) as client:
                # Warm up: imports, the connection pool, the emulator's code paths.
                await client.submit_upload(
                    file=b"%PDF-1.4\n%%EOF\n", filename="w.pdf", document_type_code="invoice"
                )

                async def from_file(c: DocuTrayClient) -> Submission:
                    with path.open("rb") as file:
                        return await c.submit_upload(
                            file=file, filename="big.pdf", document_type_code="invoice"
                        )

                async def from_async(c: DocuTrayClient) -> Submission:
                    return await c.submit_upload(
                        file=file_chunks(path),
                        filename="big.pdf",
                        document_type_code="invoice",
                        size_bytes=size_bytes,
                    )

                results.append(await measure("file", from_file, client, me, emulator, size_bytes))
                results.append(await measure("async", from_async, client, me, emulator, size_bytes))
                data = path.read_bytes()

                async def from_bytes(c: DocuTrayClient) -> Submission:
                    return await c.submit_upload(
                        file=data, filename="big.pdf", document_type_code="invoice"
                    )

                results.append(await measure("bytes", from_bytes, client, me, emulator, size_bytes))
                data = b""  # drop the copy (the closure shares this binding)
                gc.collect()

                async def control(c: DocuTrayClient) -> Submission:
                    return await c.submit_upload(
                        file=path.read_bytes(), filename="big.pdf", document_type_code="invoice"
                    )

                results.append(await measure("control", control, client, me, emulator, size_bytes))
    finally:
        server.stop()
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if as_json:
        print(
            json.dumps(
                {
                    "results": [asdict(r) for r in results],
                    "client_lifetime_max_rss_mib": round(max_rss_mib, 1),
                },
                indent=2,
            )
        )
        return
    print(f"upload of {size_bytes} bytes ({size_bytes / MIB:.0f} MiB), sampled RSS every 2 ms")
    print(f"{'source':<7} {'seconds':>8} {'client +MiB':>12} {'emulator +MiB':>14}")
    for r in results:
        print(
            f"{r.source:<7} {r.seconds:>8.2f} {r.client_peak_increase_mib:>12.1f} "
            f"{r.emulator_peak_increase_mib:>14.1f}"
        )
    print(
        f"client lifetime max RSS (getrusage): {max_rss_mib:.1f} MiB "
        "(includes the in-memory copies of the bytes and control runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=100.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.chdir(ROOT)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main_async(int(args.size_mib * MIB), args.json))


if __name__ == "__main__":
    main()
