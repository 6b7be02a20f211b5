"""A Minecraft-shaped stand-in (named as such: no Minecraft engine here): each step takes 50 ms (20 FPS,
like MinecraftSim) +/- jitter, observations are 128x128x3 frames; the policy is a small CNN on the CPU."""

import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from services.shared.policy import CategoricalHead, StatelessPolicy, ValueHead

STEP_SECONDS = 0.05


class SlowFrameEnv(gym.Env):
    def __init__(self):
        self.rng = np.random.default_rng()
        self.frame = self.rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
        self.t = 0

    def reset(self, seed=None, options=None):
        self.t = 0
        return {"image": self.frame}, {}

    def step(self, action):
        time.sleep(STEP_SECONDS * self.rng.uniform(0.6, 1.4))  # the engine's tick, uneven like a real one
        self.t += 1
        return {"image": self.frame}, 0.0, self.t >= 200, False, {}


class SmallCnnPolicy(StatelessPolicy):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 8, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=4),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.pi_head = CategoricalHead(128, 8)
        self.value_head = ValueHead(128)

    def forward(self, input, state_in=None, **kwargs):
        image = input["image"]
        b, t = image.shape[:2]
        x = self.body(image.reshape(b * t, *image.shape[2:]).permute(0, 3, 1, 2).float() / 255).reshape(b, t, -1)
        return {"pi_logits": self.pi_head(x), "vpred": self.value_head(x)}, []


def env_generator():
    return SlowFrameEnv()


def policy_generator():
    torch.set_num_threads(1)
    return SmallCnnPolicy()


online_dict = {
    "rollout_config": {"num_rollout_workers": 1, "num_gpus_per_worker": 0, "fragment_length": 64,
                       "worker_config": {"num_envs": 8, "batch_size": 8, "restart_interval": None},
                       "max_pending_fragments": 10000},
    "train_config": {"num_workers": 1, "num_gpus_per_worker": 0, "use_normalized_vf": False},
}
