"""The Kafka thread's pending-id copy: hashes and counted bytes stay consistent."""

from __future__ import annotations

import random

from service.kafka.pending_ids import PendingIds


def test_counts_common_and_unusual_costs() -> None:
    ids = PendingIds(common_cost=2000)
    ids.add("a", "h-a", 2000)
    ids.add("b", "h-b", 5000)
    assert ids.held_bytes == 7000
    assert len(ids) == 2
    assert "a" in ids
    assert "c" not in ids
    assert ids.content_hash("b") == "h-b"
    assert ids.content_hash("c") is None
    assert ids.pop("b") == ("h-b", 5000)
    assert ids.pop("b") is None
    assert ids.held_bytes == 2000
    assert ids.pop("a") == ("h-a", 2000)
    assert ids.held_bytes == 0
    assert len(ids) == 0


def test_adding_an_id_again_replaces_its_count() -> None:
    ids = PendingIds(common_cost=100)
    ids.add("a", "h1", 300)
    ids.add("a", "h2", 100)
    assert ids.held_bytes == 100
    assert ids.pop("a") == ("h2", 100)
    assert ids.held_bytes == 0


def test_matches_a_plain_dict_model() -> None:
    rng = random.Random(7)
    ids = PendingIds(common_cost=10)
    model: dict[str, tuple[str, int]] = {}
    for step in range(5000):
        rid = f"r{rng.randrange(200)}"
        if rng.random() < 0.6:
            cost = rng.choice([10, 10, 10, 25, 1000])
            ids.add(rid, f"h{step}", cost)
            model[rid] = (f"h{step}", cost)
        else:
            assert ids.pop(rid) == model.pop(rid, None)
        assert ids.held_bytes == sum(cost for _, cost in model.values())
        assert len(ids) == len(model)
    assert sorted(ids) == sorted(model)
