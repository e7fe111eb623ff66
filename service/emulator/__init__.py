"""A local stand-in for DocuTray's asynchronous conversion API.

Follows the contract in docs/docutray-api.md (same paths, request forms, statuses and error
bodies) so the bridge, its tests, the demo and the benchmarks can run with
no network; plus emulator-only `/_emulator/*` routes for tests. Run it with
`docutray-bridge emulator` or `python -m service.emulator`.
"""

from service.emulator.app import create_app
from service.emulator.config import EmulatorConfig, KnobsPatch

__all__ = ["EmulatorConfig", "KnobsPatch", "create_app"]
