"""The reaper of `mso run`: a small process that outlives its parent by design and kills what the parent
started when the parent dies without stopping it (kill -9, an OOM kill, a crash), so no Ray instance, service
or env process outlives the command.

Every child of `mso run` leads a session of its own (setsid), and its descendants stay in it: Ray's worker
processes take process groups of their own but keep the Ray head's session, and env processes keep their
worker's. So a session id names everything one child brought up. The parent writes to the reaper's stdin
one line per child (`session SID`) and `done` once it has stopped them itself. If stdin ends without `done`
(the parent is gone: the kernel closes its end of the pipe however it died), the reaper sends SIGTERM to
every process of those sessions, waits GRACE seconds, then sends SIGKILL. The reaper runs in a session of
its own, so a terminal's Ctrl-C or hang-up does not reach it, and imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
import sys
import time

GRACE = 2.0


def members(sessions: set[int]) -> list[int]:
    """The pids of every live process in these sessions."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) in sessions:
                    found.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return found


def signal_sessions(sessions: set[int], sig: int) -> int:
    """Send sig to every process of these sessions; returns how many were signalled."""
    sent = 0
    for pid in members(sessions):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
            sent += 1
        except (ProcessLookupError, PermissionError):
            pass
    return sent


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sessions: set[int] = set()
    for line in sys.stdin:
        kind, _, value = line.strip().partition(" ")
        if kind == "done":
            return 0
        if kind == "session":
            sessions.add(int(value))
    # The parent died without saying done: what it started must not outlive it.
    signal_sessions(sessions, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and any(not _zombie(p) for p in members(sessions)):
        time.sleep(0.05)
    signal_sessions(sessions, signal.SIGKILL)
    return 0


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


if __name__ == "__main__":
    sys.exit(main())
