"""The dedupe window: which request ids finished recently, with what content and outcome.

At-least-once producers re-send. A request id that already has an outcome
must not cost a second conversion or publish a second outcome, and a
*different* request that reuses the id must be named (dead letter
``request_id_conflict``), not dropped or converted silently. The window
answers both for every request id that finished in the last
``BRIDGE_DEDUPE_WINDOW_S`` seconds (default one day).

Where it lives: the durable copy is the compacted, co-partitioned
``<group>.dedupe`` topic (``cleanup.policy=compact,delete``, retention = the
window), written in the same transaction as the outcome, so it survives
restarts and rebalances and Kafka expires it by itself. A replica restores
its partitions' windows from it, like the pending changelog.

The in-memory copy must stay small: a replica remembers up to a million ids.
Each id is kept as two 64-bit numbers (a hash of the id, and a hash of the
request's canonical content with the outcome in its lowest bit) in sorted
``array('Q')`` blocks, searched with bisect: 16 bytes per id plus a little
per block, instead of ~200 bytes for a dict of strings. New ids go to a small
dict first and are sealed into a block when it reaches ``block_size`` ids or
the block's span of time ends; whole blocks expire when their newest id is
older than the window (an id may be remembered up to one block span longer,
never shorter). A 64-bit id hash makes a false match across a million ids a
one-in-ten-billion event, and a false match of id *and* content hash
(the only silent one) a one-in-2^127 event.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

Outcome = Literal["result", "dead_letter"]

#: Ids sealed into one sorted block at the most (bounds the unsorted dict).
DEFAULT_BLOCK_SIZE = 50_000


def id_hash(request_id: str) -> int:
    """The 64-bit hash a request id is remembered by."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big")


def content_hash(request: Any) -> str:
    """The hash of a request's canonical content (hex, 128 bits).

    `request` is the parsed request as JSON-able data; keys are sorted so that
    a re-send with its fields in another order is the same request.
    """
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def _packed(content: str, outcome: Outcome) -> int:
    """63 bits of the content hash and the outcome in the lowest bit."""
    return (int(content[:16], 16) & ~1) | (1 if outcome == "dead_letter" else 0)


@dataclass(frozen=True, slots=True)
class Remembered:
    """What the window knows of a finished request id."""

    content_bits: int
    outcome: Outcome

    def same_content(self, content: str) -> bool:
        """Whether `content` (a :func:`content_hash`) is the content that finished."""
        return (int(content[:16], 16) & ~1) == self.content_bits


@dataclass(slots=True)
class _Block:
    keys: array[int]
    values: array[int]
    newest_s: float

    def get(self, key: int) -> int | None:
        i = bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            return self.values[i]
        return None


class DedupeWindow:
    """Finished request ids of one partition, for `window_s` seconds (see the module docstring)."""

    def __init__(
        self,
        window_s: float,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        block_span_s: float | None = None,
    ) -> None:
        self.window_s = window_s
        self._block_size = block_size
        self._block_span_s = block_span_s if block_span_s is not None else max(1.0, window_s / 24)
        self._blocks: deque[_Block] = deque()
        self._recent: dict[int, int] = {}
        self._recent_oldest_s: float | None = None
        self._recent_newest_s = 0.0

    def __len__(self) -> int:
        return len(self._recent) + sum(len(b.keys) for b in self._blocks)

    def remember(self, request_id: str, content: str, outcome: Outcome, at_s: float) -> None:
        """Record that `request_id` with `content` finished with `outcome` at `at_s` (epoch s)."""
        if self._recent_oldest_s is not None and (
            len(self._recent) >= self._block_size
            or at_s - self._recent_oldest_s >= self._block_span_s
        ):
            self._seal()
        if self._recent_oldest_s is None:
            self._recent_oldest_s = at_s
        self._recent[id_hash(request_id)] = _packed(content, outcome)
        self._recent_newest_s = max(self._recent_newest_s, at_s)

    def get(self, request_id: str, now_s: float) -> Remembered | None:
        """What finished under `request_id` within the window, newest first; None if nothing."""
        key = id_hash(request_id)
        value = self._recent.get(key)
        if value is None:
            for block in reversed(self._blocks):
                if block.newest_s < now_s - self.window_s:
                    break
                value = block.get(key)
                if value is not None:
                    break
        if value is None:
            return None
        return Remembered(value & ~1, "dead_letter" if value & 1 else "result")

    def expire(self, now_s: float) -> int:
        """Forget blocks whose newest id is older than the window; return how many ids went."""
        gone = 0
        while self._blocks and self._blocks[0].newest_s < now_s - self.window_s:
            gone += len(self._blocks.popleft().keys)
        if self._recent and self._recent_newest_s < now_s - self.window_s:
            gone += len(self._recent)
            self._recent.clear()
            self._recent_oldest_s = None
        return gone

    def _seal(self) -> None:
        items = sorted(self._recent.items())
        self._blocks.append(
            _Block(
                keys=array("Q", (k for k, _ in items)),
                values=array("Q", (v for _, v in items)),
                newest_s=self._recent_newest_s,
            )
        )
        self._recent = {}
        self._recent_oldest_s = None
        self._recent_newest_s = 0.0


def dedupe_value(content: str, outcome: Outcome, finished_ms: int) -> bytes:
    """The ``<group>.dedupe`` record value (key: the request id)."""
    return json.dumps(
        {
            "schema_version": 1,
            "content_hash": content,
            "outcome": outcome,
            "finished_ms": finished_ms,
        },
        separators=(",", ":"),
    ).encode()


def parse_dedupe_value(value: bytes) -> tuple[str, Outcome, int] | None:
    """(content hash, outcome, finished ms) of a dedupe record, or None if unreadable."""
    try:
        data = json.loads(value)
        content, outcome, finished = data["content_hash"], data["outcome"], data["finished_ms"]
    except (ValueError, KeyError, TypeError):
        return None
    if (
        not isinstance(content, str)
        or len(content) < 16
        or outcome not in ("result", "dead_letter")
    ):
        return None
    try:
        int(content[:16], 16)
    except ValueError:
        return None
    return content, outcome, int(finished)


#: Header `docutray-bridge dead-letters replay` sets on a replayed record.
REPLAY_HEADER = "docutray-bridge-replay-of"

Decision = Literal["new", "duplicate", "conflict"]


def judge_resend(
    content: str,
    *,
    pending_content: str | None,
    finished: Remembered | None,
    replay: bool,
) -> Decision:
    """What a valid request whose id may be known is: new work, a re-send, or an id conflict.

    - pending under this id: same content (or unknown content) is a re-send, other content a
      conflict;
    - finished within the window: same content is a re-send, unless it is a replay of a
      request that was dead-lettered (the operator fixed the cause); other content a conflict;
    - otherwise new.
    """
    if pending_content is not None:
        if not pending_content or pending_content == content:
            return "duplicate"
        return "conflict"
    if finished is not None:
        if not finished.same_content(content):
            return "conflict"
        if replay and finished.outcome == "dead_letter":
            return "new"
        return "duplicate"
    return "new"
