"""The trainer lease: exactly one trainer node trains a session. A node takes the session's lease in Redis
before it starts a learner, keeps it alive while the learner runs, and gives it back when it ends; a node
that dies stops refreshing it and it expires after LEASE_TTL, so a restarted or replacement trainer can
take over. Every rank checks the holder at each iteration and stops if another node holds it."""

from __future__ import annotations

import logging
import threading

import redis

from services.shared import keys
from services.shared.session import WrongState

log = logging.getLogger(__name__)

LEASE_TTL = 10.0          # seconds a lease outlives its last refresh
REFRESH_SECONDS = 2.0

# KEYS: lease. ARGV: node id, ttl ms. 1 if this node holds it now, else the holder's id.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return holder
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseHeld(WrongState):
    """Another trainer node holds the session's lease."""


class Lease:
    """One node's claim on training one session."""

    def __init__(self, client: redis.Redis, session_id: str, node_id: str):
        self.client, self.node_id = client, node_id
        self.key = keys.SessionKeys(session_id).trainer_lease
        self.session_id = session_id
        self._take = client.register_script(_TAKE)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> None:
        """Hold the lease (or renew it); LeaseHeld when another node holds it."""
        got = self._take(keys=[self.key], args=[self.node_id, int(LEASE_TTL * 1000)])
        if got != 1:
            ttl = self.client.pttl(self.key)
            raise LeaseHeld(f"session {self.session_id} is trained by node {got.decode()} (its lease expires in "
                            f"{max(ttl, 0) / 1000:.0f}s unless it is alive)")

    def keep(self) -> None:
        """Renew the lease every REFRESH_SECONDS in the background until release()."""
        self._thread = threading.Thread(target=self._run, name="trainer-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.take()
            except LeaseHeld as exc:  # the learner sees the other holder at its next iteration and stops
                log.error("lost the trainer lease: %s", exc)
            except redis.RedisError as exc:  # Redis away: renewed once it is back (nobody else can take it
                log.warning("cannot renew the trainer lease: %s", exc)  # while Redis is down either)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._release(keys=[self.key], args=[self.node_id])
        except redis.RedisError as exc:
            log.warning("cannot release the trainer lease (it expires in %.0fs): %s", LEASE_TTL, exc)


def holder(client: redis.Redis, session_id: str) -> str | None:
    """The node that holds the session's lease, or None."""
    raw = client.get(keys.SessionKeys(session_id).trainer_lease)
    return raw.decode() if raw else None
