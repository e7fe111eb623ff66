"""Structured logging: JSON lines in production, coloured console on a terminal.

Every log line is an event with fields (``event="conversion_submitted"``,
``request_id=...``, ``conversion_id=...``). A final processor scrubs known
secret values (the API key, passwords in URLs and Kafka properties) from every
field, so a secret that slips into an exception message is still never printed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog

_secrets: set[str] = set()
_MASK = "***"


def register_secret(value: str | None) -> None:
    """Remember a secret value so that no log line can ever contain it."""
    if value and len(value) >= 4:
        _secrets.add(value)


def register_secrets(values: Iterable[str | None]) -> None:
    """Register several secret values at once."""
    for value in values:
        register_secret(value)


def scrub(text: str) -> str:
    """Replace every registered secret in ``text`` with ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub_value(v) for v in value)
    if value is None or isinstance(value, bool | int | float):
        return value
    # Anything else (exceptions, bytes, objects) is printed through str/repr: check that text.
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else repr(value)
    return scrub(text) if any(secret in text for secret in _secrets) else value


def _scrub_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if not _secrets:
        return event_dict
    for key, value in list(event_dict.items()):
        event_dict[key] = _scrub_value(value)
    return event_dict


def configure_logging(
    *,
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and the stdlib root logger) once per process."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
        # Exceptions are formatted to text first, so the scrubber sees the traceback too.
        tail: list[Any] = [structlog.processors.format_exc_info, _scrub_processor, renderer]
    else:
        renderer = structlog.processors.JSONRenderer()
        tail = [
            structlog.processors.dict_tracebacks,
            _scrub_processor,
            renderer,
        ]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the stdlib (uvicorn, httpx, librdkafka's Python side) go
    # through the same processors: one JSON stream in production, scrubbed like the rest.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.WARNING))
    # Python's warnings join the stream too (logger "py.warnings"). Uncaught exceptions keep
    # Python's plain traceback on purpose: tests and operators grep for "Traceback" to tell
    # a crash from a clear one-line error.
    logging.captureWarnings(True)
