"""The peer of measure 6: Stable-Baselines3's PPO on CartPole-v1 with the rl-baselines3-zoo hyper-parameters,
timed like `mso run`: from this process's creation (imports included) to a mean return of 475 over the last
20 finished episodes. Run as a fresh process by benchmarks/learning.py when stable-baselines3 is installed
(pip install -e '.[bench]'); prints one JSON line.

    python -m benchmarks.sb3_cartpole [--seed 1] [--target 475]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque

from services.shared import process_start

STARTED = process_start.wall_time()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", type=float, default=475.0)
    parser.add_argument("--max-steps", type=int, default=300_000)
    args = parser.parse_args(argv)

    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)

    class UntilReturn(BaseCallback):
        def __init__(self):
            super().__init__()
            self.returns, self.reached, self.first_episode = deque(maxlen=20), None, None

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.first_episode = self.first_episode or time.time() - STARTED
                    self.returns.append(info["episode"]["r"])
            if len(self.returns) == 20 and sum(self.returns) / 20 >= args.target:
                self.reached = (time.time() - STARTED, self.num_timesteps)
                return False
            return True

    def linear(start: float):
        return lambda remaining: remaining * start

    # rl-baselines3-zoo's hyperparams/ppo.yml, CartPole-v1
    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                learning_rate=linear(0.001), clip_range=linear(0.2), seed=args.seed, device="cpu", verbose=0)
    until = UntilReturn()
    model.learn(total_timesteps=args.max_steps, callback=until)
    result = {"seconds_to_target": until.reached[0] if until.reached else None,
              "env_steps": until.reached[1] if until.reached else model.num_timesteps,
              "first_episode_seconds": until.first_episode}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
