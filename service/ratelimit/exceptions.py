"""The limiter's errors.

::

    BridgeError
    └── LimiterError
        ├── LimiterTimeout     the caller's deadline would pass before a permit
        └── LimiterClosed      the limiter was closed while the caller waited

Redis being down is not an error a caller ever sees: the limiter falls back
to its local share instead (see :class:`~service.ratelimit.limiter.Limiter`).
"""

from __future__ import annotations

from service.errors import BridgeError


class LimiterError(BridgeError):
    """Root of the rate limiter's errors."""


class LimiterTimeout(LimiterError):
    """The caller's deadline would pass before a permit is granted."""


class LimiterClosed(LimiterError):
    """The limiter was closed while the caller waited for a permit."""
