"""Achievements counted where episode records are written, and the Crafter score over them exactly as the
Crafter paper's analysis computes it."""

import math

from services.shared import achievements, episode
from services.shared.episode import Episode
from services.shared.keys import SessionKeys


def test_score_is_the_papers_geometric_mean_of_one_plus_the_success_rates():
    assert math.isclose(achievements.score({"a": 100.0, "b": 0.0}), math.sqrt(101) - 1)
    assert math.isclose(achievements.score({"a": 7.0, "b": 7.0, "c": 7.0}), 7.0)
    assert achievements.score({k: 0.0 for k in "abc"}) == 0.0
    assert math.isnan(achievements.score({}))


def test_every_episode_counts_and_an_achievement_never_unlocked_counts_as_zero(redis_client):
    def ep(**unlocked):
        return Episode(1.0, 1.0, 10, False, stats={f"achievement_{k}": v for k, v in unlocked.items()})

    pipe = redis_client.pipeline()
    episode.append(pipe, "s1", [ep(collect_wood=1, eat_cow=0), ep(collect_wood=3, eat_cow=0)])
    episode.append(pipe, "s1", [ep(collect_wood=0, eat_cow=0), ep(collect_wood=1, eat_cow=0)])
    episode.append(pipe, "s1", [Episode(5.0, 5.0, 10, False, stats={"distance": 3.0})])  # reports none
    pipe.execute()

    episodes, rates = achievements.success_rates(redis_client, "s1")
    assert episodes == 4
    assert rates == {"collect_wood": 75.0, "eat_cow": 0.0}
    assert math.isclose(achievements.score(rates), math.sqrt(76 * 1) - 1)
    assert achievements.success_rates(redis_client, "other") == (0, {})


def test_a_corrupt_count_is_skipped_not_trusted(redis_client):
    key = SessionKeys("s2").achievements
    redis_client.hset(key, mapping={"episodes": 4, "achievement_a": 2, "achievement_b": "rm -rf", "achievement_c": 99})
    episodes, rates = achievements.success_rates(redis_client, "s2")
    assert episodes == 4 and rates == {"a": 50.0, "c": 100.0}  # b skipped; c capped at every episode
