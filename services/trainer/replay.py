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
from dataclasses import dataclass, field

from mso import keys
from mso.codec import CodecError, decode
from mso.queue import FragmentConsumer

log = logging.getLogger(__name__)

FRAGMENT_FIELDS = ("obs", "action", "reward", "first", "next_done", "next_truncated", "truncation_value", "logp",
                   "model_version", "in_state", "next_obs", "slot", "seq", "contiguous", "version_first",
                   "session_id")


def check_fragment(fragment, session_id: str, length: int) -> None:
    """Refuse a decoded entry that is not a fragment of this session with fragment_length steps."""
    if not isinstance(fragment, dict):
        raise CodecError(f"fragment is a {type(fragment).__name__}, not a dict")
    missing = [f for f in FRAGMENT_FIELDS if f not in fragment]
    if missing:
        raise CodecError(f"fragment lacks {', '.join(missing)}")
    if fragment["session_id"] != session_id:
        raise CodecError(f"fragment of session {fragment['session_id']!r} in session {session_id!r}")
    for name in ("reward", "first", "next_done", "next_truncated", "truncation_value", "logp", "model_version"):
        shape = getattr(fragment[name], "shape", None)
        if shape != (length,):
            raise CodecError(f"fragment field {name} has shape {shape}, expected ({length},)")


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
                 seed: int = 0):
        self.consumer, self.client = consumer, consumer.client
        self.session_id, self.length = session_id, fragment_length
        self.keys = keys.SessionKeys(session_id)
        self.max_chunks = replay_config.max_chunks
        self.max_reuse = replay_config.max_reuse
        self.max_staleness = replay_config.max_staleness
        self.per_chunk = replay_config.fragments_per_chunk
        self.chunks: list[_Chunk] = []            # oldest first
        self.partial: dict[str, _Partial] = {}    # slot -> chunk being assembled
        self.hot: dict[bytes, dict] = {}          # decoded payloads read since the last sample
        self.rng = random.Random(seed)

    @property
    def capacity(self) -> int:
        return self.max_chunks * self.per_chunk

    def held(self) -> int:
        """Fragments in sampleable chunks."""
        return sum(len(c.ids) for c in self.chunks)

    # -- filling ---------------------------------------------------------------------------------------
    def fill(self, n: int, version: int, should_stop) -> bool:
        """Read the stream until at least n fresh fragments can be sampled; False if should_stop() first.
        What the stream already holds is taken at once (the oldest chunks make room), as the reference's
        buffer takes everything that arrives."""
        self._drop_stale(version)
        block_ms = None  # the first read only drains what is there
        while True:
            entries = self.consumer.read(max(n - self.held(), self.capacity), block_ms=block_ms)
            self._add(entries, version)
            if not entries and block_ms is not None:
                # Nothing arrived for a while: the producers may be blocked by a stream that partial chunks
                # fill (max_pending_fragments); those chunks are closed as they are rather than wait forever.
                for slot in list(self.partial):
                    part = self.partial.pop(slot)
                    self._close(_Chunk(part.ids, part.version))
            if self.held() >= n:
                return True
            if should_stop():
                return False
            block_ms = 200

    def _add(self, entries: list[tuple[bytes, dict]], version: int) -> None:
        corrupt, stale = [], []
        fresh = []
        for entry_id, fragment in entries:
            try:
                check_fragment(fragment, self.session_id, self.length)
            except CodecError as exc:
                log.warning("dropping malformed fragment %s: %s", entry_id, exc)
                corrupt.append(entry_id)
                continue
            if version - fragment["version_first"] > self.max_staleness:
                stale.append(entry_id)
                continue
            fresh.append((entry_id, fragment))
        self.consumer.retire(corrupt, "dropped_corrupt")
        self._retire(stale, "dropped_stale")
        if not fresh:
            return
        # Entries a dead trainer had used keep their count (they come back through reclaim).
        used = self.client.hmget(self.keys.uses, [i for i, _ in fresh])
        earlier = {i: int(u) for (i, _), u in zip(fresh, used) if u is not None}
        for entry_id, fragment in fresh:
            self.hot[entry_id] = fragment
            if self.per_chunk == 1:
                self._close(_Chunk([entry_id], fragment["version_first"], earlier.get(entry_id, 0)))
                continue
            slot = str(fragment["slot"])
            part = self.partial.get(slot)
            if part is not None and (fragment["seq"] != part.last_seq + 1 or not fragment["contiguous"]):
                self._close(_Chunk(part.ids, part.version))  # the slot's stream broke: a shorter chunk
                part = None
            if part is None:
                part = self.partial[slot] = _Partial(version=fragment["version_first"])
            part.ids.append(entry_id)
            part.last_seq = fragment["seq"]
            if len(part.ids) == self.per_chunk:
                del self.partial[slot]
                self._close(_Chunk(part.ids, part.version, max(earlier.get(i, 0) for i in part.ids)))

    def _close(self, chunk: _Chunk) -> None:
        while len(self.chunks) >= self.max_chunks:
            self._retire_chunk(self.chunks.pop(0))
        if chunk.uses >= self.max_reuse:
            self._retire_chunk(chunk)
        else:
            self.chunks.append(chunk)

    # -- sampling --------------------------------------------------------------------------------------
    def sample(self, n: int, version: int) -> tuple[list[_Chunk], list[bytes], list[dict]]:
        """At least n fragments (whole chunks, chosen uniformly without replacement) that are fresh now."""
        self._drop_stale(version)
        order = self.rng.sample(range(len(self.chunks)), len(self.chunks))
        picked, total = [], 0
        for k in order:
            if total >= n:
                break
            picked.append(self.chunks[k])
            total += len(self.chunks[k].ids)
        ids = [i for c in picked for i in c.ids]
        missing = [i for i in ids if i not in self.hot]
        if missing:
            pipe = self.client.pipeline(transaction=False)
            for i in missing:
                pipe.xrange(self.keys.fragments, min=i, max=i)
            for i, found in zip(missing, pipe.execute()):
                self.hot[i] = decode(found[0][1][b"f"]) if found else None
        fragments = [self.hot[i] for i in ids]
        self.hot.clear()
        gone = [i for i, f in zip(ids, fragments) if f is None]
        if gone:  # lost with the Redis data (e.g. the last second before a crash under AOF everysec)
            log.warning("%d sampled fragments are no longer in Redis; skipping them", len(gone))
            for c in picked:
                c.ids = [i for i in c.ids if i not in gone]
            self.chunks = [c for c in self.chunks if c.ids]
            keep = [k for k, f in enumerate(fragments) if f is not None]
            ids, fragments = [ids[k] for k in keep], [fragments[k] for k in keep]
        return picked, ids, fragments

    def used(self, picked: list[_Chunk]) -> None:
        """Count one use of each picked chunk (after its update); retire the ones used max_reuse times."""
        pipe = self.client.pipeline(transaction=False)
        for c in picked:
            c.uses += 1
            for i in c.ids:
                pipe.hincrby(self.keys.uses, i, 1)
        reused = sum(len(c.ids) for c in picked if c.uses > 1)
        if reused:
            pipe.hincrby(self.keys.ledger, "reused", reused)
        pipe.execute()
        done = [c for c in picked if c.uses >= self.max_reuse]
        self.chunks = [c for c in self.chunks if c.uses < self.max_reuse]
        for c in done:
            self._retire_chunk(c)

    # -- retiring --------------------------------------------------------------------------------------
    def _drop_stale(self, version: int) -> None:
        stale = [c for c in self.chunks if version - c.version > self.max_staleness]
        if stale:
            self.chunks = [c for c in self.chunks if version - c.version <= self.max_staleness]
            for c in stale:
                self._retire_chunk(c)

    def _retire_chunk(self, chunk: _Chunk) -> None:
        self._retire(chunk.ids, "consumed" if chunk.uses else "dropped_stale")
        for i in chunk.ids:
            self.hot.pop(i, None)

    def _retire(self, ids: list[bytes], outcome: str) -> None:
        if ids:
            self.consumer.retire(ids, outcome)
            self.client.hdel(self.keys.uses, *ids)
