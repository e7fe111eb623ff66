"""One DocuTray rate limit shared by every replica (README: "Settings", the rate-limit rows).

- :mod:`.policy`: the decisions as pure functions (GCRA, AIMD, class shares, the submit gate).
- :mod:`.redis_backend`: the same decisions as Lua scripts on one Redis hash per lane
  (and one for the submit gate).
- :mod:`.local_backend`: the same decisions in process memory.
- :mod:`.limiter`: queues, the dispatcher, the fallback when Redis is down.
- :mod:`.exceptions`: the error tree.
"""

from service.ratelimit.exceptions import LimiterClosed, LimiterError, LimiterTimeout
from service.ratelimit.limiter import (
    LONG_WINDOWS,
    EventHook,
    Limiter,
    RateLimiter,
    SubmitHold,
    build_limiter,
)
from service.ratelimit.policy import BUDGETS, AimdParams, Budget

__all__ = [
    "BUDGETS",
    "LONG_WINDOWS",
    "AimdParams",
    "Budget",
    "EventHook",
    "Limiter",
    "LimiterClosed",
    "LimiterError",
    "LimiterTimeout",
    "RateLimiter",
    "SubmitHold",
    "build_limiter",
]
