"""The fragment queue: a Redis stream per session that rollout workers append to and trainer ranks read
through one consumer group, plus the ledger counters that make it checkable.

Ledger: produced = consumed + dropped_stale + dropped_corrupt + pending, where pending is what the
stream still holds (entries are deleted when retired). Every change to the stream moves its counter in the
same atomic step (a Lua script), by what Redis really did: a push adds an entry and counts it only while
the stream has room, so the bound is exact however many producers race; a retirement counts the entries
XDEL really removed, so an entry two consumers retire is counted once.
"""

from __future__ import annotations

import logging
import time

import redis

from services.shared import keys
from services.shared.codec import CodecError, decode
from services.shared.fragment import Fragment

log = logging.getLogger(__name__)

# KEYS: stream, ledger, produced by node. ARGV: max_pending, now, node, then env_steps and payload of each
# fragment. Appends them in order while the stream has room; returns how many it appended and the room left.
_PUSH = """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local n, steps = 0, 0
for i = 4, #ARGV, 2 do
  if n >= room then break end
  redis.call('XADD', KEYS[1], '*', 'f', ARGV[i + 1])
  n = n + 1
  steps = steps + tonumber(ARGV[i])
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'produced', n)
  redis.call('HINCRBY', KEYS[2], 'env_steps', steps)
  redis.call('HSETNX', KEYS[2], 'first_fragment_at', ARGV[2])
  redis.call('HINCRBY', KEYS[3], ARGV[3], n)
end
return {n, room - n}
"""
# KEYS: stream, ledger, uses, room channel. ARGV: group, outcome, ids... The number of entries really
# removed, also published on the room channel, where producers waiting for room listen.
_RETIRE = """
local ids = {unpack(ARGV, 3)}
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
local removed = redis.call('XDEL', KEYS[1], unpack(ids))
if removed > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], removed)
  redis.call('PUBLISH', KEYS[4], removed)
end
redis.call('HDEL', KEYS[3], unpack(ids))
return removed
"""
RETIRE_BATCH = 1000          # ids per script call (Lua's unpack has a stack limit)
PUSH_BYTES = 8 << 20         # payload bytes per push call (several fragments share one round trip up to it)
RECLAIM_IDLE_SECONDS = 600   # a live node's consumer that has not touched the stream this long is taken over
ROOM_POLL = (0.002, 0.05)    # seconds a producer waits for room between two looks unless woken: first, longest


class Backpressure(TimeoutError):
    """The stream stayed full for longer than the producer was willing to wait."""


