"""Loopback ports for the local grid's SSH servers, named in turn instead of asked of the kernel.

Binding to port 0 has the kernel search its ephemeral range for a free port, a search that
costs more the more ports are taken: with 18,000 VM listeners in one process it took 4 ms of
system time per bind, against 0.03 ms for the first thousand. Binding a named port is one
lookup, so the machines walk that same range with a cursor, skip the ports this process holds,
and leave one someone else holds (EADDRINUSE) for the next.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_RANGE = (32768, 60999)  # Linux's default net.ipv4.ip_local_port_range


def ephemeral_range(path: Path = _RANGE) -> tuple[int, int]:
    """This host's ephemeral port range, or Linux's default where it cannot be read."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_RANGE
    return (low, high) if 0 < low <= high <= 65535 else _DEFAULT_RANGE


class PortCursor:
    """Walks a port range from a random start; knows which ports this process holds."""

    def __init__(self, low: int, high: int) -> None:
        self._low = low
        self._high = high
        self._next = random.randint(low, high)  # processes started together start apart
        self._held: set[int] = set()

    def candidates(self, count: int) -> list[int]:
        """The next `count` ports of the range this process does not hold (fewer if full)."""
        found: list[int] = []
        for _ in range(self._high - self._low + 1):
            if len(found) == count:
                break
            port = self._next
            self._next = self._low if port >= self._high else port + 1
            if port not in self._held:
                found.append(port)
        return found

    def hold(self, port: int) -> None:
        """Marks `port` as listened on here."""
        self._held.add(port)

    def release(self, port: int) -> None:
        """Marks `port` as free again."""
        self._held.discard(port)


PORTS = PortCursor(*ephemeral_range())
"""The cursor of this process: ports are a resource of the whole process."""


BACKLOG = 100  # asyncssh's


def listening_socket(cursor: PortCursor, last: int = 0) -> socket.socket:
    """A loopback socket listening on `last`, else on the cursor's next ports, else the kernel's.

    A port someone else holds fails the bind; one that another program bound too and listened
    on first fails the listen (both may bind it with SO_REUSEADDR): either way the next port is
    tried. OSError when the system refuses a socket at all (out of file descriptors).
    """
    for port in [*([last] if last else []), *cursor.candidates(8), 0]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            bound: int = sock.getsockname()[1]  # the kernel's pick when port is 0
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            if port == 0:
                raise
            continue
        sock.setblocking(False)
        cursor.hold(bound)
        return sock
    raise AssertionError("unreachable")
