"""Calling librdkafka from the Kafka thread: retried while retriable, bounded where it may hang.

Both keep the thread's liveness heartbeat beating while they wait, so a long retry or
a slow look-up is never taken for a stuck thread (the watchdog restarts only a thread
that makes no progress).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException

from service import metrics
from service.kafka.errors import CallHung, FatalKafkaError, retriable

log = structlog.get_logger(__name__)

#: A transactional call that has not returned after this long is taken for stuck.
CALL_LIMIT_S = 45.0

#: One look-up (offsets, watermarks) waits this long at most; `retrying` tries again, beating.
LOOKUP_TIMEOUT_S = 10.0


class Calls:
    """How the Kafka thread calls librdkafka (one per thread; `beat` is its heartbeat)."""

    def __init__(self, *, retry_limit_ms: int, beat: Callable[[], None]) -> None:
        #: Retriable errors are retried this long (the transaction timeout).
        self._limit_ms = retry_limit_ms
        self._beat = beat

    def retrying(self, what: str, call: Callable[[], Any], *, limit_ms: int | None = None) -> Any:
        """Run a Kafka call, retrying retriable errors with backoff within the transaction timeout
        (or `limit_ms`).

        Fatal errors (fenced, authentication) raise FatalKafkaError; abortable ones are
        re-raised for the caller's abort path. A retriable error that outlasts the limit
        raises FatalKafkaError: the process restarts rather than hang.
        """
        limit_ms = self._limit_ms if limit_ms is None else limit_ms
        deadline = time.monotonic() + limit_ms / 1000
        delay = 0.1
        while True:
            self._beat()
            try:
                return call()
            except KafkaException as exc:
                kerr: KafkaError = exc.args[0]
                if kerr.fatal():
                    raise FatalKafkaError(f"{what} failed: {kerr.str()}") from None
                if kerr.txn_requires_abort() or not retriable(kerr):
                    raise
                if time.monotonic() > deadline:
                    raise FatalKafkaError(
                        f"{what} still failing after {limit_ms} ms: {kerr.str()}"
                    ) from None
                metrics.KAFKA_RETRIES.labels(what).inc()
                log.warning(
                    "kafka_call_retry",
                    call=what,
                    error=kerr.str(),
                    retry_in_s=round(delay, 2),
                    action="none: retried; check the brokers if it persists",
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def bounded(self, what: str, call: Callable[[], Any]) -> Any:
        """Run a librdkafka call that may never return, beating; CallHung past the limit.

        librdkafka's send_offsets_to_transaction waits without a deadline for its result,
        whatever timeout it is given: when the transaction coordinator's broker goes away
        at the wrong moment it blocks forever (seen on a three-broker cluster). The call
        runs on a helper thread so that this thread can give up on it.
        """
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # handed to the Kafka thread below
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name=f"kafka-{what}", daemon=True).start()
        deadline = time.monotonic() + CALL_LIMIT_S
        while not done.wait(0.5):
            self._beat()
            if time.monotonic() > deadline:
                raise CallHung(f"{what} did not return within {CALL_LIMIT_S:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["value"]
