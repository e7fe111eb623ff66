"""The operations endpoint: ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness).

Liveness never depends on Kafka or DocuTray: it says whether the processing
loop and the Kafka thread still turn (their heartbeats are fresh), so a
restart can only help when it fails. Readiness says whether this replica is
doing its job: it joined the group, restored its partitions, and is not
paused by a systemic error. Both answer JSON that says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass(frozen=True, slots=True)
class Probe:
    """One health verdict with the reasons behind it."""

    ok: bool
    details: dict[str, Any]


def liveness(*, now: float, heartbeats: dict[str, float], timeout_s: float) -> Probe:
    """Alive when every loop's heartbeat is younger than `timeout_s`."""
    ages = {name: round(now - beat, 3) for name, beat in heartbeats.items()}
    stale = sorted(name for name, age in ages.items() if age > timeout_s)
    return Probe(
        ok=not stale,
        details={
            "status": "ok" if not stale else "stale",
            "heartbeat_age_s": ages,
            "stale": stale,
            "timeout_s": timeout_s,
        },
    )


def readiness(
    *,
    joined: bool,
    stopping: bool,
    paused: frozenset[str],
    failure: str | None,
    extra: dict[str, Any],
) -> Probe:
    """Ready when the group is joined, partitions restored, and nothing systemic is wrong."""
    reasons: list[str] = []
    if failure:
        reasons.append(f"failed: {failure}")
    if not joined:
        reasons.append("not yet assigned partitions / restoring the changelog")
    if stopping:
        reasons.append("shutting down")
    reasons.extend(f"paused: {p}" for p in sorted(paused))
    return Probe(
        ok=not reasons,
        details={"status": "ready" if not reasons else "not_ready", "reasons": reasons, **extra},
    )


def create_ops_app(*, live: Callable[[], Probe], ready: Callable[[], Probe]) -> Starlette:
    """The Starlette app served on BRIDGE_METRICS_PORT."""

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        probe = live()
        return JSONResponse(probe.details, status_code=200 if probe.ok else 503)

    async def readyz(_: Request) -> Response:
        probe = ready()
        return JSONResponse(probe.details, status_code=200 if probe.ok else 503)

    return Starlette(
        routes=[
            Route("/metrics", metrics_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )
