"""The shared budget in Redis: one hash per lane, changed only by two Lua scripts.

Every replica runs the same scripts against the same keys, so the budget is
one budget however many replicas there are. The clock is Redis ``TIME`` read
inside the script (Redis 7 replicates script effects, so reading the clock
before writing is allowed): replicas' clocks never matter, and the dispatcher
only ever uses the *durations* the scripts return.

The scripts mirror :func:`~service.ratelimit.policy.acquire_step` and
:func:`~service.ratelimit.policy.rate_limited_step`; a test checks they agree.

Keys (all under the one ``key_prefix`` the caller gives, see :func:`lane_key`; the
bridge's prefix is ``docutray-bridge:{<group>}:``). An acquire touches a lane and the
gate in one script, so every key carries the same Redis Cluster hash tag (the ``{...}``
in the prefix, or one :func:`lane_key` adds) and lands in one slot: the scripts run
unchanged on a cluster (ElastiCache cluster mode, Memorystore cluster), on Sentinel and on
one server (see :func:`connect` for the URL forms).

``<prefix>ratelimit:<lane>``
    hash ``tat``, ``eff``, ``ceiling``, ``changed``, ``gate``, ``blocked``,
    ``seen``, ``sub_at`` (the last submission granted on the lane; times are Redis-clock seconds, rates per minute); expires
    ``state_ttl_s`` after its last write, after which the lane starts afresh
    at its configured rate.
``<prefix>ratelimit:submit-gate``
    hash ``hour_tat``, ``day_tat``, ``blocked``, ``blocked_reason``, ``paused``,
    ``pause_reason``, ``seen``: what holds submissions back on every replica
    (:class:`~service.ratelimit.policy.GateState`); expires ``state_ttl_s``
    after the last of its times has passed (never while a pause is open-ended).

``seen`` is the latest Redis ``TIME`` a script ran at: when ``TIME`` steps
back (the Redis host's clock was corrected), the scripts shift every stored
time by the step, so a block or a reservation keeps its length.
"""

from __future__ import annotations

import math
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from service.ratelimit.policy import AimdParams, Answer, Feedback, GateOp
from service.redis_url import parse_redis_url

RedisClient = Redis | RedisCluster
"""A client of one server or Sentinel's master (``Redis``), or of a cluster."""

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
local FAR = 1e17
local function fmt(x) return string.format('%.17g', x) end
local function shift(t, step)
  if t > -FAR and t < FAR then return t + step end
  return t
end
local f = redis.call('HMGET', key, 'tat', 'eff', 'ceiling', 'changed', 'gate', 'blocked', 'seen',
  'sub_at')
local tat = tonumber(f[1]) or NEVER
local eff = tonumber(f[2]) or configured
local ceiling = tonumber(f[3]) or configured
local changed = tonumber(f[4]) or NEVER
local gate = tonumber(f[5]) or NEVER
local blocked = tonumber(f[6]) or NEVER
local seen = tonumber(f[7]) or NEVER
local sub_at = tonumber(f[8]) or NEVER
-- rebase: the clock stepped back, move every stored time with it
if now < seen then
  local step = now - seen
  tat = shift(tat, step)
  changed = shift(changed, step)
  gate = shift(gate, step)
  blocked = shift(blocked, step)
  sub_at = shift(sub_at, step)
end
seen = now
-- aimd_clamp
if eff > configured then eff = configured end
if ceiling > configured then ceiling = configured end
local function save()
  redis.call('HSET', key, 'tat', fmt(tat), 'eff', fmt(eff), 'ceiling', fmt(ceiling),
    'changed', fmt(changed), 'gate', fmt(gate), 'blocked', fmt(blocked), 'seen', fmt(seen),
    'sub_at', fmt(sub_at))
  redis.call('PEXPIRE', key, ttl_ms)
end
-- gcra_shape and gcra
local function shape(rate, burst, window)
  local b = math.max(1, math.min(burst, math.floor(rate / 20)))
  return window / math.max(rate - b, rate / 2), b
end
local function gcra_at(start, t, interval, b)
  local base = math.max(t, start)
  return math.max(start, base - (b - 1) * interval), base + interval
end
"""

_GATE: Final = """
local gkey = KEYS[2]
local g = redis.call('HMGET', gkey, 'hour_tat', 'day_tat', 'blocked', 'blocked_reason',
  'paused', 'pause_reason', 'seen')
local hour_tat = tonumber(g[1]) or NEVER
local day_tat = tonumber(g[2]) or NEVER
local gblocked = tonumber(g[3]) or NEVER
local gblocked_reason = g[4] or ''
local paused = tonumber(g[5]) or NEVER
local pause_reason = g[6] or ''
local gseen = tonumber(g[7]) or NEVER
if now < gseen then
  local step = now - gseen
  hour_tat = shift(hour_tat, step)
  day_tat = shift(day_tat, step)
  gblocked = shift(gblocked, step)
  paused = shift(paused, step)
