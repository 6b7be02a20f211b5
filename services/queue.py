"""The fragment queue: a Redis stream per session that rollout workers append to and trainer ranks read
through one consumer group, plus the ledger counters that make it checkable.

Ledger: produced = consumed + dropped_stale + dropped_corrupt + pending, where pending is what the
stream still holds (entries are deleted when retired).
"""

from __future__ import annotations

import logging
import time

import redis

from mso import keys
from mso.codec import CodecError, decode, encode

log = logging.getLogger(__name__)


class Backpressure(TimeoutError):
    """The stream stayed full for longer than the producer was willing to wait."""


class FragmentProducer:
    """Appends fragments; blocks (does not grow memory) while the stream holds max_pending entries."""

    def __init__(self, client: redis.Redis, session_id: str, max_pending: int):
        self.client = client
        self.keys = keys.SessionKeys(session_id)
        self.max_pending = max_pending

    def wait_for_room(self, should_stop=lambda: False, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while self.client.xlen(self.keys.fragments) >= self.max_pending and not should_stop():
            if deadline is not None and time.monotonic() > deadline:
                raise Backpressure(f"fragment stream {self.keys.fragments} full for {timeout}s")
            time.sleep(delay)  # the consumer frees room by deleting retired entries; no event to wait on
            delay = min(delay * 2, 0.05)

    def push(self, fragment: dict, env_steps: int) -> int:
        """Append one fragment; returns its encoded size in bytes."""
        payload = encode(fragment)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.fragments, {b"f": payload})
        pipe.hincrby(self.keys.ledger, "produced", 1)
        pipe.hincrby(self.keys.ledger, "env_steps", env_steps)
        pipe.hsetnx(self.keys.ledger, "first_fragment_at", time.time())
        pipe.execute()
        return len(payload)


class FragmentConsumer:
    """One trainer rank's view of the stream: read new entries, retire (ack + delete) used ones."""

    def __init__(self, client: redis.Redis, session_id: str, consumer: str):
        self.client = client
        self.keys = keys.SessionKeys(session_id)
        self.consumer = consumer
        self._pending_cursor = None  # while set: deliver entries claimed by reclaim() (after this id) first
        ensure_group(client, session_id)

    def reclaim(self) -> int:
        """Take over every entry other consumers read but never retired (they died: a trainer restarts
        with new consumer names), so nothing is lost; returns how many."""
        start, total = "0-0", 0
        while True:
            reply = self.client.xautoclaim(self.keys.fragments, keys.GROUP, self.consumer, min_idle_time=0,
                                           start_id=start, count=256)
            start, claimed = reply[0], reply[1]
            total += len(claimed)
            if start in (b"0-0", "0-0"):
                break
        if total:
            self._pending_cursor = "0"
        return total

    def read(self, count: int, block_ms: int = 200) -> list[tuple[bytes, dict]]:
        """Up to count decoded fragments as (entry_id, fragment); corrupt entries are retired and counted."""
        reply = None
        if self._pending_cursor is not None:
            reply = self.client.xreadgroup(keys.GROUP, self.consumer, {self.keys.fragments: self._pending_cursor},
                                           count=count)
            entries = [e for _s, es in reply or [] for e in es]
            self._pending_cursor = entries[-1][0] if entries else None
        if self._pending_cursor is None:
            reply = self.client.xreadgroup(keys.GROUP, self.consumer, {self.keys.fragments: ">"},
                                           count=count, block=block_ms)
        out, corrupt = [], []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    payload = fields.get(b"f") if fields else None
                    if payload is None:
                        raise CodecError(f"entry has no 'f' field (fields: {sorted(fields)})")
                    out.append((entry_id, decode(payload)))
                except CodecError as exc:
                    log.warning("dropping corrupt fragment %s: %s", entry_id, exc)
                    corrupt.append(entry_id)
        if corrupt:
            self.retire(corrupt, "dropped_corrupt")
        return out

    def retire(self, entry_ids: list[bytes], outcome: str) -> None:
        """Ack and delete entries, counting them under outcome (consumed, dropped_stale, dropped_corrupt)."""
        if not entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.fragments, keys.GROUP, *entry_ids)
        pipe.xdel(self.keys.fragments, *entry_ids)
        pipe.hincrby(self.keys.ledger, outcome, len(entry_ids))
        pipe.execute()


def ensure_group(client: redis.Redis, session_id: str) -> None:
    try:
        client.xgroup_create(keys.SessionKeys(session_id).fragments, keys.GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def ledger(client: redis.Redis, session_id: str) -> dict[str, int]:
    """The session's fragment counters, plus pending = entries still in the stream."""
    sk = keys.SessionKeys(session_id)
    counts = {k.decode(): int(v) for k, v in client.hgetall(sk.ledger).items() if k != b"first_fragment_at"}
    counts["pending"] = client.xlen(sk.fragments)
    return counts
