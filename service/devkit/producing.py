"""Offered load: records produced at a steady rate, in a thread, for tests and benchmarks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, Producer

#: librdkafka's "no partition chosen": the configured partitioner picks one.
UNASSIGNED = -1
#: What a load produces as its record number `n`: (key, value, partition or None).
Record = tuple[str, bytes, int | None]


class PacedProducer:
    """Produces ``make(n)`` for n = 0, 1, 2 ... at `rate_per_s`, in a thread.

    Record n is due at ``start + n / rate_per_s`` (no catching up in bursts after a stall
    beyond what is due). With `count` it ends after that many; otherwise it runs until
    :meth:`stop`. ``sent`` lists the keys produced so far, in order.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        make: Callable[[int], Record],
        *,
        rate_per_s: float,
        count: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.make = make
        self.rate_per_s = rate_per_s
        self.count = count
        self.sent: list[str] = []
        self.errors: list[str] = []
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 5, **(config or {})}
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{topic}", daemon=True)

    def _report(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self.errors.append(err.str())

    def _run(self) -> None:
        started = time.monotonic()
        n = 0
        while not self._stop.is_set() and (self.count is None or n < self.count):
            delay_s = started + n / self.rate_per_s - time.monotonic()
            if delay_s > 0 and self._stop.wait(delay_s):  # wait-ok: pacing the offered load
                break
            key, value, partition = self.make(n)
            self._producer.produce(
                self.topic,
                key=key.encode(),
                value=value,
                partition=partition if partition is not None else UNASSIGNED,
                on_delivery=self._report,
            )
            self.sent.append(key)
            self._producer.poll(0)
            n += 1

    def start(self) -> PacedProducer:
        """Start producing."""
        self._thread.start()
        return self

    def halt(self) -> None:
        """Stop producing, without waiting for delivery (for an error path)."""
        self._stop.set()

    def stop(self, *, flush_timeout_s: float = 30.0) -> int:
        """Stop producing and wait until every record is delivered; how many were sent.
        RuntimeError when a record was not delivered."""
        self._stop.set()
        return self._finish(flush_timeout_s)

    def finish(self, timeout_s: float, *, flush_timeout_s: float = 30.0) -> int:
        """Wait until all `count` records are produced (at most `timeout_s`), then as
        :meth:`stop`."""
        self._thread.join(timeout_s)
        self._stop.set()
        return self._finish(flush_timeout_s)

    def _finish(self, flush_timeout_s: float) -> int:
        self._thread.join(60)
        if self._thread.is_alive():
            raise RuntimeError(f"the producer of {self.topic} did not stop")
        left = self._producer.flush(flush_timeout_s)
        if left:
            self.errors.append(f"{left} records not delivered")
        if self.errors:
            raise RuntimeError(f"records not delivered to {self.topic}: {self.errors[:3]}")
        return len(self.sent)