end
gseen = now
local function gate_hold()
  if paused > now and paused >= gblocked then return paused, pause_reason end
  if gblocked > now then return gblocked, gblocked_reason end
  return now, ''
end
local function gate_save()
  redis.call('HSET', gkey, 'hour_tat', fmt(hour_tat), 'day_tat', fmt(day_tat),
    'blocked', fmt(gblocked), 'blocked_reason', gblocked_reason, 'paused', fmt(paused),
    'pause_reason', pause_reason, 'seen', fmt(gseen))
  if paused >= FAR then
    redis.call('PERSIST', gkey)
  else
    local last = math.max(hour_tat, day_tat, gblocked, paused, now)
    redis.call('PEXPIRE', gkey, math.ceil((last - now) * 1000) + ttl_ms)
  end
end
"""

ACQUIRE_LUA: Final = (
    _PRELUDE
    + _GATE
    + """
local burst = tonumber(ARGV[11])
local slots = tonumber(ARGV[12])
local want_increase = ARGV[13] == '1'
local holding = ARGV[14] == '1'
local plan = ARGV[15]
local per_hour = tonumber(ARGV[16])
local per_day = tonumber(ARGV[17])
local max_ahead = tonumber(ARGV[18])
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
local reserved = {}
if slots > 0 then
  -- gcra from the block's end at the earliest, after clamp_tat
  local interval, b = shape(eff, burst, 60)
  local start = math.max(now, blocked)
  if tat > start + (b + max_ahead) * interval then tat = start end
  for i = 1, slots do
    local allowed_at
    allowed_at, tat = gcra_at(start, tat, interval, b)
    reserved[i] = allowed_at - now
  end
end
local blocked_for = math.max(0, blocked - now)
local reply = {fmt(reserved[1] or -1), fmt(blocked_for), fmt(eff), 0, fmt(0), '',
  fmt(now - sub_at)}
for i = 2, slots do reply[6 + i] = fmt(reserved[i]) end
if plan == '-' then
  save()
  return reply
end
-- usable_permits, then gate_step
local usable = 0
if holding and blocked_for <= 0 then usable = usable + 1 end
for i = 1, slots do
  if reserved[i] <= 0 then usable = usable + 1 end
end
local wanted = 0
for i = 1, math.min(usable, string.len(plan)) do
  if string.sub(plan, i, i) == 's' then wanted = wanted + 1 end
end
local ih, bh, iday, bday = 0, 1, 0, 1
if per_hour > 0 then
  ih, bh = shape(per_hour, burst, 3600)
  hour_tat = math.min(hour_tat, now + bh * ih)
end
if per_day > 0 then
  iday, bday = shape(per_day, burst, 86400)
  day_tat = math.min(day_tat, now + bday * iday)
end
local held_until, reason = gate_hold()
local granted = 0
while granted < wanted and held_until <= now do
  if per_hour > 0 and gcra_at(now, hour_tat, ih, bh) > now then break end
  if per_day > 0 and gcra_at(now, day_tat, iday, bday) > now then break end
  if per_hour > 0 then
    local _, t = gcra_at(now, hour_tat, ih, bh)
    hour_tat = t
  end
  if per_day > 0 then
    local _, t = gcra_at(now, day_tat, iday, bday)
    day_tat = t
  end
  granted = granted + 1
end
local ready = held_until
if per_hour > 0 then
  local at = gcra_at(ready, hour_tat, ih, bh)
  if at > ready then ready = at; reason = 'budget_hour' end
end
if per_day > 0 then
  local at = gcra_at(ready, day_tat, iday, bday)
  if at > ready then ready = at; reason = 'budget_day' end
end
if granted > 0 then sub_at = now end
save()
gate_save()
reply[4] = granted
reply[5] = fmt(ready - now)
reply[6] = reason
reply[7] = fmt(now - sub_at)
return reply
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

GATE_LUA: Final = (
    _PRELUDE
    + _GATE
    + """
local op = ARGV[11]
local hold = tonumber(ARGV[12])
local why = ARGV[13]
if op == 'block' then
  if now + hold > gblocked then
    gblocked = now + hold
    gblocked_reason = why
  end
elseif op == 'pause' then
  if hold < 0 then paused = 1e18 else paused = now + hold end
  pause_reason = why
elseif op == 'resume' then
  if why == '' or why == pause_reason then
    paused = NEVER
    pause_reason = ''
  end
end
gate_save()
local held_until, reason = gate_hold()
return {fmt(held_until - now), reason}
"""
)

GATE_KEY: Final = "submit-gate"
"""The lane name of the submit gate's key (see :func:`lane_key`)."""


