"""``REDIS_URL`` for the three shapes managed Redis comes in, read without I/O.

::

    redis://[[user]:password@]host:port[/db][?option=value...]          one server
    rediss://...                                                        the same over TLS
    unix:///path/to/redis.sock[?db=N]                                   a local socket
    redis+sentinel://[[user]:password@]host:26379[,host:26379...]/<master>[/db][?...]
    rediss+sentinel://...            TLS to the sentinels and to the master
    redis+cluster://[[user]:password@]host:port[,host:port...][/][?...]
    rediss+cluster://...             TLS to every node (ElastiCache, Memorystore cluster)

The user and password are the data nodes' (the master's, the cluster's). Sentinels
that need their own are given ``sentinel_username`` / ``sentinel_password`` in the query
(none by default). Every other query option goes to redis-py's connection as
``Redis.from_url`` would take it, e.g. ``ssl_ca_certs=/etc/redis-ca/ca.crt``,
``ssl_cert_reqs=none``, ``ssl_check_hostname=false``. Cluster mode has database 0 only.

:func:`parse_redis_url` is pure (settings call it at load for a one-line error);
the limiter's ``connect`` builds the client from its :class:`RedisTarget`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

Topology = Literal["standalone", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}

_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")


class RedisUrlError(ValueError):
    """REDIS_URL cannot be read; the message names the part and never holds the password."""


@dataclass(frozen=True)
class RedisTarget:
    """What :func:`parse_redis_url` read: enough to build the client, no connection yet."""

    topology: Topology
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    """Sentinels (sentinel) or startup nodes (cluster); empty for standalone."""
    master: str = ""
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    query: str = field(default="", repr=False)
    """The remaining query options, url-encoded, for redis-py."""
    url: str = field(default="", repr=False)
    """The URL as given (standalone: handed to ``Redis.from_url`` as it is)."""

    def secrets(self) -> list[str]:
        """Every password in the URL (for log redaction)."""
        return [s for s in (self.password, self.sentinel_password) if s]

    def single_node_url(self) -> str:
        """A plain ``redis://`` / ``rediss://`` URL with this target's credentials and options
        for one of its nodes, so redis-py's own parser reads the options."""
        scheme = "rediss" if self.tls else "redis"
        host, port = self.nodes[0]
        auth = ""
        if self.username or self.password:
            auth = f"{_q(self.username or '')}:{_q(self.password or '')}@"
        return f"{scheme}://{auth}{_host(host)}:{port}/{self.db}" + (
            f"?{self.query}" if self.query else ""
        )


def parse_redis_url(url: str) -> RedisTarget:
    """Read ``url`` (forms in the module docstring); raise :class:`RedisUrlError` if it is
    not one of them."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise RedisUrlError(
            f"REDIS_URL must start with one of {', '.join(_SCHEMES)} followed by ://"
        )
    topology, tls = _SCHEMES[scheme]
    if topology == "standalone":
        return RedisTarget("standalone", tls, url=url)
    parts = urlsplit(f"x://{rest}")
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon and pw else None
    nodes = tuple(_node(h, topology) for h in hosts.split(",") if h.strip())
    if not nodes:
        raise RedisUrlError(f"REDIS_URL ({scheme}) names no host")
    path = [unquote(p) for p in parts.path.split("/") if p]
    options = parse_qsl(parts.query, keep_blank_values=True)
    sentinel_auth = {k: v for k, v in options if k in _SENTINEL_AUTH}
    query = urlencode([(k, v) for k, v in options if k not in _SENTINEL_AUTH])
    master, db = "", 0
    if topology == "sentinel":
        if not path or len(path) > 2:
            raise RedisUrlError(
                "REDIS_URL (sentinel) must end with /<master-name> or /<master-name>/<db>"
            )
        master = path[0]
        db = _db(path[1]) if len(path) == 2 else 0
    else:
        if len(path) > 1 or (path and _db(path[0]) != 0):
            raise RedisUrlError("REDIS_URL (cluster) takes no path but /0: a cluster has db 0 only")
        if sentinel_auth:
            raise RedisUrlError("REDIS_URL (cluster) takes no sentinel_* options")
    return RedisTarget(
        topology,
        tls,
        nodes=nodes,
        master=master,
        db=db,
        username=username,
        password=password,
        sentinel_username=sentinel_auth.get("sentinel_username") or None,
        sentinel_password=sentinel_auth.get("sentinel_password") or None,
        query=query,
        url=url,
    )


def _node(text: str, topology: Topology) -> tuple[str, int]:
    default = 26379 if topology == "sentinel" else 6379
    host, port = text.strip(), default
    if host.startswith("["):  # [IPv6]:port
        inside, _, after = host[1:].partition("]")
        host, port_text = inside, after.removeprefix(":")
    else:
        host, _, port_text = host.rpartition(":") if ":" in host else (host, "", "")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RedisUrlError(f"REDIS_URL: bad port {port_text!r}")
        port = int(port_text)
    if not host:
        raise RedisUrlError("REDIS_URL: a host is empty")
    return unquote(host), port


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"REDIS_URL: database {text!r} is not a number")
    return int(text)


def _q(text: str) -> str:
    return quote(text, safe="")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
