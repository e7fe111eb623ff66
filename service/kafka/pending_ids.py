"""The Kafka thread's view of a partition's pending requests: ids, content hashes, bytes.

The I/O thread judges each input record against the requests already pending
in its partition (a re-send of the same content is a duplicate, other content
under the same id is a conflict), and counts the bytes the pending entries
hold for backpressure. It cannot ask the engine, which lives on the event
loop, so it keeps this small copy.

With 100,000 pending requests the copy matters: a ``(hash, cost)`` tuple per
id cost about 190 bytes each. Here an id maps to its hash only; the cost is
one number for the whole partition plus, for the few entries whose cost is
not the common one (metadata or headers kept), their cost in a second dict.
"""

from __future__ import annotations

from collections.abc import Iterator


class PendingIds:
    """Pending request ids of one partition, with their content hashes and counted bytes."""

    def __init__(self, common_cost: int) -> None:
        self._common_cost = common_cost
        self._hashes: dict[str, str] = {}
        self._unusual_costs: dict[str, int] = {}
        self.held_bytes = 0

    def add(self, request_id: str, content_hash: str, cost: int) -> None:
        """Count `request_id` as pending (replacing an earlier count of the same id)."""
        self.pop(request_id)
        self._hashes[request_id] = content_hash
        if cost != self._common_cost:
            self._unusual_costs[request_id] = cost
        self.held_bytes += cost

    def pop(self, request_id: str) -> tuple[str, int] | None:
        """Stop counting `request_id`: its (hash, cost), or None if it was not pending."""
        content_hash = self._hashes.pop(request_id, None)
        if content_hash is None:
            return None
        cost = self._unusual_costs.pop(request_id, self._common_cost)
        self.held_bytes -= cost
        return content_hash, cost

    def content_hash(self, request_id: str) -> str | None:
        """The pending request's content hash ("" if unknown), or None if it is not pending."""
        return self._hashes.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._hashes)
