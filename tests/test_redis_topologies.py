"""The shared limiter on Redis as production runs it: TLS, Sentinel, Cluster.

Each topology is private to its test (tests/fixtures/redis_topology.py) and torn down after.
The failover tests run two limiters (two replicas, ``expected_replicas=2``) saturating one
shared budget, take the master that holds the budget away mid-run (``SENTINEL FAILOVER``;
SIGKILL of the cluster master owning the keys' slot), and count the permits granted in the
worst 60 s window: the local fallback covers the gap, and the total stays within the limit
plus what the fallback may add (each replica's local burst, and its rate/N share over the gap).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from service.config import SettingsError, load_settings
from service.ratelimit import Limiter, build_limiter
from service.ratelimit.policy import gcra_shape
from service.ratelimit.redis_backend import GATE_KEY, connect, lane_key
from service.redis_url import RedisUrlError, parse_redis_url
from tests.fixtures import redis_topology
from tests.fixtures.stack import new_id

RATE = 300.0  # per minute: 5 permits a second shared by the two replicas
BURST = 5
REPLICAS = 2
RUN_S = 61.0
FAIL_AT_S = 12.0


# --------------------------------------------------------------------------- URL forms


def test_url_forms() -> None:
    s = parse_redis_url("redis+sentinel://:pw@h1:26379,h2/budget/3?sentinel_password=sp&x=1")
    assert (s.topology, s.tls, s.master, s.db) == ("sentinel", False, "budget", 3)
    assert s.nodes == (("h1", 26379), ("h2", 26379))
    assert (s.password, s.sentinel_password, s.query) == ("pw", "sp", "x=1")
    c = parse_redis_url("rediss+cluster://u:p%40w@[::1]:7000,10.0.0.2:7001/?ssl_cert_reqs=none")
    assert (c.topology, c.tls, c.username, c.password) == ("cluster", True, "u", "p@w")
    assert c.nodes == (("::1", 7000), ("10.0.0.2", 7001))
    assert c.single_node_url() == "rediss://u:p%40w@[::1]:7000/0?ssl_cert_reqs=none"
    assert parse_redis_url("rediss://h:6380/0").topology == "standalone"
    assert "pw" not in repr(s)
    for bad in (
        "http://h:6379",
        "redis+sentinel://h:26379",
        "redis+cluster://h:7000/2",
        "redis+cluster://",
        "redis+sentinel://h:x/m",
    ):
        with pytest.raises(RedisUrlError):
            parse_redis_url(bad)


def test_bad_url_is_one_line_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis+sentinel://:hunter2@h1:26379")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "REDIS_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_every_key_of_one_prefix_shares_a_slot() -> None:
    for prefix in ("docutray-bridge:{orders}:", "plain:", "", "odd{}:", "a}b{:"):
        keys = [lane_key(prefix, lane) for lane in ("submit", "status", "shared", GATE_KEY)]
        slots = {key_slot(k.encode()) for k in keys}
        assert len(slots) == 1, (prefix, keys)
    assert (
        lane_key("docutray-bridge:{orders}:", "shared")
        == "docutray-bridge:{orders}:ratelimit:shared"
    )


# --------------------------------------------------------------------------- the harness


@dataclass
class Run:
    grants: list[float] = field(default_factory=list)
    degraded: list[tuple[float, bool]] = field(default_factory=list)

    def worst_window(self, window_s: float) -> int:
        times, best, lo = sorted(self.grants), 0, 0
        for hi, t in enumerate(times):
            while times[lo] <= t - window_s:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def longest_pause(self, start: float, end: float) -> float:
        times = [t for t in sorted(self.grants) if start <= t <= end]
        return max((b - a for a, b in itertools.pairwise(times)), default=end - start)


def limiter_for(url: str, prefix: str, run: Run) -> Limiter:
    def on_event(name: str, fields: dict[str, Any]) -> None:
        if name == "degraded":
            run.degraded.append((time.monotonic(), bool(fields["degraded"])))

    return build_limiter(
        redis_url=url,
        submit_rate_per_minute=RATE,
        status_rate_per_minute=RATE,
        shared_budget=False,
        burst=BURST,
        expected_replicas=REPLICAS,
        key_prefix=prefix,
        on_event=on_event,
        probe_interval_s=0.5,
    )


async def saturate(
    url: str, prefix: str, *, fail: Callable[[], Awaitable[None]] | None, run_s: float
) -> tuple[Run, float]:
    """Two limiters, three busy callers each, for ``run_s``; ``fail`` runs at FAIL_AT_S.
    Returns the run and the monotonic time the failure was injected."""
    run = Run()
    limiters = [limiter_for(url, prefix, run) for _ in range(REPLICAS)]
    failed_at = 0.0

    async def caller(limiter: Limiter) -> None:
        while True:
            await limiter.acquire("submit")
            run.grants.append(time.monotonic())

    tasks = [asyncio.create_task(caller(lim)) for lim in limiters for _ in range(3)]
    start = time.monotonic()
    try:
        if fail is not None:
            await asyncio.sleep(FAIL_AT_S)  # wait-ok: the load runs this long before the failure
            failed_at = time.monotonic()
            await fail()
        await asyncio.sleep(max(0.0, start + run_s - time.monotonic()))  # wait-ok: load duration
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        assert not any(lim.degraded for lim in limiters), "a limiter still runs on its fallback"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lim in limiters:
            await lim.close()
    return run, failed_at


def degraded_gap(run: Run) -> float:
    """First switch to the fallback to the last switch back (0: never degraded)."""
    downs = [t for t, d in run.degraded if d]
    ups = [t for t, d in run.degraded if not d]
    return max(ups) - min(downs) if downs and ups else 0.0


def allowed_in_window(gap_s: float) -> float:
    """The limit over 60 s, plus the fallback's share: each replica's local burst and its
    rate/N over the gap (on top of what Redis granted, at worst), plus Redis' own burst."""
    _, shared_burst = gcra_shape(RATE, BURST)
    _, local_burst = gcra_shape(RATE / REPLICAS, BURST)
    return RATE + shared_burst + REPLICAS * local_burst + RATE / REPLICAS * gap_s / 60.0


