"""Free TCP ports on loopback, for processes that must be told their port up front."""

from __future__ import annotations

import random
import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback nothing listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether `port` can be bound on loopback now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, with_bus: bool = False) -> list[int]:
    """`count` consecutive free loopback ports (and, with `with_bus`, their Redis Cluster bus
    ports +10000 free too); RuntimeError when 200 random tries all collide."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 30000 - count)
        ports = list(range(first, first + count))
        wanted = ports + ([p + 10000 for p in ports] if with_bus else [])
        if all(port_is_free(p) for p in wanted):
            return ports
    raise RuntimeError("no free loopback ports")
