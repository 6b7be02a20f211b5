"""Crafter learns through the real services what random play does not: `mso run crafter --until-steps`
from a cold interpreter, against uniformly random actions played in the same test."""

import json
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from configs.crafter import CrafterEnv

EPISODES = 20  # mso run's summary reports the mean return of the last 20 episodes: the same statistic


def random_play(seed: int) -> float:
    """Mean return of EPISODES episodes of uniformly random actions."""
    env, rng, returns = CrafterEnv(), np.random.default_rng(seed), []
    for i in range(EPISODES):
        env.reset(seed=seed * 1000 + i)
        total, done = 0.0, False
        while not done:
            _obs, reward, terminated, truncated, _info = env.step(rng.integers(17))
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def test_a_short_crafter_run_returns_more_than_random_play_beyond_its_spread(tmp_path):
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "run", "crafter", "--until-steps=60000", "--port=0",
                           "--quiet", f"--summary={summary}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(summary.read_text())
    with ProcessPoolExecutor(2) as pool:
        randoms = list(pool.map(random_play, range(4)))
    # Random play's run-to-run spread of the same 20-episode mean; the trained policy must clear the best
    # random run by at least that spread again.
    spread = max(randoms) - min(randoms)
    print(f"\ncrafter after {s['env_steps']} env steps: mean return {s['mean_return']:.2f}, score {s['score']:.2f}%; "
          f"random play {', '.join(f'{r:.2f}' for r in randoms)} (mean {statistics.mean(randoms):.2f})")
    assert s["env_steps"] >= 60000 and s["scored_episodes"] > 200
    assert len(s["success_rates"]) == 22  # every achievement counts, unlocked or not
    assert s["mean_return"] > max(randoms) + spread, (s["mean_return"], randoms)
