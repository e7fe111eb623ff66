"""Shared pytest wiring: each subsystem's fixtures live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.stack",
    "tests.fixtures.emulator",
    "tests.fixtures.bridge",
]