def report(name: str, run: Run, failed_at: float) -> tuple[int, float]:
    worst = run.worst_window(60.0)
    gap = degraded_gap(run)
    pause = run.longest_pause(failed_at, failed_at + 20.0) if failed_at else 0.0
    print(
        f"\n{name}: worst 60 s window {worst} permits (limit {RATE:.0f}/min, "
        f"allowed {allowed_in_window(gap):.1f}); fallback gap {gap:.2f} s; "
        f"longest pause between permits after the failure {pause:.2f} s; "
        f"permits {len(run.grants)}"
    )
    return worst, gap


# --------------------------------------------------------------------------- topologies


@pytest.fixture
def tls_redis() -> Iterator[redis_topology.Topology]:
    topo = redis_topology.start_tls()
    yield topo
    topo.stop()


@pytest.fixture
def sentinel_set() -> Iterator[redis_topology.SentinelSet]:
    topo = redis_topology.start_sentinel()
    yield topo
    topo.stop()


@pytest.fixture
def cluster() -> Iterator[redis_topology.Cluster]:
    topo = redis_topology.start_cluster()
    yield topo
    topo.stop()


@pytest.mark.timeout(60)
async def test_tls_budget_is_shared_and_verified(tls_redis: redis_topology.Topology) -> None:
    prefix = f"docutray-bridge:{{{new_id('tls')}}}:"
    run, _ = await saturate(tls_redis.url, prefix, fail=None, run_s=4.0)  # ends on Redis
    _, shared_burst = gcra_shape(RATE, BURST)
    if not run.degraded:  # the whole run on the shared budget (a loaded machine may fall back)
        assert len(run.grants) <= RATE / 60 * 4.0 + shared_burst + 1
    assert len(run.grants) >= shared_burst
    client = connect(tls_redis.url)
    try:
        assert await client.hget(lane_key(prefix, "submit"), "tat") is not None
    finally:
        await client.aclose()
    # Without the CA the server's certificate is refused: the limiter falls back, never
    # talks in clear or unverified.
    unverified = tls_redis.url.split("?")[0]
    fallback = Run()
    limiter = limiter_for(unverified, prefix, fallback)
    try:
        await asyncio.wait_for(limiter.acquire("submit"), 5.0)
        assert limiter.degraded
    finally:
        await limiter.close()


