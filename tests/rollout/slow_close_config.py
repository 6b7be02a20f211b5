"""A config module whose env takes CLOSE_SECONDS to close: a stand-in for a simulator that is slow to shut down
(MineRL's close stops a Java process), for the rollout node's Stop. Its policy is a stand-in too."""

import time

import gymnasium as gym
import numpy as np
from torch import nn

from services.shared.policy import CategoricalHead, StatelessPolicy, ValueHead

CLOSE_SECONDS = 1.5


class SlowCloseEnv(gym.Env):
    """Episodes of zeros that never end; close() takes CLOSE_SECONDS."""

    def reset(self, seed=None, options=None):
        return {"obs": np.zeros(2, dtype=np.float32)}, {}

    def step(self, action):
        return {"obs": np.zeros(2, dtype=np.float32)}, 0.0, False, False, {}

    def close(self):
        time.sleep(CLOSE_SECONDS)


class TinyPolicy(StatelessPolicy):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 8)
        self.pi_head = CategoricalHead(8, 2)
        self.value_head = ValueHead(8)

    def forward(self, input, state_in=None, **kwargs):
        x = self.body(input["obs"].float())
        return {"pi_logits": self.pi_head(x), "vpred": self.value_head(x)}, []


def env_generator():
    return SlowCloseEnv()


def policy_generator():
    return TinyPolicy()


online_dict = {
    "rollout_config": {
        "num_rollout_workers": 2, "num_gpus_per_worker": 0, "num_cpus_per_worker": 0.1, "fragment_length": 4,
        "worker_config": {"num_envs": 3, "batch_size": 3, "envs_per_process": 1, "restart_interval": None},
        "max_pending_fragments": 10000,
    },
    "train_config": {"num_workers": 1, "num_gpus_per_worker": 0, "record_video_interval": 0},
}
