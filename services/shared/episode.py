"""The episode record: one finished episode, as a rollout worker writes it to the session's episode stream
and as the launcher (progress), the trainer (logs) and RolloutService/WatchEpisodes read it. The one owner
of its fields, its encoding (msgpack, never pickle) and its validation: an entry that is not a valid record
is skipped by every reader."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields

import msgpack
import redis

from services.shared import achievements, keys

log = logging.getLogger(__name__)
KEPT = 10_000  # entries the episode stream keeps (approximately: XADD MAXLEN ~)
RECENT = 20    # the newest episodes a "mean return" is taken over (GetSession, TrainerService, mso run)


@dataclass
class Episode:
    episode_return: float
    discounted_return: float    # with train_config.discount
    length: int
    truncated: bool             # ended by a time limit rather than a termination
    task: str = ""              # obs["task"] when the env reports one
    video: str = ""             # the mp4 of this episode, when it was recorded
    stats: dict[str, float] = field(default_factory=dict)  # the env's info["episode_stats"] (Crafter's achievements)
    version: int = 0            # the model version that acted at its end
    slot: str = ""              # the env slot that played it
    worker: int = 0


FIELDS = [f.name for f in fields(Episode)]


def encode(e: Episode) -> bytes:
    """The record's bytes in its entry (a field map; dataclasses.asdict, which deep-copies, took 8.5 us a record
    of the hundreds a second a CartPole worker ends, this 1.5)."""
    return msgpack.packb({name: getattr(e, name) for name in FIELDS})


def _valid(e: Episode) -> bool:
    numbers_ok = all(isinstance(getattr(e, k), (int, float)) and not isinstance(getattr(e, k), bool)
                     for k in ("episode_return", "discounted_return", "length", "version", "worker"))
    return (numbers_ok and math.isfinite(e.episode_return) and isinstance(e.truncated, bool)
            and isinstance(e.task, str) and isinstance(e.video, str) and isinstance(e.slot, str)
            and isinstance(e.stats, dict) and all(isinstance(k, str) and isinstance(v, (int, float))
                                                  for k, v in e.stats.items()))


def decode(raw) -> Episode | None:
    """The record in an entry's bytes, or None when they are not a valid one."""
    try:
        record = Episode(**msgpack.unpackb(raw))
    except Exception:
        return None
    return record if _valid(record) else None


def append(pipe: redis.client.Pipeline, session_id: str, episodes: list[Episode]) -> None:
    """Queue the records on pipe, with the session's episode counter."""
    stream = keys.SessionKeys(session_id).episodes
    for e in episodes:
        pipe.xadd(stream, {b"e": encode(e)}, maxlen=KEPT, approximate=True)
    pipe.hincrby(keys.SessionKeys(session_id).ledger, "episodes", len(episodes))
    achievements.count(pipe, session_id, [e.stats for e in episodes])


def entries(reply) -> list[tuple[str, Episode]]:
    """(entry id, record) of the valid records in an XRANGE/XREAD reply's entries."""
    out = []
    for entry_id, raw in reply:
        record = decode(raw.get(b"e")) if raw else None
        if record is not None:
            out.append((entry_id.decode(), record))
    return out


def latest(client: redis.Redis, session_id: str, count: int) -> list[Episode]:
    """The newest `count` valid records, newest first."""
    return [e for _i, e in entries(client.xrevrange(keys.SessionKeys(session_id).episodes, count=count))]


def after(client: redis.Redis, session_id: str, last_id: str) -> list[tuple[str, Episode]]:
    """The records after entry last_id ("" for all), oldest first."""
    return entries(client.xrange(keys.SessionKeys(session_id).episodes, min=f"({last_id}" if last_id else "-"))


def follow(client: redis.Redis, session_id: str, last_id: str, block_ms: int) -> list[tuple[str, Episode]]:
    """The records after last_id ("$": from now on), waiting up to block_ms for the first."""
    reply = client.xread({keys.SessionKeys(session_id).episodes: last_id}, block=block_ms, count=100)
    return [item for _stream, es in reply or [] for item in entries(es)]
