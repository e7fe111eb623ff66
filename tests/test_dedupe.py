"""The dedupe window (service.dedupe): what it remembers, for how long, and what it decides."""

from __future__ import annotations

import pytest

from service.dedupe import (
    DedupeWindow,
    content_hash,
    dedupe_value,
    judge_resend,
    parse_dedupe_value,
)

A = content_hash({"request_id": "r1", "document_type_code": "invoice", "source": {"url": "x"}})
B = content_hash({"request_id": "r1", "document_type_code": "receipt", "source": {"url": "x"}})


def test_content_hash_ignores_key_order_and_sees_every_value() -> None:
    one = content_hash({"a": 1, "b": {"c": 2, "d": [1, 2]}})
    assert one == content_hash({"b": {"d": [1, 2], "c": 2}, "a": 1})
    assert one != content_hash({"a": 1, "b": {"c": 2, "d": [2, 1]}})
    assert A != B


@pytest.mark.parametrize("block_size", [1, 3, 1000])
def test_window_remembers_ids_across_sealed_blocks(block_size: int) -> None:
    window = DedupeWindow(3600, block_size=block_size)
    for i in range(50):
        window.remember(f"id-{i}", A if i % 2 else B, "result" if i % 3 else "dead_letter", 1000.0)
    assert len(window) == 50
    for i in range(50):
        seen = window.get(f"id-{i}", 1001.0)
        assert seen is not None
        assert seen.same_content(A if i % 2 else B)
        assert not seen.same_content(B if i % 2 else A)
        assert seen.outcome == ("result" if i % 3 else "dead_letter")
    assert window.get("id-50", 1001.0) is None


def test_window_forgets_after_the_window_never_before() -> None:
    window = DedupeWindow(100, block_size=10, block_span_s=10)
    for i in range(30):
        window.remember(f"old-{i}", A, "result", 1000.0 + i)
    window.remember("new", A, "result", 1095.0)
    assert window.get("old-0", 1099.0) is not None  # 99 s old: still inside
    assert window.expire(1099.0) == 0
    gone = window.expire(1131.0)  # the first blocks' newest ids are now over 100 s old
    assert 0 < gone < 31
    assert window.get("old-0", 1131.0) is None
    assert window.get("new", 1131.0) is not None
    assert window.expire(1300.0) == 31 - gone
    assert len(window) == 0


def test_a_later_finish_of_the_same_id_wins() -> None:
    window = DedupeWindow(3600, block_size=2)
    window.remember("r1", A, "dead_letter", 1.0)
    window.remember("x", A, "result", 2.0)
    window.remember("r1", B, "result", 3.0)  # replayed and finished again
    seen = window.get("r1", 4.0)
    assert seen is not None
    assert seen.same_content(B)
    assert seen.outcome == "result"


def test_judging_resends() -> None:
    window = DedupeWindow(3600)
    window.remember("done", A, "result", 1.0)
    window.remember("failed", A, "dead_letter", 1.0)

    def judge(pending: str | None, rid: str, content: str, replay: bool = False) -> str:
        return judge_resend(
            content, pending_content=pending, finished=window.get(rid, 2.0), replay=replay
        )

    assert judge(None, "fresh", A) == "new"
    assert judge(A, "fresh", A) == "duplicate"
    assert judge("", "fresh", B) == "duplicate"  # restored without a hash: never a conflict
    assert judge(A, "fresh", B) == "conflict"
    assert judge(None, "done", A) == "duplicate"
    assert judge(None, "done", A, replay=True) == "duplicate"  # a result is never redone
    assert judge(None, "done", B) == "conflict"
    assert judge(None, "failed", A) == "duplicate"
    assert judge(None, "failed", A, replay=True) == "new"  # the operator fixed the cause
    assert judge(None, "failed", B, replay=True) == "conflict"


def test_dedupe_records_round_trip_and_junk_is_refused() -> None:
    value = dedupe_value(A, "dead_letter", 1234)
    assert parse_dedupe_value(value) == (A, "dead_letter", 1234)
    assert len(value) < 120
    for junk in (
        b"",
        b"{}",
        b"[]",
        b"\xff",
        b'{"content_hash":"zz","outcome":"result","finished_ms":1}',
    ):
        assert parse_dedupe_value(junk) is None
