"""Shared pytest wiring: each subsystem's fixtures live in tests/fixtures/."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from service import logging as bridge_logging

pytest_plugins = [
    "tests.fixtures.stack",
    "tests.fixtures.emulator",
    "tests.fixtures.bridge",
    "tests.fixtures.redis_clients",
]

#: Run last: they need helm, promtool and prometheus, and the container image, which `make test`
#: builds in the background meanwhile.
_LAST = ("tests/test_deploy.py", "tests/test_prometheus_live.py", "tests/test_image.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the deploy checks to the end of the run (stable order otherwise)."""
    items.sort(key=lambda item: any(item.nodeid.startswith(p) for p in _LAST))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog, the stdlib root logger, the registered secrets and the warnings hook
    (configure_logging routes warnings into the log) back after a test."""
    was_configured = structlog.is_configured()
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    secrets = set(bridge_logging._secrets)
    yield
    bridge_logging._secrets.clear()
    bridge_logging._secrets.update(secrets)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    if was_configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()
