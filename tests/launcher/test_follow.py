"""What `mso run` reports of a session's returns, on a real redis-server: a milestone is timed to the episode
that reached it, not to the poll that saw it, with the env steps of that moment; a peak between two polls
counts."""

import time

from services.launcher.follow import Returns
from services.shared import episode, keys
from services.shared.episode import Episode


def add(client, sid: str, returns: list[float], at_ms: int) -> None:
    """Episode records with these returns, their entries stamped at_ms, at_ms + 1, ... (Redis time)."""
    for i, r in enumerate(returns):
        client.xadd(keys.SessionKeys(sid).episodes, {b"e": episode.encode(Episode(r, r, int(r), False))},
                    id=f"{at_ms + i}-0")


def test_a_milestone_is_timed_to_the_episode_that_reached_it_with_the_env_steps_then(redis_client):
    started_at = time.time() - 10.0
    returns = Returns(redis_client, "s1", started_at, [195.0, 475.0])
    returns.polled = (started_at + 4.0, 40_000)  # the previous poll: 4 s in, 40 k env steps
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    # 20 episodes ending 3 s ago (6.98-7.0 s in) make the mean 500; polled now (~10 s in, 100 k env steps).
    add(redis_client, "s1", [500.0] * 20, now_ms - 3000 - 19)
    returns.update(100_000)
    assert abs(returns.seconds["475.0"] - 7.0) < 0.1 and abs(returns.seconds["195.0"] - returns.seconds["475.0"]) < 0.1
    # at 7 s of the 4-10 s between the polls, half of the 60 k env steps they counted
    assert abs(returns.env_steps["475.0"] - 70_000) < 2_000, returns.env_steps
    assert returns.best == 500.0


def test_a_peak_between_two_polls_is_seen(redis_client):
    returns = Returns(redis_client, "s2", time.time(), [475.0])
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    # the mean of the newest 20 reaches 480 at the 20th episode, then falls to 22 by the poll
    add(redis_client, "s2", [480.0] * 20 + [22.0] * 20, now_ms - 100)
    returns.update(5_000)
    assert returns.best == 480.0 and "475.0" in returns.seconds
    assert sum(returns.recent) / len(returns.recent) == 22.0