class FragmentProducer:
    """Appends fragments; blocks (does not grow memory) while the stream holds max_pending entries."""

    def __init__(self, client: redis.Redis, session_id: str, max_pending: int, node_id: str = ""):
        self.client = client
        self.keys = keys.SessionKeys(session_id)
        self.max_pending = max_pending
        self.node_id = node_id  # whose fragments these are (produced_by_node)
        self._push = client.register_script(_PUSH)
        self._room = None  # subscribed to the room channel the first time the stream is full

    def push(self, fragment: Fragment, should_stop=lambda: False, timeout: float | None = None) -> int:
        """Append one fragment once the stream has room; returns its encoded size in bytes, or 0 when
        should_stop() became true first (the fragment was never produced). Raises Backpressure after
        timeout seconds of a full stream."""
        return self.push_many([fragment], should_stop, timeout)[0]

    def push_many(self, fragments: list[Fragment], should_stop=lambda: False, timeout: float | None = None,
                  each_round=lambda sizes, full: None) -> list[int]:
        """push() for several fragments, in order, as many in each round trip as the stream has room for (up
        to PUSH_BYTES of payload): a worker's envs tend to finish their fragments in the same step. Calls
        each_round(sizes, full) after each round trip: the sizes it appended, and whether the stream has no
        room left (it refused some, or they filled it). Returns each one's size, 0 for those should_stop() left
        unproduced; Backpressure after timeout seconds without room (the fragments before the one that found
        none were appended)."""
        payloads = [(len(f.reward), f.encode()) for f in fragments]
        sizes, deadline, delay = [], None if timeout is None else time.monotonic() + timeout, ROOM_POLL[0]
        while len(sizes) < len(payloads):
            args, nbytes = [], 0
            for steps, payload in payloads[len(sizes):]:
                if args and nbytes + len(payload) > PUSH_BYTES:
                    break
                args += [steps, payload]
                nbytes += len(payload)
            count, left = self._push(keys=[self.keys.fragments, self.keys.ledger, self.keys.produced_by_node],
                                     args=[self.max_pending, time.time(), self.node_id, *args])
            new = [len(payload) for _steps, payload in payloads[len(sizes):len(sizes) + count]]
            sizes += new
            each_round(new, left <= 0)  # a fragment refused leaves none either: the script stopped at room 0
            if new:
                delay = ROOM_POLL[0]
                if deadline is not None:
                    deadline = time.monotonic() + timeout
                continue
            if should_stop():
                return sizes + [0] * (len(payloads) - len(sizes))
            if deadline is not None and time.monotonic() > deadline:
                raise Backpressure(f"fragment stream {self.keys.fragments} full for {timeout}s")
            self._await_room(delay)
            delay = min(delay * 2, ROOM_POLL[1])
        return sizes

    def _await_room(self, seconds: float) -> None:
        """Wait until a trainer rank retires entries (its retire script publishes on the room channel), or
        seconds at most: the fallback for a notification missed. Polling alone found the room up to 50 ms
        late, while a CartPole learner's update, during which its iteration's fragments fill the stream,
        takes 30 ms."""
        try:
            if self._room is None:
                self._room = self.client.pubsub(ignore_subscribe_messages=True)
                self._room.subscribe(self.keys.room_channel)
            if self._room.get_message(timeout=seconds) is not None:
                while self._room.get_message(timeout=0) is not None:
                    pass  # one look at the stream answers every retirement so far
        except redis.RedisError:  # Redis restarting: wait as if by polling, subscribe again next time
            if self._room is not None:
                self._room.close()
                self._room = None
            time.sleep(seconds)


def node_of(consumer: str) -> str:
    """The node id in a consumer name `{node_id}-rank{rank}`."""
    return consumer.rsplit("-rank", 1)[0]


