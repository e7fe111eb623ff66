"""Scenarios 5-8: documents and results of real size, and the dedupe window (issues 12 and 11.6).

5. **Pending 1 MB documents.** N requests whose inline document is 1 MiB of
   base64 (768 KiB of random bytes, so compression cannot shrink it below
   ~75 %) arrive at one replica whose submit budget is 1/min, so they all stay
   pending. Measured: the replica's RSS while they arrive (``VmHWM``, the
   kernel's own peak, and ``VmRSS`` sampled every 250 ms from
   ``/proc/<pid>/status``), then ``kill -9`` and a restart under the same
   instance id: seconds from the kill to ``/readyz`` 200 and until every
   entry is back, and the RSS after. Targets for 10,000: RSS < 300 MB,
   restore < 10 s.
6. **Write amplification.** N such requests converted to completion; the
   bytes the broker stored for the run (the ``.log`` segment files of the
   input, documents, changelog, results, dead-letter and dedupe topics,
   read from the broker's log directory) divided by the input topic's bytes.
   Target ≤ 2.2.
7. **A result over the results topic's limit.** The results topic is
   created at Kafka's default ``max.message.bytes`` (1048588); one request
   echoes 3 MB of incompressible metadata into its result, five small ones
   follow it on the same partition. Measured: seconds from the conversion
   finishing (DocuTray's ``response_timestamp``; and from the bridge's
   ``conversion_succeeded`` log line) to the ``result_too_large`` dead letter,
   target < 5 s; the five small ones get one result each, and no
   transaction aborts.
8. **Dedupe memory.** ``python -m bench.dedupe_memory``: bytes per remembered
   id of ``service.dedupe.DedupeWindow`` (tracemalloc), and the RSS of a
   process that imports ``service.app`` and holds 1,000,000 remembered ids
   (target < 150 MB).

Every scenario uses its own topics (deleted at the end) and a broker with
Kafka's default limits (``scripts/stack``); topics are created with the
configs the bridge gives them (``service.kafka.topics.topic_specs``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer

from bench.harness import (
    REPO,
    Context,
    RssSampler,
    Run,
    contender,
    cpu_seconds,
    load_average,
    parse_ts,
)
from service import samples
from service.devkit.processes import BridgeProcess, EmulatorProcess
from service.devkit.waiting import wait_until
from service.kafka.io import IDLE_TRIM_AFTER_S
from service.tools import read_outcomes

#: The memory budget the replica of scenario 5 runs with (the chart would set it from a
#: 300-400 MiB container limit).
MEMORY_BUDGET_MB = 256
#: Raw bytes of each document: base64 makes them 1 MiB of text in the request.
DOCUMENT_RAW_BYTES = 768 * 1024
#: Kafka's own default for a topic's max.message.bytes.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


# --------------------------------------------------------------------------- helpers


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process, in bytes, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def mb(value: float) -> float:
    """Bytes as MiB, one decimal."""
    return round(value / 2**20, 1)


def document_b64(raw_bytes: int = DOCUMENT_RAW_BYTES) -> str:
    """A PDF (header and all) padded with random bytes to `raw_bytes`, in base64."""
    head = samples.pdf("bench big document")
    return base64.b64encode(head + os.urandom(max(0, raw_bytes - len(head)))).decode("ascii")


def big_request(request_id: str, document: str, **metadata: Any) -> bytes:
    """An input record value carrying `document` (base64 PDF) inline."""
    return json.dumps(
        {
            "request_id": request_id,
            "document_type_code": "invoice",
            "source": {"base64": document, "content_type": "application/pdf"},
            "metadata": {"request_id": request_id, **metadata},
        },
        separators=(",", ":"),
    ).encode()


def big_producer(bootstrap: str, *, compression: str = "none") -> Producer:
    """A producer for multi-megabyte records that buffers at most 64 MiB (by default no
    compression: the input's bytes on disk are the bytes produced)."""
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "message.max.bytes": 16 * 1024 * 1024,
            "queue.buffering.max.kbytes": 64 * 1024,
            "linger.ms": 5,
            "compression.type": compression,
        }
    )