def lane_key(key_prefix: str, lane: str) -> str:
    """The one Redis key holding a lane's state; every key the limiter uses comes from here.

    All keys of one prefix share one Redis Cluster hash tag: the prefix's own ``{tag}``
    when it has a non-empty one (``docutray-bridge:{orders}:`` gives
    ``docutray-bridge:{orders}:ratelimit:shared``), else the whole prefix is made the tag
    (``{test:ratelimit}:shared``).
    """
    if has_hash_tag(key_prefix):
        return f"{key_prefix}ratelimit:{lane}"
    return f"{{{key_prefix}ratelimit}}:{lane}"


def has_hash_tag(text: str) -> bool:
    """True when a key starting with ``text`` hashes by a tag inside ``text`` (Redis Cluster
    spec: the first ``{``, then the first ``}`` after it, with something between)."""
    start = text.find("{")
    end = text.find("}", start + 1) if start >= 0 else -1
    return end > start + 1


def connect(
    redis_url: str, *, socket_timeout_s: float = 0.5, connect_timeout_s: float = 0.5
) -> RedisClient:
    """A client for ``REDIS_URL`` (one server, TLS, Sentinel or Cluster: the forms are in
    :mod:`service.redis_url`) that fails fast: short timeouts and a single retry.

    The limiter falls back to its local share when Redis does not answer; a client that
    retried for seconds would stall every permit instead. Sentinel's client asks the
    sentinels for the master on every new connection and drops connections to a master
    that was demoted; the cluster client re-reads the slot map after a node fails. No
    network I/O happens here (pools connect lazily). Raises
    :class:`~service.redis_url.RedisUrlError` for a URL it cannot read.
    """
    target = parse_redis_url(redis_url)
    fast: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "health_check_interval": 0,
    }
    if target.topology == "standalone":
        return Redis.from_url(redis_url, retry=Retry(NoBackoff(), retries=1), **fast)
    options: dict[str, Any] = dict(parse_url(target.single_node_url()))
    for name in ("host", "port", "path", "connection_class"):
        options.pop(name, None)
    options.update(fast)
    if target.topology == "cluster":
        options.pop("db", None)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            ssl=target.tls,
            retry=Retry(NoBackoff(), retries=1),
            **options,
        )
    db = options.pop("db", target.db)
    sentinel_kwargs: dict[str, Any] = dict(fast)
    if target.sentinel_username:
        sentinel_kwargs["username"] = target.sentinel_username
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    if target.tls:
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update({k: v for k, v in options.items() if k.startswith("ssl_")})
    sentinel = Sentinel(target.nodes, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(
        target.master,
        db=db,
        ssl=target.tls,
        retry=Retry(NoBackoff(), retries=1),
        **options,
    )
    return client


class RedisBackend:
    """Runs the three scripts (EVALSHA, reloaded on NOSCRIPT by redis-py) for the dispatcher.

    Raises whatever redis-py raises (``ConnectionError``, ``TimeoutError``,
    ``ResponseError``); the limiter catches those and falls back.
    """

    def __init__(
        self,
        client: RedisClient,
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
        self._gate = client.register_script(GATE_LUA)

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
        holding: bool = False,
        plan: str | None = None,
        per_hour: float = 0.0,
        per_day: float = 0.0,
        max_ahead_slots: int = 64,
        extra_slots: int = 0,
        now: float | None = None,
    ) -> Answer:
        """Run the acquire script (:func:`~service.ratelimit.policy.reserve_step`).

        ``plan`` None leaves the submit gate alone (a lane without
        submissions); ``now`` overrides Redis TIME (tests only).
        """
        args = self._common(configured_per_minute=configured_per_minute, now=now)
        slots = 1 + extra_slots if want_slot else 0
        args += [burst, slots, int(want_increase), int(holding)]
        args += ["-" if plan is None else plan, repr(per_hour), repr(per_day)]
        args += [max_ahead_slots]
        keys = [lane_key(self._prefix, lane), lane_key(self._prefix, GATE_KEY)]
        reply = await self._acquire(keys=keys, args=args)
        reserved = float(reply[0])
        return Answer(
            reserved if want_slot else None,
            float(reply[1]),
            float(reply[2]),
            submits_granted=int(reply[3]),
            submit_wait_s=float(reply[4]),
            submit_reason=_text(reply[5]),
            since_submit_s=float(reply[6]),
            more_in_s=tuple(float(r) for r in reply[7:]),
        )

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

    async def gate(
        self, op: GateOp, *, hold_s: float = 0.0, reason: str = "", now: float | None = None
    ) -> tuple[float, str]:
        """Run the gate script (:func:`~service.ratelimit.policy.gate_op`): ``(held_for_s,
        reason)`` of the block or pause after ``op``; ``now`` overrides Redis TIME (tests only)."""
        args = self._common(configured_per_minute=1.0, now=now)
        args += [op, repr(hold_s), reason]
        key = lane_key(self._prefix, GATE_KEY)
        reply = await self._gate(keys=[key, key], args=args)
        return float(reply[0]), _text(reply[1])

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