class FragmentConsumer:
    """One trainer rank's view of the stream: read new entries, retire (ack + delete) used ones."""

    def __init__(self, client: redis.Redis, session_id: str, consumer: str):
        self.client = client
        self.keys = keys.SessionKeys(session_id)
        self.consumer = consumer
        # Entries delivered to this name before (a learner restarted in the same node) or claimed by
        # reclaim() come first: ">" would never deliver them again.
        self._pending_cursor: str | None = "0"
        self._retire = client.register_script(_RETIRE)
        self.bytes_read = 0  # payload bytes of the last read()
        self.redelivered = False  # the last read()'s entries were this consumer's pending ones
        ensure_group(client, session_id)

    def reclaim(self, live_nodes: set[str]) -> int:
        """Take over the entries that consumers of other nodes read but never retired, when their node is
        dead (not in live_nodes) or has not touched the stream for RECLAIM_IDLE_SECONDS; a live rank's
        entries are never taken. Returns how many entries were claimed."""
        total = 0
        stream, me = self.keys.fragments, node_of(self.consumer)
        for info in self.client.xinfo_consumers(stream, keys.GROUP):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            owner = node_of(name)
            if owner == me:
                continue
            alive = owner in live_nodes
            if alive and info["idle"] < RECLAIM_IDLE_SECONDS * 1000:
                continue
            min_idle = RECLAIM_IDLE_SECONDS * 1000 if alive else 0
            while True:
                pending = self.client.xpending_range(stream, keys.GROUP, min="-", max="+", count=256,
                                                     consumername=name, idle=min_idle or None)
                if not pending:
                    break
                claimed = self.client.xclaim(stream, keys.GROUP, self.consumer, min_idle_time=min_idle,
                                             message_ids=[p["message_id"] for p in pending], justid=True)
                total += len(claimed)
                if len(pending) < 256:
                    break
            if not alive:
                self.client.xgroup_delconsumer(stream, keys.GROUP, name)
        if total:
            self._pending_cursor = "0"
        return total

    def read(self, count: int, block_ms: int | None = 200) -> list[tuple[bytes, dict]]:
        """Up to count decoded entries as (entry_id, tree): the reader checks each is a fragment
        (fragment.Checker); entries that do not even decode are retired and counted as corrupt here.
        Entries this consumer already holds (pending) come first; `redelivered` says whether this read's were
        those (delivered before: reclaimed, or this consumer's own from before a restart)."""
        reply = None
        self.redelivered = self._pending_cursor is not None
        if self._pending_cursor is not None:
            reply = self.client.xreadgroup(keys.GROUP, self.consumer, {self.keys.fragments: self._pending_cursor},
                                           count=count)
            entries = [e for _s, es in reply or [] for e in es]
            self._pending_cursor = entries[-1][0] if entries else None
        if self._pending_cursor is None and not reply_entries(reply):
            self.redelivered = False
            reply = self.client.xreadgroup(keys.GROUP, self.consumer, {self.keys.fragments: ">"},
                                           count=count, block=block_ms)
        out, corrupt = [], []
        self.bytes_read = 0
        for entry_id, fields in reply_entries(reply):
            try:
                payload = fields.get(b"f") if fields else None
                if payload is None:
                    raise CodecError(f"entry has no 'f' field (fields: {sorted(fields or {})})")
                self.bytes_read += len(payload)
                out.append((entry_id, decode(payload)))
            except CodecError as exc:
                log_corrupt(entry_id, str(exc))
                corrupt.append(entry_id)
        if corrupt:
            self.retire(corrupt, "dropped_corrupt")
        return out

    def retire(self, entry_ids: list[bytes], outcome: str) -> int:
        """Ack and delete entries, counting under outcome (consumed, dropped_stale, dropped_corrupt) the
        ones Redis really removed, and forget their use counts; returns that number."""
        removed = 0
        for i in range(0, len(entry_ids), RETIRE_BATCH):
            batch = entry_ids[i:i + RETIRE_BATCH]
            removed += self._retire(keys=[self.keys.fragments, self.keys.ledger, self.keys.uses,
                                          self.keys.room_channel], args=[keys.GROUP, outcome, *batch])
        return removed


def reply_entries(reply) -> list:
    return [e for _stream, entries in reply or [] for e in entries]


_logged_reasons: set[str] = set()


def log_corrupt(entry_id, reason: str) -> None:
    """Log a dropped entry's reason the first time that kind of reason is seen (a flood of one foreign
    producer must not drown the log); every one is counted in the ledger as dropped_corrupt."""
    kind = reason.split(":")[0][:80]
    if kind not in _logged_reasons:
        _logged_reasons.add(kind)
        log.warning("dropping corrupt fragment %s: %s (further entries dropped for this reason are only counted)",
                    entry_id, reason)


def ensure_group(client: redis.Redis, session_id: str) -> None:
    try:
        client.xgroup_create(keys.SessionKeys(session_id).fragments, keys.GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def produced_by_node(client: redis.Redis, session_id: str) -> dict[str, int]:
    """Fragments each rollout node produced (they add up to the ledger's produced)."""
    raw = client.hgetall(keys.SessionKeys(session_id).produced_by_node)
    return {k.decode(errors="replace"): int(v) for k, v in raw.items()}


def first_fragment_at(client: redis.Redis, session_id: str) -> float | None:
    """When the session's first fragment was produced (time.time()), or None."""
    raw = client.hget(keys.SessionKeys(session_id).ledger, "first_fragment_at")
    return float(raw) if raw else None


def ledger(client: redis.Redis, session_id: str) -> dict[str, int]:
    """The session's fragment counters, plus pending = entries still in the stream."""
    sk = keys.SessionKeys(session_id)
    counts = {k.decode(): int(v) for k, v in client.hgetall(sk.ledger).items() if k != b"first_fragment_at"}
    counts["pending"] = client.xlen(sk.fragments)
    return counts
