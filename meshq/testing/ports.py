"""Free TCP ports on 127.0.0.1 for nodes that tests and benchmarks start, kill and restart in place.

A port from ``bind(("127.0.0.1", 0))`` lies in the kernel's ephemeral range, and while its node is down any
outgoing connection on the machine may be given that same port as its local end: above all the survivors' DEALERs,
which reconnect to the dead node's address every few hundred ms and now and then connect to themselves (TCP
simultaneous open, local port == remote port). The restarted node then fails with "Address already in use" — a
CI run failed this way. :func:`free_port` therefore hands out ports *below* the ephemeral range, which the kernel
never gives to an outgoing connection, and never the same one twice in a process.
"""

from __future__ import annotations

import random
import socket

_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST = 20000  # above the well-known and most registered service ports
_given: set[int] = set()
_draw = random.SystemRandom()  # not the global generator: tests that seed it would draw the same ports in parallel


def _ephemeral_low() -> int:
    try:
        with open(_EPHEMERAL_RANGE, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # the Linux default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range when the machine leaves room below it
    (else any free port the kernel picks), and not handed out before by this process."""
    low = _ephemeral_low()
    if low - _LOWEST >= 1000:
        for _ in range(200):
            port = _draw.randrange(_LOWEST, low)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
