"""The shared budget in Redis: one hash per lane, changed only by two Lua scripts.

Every replica runs the same scripts against the same keys, so the budget is
one budget however many replicas there are. The clock is Redis ``TIME`` read
inside the script (Redis 7 replicates script effects, so reading the clock
before writing is allowed): replicas' clocks never matter, and the dispatcher
only ever uses the *durations* the scripts return.

The scripts mirror :func:`~service.ratelimit.policy.acquire_step` and
:func:`~service.ratelimit.policy.rate_limited_step`; a test checks they agree.

Keys (all under the one ``key_prefix`` the caller gives, see :func:`lane_key`):

``<prefix>ratelimit:<lane>``
    hash ``tat``, ``eff``, ``ceiling``, ``changed``, ``gate``, ``blocked``
    (times are Redis-clock seconds, rates per minute); expires
    ``state_ttl_s`` after its last write, after which the lane starts afresh
    at its configured rate.
"""

from __future__ import annotations

import math
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.ratelimit.policy import AimdParams, Answer, Feedback

_PRELUDE: Final = """
local key = KEYS[1]
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local configured = tonumber(ARGV[2])
local p_decrease = tonumber(ARGV[3])
local p_floor = tonumber(ARGV[4])
local p_interval = tonumber(ARGV[5])
local p_incr = tonumber(ARGV[6])
local p_probe = tonumber(ARGV[7])
local p_margin = tonumber(ARGV[8])
local p_gap = tonumber(ARGV[9])
local ttl_ms = tonumber(ARGV[10])
local NEVER = -1e18
local f = redis.call('HMGET', key, 'tat', 'eff', 'ceiling', 'changed', 'gate', 'blocked')
local tat = tonumber(f[1]) or NEVER
local eff = tonumber(f[2]) or configured
local ceiling = tonumber(f[3]) or configured
local changed = tonumber(f[4]) or NEVER
local gate = tonumber(f[5]) or NEVER
local blocked = tonumber(f[6]) or NEVER
-- aimd_clamp
if eff > configured then eff = configured end
if ceiling > configured then ceiling = configured end
local function fmt(x) return string.format('%.17g', x) end
local function save()
  redis.call('HSET', key, 'tat', fmt(tat), 'eff', fmt(eff), 'ceiling', fmt(ceiling),
    'changed', fmt(changed), 'gate', fmt(gate), 'blocked', fmt(blocked))
  redis.call('PEXPIRE', key, ttl_ms)
end
"""

ACQUIRE_LUA: Final = (
    _PRELUDE
    + """
local burst = tonumber(ARGV[11])
local want_slot = ARGV[12] == '1'
local want_increase = ARGV[13] == '1'
-- aimd_increase
if want_increase and now - changed >= p_interval and eff < configured then
  local knee = ceiling * p_margin
  local new
  if eff < knee then
    new = math.min(eff + p_incr * configured, knee)
  else
    new = eff + p_probe * configured
  end
  new = math.min(new, configured)
  ceiling = math.max(ceiling, new)
  eff = new
  changed = now
end
local reserved_in = -1
if want_slot then
  -- gcra_shape(eff, burst), then gcra(start, ...) from the block's end at the earliest
  local b = math.max(1, math.min(burst, math.floor(eff / 20)))
  local interval = 60 / math.max(eff - b, eff / 2)
  local start = math.max(now, blocked)
  local base = math.max(tat, start)
  local allowed_at = math.max(start, base - (b - 1) * interval)
  tat = base + interval
  reserved_in = allowed_at - now
end
save()
return {fmt(reserved_in), fmt(math.max(0, blocked - now)), fmt(eff)}
"""
)

RATE_LIMITED_LUA: Final = (
    _PRELUDE
    + """
local hold = tonumber(ARGV[11])
local decreased = 0
-- aimd_decrease
if now >= gate then
  local new = math.max(eff * p_decrease, p_floor * configured)
  ceiling = eff
  eff = new
  changed = now
  gate = now + math.max(hold, p_gap)
  decreased = 1
end
blocked = math.max(blocked, now + hold)
save()
return {fmt(eff), decreased, fmt(blocked - now)}
"""
)


def lane_key(key_prefix: str, lane: str) -> str:
    """The one Redis key holding a lane's state; every key the limiter uses comes from here."""
    return f"{key_prefix}ratelimit:{lane}"


def connect(
    redis_url: str, *, socket_timeout_s: float = 0.5, connect_timeout_s: float = 0.5
) -> Redis:
    """A Redis client that fails fast: short timeouts and a single retry.

    The limiter falls back to its local share when Redis does not answer; a
    client that retried for seconds would stall every permit instead. No
    network I/O happens here (the pool connects lazily).
    """
    return Redis.from_url(
        redis_url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), retries=1),
        health_check_interval=0,
    )


class RedisBackend:
    """Runs the two scripts (EVALSHA, reloaded on NOSCRIPT by redis-py) for the dispatcher.

    Raises whatever redis-py raises (``ConnectionError``, ``TimeoutError``,
    ``ResponseError``); the limiter catches those and falls back.
    """

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str,
        params: AimdParams,
        state_ttl_s: float = 3600.0,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._params = params
        self._ttl_ms = math.ceil(state_ttl_s * 1000)
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._rate_limited = client.register_script(RATE_LIMITED_LUA)

    def _common(self, *, configured_per_minute: float, now: float | None) -> list[Any]:
        head: list[Any] = ["" if now is None else repr(now), repr(configured_per_minute)]
        return head + [repr(p) for p in self._params.as_args()] + [self._ttl_ms]

    async def reserve(
        self,
        lane: str,
        *,
        configured_per_minute: float,
        burst: int,
        want_slot: bool,
        want_increase: bool,
        now: float | None = None,
    ) -> Answer:
        """Run the acquire script; ``now`` overrides Redis TIME (tests only)."""
        args = self._common(configured_per_minute=configured_per_minute, now=now)
        args += [burst, int(want_slot), int(want_increase)]
        reply = await self._acquire(keys=[lane_key(self._prefix, lane)], args=args)
        reserved = float(reply[0])
        return Answer(reserved if want_slot else None, float(reply[1]), float(reply[2]))

    async def rate_limited(
        self,
        lane: str,
        *,
        configured_per_minute: float,
        hold_s: float,
        now: float | None = None,
    ) -> Feedback:
        """Run the 429 script; ``now`` overrides Redis TIME (tests only)."""
        args = self._common(configured_per_minute=configured_per_minute, now=now)
        args += [repr(hold_s)]
        reply = await self._rate_limited(keys=[lane_key(self._prefix, lane)], args=args)
        return Feedback(float(reply[0]), int(reply[1]) == 1, float(reply[2]))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
