"""Achievements across a session's episodes and the Crafter score over them, counted where the episode
records are written (episode.append), so the launcher's progress, the trainer's logs and the benchmark all
read the same numbers.

An env reports achievements as info["episode_stats"]["achievement_<name>"] (1 unlocked in the episode, 0
not) at an episode's end, every achievement in every episode (Crafter's 22), so one never unlocked counts.
The score is the Crafter paper's (Hafner 2021, crafter/analysis): the success rate of achievement i is the
percentage of all episodes so far in which it was unlocked at least once, and

    score = exp(mean_i ln(1 + s_i)) - 1        (in %; a geometric mean that rewards rare achievements)
"""

from __future__ import annotations

import math

import redis

from services.shared import keys

PREFIX = "achievement_"
EPISODES = "episodes"  # the hash's count of episodes that reported achievements


def unlocked(stats: dict[str, float]) -> dict[str, int]:
    """The achievements an episode's stats report, each 1 (unlocked) or 0; {} for an episode that reports none."""
    return {k[len(PREFIX):]: 1 if v > 0 else 0 for k, v in stats.items() if k.startswith(PREFIX)}


def count(pipe: redis.client.Pipeline, session_id: str, stats: list[dict[str, float]]) -> None:
    """Queue on pipe the counts of the episodes whose stats report achievements."""
    key = keys.SessionKeys(session_id).achievements
    for s in stats:
        hits = unlocked(s)
        if not hits:
            continue
        pipe.hincrby(key, EPISODES, 1)
        for name, hit in hits.items():
            pipe.hincrby(key, PREFIX + name, hit)  # an increment of 0 still creates the field: it counts as 0 %


def success_rates(client: redis.Redis, session_id: str) -> tuple[int, dict[str, float]]:
    """(episodes that reported achievements, {achievement: % of them that unlocked it})."""
    raw = {}
    for k, v in client.hgetall(keys.SessionKeys(session_id).achievements).items():
        try:
            raw[k.decode()] = int(v)
        except ValueError:  # not a count this module wrote: skipped, as every reader skips a corrupt entry
            continue
    episodes = raw.pop(EPISODES, 0)
    if episodes <= 0:
        return 0, {}
    return episodes, {k[len(PREFIX):]: 100.0 * min(max(v, 0), episodes) / episodes
                      for k, v in sorted(raw.items()) if k.startswith(PREFIX)}


def score(rates: dict[str, float]) -> float:
    """The Crafter score (%) of success rates in %; NaN when there are none."""
    if not rates:
        return float("nan")
    return math.exp(sum(math.log1p(r) for r in rates.values()) / len(rates)) - 1
