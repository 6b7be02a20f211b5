"""Ports chosen for processes that bind them later (an embedded Redis, a Ray head, a service).

A port the kernel hands out for bind(("", 0)) lies in its ephemeral range, the range every outgoing
connection takes its local port from: between choosing such a port and the process binding it, any
connection on the machine may take it, and the process fails to bind (a Ray head whose client server lost
its port that way died seconds after it said it had started, and its drivers with it a minute later).
So free_port() chooses outside that range and below 65536, above Ray's worker ports (10002-19999): there
only a process asking for that very port can take it."""

from __future__ import annotations

import random
import socket
import threading

RAY_WORKER_PORTS_END = 19999
_given: set[int] = set()  # never the same port twice from one process, whoever bound it since
_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default when unreadable)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _candidates() -> list[range]:
    low, high = ephemeral_range()
    ranges = [range(RAY_WORKER_PORTS_END + 1, low), range(max(high + 1, RAY_WORKER_PORTS_END + 1), 65536)]
    return [r for r in ranges if len(r) >= 1000]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, outside the ephemeral range (see the module's doc), not given before by this
    process. Where the kernel leaves no room outside it, a port it chooses."""
    ranges = _candidates()
    with _lock:
        for _ in range(200 if ranges else 0):
            r = random.choice(ranges)
            port = random.randrange(r.start, r.stop)
            if port not in _given and _bindable(host, port):
                _given.add(port)
                return port
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
