"""docutray-bridge: turn Kafka document requests into DocuTray conversions."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("docutray-bridge")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
