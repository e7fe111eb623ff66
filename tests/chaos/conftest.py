"""Fixtures of the chaos suite.

- `chaos(name, emulator=None, *, max_restarts=0, liveness_probe=False, emulator_knobs=None,
  **bridge_env)`:
  a :class:`~tests.chaos.harness.Scenario` on fresh topics and group, with its own
  emulator (started with `emulator_knobs` unless one is given).
- `private_stack` (module): a Kafka broker and a Redis of their own (`scripts/stack`
  with a temporary `STACK_DIR` and free ports), for scenarios that stop and restart
  them without disturbing tests that share the main stack; wiped at the end.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import CHAOS_KAFKA_ENV, Scenario
from tests.fixtures.bridge import Rig, free_port
from tests.fixtures.emulator import EmulatorStarter, RunningEmulator
from tests.fixtures.stack import parse_env_file, stack_ctl


@pytest.fixture
def chaos(
    rig_factory: Callable[..., Rig], emulator_factory: EmulatorStarter
) -> Callable[..., Scenario]:
    """Factory of scenarios (see the module docstring)."""

    def make(
        name: str,
        emulator: RunningEmulator | None = None,
        *,
        max_restarts: int = 0,
        liveness_probe: bool = False,
        emulator_knobs: dict[str, Any] | None = None,
        **env: str,
    ) -> Scenario:
        emu = emulator or emulator_factory(**(emulator_knobs or {"processing_median_s": 0.5}))
        rig = rig_factory(emu, **{**CHAOS_KAFKA_ENV, **env})
        if "KAFKA_BOOTSTRAP_SERVERS" in env:
            rig.bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        return Scenario(
            name=name,
            rig=rig,
            emulator=emu,
            max_restarts=max_restarts,
            liveness_probe=liveness_probe,
        )

    return make


@dataclass(frozen=True)
class PrivateStack:
    """A Kafka + Redis of one test module; `ctl("stop", "kafka")` and friends act on it only."""

    env: dict[str, str]
    ctl_env: dict[str, str]

    @property
    def bootstrap(self) -> str:
        """bootstrap.servers of the private broker (PLAINTEXT)."""
        return self.env["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def redis_url(self) -> str:
        """URL of the private Redis."""
        return self.env["REDIS_URL"]

    def ctl(self, *args: str) -> None:
        """Run scripts/stack against this stack."""
        stack_ctl(*args, env=self.ctl_env)


@pytest.fixture(scope="module")
def private_stack() -> Iterator[PrivateStack]:
    """A stack of this module's own, started with `scripts/stack up`, wiped at the end."""
    root = Path(tempfile.mkdtemp(prefix="chaos-stack-"))
    ctl_env = {
        **os.environ,
        "STACK_DIR": str(root),
        "STACK_KAFKA_PORT": str(free_port()),
        "STACK_KAFKA_CONTROLLER_PORT": str(free_port()),
        "STACK_KAFKA_SASL_PORT": str(free_port()),
        "STACK_REDIS_PORT": str(free_port()),
    }
    stack = PrivateStack(env={}, ctl_env=ctl_env)
    try:
        stack.ctl("up")
        stack = PrivateStack(env=parse_env_file(root / "env"), ctl_env=ctl_env)
        yield stack
    finally:
        stack_ctl("down", "--wipe", env=ctl_env, check=False)
