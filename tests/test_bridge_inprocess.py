"""A whole bridge in the test's own process: `Bridge.build`, `run`, `shutdown` (issue 15).

The bridge runs in the test's event loop against the dev stack's Kafka and an
emulator process, with its own topics (created by the bridge) and group.
Everything that blocks (producing, reading outcomes, HTTP probes, the deadline
loop) runs in a worker thread, so the bridge's loop keeps turning meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service.app import Bridge
from service.config import load_settings
from service.devkit.ports import free_port
from service.devkit.processes import OpsEndpoint
from tests.fixtures.bridge import Rig, assert_exactly_once, pdf_request
from tests.fixtures.stack import wait_for

START_TIMEOUT_S = 60.0
OUTCOME_TIMEOUT_S = 60.0


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking call off the event loop the bridge runs in."""
    return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture
def bridge_settings(
    rig_factory: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> Callable[[], tuple[Rig, Any, OpsEndpoint]]:
    """`make() -> (rig, settings, ops)`: fresh topics and group, the rig's env applied."""

    def make() -> tuple[Rig, Any, OpsEndpoint]:
        rig = rig_factory(BRIDGE_SHUTDOWN_GRACE_S="10")
        for name, value in rig.base_env.items():
            if os.environ.get(name) != value:
                monkeypatch.setenv(name, value)
        port = free_port()
        settings = load_settings(metrics_port=port, instance_id=f"inproc-{uuid.uuid4().hex[:6]}")
        return rig, settings, OpsEndpoint(port)

    return make


async def test_a_bridge_runs_in_process_and_shuts_down_cleanly(
    bridge_settings: Callable[[], tuple[Rig, Any, OpsEndpoint]],
) -> None:
    rig, settings, ops = bridge_settings()
    bridge = await Bridge.build(settings)
    running = asyncio.create_task(bridge.run())
    try:
        await in_thread(wait_for, ops.ready, START_TIMEOUT_S, message="bridge ready (/readyz)")
        assert bridge.ready().ok
        assert bridge.live().ok

        ids = {f"inproc-{i}-{uuid.uuid4().hex[:6]}" for i in range(5)}
        await in_thread(rig.send, [pdf_request(rid) for rid in sorted(ids)])
        grouped = await in_thread(rig.wait_outcomes, ids, OUTCOME_TIMEOUT_S)
        assert_exactly_once(grouped, ids)
        assert all(grouped[rid][0].result is not None for rid in ids), grouped

        code = await asyncio.wait_for(bridge.shutdown(), timeout=settings.shutdown_grace_s + 10)
    finally:
        if not running.done():
            await bridge.shutdown()
    assert code == 0
    assert await running == 0  # run() ends with the same shutdown
    assert await bridge.shutdown() == 0  # a second call waits for the same, finished stop
    probe = bridge.ready()
    assert not probe.ok
    assert REGISTRY.get_sample_value("docutray_bridge_ready") == 0
    assert not await in_thread(ops.ready)  # the ops server is gone
    assert bridge.kafka.stopped.is_set()
    # Nothing was published twice on the way out.
    assert_exactly_once(await in_thread(rig.by_request), ids)


async def test_a_fatal_engine_error_ends_run_with_exit_code_1(
    bridge_settings: Callable[[], tuple[Rig, Any, OpsEndpoint]],
) -> None:
    _rig, settings, ops = bridge_settings()
    bridge = await Bridge.build(settings)
    running = asyncio.create_task(bridge.run())
    try:
        await in_thread(wait_for, ops.ready, START_TIMEOUT_S, message="bridge ready (/readyz)")
        bridge.engine.fatal(RuntimeError("injected by the test"))
        code = await asyncio.wait_for(running, timeout=settings.shutdown_grace_s + 10)
    finally:
        if not running.done():
            await bridge.shutdown()
    assert code == 1
    probe = bridge.ready()
    assert not probe.ok
    assert "injected by the test" in str(probe.details)
