"""What a user writes without the bridge: a Kafka loop around the official `docutray` SDK.

For each request read from Kafka: ``client.convert.run_async(...)``, then
``status.wait()`` (the SDK polls every 2 s), then produce the result. With
``--threads 1`` one document at a time, committing each offset after its
result (the careful naive loop); with ``--threads N`` the same function in a
thread pool of N workers, offsets auto-committed (the usual "make it faster"
step). A 429 the SDK still raises after its own two retries is waited out
(``retry_after``) and the call repeated, so no document is dropped.

Results are written in the bridge's shape (``request_id``, ``metadata``,
``timings`` with ``submitted_at``, ``completed_at``, ``published_at``,
``status_calls``) so the benchmark reads both the same way.

    DOCUTRAY_API_KEY=... python -m bench.sdk_loop --bootstrap B --input-topic T
        --result-topic R --group G --base-url URL [--threads N]

Prints ``ready`` on stdout once subscribed; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import docutray
from confluent_kafka import Consumer, Message, Producer

T = TypeVar("T")
_stop = threading.Event()


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat().replace("+00:00", "Z")


def _patient(call: Callable[[], T]) -> T:
    """Repeat `call` while the API says 429 (after the SDK's own retries) or is unreachable."""
    while True:
        try:
            return call()
        except docutray.RateLimitError as exc:
            time.sleep(exc.retry_after or 2.0)  # wait-ok: what a user does with a 429
        except docutray.APIConnectionError:
            time.sleep(1.0)  # wait-ok: transient network error


def convert(client: docutray.Client, request: dict[str, Any]) -> dict[str, Any]:
    """One document through the SDK: submit, wait, and the result in the bridge's shape."""
    source = request["source"]
    received_at = time.time()
    status = _patient(
        lambda: client.convert.run_async(
            document_type_code=request["document_type_code"],
            file_base64=source["base64"],
            content_type=source.get("content_type"),
            document_metadata=request.get("metadata"),
        )
    )
    submitted_at = time.time()
    calls = 0

    def count(_: docutray.ConversionStatus) -> None:
        nonlocal calls
        calls += 1

    while True:
        try:
            final = status.wait(on_status=count, timeout=3600)
            break
        except docutray.RateLimitError as exc:
            time.sleep(exc.retry_after or 2.0)  # wait-ok: what a user does with a 429
            cid = status.conversion_id
            status = _patient(lambda cid=cid: client.convert.get_status(cid))
            calls += 1
    return {
        "request_id": request["request_id"],
        "conversion_id": final.conversion_id,
        "document_type_code": request["document_type_code"],
        "status": final.status,
        "data": final.data or {},
        "metadata": request.get("metadata"),
        "timings": {
            # The bridge's result shape (service.messages.ConversionResult), so that the
            # bench reads both contenders' results with the same parser.
            "received_at": _iso(received_at),
            "submitted_at": _iso(submitted_at),
            "completed_at": final.response_timestamp.isoformat()
            if final.response_timestamp
            else None,
            "published_at": _iso(time.time()),
            "status_calls": calls,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--result-topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: _stop.set())

    client = docutray.Client(base_url=args.base_url)  # the key comes from DOCUTRAY_API_KEY
    pooled = args.threads > 1
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": pooled,
        }
    )
    producer = Producer({"bootstrap.servers": args.bootstrap})
    consumer.subscribe([args.input_topic])
    print("ready", flush=True)

    def publish(result: dict[str, Any]) -> None:
        producer.produce(
            args.result_topic, key=result["request_id"].encode(), value=json.dumps(result).encode()
        )
        producer.poll(0)

    if not pooled:
        while not _stop.is_set():
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            publish(convert(client, json.loads(msg.value() or b"{}")))
            producer.flush(10)
            consumer.commit(msg, asynchronous=False)
    else:
        slots = threading.BoundedSemaphore(args.threads)

        def work(msg: Message) -> None:
            try:
                publish(convert(client, json.loads(msg.value() or b"{}")))
            finally:
                slots.release()

        with ThreadPoolExecutor(args.threads) as pool:
            while not _stop.is_set():
                if not slots.acquire(timeout=0.5):
                    continue
                msg = consumer.poll(0.5)
                if msg is None or msg.error() is not None:
                    slots.release()
                    continue
                pool.submit(work, msg)
            pool.shutdown(wait=False, cancel_futures=True)
    producer.flush(10)
    consumer.close()
    sys.stdout.flush()
    # Worker threads may sit in status.wait(); a user's process would just exit.
    os._exit(0)


if __name__ == "__main__":
    main()
