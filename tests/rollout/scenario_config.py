"""A config module for rollout tests. Stand-ins, named as such: CountingEnv stands in for a simulator
(its observations count, so alignment can be checked exactly) and VersionPolicy for a trained model (its
action is its weights' version, and its recurrent state counts steps since the episode began).

MSO_TEST_FAULT="crash:N" | "die:N" | "hang:N" | "malformed:N" makes ONE env process (the first to claim a
marker in MSO_TEST_FAULT_DIR) raise, exit, hang, or return a wrongly shaped observation at its N-th step
of every env instance it builds; with MSO_TEST_FAULT_ENVS=N only the first N instances it builds are faulty
(with several envs per process: one env of the process, not its process-mates or its own rebuild).
MSO_TEST_STEP_MS="LO,HI" makes every step take between LO and HI ms, uneven like Minecraft's ticks.
"""

import os
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from services.shared.policy import CategoricalHead, ValueHead

EPISODE_LENGTH = 5
N_ACTIONS = 4
_claimed = None
_built = 0  # CountingEnv instances this process has built


def _is_faulty() -> bool:
    global _claimed
    if _claimed is None:
        folder = os.environ.get("MSO_TEST_FAULT_DIR")
        try:
            os.close(os.open(os.path.join(folder, "claimed"), os.O_CREAT | os.O_EXCL)) if folder else None
            _claimed = bool(folder)
        except FileExistsError:
            _claimed = False
    return _claimed


class CountingEnv(gym.Env):
    """Observation g counts every observation the agent sees; k counts steps within the episode.
    The reward of acting on observation g is g; episodes terminate after EPISODE_LENGTH steps."""

    def __init__(self):
        global _built
        self.g, self.k, self.steps = -1, 0, 0
        self.rng = np.random.default_rng()  # its own: forked env processes share the global one's state
        kind, _, n = os.environ.get("MSO_TEST_FAULT", "").partition(":")
        limit = int(os.environ.get("MSO_TEST_FAULT_ENVS", 0)) or None
        self.fault = (kind, int(n)) if kind and _is_faulty() and (limit is None or _built < limit) else None
        _built += 1

    def _obs(self):
        return {"g": np.array([self.g], dtype=np.int64), "k": np.array([self.k], dtype=np.int64),
                "image": np.full((6, 8, 3), self.g % 256, dtype=np.uint8)}

    def reset(self, seed=None, options=None):
        self.g += 1
        self.k = 0
        return self._obs(), {}

    def step(self, action):
        self.steps += 1
        if os.environ.get("MSO_TEST_STEP_MS"):
            lo, hi = (float(ms) / 1000 for ms in os.environ["MSO_TEST_STEP_MS"].split(","))
            time.sleep(self.rng.uniform(lo, hi))
        if self.fault and self.steps == self.fault[1]:
            if self.fault[0] == "crash":
                raise RuntimeError("stand-in simulator crash")
            if self.fault[0] == "die":
                os._exit(3)
            if self.fault[0] == "malformed":
                return {"g": np.zeros(3), "k": np.array([0])}, 0.0, False, False, {}
            time.sleep(3600)
        reward = float(self.g)
        self.k += 1
        if self.k == EPISODE_LENGTH:
            return {"g": np.array([-1]), "k": np.array([-1]), "image": np.zeros((6, 8, 3), np.uint8)}, \
                reward, True, False, {}
        self.g += 1
        return self._obs(), reward, False, False, {}


class VersionPolicy(nn.Module):
    """Acts `version % N_ACTIONS` with certainty; state = steps taken since the episode's first obs."""

    def __init__(self):
        super().__init__()
        self.version = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.body = nn.Linear(1, 8)
        self.pi_head = CategoricalHead(8, N_ACTIONS)
        self.value_head = ValueHead(8)

    def initial_state(self, batch_size=None):
        return [torch.zeros(batch_size or 1, 1)]

    def merge_state(self, states):
        return [torch.cat([s[0] for s in states])]

    def split_state(self, state, n):
        return [[state[0][i:i + 1]] for i in range(n)]

    @property
    def device(self):
        return self.version.device

    def forward(self, input, state_in=None, context=None):
        g = input["g"].float()
        b, t = g.shape[:2]
        count = (state_in or self.initial_state(b))[0].clone()
        first = context["first"] if context else torch.zeros(b, t, dtype=torch.bool)
        counts = []
        for i in range(t):
            count = torch.where(first[:, i:i + 1], torch.zeros_like(count), count)
            counts.append(count.clone())
            count = count + 1
        hidden = torch.tanh(self.body(g))
        logits = torch.full((b, t, N_ACTIONS), -30.0)
        logits[..., int(self.version.item()) % N_ACTIONS] = 0.0
        return {"pi_logits": torch.log_softmax(logits + 0 * self.pi_head(hidden), -1),
                "vpred": self.value_head(hidden), "count": torch.stack(counts, 1)}, [count]


def env_generator():
    return CountingEnv()


def policy_generator():
    return VersionPolicy()


online_dict = {
    "rollout_config": {
        "num_rollout_workers": 1, "num_gpus_per_worker": 0, "num_cpus_per_worker": 0.1, "fragment_length": 4,
        "worker_config": {"num_envs": 2, "batch_size": 2, "restart_interval": None, "env_timeout": 30},
        "replay_buffer_config": {"max_staleness": 1000},
        "max_pending_fragments": 10000,
    },
    "train_config": {"num_workers": 1, "num_gpus_per_worker": 0, "use_normalized_vf": False,
                     "record_video_interval": 0, "kl_divergence_coef_rho": 0.0, "batch_size_per_gpu": 2,
                     "batches_per_iteration": 1, "gradient_accumulation": 1},
}
