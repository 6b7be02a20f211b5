"""Crafter (a 2-D Minecraft: 64x64 pixels, 17 actions, 22 achievements) with a small CNN+LSTM policy that
has MineStudio's MinePolicy interface. The pixel benchmark that runs on a laptop CPU."""

import crafter
import gymnasium as gym
import numpy as np
import torch
from torch import nn

from services.shared.policy import CategoricalHead, ValueHead


class CrafterEnv(gym.Env):
    """crafter.Env with gymnasium's API and MineStudio-style dict observations {"image": uint8 (64,64,3)}.
    Death is termination; the 10 000-step limit is truncation. At an episode's end, info["episode_stats"]
    holds the achievements unlocked, which the rollout service puts into the episode record."""

    observation_space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    action_space = gym.spaces.Discrete(17)

    def __init__(self):
        self.env = crafter.Env()

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.env = crafter.Env(seed=seed)
        return {"image": self.env.reset()}, {}

    def step(self, action):
        obs, reward, done, info = self.env.step(int(np.asarray(action).reshape(-1)[0]))
        terminated = done and info["discount"] == 0
        truncated = done and not terminated
        if done:
            info["episode_stats"] = {f"achievement_{k}": float(v > 0) for k, v in info["achievements"].items()}
        return {"image": obs}, float(reward), terminated, truncated, info


class CrafterPolicy(nn.Module):
    """Conv encoder -> LSTM -> categorical action head and EWMA-normalised value head."""

    def __init__(self, hidsize: int = 256, n_actions: int = 17):
        super().__init__()
        self.hidsize = hidsize
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 6 * 6, hidsize), nn.ReLU())
        self.lstm = nn.LSTMCell(hidsize, hidsize)
        self.pi_head = CategoricalHead(hidsize, n_actions)
        self.value_head = ValueHead(hidsize)

    @property
    def device(self):
        return next(self.parameters()).device

    def initial_state(self, batch_size=None):
        zeros = torch.zeros(batch_size or 1, self.hidsize, device=self.device)
        return [zeros, zeros.clone()]

    def merge_state(self, states):
        return [torch.cat([s[i] for s in states]) for i in range(2)]

    def split_state(self, state, n):
        return [[state[0][i:i + 1], state[1][i:i + 1]] for i in range(n)]

    def forward(self, input, state_in=None, context=None):
        image = input["image"]
        b, t = image.shape[:2]
        x = image.reshape(b * t, *image.shape[2:]).permute(0, 3, 1, 2).float() / 255.0
        features = self.encoder(x).reshape(b, t, -1)
        h, c = state_in if state_in else self.initial_state(b)
        first = context["first"] if context else torch.zeros(b, t, dtype=torch.bool, device=image.device)
        outputs = []
        for i in range(t):
            keep = (~first[:, i]).float().unsqueeze(-1)  # an episode start resets the memory, in training too
            h, c = self.lstm(features[:, i], (h * keep, c * keep))
            outputs.append(h)
        latent = torch.stack(outputs, 1)
        return {"pi_logits": self.pi_head(latent), "vpred": self.value_head(latent)}, [h, c]


def env_generator():
    return CrafterEnv()


def policy_generator():
    torch.set_num_threads(1)
    return CrafterPolicy()


online_dict = {
    "trainer_name": "PPOTrainer",
    "rollout_config": {
        "num_rollout_workers": 1,
        "num_gpus_per_worker": 0,
        "num_cpus_per_worker": 1,
        "fragment_length": 64,
        "to_send_queue_size": 8,
        "worker_config": {"num_envs": 8, "batch_size": 8, "restart_interval": None,
                          "video_fps": 10, "video_output_dir": "output/videos/crafter"},
        "replay_buffer_config": {"max_chunks": 16, "max_reuse": 1, "max_staleness": 2, "fragments_per_chunk": 1},
        "max_pending_fragments": 64,
    },
    "train_config": {
        "num_workers": 1,
        "num_gpus_per_worker": 0,
        "num_iterations": 2000,
        "learning_rate": 3e-4,
        "weight_decay": 0.0,
        "adam_eps": 1e-5,
        "batch_size_per_gpu": 8,
        "batches_per_iteration": 2,
        "gradient_accumulation": 1,
        "epochs_per_iteration": 3,
        "context_length": 64,
        "discount": 0.95,
        "gae_lambda": 0.65,
        "ppo_clip": 0.2,
        "max_grad_norm": 0.5,
        "zero_initial_vf": True,
        "kl_divergence_coef_rho": 0.0,
        "entropy_bonus_coef": 0.01,
        "use_normalized_vf": True,
        "save_interval": 0,
        "record_video_interval": 100,
    },
    "logger_config": {"project": "mso", "name": "crafter"},
}