def produce_values(
    producer: Producer,
    topic: str,
    items: list[tuple[str, bytes]],
    *,
    partition: int | None = None,
) -> int:
    """Produce (key, value) pairs, waiting when the producer's buffer is full; bytes produced."""
    total = 0
    for key, value in items:
        while True:
            try:
                if partition is None:
                    producer.produce(topic, key=key.encode(), value=value)
                else:
                    producer.produce(topic, key=key.encode(), value=value, partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        total += len(value)
    return total


def broker_data_dir() -> Path | None:
    """The local single-broker stack's log directory (``$STACK_DIR/kafka/data``), if here."""
    stack = Path(os.environ.get("STACK_DIR") or REPO / ".stack")
    data = stack / "kafka" / "data"
    return data if data.is_dir() else None


def topic_log_bytes(data_dir: Path, topic: str) -> int:
    """Bytes of a topic's record segments (``*.log``) in the broker's log directory."""
    pattern = re.compile(re.escape(topic) + r"-\d+")
    total = 0
    for part in data_dir.iterdir():
        if part.is_dir() and pattern.fullmatch(part.name):
            total += sum(f.stat().st_size for f in part.glob("*.log"))
    return total


def wait_ready_traced(bridge: BridgeProcess, timeout_s: float) -> dict[str, float]:
    """Wait for /readyz 200; for each reason it gave for not being ready, the last moment
    (monotonic) it was given. Raises if the process exits or the deadline passes."""
    last_seen: dict[str, float] = {}

    def ready() -> bool:
        bridge.check_alive()
        try:
            response = httpx.get(bridge.url("/readyz"), timeout=2)
        except httpx.HTTPError:
            last_seen["ops endpoint not up"] = time.monotonic()
            return False
        for reason in [] if response.status_code == 200 else response.json().get("reasons", []):
            last_seen[str(reason)] = time.monotonic()
        return response.status_code == 200

    wait_until(ready, timeout_s, f"bridge {bridge.name} ready")
    return last_seen


def _log_lines(bridge: BridgeProcess) -> int:
    if not bridge.log_path.exists():
        return 0
    with bridge.log_path.open(errors="replace") as fh:
        return sum(1 for _ in fh)


def _timeline(bridge: BridgeProcess, skip_lines: int, t0_wall: float) -> dict[str, float]:
    """Seconds from `t0_wall` to the first log event of each kind after line `skip_lines`."""
    out: dict[str, float] = {}
    with bridge.log_path.open(errors="replace") as fh:
        for i, line in enumerate(fh):
            if i < skip_lines or not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                body = json.loads(line)
                event, at = body.get("event"), parse_ts(body.get("timestamp"))
                if isinstance(event, str) and at is not None and event not in out:
                    out[event] = round(at - t0_wall, 2)
    return out


def _pending_total(bridge: BridgeProcess) -> float:
    return bridge.metric("docutray_bridge_pending_conversions")


# --------------------------------------------------------------------------- scenario 5


def run_pending_documents(ctx: Context) -> dict[str, Any]:
    """N pending requests with 1 MiB inline documents: RSS while filling, restore after kill -9."""
    n = ctx.big_pending or (200 if ctx.quick else 10_000)
    return pending_and_restore(
        ctx, label="s5", n=n, document=document_b64(), fill_deadline_s=120 + n * 0.5
    )


def run_pending_small(ctx: Context) -> dict[str, Any]:
    """Scenario 3b: 100,000 small requests kept pending (queued) by a submit budget of 1/min:
    RSS while they arrive, restore after kill -9. Scenario 3 fills the set as `submitted`,
    which needs 100,000 submits; this one is bounded by intake alone. The budget is 640 MB:
    the pending states may hold a quarter (160 MB), and backpressure counts ~1,500 bytes per
    small request, so 100,000 fit (at the default 512 MB intake pauses at about 85,000, as
    designed). The budget caps; the RSS measured is what the bridge really holds."""
    n = 10_000 if ctx.quick else 100_000
    document = base64.b64encode(samples.pdf("small")).decode("ascii")
    return pending_and_restore(
        ctx, label="s3b", n=n, document=document, fill_deadline_s=300 + n * 0.02, budget_mb=640
    )


def pending_and_restore(
    ctx: Context,
    *,
    label: str,
    n: int,
    document: str,
    fill_deadline_s: float,
    budget_mb: int = MEMORY_BUDGET_MB,
) -> dict[str, Any]:
    """N pending requests carrying `document` (base64 PDF) at one replica whose submit budget
    is 1/min: RSS while they arrive; then kill -9, restart under the same id, restore."""
    started = time.monotonic()
    env = {
        "BRIDGE_MEMORY_BUDGET_MB": str(budget_mb),
        "BRIDGE_SUBMIT_RATE_PER_MINUTE": "1",
        "BRIDGE_RATE_BURST": "1",
        "BRIDGE_MAX_PENDING": str(n + 1000),
        "BRIDGE_POLL_DEFAULT_MEDIAN_S": "3000",
    }
    result: dict[str, Any] = {
        "requests": n,
        "document_base64_bytes": len(document),
        "config": env,
        "load_average_before": load_average(),
    }
    emulator_args = ["--processing-median-s", "3000", "--processing-sigma", "0.01"]
    with contender(ctx, label, emulator_args=emulator_args, env=env) as entrant:
        emulator, run, bridge = entrant.emulator, entrant.run, entrant.bridge
        bridge.start()
        result["first_ready_s"] = round(bridge.wait_ready(120), 2)
        result["rss_mb_idle"] = mb(proc_status(bridge.pid)["VmRSS"])
        producer = big_producer(ctx.bootstrap)
        cpu0 = cpu_seconds(bridge.pid)
        with RssSampler(bridge.pid) as rss:
            t0 = time.monotonic()
            produced = 0
            for start in range(0, n, 100):
                chunk = [
                    (rid, big_request(rid, document))
                    for rid in (f"{run.name}-{i:06d}" for i in range(start, min(n, start + 100)))
                ]
                produced += produce_values(producer, run.input_topic, chunk)
                bridge.check_alive()
            if producer.flush(300):
                raise RuntimeError("requests not delivered")
            result["produce_s"] = round(time.monotonic() - t0, 1)
            result["input_value_bytes"] = produced

            def all_pending() -> bool:
                bridge.check_alive()
                return _pending_total(bridge) >= n

            wait_until(all_pending, fill_deadline_s, f"{n} requests pending", interval_s=1.0)
            fill_s = time.monotonic() - t0
            result["fill_s"] = round(fill_s, 1)
            result["fill_mb_per_s"] = round(produced / 2**20 / fill_s, 1)
            result["fill_bridge_cpu_ms_per_request"] = round(
                (cpu_seconds(bridge.pid) - cpu0) / n * 1000, 1
            )
            result["load_average_filled"] = load_average()
            status = proc_status(bridge.pid)
            result["rss_mb_filled"] = mb(status["VmRSS"])
            result["rss_mb_peak_sampled"] = mb(rss.peak_bytes)
            result["rss_mb_peak_vmhwm"] = mb(status["VmHWM"])
            result["memory_held_mb"] = {
                kind: mb(bridge.metric("docutray_bridge_memory_held_bytes", kind=kind))
                for kind in ("pending", "inflight")
            }
            result["pending_by_state"] = {
                s: bridge.metric("docutray_bridge_pending_conversions", state=s)
                for s in ("queued", "submitting", "submitted")
            }
            # At rest: intake quiet for longer than the bridge waits before it gives freed
            # memory back (service.kafka.io.IDLE_TRIM_AFTER_S), the pending set unchanged.
            time.sleep(IDLE_TRIM_AFTER_S + 5)  # wait-ok: the measurement interval itself
            result["rss_mb_settled"] = mb(proc_status(bridge.pid)["VmRSS"])
        data_dir = broker_data_dir()
        if data_dir is not None:
            result["disk_mb"] = {
                role: mb(topic_log_bytes(data_dir, name))
                for role, name in run.topic_names(**env).items()
            }
        # kill -9, restart under the same instance id (static membership, same transactional id)
        assert bridge.proc is not None
        log_lines_before = _log_lines(bridge)
        t_kill = time.monotonic()
        t_kill_wall = time.time()
        bridge.proc.kill()
        bridge.proc.wait(30)
        bridge.start()
        with RssSampler(bridge.pid) as rss2:
            reasons = wait_ready_traced(bridge, 300)
            result["restart_kill_to_ready_s"] = round(time.monotonic() - t_kill, 2)
            result["load_average_restore"] = load_average()
            result["restart_not_ready_reasons_s"] = {
                reason: round(seen - t_kill, 2) for reason, seen in reasons.items()
            }
            result["restart_timeline_s"] = _timeline(bridge, log_lines_before, t_kill_wall)

            def restored() -> bool:
                bridge.check_alive()
                return _pending_total(bridge) >= n

            wait_until(restored, 120, "every pending entry restored", interval_s=0.1)
            result["restart_kill_to_all_pending_s"] = round(time.monotonic() - t_kill, 2)
            result["restore_seconds_metric_sum"] = round(
                bridge.metric("docutray_bridge_changelog_restore_seconds_sum"), 3
            )
            result["restored_records"] = int(
                bridge.metric("docutray_bridge_changelog_restored_records_total")
            )
            time.sleep(2.0)  # wait-ok: memory once the restored set is adopted
            status = proc_status(bridge.pid)
            result["restart_rss_mb"] = mb(status["VmRSS"])
            result["restart_rss_mb_peak_vmhwm"] = mb(status["VmHWM"])
        result["restart_rss_mb_peak_sampled"] = mb(rss2.peak_bytes)
        result["emulator_submissions"] = emulator.stats()["submissions_accepted"]
    result["load_average_after"] = load_average()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


# --------------------------------------------------------------------------- scenario 6


def run_write_amplification(ctx: Context) -> dict[str, Any]:
    """Stored bytes per input byte, the input produced uncompressed and with zstd."""
    started = time.monotonic()
    out: dict[str, Any] = {
        "input_uncompressed": _write_amplification(ctx, "none"),
        "input_zstd": _write_amplification(ctx, "zstd"),
    }
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def _write_amplification(ctx: Context, compression: str) -> dict[str, Any]:
    """N requests with 1 MiB documents converted to completion; stored bytes per input byte."""
    n = 20 if ctx.quick else 300
    data_dir = broker_data_dir()
    if data_dir is None:
        raise RuntimeError("no local broker log directory ($STACK_DIR/kafka/data) to measure")
    started = time.monotonic()
    env = {
        "BRIDGE_MEMORY_BUDGET_MB": str(MEMORY_BUDGET_MB),
        "BRIDGE_SUBMIT_RATE_PER_MINUTE": "6000",
        "BRIDGE_STATUS_RATE_PER_MINUTE": "6000",
        "BRIDGE_RATE_BURST": "50",
        "BRIDGE_POLL_DEFAULT_MEDIAN_S": "0.5",
    }
    document = document_b64()
    result: dict[str, Any] = {
        "requests": n,
        "document_base64_bytes": len(document),
        "input_compression": compression,
        "config": env,
        "load_average_before": load_average(),
    }
    emulator_args = ["--processing-median-s", "0.5", "--processing-sigma", "0.2"]
    with contender(ctx, "s6", emulator_args=emulator_args, env=env) as entrant:
        run, bridge, collector = entrant.run, entrant.bridge, entrant.collector
        entrant.start()
        producer = big_producer(ctx.bootstrap, compression=compression)
        t0 = time.monotonic()
        produced = produce_values(
            producer,
            run.input_topic,
            [
                (f"{run.name}-{i:05d}", big_request(f"{run.name}-{i:05d}", document))
                for i in range(n)
            ],
        )
        if producer.flush(120):
            raise RuntimeError("requests not delivered")
        result["input_value_bytes"] = produced
        collector.wait_count(n, 120 + n * 2, on_wait=bridge.check_alive)
        result["seconds_to_all_outcomes"] = round(time.monotonic() - t0, 1)
        outcomes = collector.snapshot()
        result["results"] = sum(1 for o in outcomes if o.ok)
        result["dead_letters"] = sum(1 for o in outcomes if not o.ok)
        names = run.topic_names(**env)
        by_role = {role: topic_log_bytes(data_dir, name) for role, name in names.items()}
        written = sum(by_role.values())
        result["stored_bytes"] = by_role
        result["stored_mb"] = {role: mb(v) for role, v in by_role.items()}
        result["bridge_written_bytes"] = written - by_role["input"]
        result["amplification_vs_input_topic"] = round(written / by_role["input"], 3)
        result["amplification_vs_input_values"] = round(written / produced, 3)
        result["per_input_byte"] = {
            role: round(v / by_role["input"], 4) for role, v in by_role.items()
        }
        result["transactions_aborted"] = bridge.metric(
            "docutray_bridge_transactions_total", outcome="aborted"
        )
    result["load_average_after"] = load_average()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


# --------------------------------------------------------------------------- scenario 7


def run_result_too_large(ctx: Context) -> dict[str, Any]:
    """A 3 MB result on a results topic at 1048588, five small requests behind it."""
    started = time.monotonic()
    small_doc = base64.b64encode(samples.pdf("small")).decode("ascii")
    # Incompressible text: zstd cannot shrink the result below the topic's limit.
    echoed = base64.b64encode(os.urandom(3_000_000 * 3 // 4)).decode("ascii")
    result: dict[str, Any] = {
        "results_topic_max_message_bytes": KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
        "echoed_metadata_bytes": len(echoed),
        "load_average_before": load_average(),
    }
    with contender(
        ctx,
        "s7",
        emulator_args=["--processing-median-s", "2", "--processing-sigma", "0.01"],
        env={"BRIDGE_POLL_DEFAULT_MEDIAN_S": "2"},
        topic_configs={"results": {"max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)}},
    ) as entrant:
        emulator, run, bridge, collector = (
            entrant.emulator,
            entrant.run,
            entrant.bridge,
            entrant.collector,
        )
        big_id = f"{run.name}-big"
        small_ids = [f"{run.name}-small-{i}" for i in range(5)]
        entrant.start()
        producer = big_producer(ctx.bootstrap)
        items = [(big_id, big_request(big_id, small_doc, echoed=echoed))]
        items += [(rid, big_request(rid, small_doc)) for rid in small_ids]
        t0 = time.time()
        produce_values(producer, run.input_topic, items, partition=0)
        if producer.flush(60):
            raise RuntimeError("requests not delivered")
        collector.wait_count(6, 120, on_wait=bridge.check_alive)
        time.sleep(3.0)  # wait-ok: room for a second (wrong) outcome to show up
        outcomes = collector.snapshot()
        big = [o for o in outcomes if o.request_id == big_id]
        small = [o for o in outcomes if o.request_id in small_ids]
        result["outcomes_of_big"] = [o.reason or "result" for o in big]
        result["small_results"] = sum(1 for o in small if o.ok)
        result["small_outcomes"] = len(small)
        result["small_each_exactly_one"] = sorted(o.request_id or "" for o in small) == sorted(
            small_ids
        ) and all(o.ok for o in small)
        letter = big[0] if big else None
        if letter is not None and not letter.ok:
            conversion_id = _dead_letter_conversion_id(run, ctx, big_id)
            finished = _conversion_finished_at(emulator, conversion_id) if conversion_id else None
            detected = _log_time(bridge, "conversion_succeeded", big_id)
            result["conversion_id"] = conversion_id
            result["produce_to_dead_letter_s"] = round(letter.seen_at - t0, 2)
            if finished is not None:
                result["finished_to_dead_letter_s"] = round(letter.seen_at - finished, 2)
            if detected is not None:
                result["detected_to_dead_letter_s"] = round(letter.seen_at - detected, 2)
        result["small_completed_to_seen_s"] = [
            round(o.seen_at - o.completed_at, 2) for o in small if o.completed_at is not None
        ]
        result["transactions_aborted"] = bridge.metric(
            "docutray_bridge_transactions_total", outcome="aborted"
        )
        result["transactions_committed"] = bridge.metric(
            "docutray_bridge_transactions_total", outcome="committed"
        )
        result["result_too_large_metric"] = bridge.metric(
            "docutray_bridge_dead_letters_total", reason="result_too_large"
        )
        result["emulator_status_calls"] = emulator.stats()["status_calls"]
        result["load_average_after"] = load_average()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _dead_letter_conversion_id(run: Run, ctx: Context, request_id: str) -> str | None:
    """The conversion id in the dead letter of `request_id` (read once more, whole)."""
    for outcome in read_outcomes(
        {"bootstrap.servers": ctx.bootstrap}, [run.dead_letter_topic], follow=False
    ):
        letter = outcome.dead_letter
        if letter is not None and letter.request_id == request_id:
            return letter.conversion_id or None
    return None


def _conversion_finished_at(emulator: EmulatorProcess, conversion_id: str) -> float | None:
    """DocuTray's ``response_timestamp`` of a conversion (epoch seconds)."""
    response = httpx.get(
        f"{emulator.base_url}/api/convert-async/status/{conversion_id}",
        headers={"Authorization": f"Bearer {emulator.api_key}"},
        timeout=10,
    )
    if response.status_code != 200:
        return None
    return parse_ts(response.json().get("response_timestamp"))


def _log_time(bridge: BridgeProcess, event: str, request_id: str) -> float | None:
    """When the bridge logged `event` for `request_id` (epoch seconds)."""
    for body in bridge.log_events(event):
        if body.get("request_id") == request_id:
            return parse_ts(body.get("timestamp"))
    return None


# --------------------------------------------------------------------------- scenario 8


def run_dedupe_memory(ctx: Context) -> dict[str, Any]:
    """Bytes per remembered id, and RSS with 1,000,000 ids (a separate process)."""
    ids = 100_000 if ctx.quick else 1_000_000
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dedupe_memory", "--ids", str(ids)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.dedupe_memory failed: {proc.stderr.strip()[-2000:]}")
    measured: dict[str, Any] = json.loads(proc.stdout)
    measured["load_average_after"] = load_average()
    return measured
