"""What crosses between the asyncio engine and the Kafka thread.

Engine → Kafka: an :class:`Effect` (records that must become durable together, for one
partition's entry), and pause reasons, through a :class:`Channel` (the engine sees it as a
:class:`KafkaEdge`). Kafka → engine: the :class:`EngineHooks`, called in the event loop,
and each effect's future, resolved by :func:`committed` once its transaction committed
(or failed by :func:`fail`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service import metrics
from service.pending import Entry, Unreadable

#: Headers are carried from the input record to every output record.
Headers = list[tuple[str, str | bytes | None]]


@dataclass(slots=True)
class OutRecord:
    """One record to produce inside the next transaction."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None
    partition: int | None = None
    #: Told the record's offset once the broker has it (before the commit).
    delivered: Callable[[int], None] | None = None


@dataclass(slots=True)
class Effect:
    """Records that must become durable together, for one partition's entry."""

    partition: int
    epoch: int
    records: list[OutRecord]
    #: Request id whose pending record this effect tombstones (removes from the dedupe set).
    finishes: str | None = None
    #: Called in the event loop after the commit (metrics, adopting new entries).
    on_commit: Callable[[], None] | None = None
    future: asyncio.Future[None] | None = None
    dead_letter_reason: str | None = None
    result: bool = False
    #: Records that need the offsets of `records` (produced after those are delivered).
    late: Callable[[], list[OutRecord]] | None = None


class EngineHooks:
    """What the Kafka thread tells the asyncio engine (each runs in the event loop)."""

    def adopt(
        self,
        partition: int,
        epoch: int,
        entries: list[Entry],
        unreadable: list[Unreadable] | None = None,
    ) -> None:
        """Take over pending entries of a partition (after restore, or newly accepted).

        `unreadable` changelog records must be dead-lettered, never dropped.
        """
        raise NotImplementedError

    def drop(self, partition: int) -> None:
        """Forget everything of a partition (revoked, lost, or being reset)."""
        raise NotImplementedError

    def quiesce(self, partitions: list[int], done: threading.Event) -> None:
        """Start no new submit on `partitions`; set `done` once none is in flight there."""
        done.set()

    def fatal(self, exc: BaseException) -> None:
        """The Kafka thread stopped on an unrecoverable error."""
        raise NotImplementedError


class KafkaEdge(Protocol):
    """What the engine asks of the Kafka side: a :class:`Channel`, or a test's fake."""

    def submit(self, effect: Effect) -> None:
        """Queue an effect for the next transaction."""

    def pause(self, reason: str) -> None:
        """Stop fetching input for `reason` (systemic error, shutdown)."""

    def resume(self, reason: str) -> None:
        """Lift a pause reason; fetching resumes when no reason is left."""


class Channel:
    """Engine to Kafka thread: effects and pause reasons, in the order given (thread-safe).

    Made before both sides, so that neither needs the other to exist first.
    """

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def submit(self, effect: Effect) -> None:
        """Queue an effect for the next transaction."""
        self._commands.put(("effect", effect))

    def pause(self, reason: str) -> None:
        """Stop fetching input for `reason` (systemic error, shutdown)."""
        self._commands.put(("pause", reason))

    def resume(self, reason: str) -> None:
        """Lift a pause reason; fetching resumes when no reason is left."""
        self._commands.put(("resume", reason))

    def take(self) -> tuple[str, Any] | None:
        """The next command, or None when there is none (the Kafka thread's side)."""
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None


def fail(loop: asyncio.AbstractEventLoop, effect: Effect, exc: BaseException) -> None:
    """From the Kafka thread: the effect will never commit; its future gets `exc`."""
    fut = effect.future
    if fut is not None:
        loop.call_soon_threadsafe(set_exception, fut, exc)


def set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    """In the event loop: fail `fut` unless it is done already."""
    if not fut.done():
        fut.set_exception(exc)


def committed(effect: Effect) -> None:
    """In the event loop, after the effect's transaction committed: count it, tell its owner."""
    if effect.result:
        metrics.RESULTS.inc()
    if effect.dead_letter_reason is not None:
        metrics.DEAD_LETTERS.labels(effect.dead_letter_reason).inc()
    if effect.on_commit is not None:
        effect.on_commit()
    fut = effect.future
    if fut is not None and not fut.done():
        fut.set_result(None)
