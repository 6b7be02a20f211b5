"""Crafter learns through the real services what random play does not: `mso run crafter --until-steps`
from a cold interpreter, against uniformly random actions played in the same test."""

import json
import math
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from configs.crafter import CrafterEnv

EPISODES = 20  # mso run's summary reports the mean return of the last 20 episodes: the same statistic
STEPS = 100_000
SIGMAS = 4


def random_play(seed: int) -> list[float]:
    """The returns of EPISODES episodes of uniformly random actions."""
    env, rng, returns = CrafterEnv(), np.random.default_rng(seed), []
    for i in range(EPISODES):
        env.reset(seed=seed * 1000 + i)
        total, done = 0.0, False
        while not done:
            _obs, reward, terminated, truncated, _info = env.step(rng.integers(17))
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return returns


def test_a_short_crafter_run_returns_more_than_random_play_beyond_its_noise(tmp_path):
    """The trained policy's mean return over its last 20 episodes must exceed what random play's 20-episode
    mean reaches by chance: random play's mean over 80 episodes plus 4 standard errors of a 20-episode mean
    (its episodes' standard deviation / sqrt(20)). Random play: mean ~1.5, sd ~1.2, so a bar of ~2.6; mso at
    100 k env steps returns ~3.5-3.8. The old bar (the best of four random 20-episode means plus their range)
    swung with two noisy numbers, and at 60 k steps (returns ~2.5-3.2) the run cleared it only by chance."""
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "run", "crafter", f"--until-steps={STEPS}",
                           "--port=0", "--quiet", f"--summary={summary}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(summary.read_text())
    with ProcessPoolExecutor(2) as pool:
        randoms = [r for run in pool.map(random_play, range(4)) for r in run]
    bar = statistics.mean(randoms) + SIGMAS * statistics.stdev(randoms) / math.sqrt(EPISODES)
    print(f"\ncrafter after {s['env_steps']} env steps: mean return {s['mean_return']:.2f}, score {s['score']:.2f}%; "
          f"random play over {len(randoms)} episodes: mean {statistics.mean(randoms):.2f}, "
          f"sd {statistics.stdev(randoms):.2f}; bar {bar:.2f}")
    assert s["env_steps"] >= STEPS and s["scored_episodes"] > 300
    assert len(s["success_rates"]) == 22  # every achievement counts, unlocked or not
    assert s["mean_return"] > bar, (s["mean_return"], bar)
