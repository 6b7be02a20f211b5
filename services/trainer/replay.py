"""The replay of one trainer rank: MineStudio's replay buffer (reference §4.2) with its bugs fixed.

Fragments read from the session's Redis stream are grouped into chunks of `fragments_per_chunk`
consecutive, contiguous fragments of one env slot (so GAE can chain across them), held up to `max_chunks`,
sampled uniformly at random, and retired after `max_reuse` samplings. Differences from the reference:
  - staleness (learner version - version of a chunk's oldest step > max_staleness) is checked when a chunk
    is sampled as well as when it arrives, so nothing too old is ever trained on;
  - use counts are kept in Redis beside the stream, so a restarted trainer that reclaims the entries a dead
    one held does not use them more than max_reuse times in all;
  - payloads stay in the stream until retired (acknowledged and deleted), so a replay of thousands of
    VPT-sized fragments costs Redis memory, not trainer memory; only fragments read since the last sample
    are kept decoded here.
Ledger outcomes: a chunk retired after at least one use is `consumed`; one never trained on (stale, or
pushed out of a full replay as the oldest) is `dropped_stale`; each use after the first counts `reused`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from services.shared import keys
from services.shared.codec import CodecError, decode
from services.shared.fragment import Checker, Fragment
from services.shared.queue import FragmentConsumer, log_corrupt

log = logging.getLogger(__name__)

READ_BYTES = 64 << 20     # decoded bytes one read of the stream may bring in (a batch of fragments)
READ_MAX = 256            # entries one read may bring in
HOT_BYTES = 256 << 20     # decoded fragments kept between a read and the next sample; the rest is re-read
WAIT_NOTICE_SECONDS = 10.0  # a fill that waits this long (or half the stall timeout) says so, every 2 s


class Stalled(RuntimeError):
    """No usable fragment arrived for stall_timeout seconds; the message says what arrived instead."""


@dataclass
class _Chunk:
    ids: list[bytes]
    version: int            # model version that chose the chunk's oldest step
    uses: int = 0


@dataclass
class _Partial:
    ids: list[bytes] = field(default_factory=list)
    last_seq: int = -1
    version: int = 0


class Replay:
    """Chunks of fragments a rank may train on, between the Redis stream and the PPO update."""

    def __init__(self, consumer: FragmentConsumer, session_id: str, fragment_length: int, replay_config,
                 seed: int = 0, state_signature=None, stall_timeout: float = 0.0, on_wait=None):
        self.consumer, self.client = consumer, consumer.client
        self.session_id, self.length = session_id, fragment_length
        self.keys = keys.SessionKeys(session_id)
        self.checker = Checker(session_id, fragment_length, state_signature)
        self.max_chunks = replay_config.max_chunks
        self.max_reuse = replay_config.max_reuse
        self.max_staleness = replay_config.max_staleness
        self.per_chunk = replay_config.fragments_per_chunk
        self.stall_timeout = stall_timeout        # 0: wait for fragments forever
        self.on_wait = on_wait                    # on_wait(seconds, why) while a fill waits
        self.chunks: list[_Chunk] = []            # oldest first
        self.partial: dict[str, _Partial] = {}    # slot -> chunk being assembled
        self.hot: dict[bytes, Fragment] = {}      # fragments read since the last sample (up to HOT_BYTES)
        self.hot_bytes = 0
        self.entry_bytes = 0                      # decoded size of the last fragment read
        self.rng = random.Random(seed)
        self.last_fresh = 0.0                     # when a usable fragment last arrived
        self.dropped_since = {"dropped_stale": 0, "dropped_corrupt": 0}

    @property
    def capacity(self) -> int:
        return self.max_chunks * self.per_chunk

    def held(self) -> int:
        """Fragments in sampleable chunks."""
        return sum(len(c.ids) for c in self.chunks)

    # -- filling ---------------------------------------------------------------------------------------
    def fill(self, n: int, version: int, should_stop) -> bool:
        """Read the stream until at least n fresh fragments can be sampled; False if should_stop() first.
        What the stream already holds is taken (up to the capacity; the oldest chunks make room), as the
        reference's buffer takes everything that arrives, in reads of at most READ_BYTES decoded bytes,
        so memory stays flat however many fragments are pending. Raises Stalled when no usable fragment
        arrived for stall_timeout seconds."""
        self._drop_stale(version)
        block_ms, taken, reported, started = None, 0, 0.0, time.monotonic()
        while True:
            if block_ms is not None and should_stop():  # asked before a wait; the caller asked before the call
                return False
            batch = max(1, min(self._batch(), self.capacity - taken))
            entries = self.consumer.read(batch, block_ms=block_ms)
            self._add(entries, version)
            taken += len(entries)
            if len(entries) == batch and taken < self.capacity:
                block_ms = None  # more is waiting: drain what the stream holds, a bounded read at a time
                continue
            if not entries and block_ms is not None:
                # Nothing arrived for a while: the producers may be blocked by a stream that partial chunks
                # fill (max_pending_fragments); those chunks are closed as they are rather than wait forever.
                for slot in list(self.partial):
                    part = self.partial.pop(slot)
                    self._close(_Chunk(part.ids, part.version))
            if self.held() >= n:
                return True
            waited = time.monotonic() - max(self.last_fresh, started)  # training between fills is no wait
            if self.stall_timeout and waited > self.stall_timeout:
                raise Stalled(f"no usable fragment for {waited:.0f}s (train_config.stall_timeout): "
                              f"{self._dropped_text()}")
            notice = min(WAIT_NOTICE_SECONDS, self.stall_timeout / 2) if self.stall_timeout else WAIT_NOTICE_SECONDS
            if self.on_wait is not None and waited >= notice and time.monotonic() - reported >= 2.0:
                reported = time.monotonic()
                self.on_wait(waited, self._dropped_text())
            block_ms = 200

    def _dropped_text(self) -> str:
        d = self.dropped_since
        return (f"{d['dropped_stale']} dropped as stale (older than max_staleness), {d['dropped_corrupt']} as "
                f"corrupt since the last usable one")

    def _batch(self) -> int:
        """Entries per read: READ_BYTES worth of fragments of the size seen last (one until a size is known),
        at most READ_MAX."""
        if not self.entry_bytes:
            return 1
        return max(1, min(READ_MAX, READ_BYTES // self.entry_bytes))

    def _add(self, entries: list[tuple[bytes, dict]], version: int) -> None:
        """Check what was read, retire the corrupt and the stale, and chunk the rest."""
        corrupt, stale = [], []
        fresh = []
        for entry_id, tree in entries:
            try:
                fragment = self.checker.check(tree)
            except CodecError as exc:
                log_corrupt(entry_id, str(exc))
                corrupt.append(entry_id)
                continue
            self.entry_bytes = _nbytes(fragment)
            if version - fragment.version_first > self.max_staleness:
                stale.append(entry_id)
                continue
            fresh.append((entry_id, fragment))
        self.dropped_since["dropped_corrupt"] += self.consumer.retire(corrupt, "dropped_corrupt")
        self.dropped_since["dropped_stale"] += self.consumer.retire(stale, "dropped_stale")
        if not fresh:
            return
        self.last_fresh = time.monotonic()
        self.dropped_since = {"dropped_stale": 0, "dropped_corrupt": 0}
        # Entries a dead trainer had used keep their count; they come back through reclaim, as this consumer's
        # pending entries. An entry delivered for the first time has none: no round trip to look.
        earlier = {}
        if self.consumer.redelivered:
            used = self.client.hmget(self.keys.uses, [i for i, _ in fresh])
            earlier = {i: int(u) for (i, _), u in zip(fresh, used) if u is not None}
        for entry_id, fragment in fresh:
            size = _nbytes(fragment)
            if self.hot_bytes + size <= HOT_BYTES:
                self.hot[entry_id] = fragment
                self.hot_bytes += size
            if self.per_chunk == 1:
                self._close(_Chunk([entry_id], fragment.version_first, earlier.get(entry_id, 0)))
                continue
            slot = fragment.slot
            part = self.partial.get(slot)
            if part is not None and (fragment.seq != part.last_seq + 1 or not fragment.contiguous):
                self._close(_Chunk(part.ids, part.version))  # the slot's stream broke: a shorter chunk
                part = None
            if part is None:
                part = self.partial[slot] = _Partial(version=fragment.version_first)
            part.ids.append(entry_id)
            part.last_seq = fragment.seq
            if len(part.ids) == self.per_chunk:
                del self.partial[slot]
                self._close(_Chunk(part.ids, part.version, max(earlier.get(i, 0) for i in part.ids)))

    def _close(self, chunk: _Chunk) -> None:
        while len(self.chunks) >= self.max_chunks:
            self._retire([self.chunks.pop(0)])
        if chunk.uses >= self.max_reuse:
            self._retire([chunk])
        else:
            self.chunks.append(chunk)

    # -- sampling --------------------------------------------------------------------------------------
    def sample(self, n: int, version: int) -> tuple[list[_Chunk], list[Fragment]]:
        """At least n fragments (whole chunks, chosen uniformly without replacement) that are fresh now, and
        their chunks (for used())."""
        self._drop_stale(version)
        order = self.rng.sample(range(len(self.chunks)), len(self.chunks))
        picked, total = [], 0
        for k in order:
            if total >= n:
                break
            picked.append(self.chunks[k])
            total += len(self.chunks[k].ids)
        ids = [i for c in picked for i in c.ids]
        fragments = {i: self.hot[i] for i in ids if i in self.hot}
        missing = [i for i in ids if i not in fragments]
        if missing:  # pushed out of the hot set by its byte budget: read again, and checked again
            pipe = self.client.pipeline(transaction=False)
            for i in missing:
                pipe.xrange(self.keys.fragments, min=i, max=i)
            for i, found in zip(missing, pipe.execute()):
                fragments[i] = self._reread(i, found)
        self.hot.clear()
        self.hot_bytes = 0
        gone = {i for i in ids if fragments[i] is None}
        if gone:  # lost with the Redis data (e.g. the last second before a crash under AOF everysec)
            log.warning("%d sampled fragments are no longer in Redis; skipping them", len(gone))
            for c in picked:
                c.ids = [i for i in c.ids if i not in gone]
            self.chunks = [c for c in self.chunks if c.ids]
            ids = [i for i in ids if i not in gone]
        return picked, [fragments[i] for i in ids]

    def _reread(self, entry_id: bytes, found) -> Fragment | None:
        if not found:
            return None
        try:
            return self.checker.check(decode(found[0][1][b"f"]))
        except (CodecError, KeyError, TypeError) as exc:  # it passed once: Redis was changed under us
            log_corrupt(entry_id, str(exc))
            self.consumer.retire([entry_id], "dropped_corrupt")
            return None

    def used(self, picked: list[_Chunk]) -> None:
        """Count one use of each picked chunk (after its update); retire the ones used max_reuse times."""
        pipe = self.client.pipeline(transaction=False)
        for c in picked:
            c.uses += 1
            if c.uses < self.max_reuse:  # a chunk retired now needs no count: retiring forgets it
                for i in c.ids:
                    pipe.hincrby(self.keys.uses, i, 1)
        reused = sum(len(c.ids) for c in picked if c.uses > 1)
        if reused:
            pipe.hincrby(self.keys.ledger, "reused", reused)
        pipe.execute()  # empty with max_reuse 1 (cartpole): no round trip, only the retirement's below
        self.chunks = [c for c in self.chunks if c.uses < self.max_reuse]
        self._retire([c for c in picked if c.uses >= self.max_reuse])

    # -- retiring --------------------------------------------------------------------------------------
    def _drop_stale(self, version: int) -> None:
        stale = [c for c in self.chunks if version - c.version > self.max_staleness]
        if stale:
            self.chunks = [c for c in self.chunks if version - c.version <= self.max_staleness]
            self._retire(stale)

    def _retire(self, chunks: list[_Chunk]) -> None:
        """Retire chunks: those used at least once as consumed, the others as dropped_stale, each outcome in one
        script call (cartpole's 16 chunks an iteration, retired one by one, kept its learner waiting on Redis round
        trips for 7 % of its wall time)."""
        for outcome, used in (("consumed", True), ("dropped_stale", False)):
            ids = [i for c in chunks if bool(c.uses) == used for i in c.ids]
            if ids:
                self.consumer.retire(ids, outcome)
        for i in (i for c in chunks for i in c.ids):
            fragment = self.hot.pop(i, None)
            if fragment is not None:
                self.hot_bytes -= _nbytes(fragment)


def _nbytes(tree) -> int:
    if isinstance(tree, Fragment):
        return sum(_nbytes(getattr(tree, k)) for k in ("obs", "action", "next_obs", "in_state", "reward"))
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return getattr(tree, "nbytes", 8)