@pytest.mark.timeout(60)
async def test_cluster_over_tls() -> None:
    """``rediss+cluster://`` (ElastiCache cluster mode with in-transit encryption): the
    scripts run through TLS on every node, and the CA is checked."""
    topo = redis_topology.start_cluster(tls=True)
    try:
        prefix = f"docutray-bridge:{{{new_id('tls-cluster')}}}:"
        # A TLS handshake on a loaded machine may outlast the 0.5 s connect timeout: the
        # limiter may start on its fallback, but must come to run its scripts on the cluster.
        run = Run()
        limiter = limiter_for(topo.url, prefix, run)
        key = lane_key(prefix, "submit")

        async def on_cluster() -> bool:
            await limiter.acquire("submit")
            with topo.client(topo.master_of(key)) as c:
                return not limiter.degraded and c.hget(key, "tat") is not None

        try:
            deadline = time.monotonic() + 30.0
            while not await on_cluster():
                assert time.monotonic() < deadline, "the limiter never ran on the TLS cluster"
        finally:
            await limiter.close()
        client = connect(topo.url.split("?")[0])
        with pytest.raises((redis.exceptions.RedisError, redis.exceptions.RedisClusterException)):
            await client.ping()
        await client.aclose()
    finally:
        topo.stop()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["failover", "kill"])
async def test_sentinel_failover_keeps_the_budget(
    sentinel_set: redis_topology.SentinelSet, how: str
) -> None:
    """``failover``: SENTINEL FAILOVER (a planned switch; redis-py's one retry reconnects
    through the sentinels, usually without falling back). ``kill``: SIGKILL of the master,
    the sentinels promote the replica after 1 s down; the fallback covers the gap."""
    prefix = f"docutray-bridge:{{{new_id('sentinel')}}}:"
    old_master = sentinel_set.current_master()

    async def fail() -> None:
        if how == "kill":
            sentinel_set.kill(old_master)
        else:
            await asyncio.to_thread(sentinel_set.failover)

    run, failed_at = await saturate(sentinel_set.url, prefix, fail=fail, run_s=RUN_S)
    worst, gap = report(f"sentinel {how}", run, failed_at)
    if how == "kill":
        assert gap > 0, "killing the master did not make the limiters fall back"
    new_master = sentinel_set.current_master()
    assert new_master != old_master, "the sentinels did not move the master"
    with sentinel_set.client(new_master) as c:
        assert c.hget(lane_key(prefix, "submit"), "tat") is not None  # the budget lives on
    assert worst <= allowed_in_window(gap)
    assert worst >= RATE * 0.9, "the budget was not used: nothing was measured"
    assert run.longest_pause(failed_at, failed_at + 20.0) < 3.0


@pytest.mark.timeout(90)
async def test_cluster_master_loss_keeps_the_budget(cluster: redis_topology.Cluster) -> None:
    prefix = f"docutray-bridge:{{{new_id('cluster')}}}:"
    key = lane_key(prefix, "submit")
    assert lane_key(prefix, GATE_KEY) != key
    client = connect(cluster.url)
    assert isinstance(client, RedisCluster)
    await client.aclose()
    victim = cluster.master_of(key)

    async def fail() -> None:
        cluster.kill(victim)

    run, failed_at = await saturate(cluster.url, prefix, fail=fail, run_s=RUN_S)
    worst, gap = report("cluster", run, failed_at)
    new_master = cluster.master_of(key)
    assert new_master != victim
    with cluster.client(new_master) as c:
        assert c.hget(key, "tat") is not None
    assert gap > 0, "killing the slot's master did not make the limiters fall back"
    assert worst <= allowed_in_window(gap)
    assert worst >= RATE * 0.9, "the budget was not used: nothing was measured"
    assert run.longest_pause(failed_at, failed_at + 20.0) < 3.0
