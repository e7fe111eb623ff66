"""Outcomes read back from Kafka while a test or a benchmark runs.

There is one reader, :func:`service.tools.read_outcomes` (read_committed, from the
beginning), and one parsed type, :class:`service.tools.Outcome`. :class:`OutcomeCollector`
follows the topics in a thread and keeps each outcome as a small :class:`SeenOutcome`
(ids, verdict and timings, no payload), so a run with 100,000 outcomes stays small.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from confluent_kafka.admin import AdminClient

from service.devkit.waiting import GiveUp, wait_until
from service.tools import Outcome, read_outcomes

#: The metadata key a benchmark stamps on a request (epoch seconds when produced).
PRODUCED_AT_KEY = "bench_produced_at"


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


@dataclass(frozen=True, slots=True)
class SeenOutcome:
    """One result or dead letter, as much as timing and counting need (epoch seconds).

    ``published_at`` is a result's ``timings.published_at`` or a dead letter's
    ``failed_at``; ``seen_at`` is when the reader received it: an upper bound of the moment
    its transaction committed. An unreadable record has ``reason="unreadable"``.
    """

    request_id: str | None
    ok: bool
    reason: str | None
    produced_at: float | None
    submitted_at: float | None
    completed_at: float | None
    published_at: float | None
    status_calls: int | None
    seen_at: float

    @classmethod
    def of(cls, outcome: Outcome, *, seen_at: float) -> SeenOutcome:
        """The summary of one parsed outcome."""
        if outcome.result is not None:
            result = outcome.result
            timings = result.timings
            produced = (result.metadata or {}).get(PRODUCED_AT_KEY)
            return cls(
                request_id=result.request_id,
                ok=True,
                reason=None,
                produced_at=float(produced) if produced is not None else None,
                submitted_at=_epoch(timings.submitted_at),
                completed_at=_epoch(timings.completed_at),
                published_at=_epoch(timings.published_at),
                status_calls=timings.status_calls,
                seen_at=seen_at,
            )
        letter = outcome.dead_letter
        return cls(
            request_id=letter.request_id if letter is not None else None,
            ok=False,
            reason=letter.reason.value if letter is not None else "unreadable",
            produced_at=None,
            submitted_at=None,
            completed_at=None,
            published_at=_epoch(letter.failed_at) if letter is not None else None,
            status_calls=letter.status_calls if letter is not None else None,
            seen_at=seen_at,
        )


def topics_exist(bootstrap: str, topics: list[str], *, timeout_s: float = 10.0) -> bool:
    """Whether every topic in `topics` exists (one metadata request)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    known = admin.list_topics(timeout=timeout_s).topics
    return all(t in known and known[t].error is None for t in topics)


class OutcomeCollector:
    """Follows result and dead-letter topics (read_committed, from the beginning) in a thread.

    ``start()`` waits until the topics exist; ``wait_count(n, ...)`` waits for `n` outcomes;
    ``snapshot()`` copies what was seen. A reader failure is raised by the next call.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: list[str],
        *,
        batch_timeout_s: float = 0.05,
        conf: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.batch_timeout_s = batch_timeout_s
        self.conf = {"bootstrap.servers": bootstrap, **(conf or {})}
        self.outcomes: list[SeenOutcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reading = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="outcomes", daemon=True)

    def _run(self) -> None:
        try:
            wait_until(
                lambda: self._stop.is_set() or topics_exist(self.bootstrap, self.topics),
                60,
                f"topics {self.topics} exist",
                interval_s=0.2,
            )
            self._reading.set()
            for outcome in read_outcomes(
                self.conf,
                self.topics,
                follow=True,
                stop=self._stop.is_set,
                batch_timeout_s=self.batch_timeout_s,
            ):
                seen = SeenOutcome.of(outcome, seen_at=time.time())
                with self._lock:
                    self.outcomes.append(seen)
        except BaseException as exc:  # raised to the caller by _raise
            self._error = exc

    def start(self) -> OutcomeCollector:
        """Start reading; returns once the topics exist and the reader runs."""
        self._thread.start()
        wait_until(
            lambda: self._reading.is_set() or self._error is not None, 70, "the outcome reader"
        )
        self._raise()
        return self

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"outcome reader failed: {self._error}")

    def count(self) -> int:
        """Outcomes seen so far."""
        self._raise()
        with self._lock:
            return len(self.outcomes)

    def snapshot(self) -> list[SeenOutcome]:
        """A copy of every outcome seen so far."""
        self._raise()
        with self._lock:
            return list(self.outcomes)

    def first_after(self, since: float, wanted: Callable[[str], bool]) -> float | None:
        """Earliest ``published_at`` after `since` of an outcome whose request id is `wanted`."""
        times = [
            o.published_at
            for o in self.snapshot()
            if o.published_at is not None
            and o.published_at > since
            and o.request_id is not None
            and wanted(o.request_id)
        ]
        return min(times) if times else None

    def wait_count(
        self, n: int, timeout_s: float, *, on_wait: Callable[[], None] | None = None
    ) -> None:
        """Wait until at least `n` outcomes were seen (`on_wait` runs at each check)."""

        def enough() -> bool:
            if on_wait is not None:
                on_wait()
            if self._error is not None:
                raise GiveUp(f"outcome reader failed: {self._error}")
            return self.count() >= n

        wait_until(enough, timeout_s, f"{n} outcomes", interval_s=0.02)

    def stop(self) -> None:
        """Stop the reader thread (nothing to do when it never started)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(15)
