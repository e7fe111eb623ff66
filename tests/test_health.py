"""Liveness and readiness verdicts, and the ops endpoint that serves them."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.health import Probe, create_ops_app, liveness, readiness

with warnings.catch_warnings():
    # Starlette 1.x nags about preferring `httpx2`; httpx is what the project pins.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient

# --------------------------------------------------------------------------- liveness


def test_alive_when_every_heartbeat_is_fresh() -> None:
    probe = liveness(now=100.0, heartbeats={"loop": 99.0, "kafka": 95.0}, timeout_s=10.0)
    assert probe.ok
    assert probe.details["status"] == "ok"
    assert probe.details["stale"] == []
    assert probe.details["heartbeat_age_s"] == {"loop": 1.0, "kafka": 5.0}
    assert probe.details["timeout_s"] == 10.0


def test_dead_when_one_heartbeat_is_stale() -> None:
    probe = liveness(now=100.0, heartbeats={"loop": 99.0, "kafka": 80.0}, timeout_s=10.0)
    assert not probe.ok
    assert probe.details["status"] == "stale"
    assert probe.details["stale"] == ["kafka"]


def test_heartbeat_exactly_at_the_timeout_is_alive() -> None:
    assert liveness(now=100.0, heartbeats={"loop": 90.0}, timeout_s=10.0).ok
    assert not liveness(now=100.0, heartbeats={"loop": 89.9}, timeout_s=10.0).ok


def test_no_heartbeats_yet_is_alive() -> None:
    assert liveness(now=5.0, heartbeats={}, timeout_s=1.0).ok


# --------------------------------------------------------------------------- readiness


def ready_probe(**overrides: object) -> Probe:
    fields: dict[str, object] = {
        "joined": True,
        "stopping": False,
        "paused": frozenset(),
        "failure": None,
        "extra": {"assigned_partitions": [0, 1], "pending": 3},
    }
    fields.update(overrides)
    return readiness(**fields)  # type: ignore[arg-type]


def test_ready_when_joined_and_nothing_wrong() -> None:
    probe = ready_probe()
    assert probe.ok
    assert probe.details == {
        "status": "ready",
        "reasons": [],
        "assigned_partitions": [0, 1],
        "pending": 3,
    }


def test_not_ready_before_the_group_is_joined() -> None:
    probe = ready_probe(joined=False)
    assert not probe.ok
    assert probe.details["status"] == "not_ready"
    assert probe.details["reasons"] == ["not yet assigned partitions / restoring the changelog"]


def test_not_ready_while_stopping() -> None:
    assert ready_probe(stopping=True).details["reasons"] == ["shutting down"]


def test_not_ready_while_paused_says_why() -> None:
    probe = ready_probe(paused=frozenset({"invalid_api_key", "api_unreachable"}))
    assert not probe.ok
    assert probe.details["reasons"] == ["paused: api_unreachable", "paused: invalid_api_key"]


def test_failure_is_reported_first() -> None:
    probe = ready_probe(failure="producer fenced", joined=False, stopping=True)
    assert probe.details["reasons"] == [
        "failed: producer fenced",
        "not yet assigned partitions / restoring the changelog",
        "shutting down",
    ]


# --------------------------------------------------------------------------- the endpoint


def client_for(live: Callable[[], Probe], ready: Callable[[], Probe]) -> TestClient:
    return TestClient(create_ops_app(live=live, ready=ready))


def test_healthz_and_readyz_answer_200_with_json_when_ok() -> None:
    live = liveness(now=10.0, heartbeats={"loop": 9.5}, timeout_s=5.0)
    with client_for(lambda: live, ready_probe) as client:
        healthz = client.get("/healthz")
        assert healthz.status_code == 200
        assert healthz.headers["content-type"].startswith("application/json")
        assert healthz.json()["status"] == "ok"
        readyz = client.get("/readyz")
        assert readyz.status_code == 200
        assert readyz.json()["status"] == "ready"


def test_healthz_and_readyz_answer_503_with_reasons_when_not() -> None:
    dead = liveness(now=100.0, heartbeats={"loop": 1.0}, timeout_s=5.0)
    with client_for(lambda: dead, lambda: ready_probe(paused=frozenset({"invalid_api_key"}))) as c:
        healthz = c.get("/healthz")
        assert healthz.status_code == 503
        assert healthz.json()["stale"] == ["loop"]
        readyz = c.get("/readyz")
        assert readyz.status_code == 503
        assert readyz.json()["reasons"] == ["paused: invalid_api_key"]


def test_probes_are_evaluated_on_every_request() -> None:
    state = {"ok": False}

    def ready() -> Probe:
        return ready_probe(joined=state["ok"])

    with client_for(lambda: ready_probe(), ready) as client:
        assert client.get("/readyz").status_code == 503
        state["ok"] = True
        assert client.get("/readyz").status_code == 200


def test_metrics_endpoint_serves_prometheus_text() -> None:
    metrics.init_series()
    with client_for(ready_probe, ready_probe) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert "docutray_bridge_dead_letters" in names
    assert "docutray_bridge_ready" in names
    assert 'docutray_bridge_dead_letters_total{reason="too_large"}' in response.text


def test_unknown_path_is_404() -> None:
    with client_for(ready_probe, ready_probe) as client:
        assert client.get("/nope").status_code == 404
