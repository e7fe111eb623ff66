"""Memory of the dedupe window (issue 11.6): bytes per remembered id, RSS with a million ids.

    python -m bench.dedupe_memory [--ids 1000000] [--partitions 6]

Run as its own process (``bench.run`` scenario 8 starts it), so its RSS is
what a replica's would be: it imports ``service.app`` (every module of the
bridge, the Kafka client, httpx, pydantic, prometheus), then fills one
:class:`service.dedupe.DedupeWindow` per partition the way a restore does,
with ids whose finish times are spread evenly over the last 23 hours of a
24-hour window (so they are sealed into sorted blocks as in a replica that
ran for a day; ``--restore-path`` also builds and parses each id's
``<group>.dedupe`` record value, as a restore does: slower, same memory).

Prints one JSON object:

- ``rss_mb_*``: ``VmRSS`` from /proc/self/status: bare interpreter, after
  importing ``service.app``, after filling; ``vmhwm_mb``: the peak.
- ``bytes_per_id_tracemalloc``: Python allocations held by the windows per
  id (a second, separate fill under tracemalloc), the figure the module's
  docstring predicts at 16 bytes plus the unsealed tail.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any


def _status() -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


def fill(ids: int, partitions: int, now_s: float, *, restore_path: bool = False) -> list[Any]:
    """One window per partition holding `ids` ids in all, finished over the last 23 hours."""
    from service.dedupe import DedupeWindow, Outcome, dedupe_value, parse_dedupe_value

    windows = [DedupeWindow(86_400.0) for _ in range(partitions)]
    span_s = 23 * 3600.0
    for i in range(ids):
        request_id = f"req-{i:012d}-3f9a1c"
        finished_s = now_s - span_s + span_s * i / ids
        content = hashlib.blake2b(request_id.encode(), digest_size=16).hexdigest()
        outcome: Outcome = "result" if i % 50 else "dead_letter"
        if restore_path:
            parsed = parse_dedupe_value(dedupe_value(content, outcome, int(finished_s * 1000)))
            assert parsed is not None
            content, outcome, finished_ms = parsed
            finished_s = finished_ms / 1000
        windows[i % partitions].remember(request_id, content, outcome, finished_s)
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--restore-path", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "ids": args.ids,
        "partitions": args.partitions,
        "restore_path": args.restore_path,
    }
    out["rss_mb_bare"] = _status()["VmRSS"]
    import service.app  # noqa: F401  (the bridge's modules, as a replica has them)

    gc.collect()
    out["rss_mb_after_import"] = _status()["VmRSS"]
    now_s = time.time()
    t0 = time.monotonic()
    windows = fill(args.ids, args.partitions, now_s, restore_path=args.restore_path)
    out["fill_s"] = round(time.monotonic() - t0, 1)
    gc.collect()
    status = _status()
    out["rss_mb_holding"] = status["VmRSS"]
    out["rss_mb_for_ids"] = round(status["VmRSS"] - out["rss_mb_after_import"], 1)
    out["vmhwm_mb"] = status["VmHWM"]
    out["remembered"] = sum(len(w) for w in windows)
    out["lookup_hits"] = sum(
        1
        for i in range(0, args.ids, max(1, args.ids // 1000))
        if windows[i % args.partitions].get(f"req-{i:012d}-3f9a1c", now_s) is not None
    )
    out["blocks"] = sum(len(w._blocks) for w in windows)
    out["unsealed_ids"] = sum(len(w._recent) for w in windows)
    del windows
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    windows = fill(args.ids, args.partitions, now_s)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    out["bytes_per_id_tracemalloc"] = round(held / args.ids, 1)
    sealed = sum(sum(len(b.keys) for b in w._blocks) for w in windows)
    out["sealed_ids"] = sealed
    print(json.dumps(out))


if __name__ == "__main__":
    main()
