"""Shared pytest wiring: each subsystem's fixtures live in tests/fixtures/."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.stack",
    "tests.fixtures.emulator",
    "tests.fixtures.bridge",
]

#: Run last: they need helm and promtool, which `make test` builds in the background meanwhile.
_LAST = ("tests/test_deploy.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the deploy checks to the end of the run (stable order otherwise)."""
    items.sort(key=lambda item: any(item.nodeid.startswith(p) for p in _LAST))
