"""CartPole-v1 with a small MLP policy: the fast smoke test of the whole pipeline (a mean return of 475 in
~41 k env steps and ~4.0 s from a cold start, median of 48 seeds; benchmarks/README.md).

rl-zoo's PPO hyper-parameters (8 envs, 256 steps an iteration, gamma 0.98, lambda 0.8, no entropy term, the
learning rate annealed over 1e5 steps) but 5 epochs at lr 4e-3 instead of 20 at 1e-3: the learner is what an
asynchronous pipeline waits for on a small machine (0.92 of a core while the worker uses 0.46), so the time to
475 is the learner's optimizer steps, and a quarter of the steps at four times the step size moves the policy
as far an iteration. 48 seeds interleaved (session 42): 3.98 s and 41 k env steps to 475, against 4.51 s and
35 k with 10 epochs at 2e-3 (session 38's choice, which had beaten 20 epochs: 7.1 s against 8.6 s). 10 epochs at
1e-3 took 59 k env steps, 4 at 5e-3 45 k. About one run in 50 of either (3 of 160 of this one, 1 of 48 of the old)
never reaches 475 in its 1e5 env steps: its value network's second tanh layer saturates (benchmarks/README.md).
What is ours is the pipeline depth. The stream holds an iteration and a half (24 fragments of 16 steps), so
the worker steps half of the next iteration while the learner trains, and the learner trains on fragments up
to two versions old (max_staleness 2), their ratio taken against the policy that stepped them
(services/trainer/ppo.py): none is dropped as stale, and 37 seeds took a median of 4.77 s and 39 k env steps
to 475, against 4.97 s and 36 k with one iteration of queue and max_staleness 1 (session 41). Before the ratio
was taken against the behaviour policy, deeper pipelines lost: 24 entries with max_staleness 1 dropped a quarter
of the fragments as stale, 32 with max_staleness 2 needed 55 k env steps (session 40), and 32-step fragments, a
64-fragment queue and 8 fragments a worker may hold dropped 74 % of all env steps. The bodies are initialised
as SB3's (orthogonal, gain sqrt 2): in a plain loop with rl-zoo's schedule, 34 k -> 27 k env steps to 475
(median of 5 seeds; benchmarks/README.md)."""

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from services.shared.policy import CategoricalHead, StatelessPolicy, ValueHead


class CartPolePolicy(StatelessPolicy):
    """Two tanh layers, a categorical action head and a normalised value head (MinePolicy's interface)."""

    def __init__(self, obs_dim: int = 4, n_actions: int = 2, hidsize: int = 64):
        super().__init__()
        self.pi_body = nn.Sequential(nn.Linear(obs_dim, hidsize), nn.Tanh(), nn.Linear(hidsize, hidsize), nn.Tanh())
        self.vf_body = nn.Sequential(nn.Linear(obs_dim, hidsize), nn.Tanh(), nn.Linear(hidsize, hidsize), nn.Tanh())
        self.pi_head = CategoricalHead(hidsize, n_actions)
        self.value_head = ValueHead(hidsize)
        for body in (self.pi_body, self.vf_body):  # orthogonal, gain sqrt(2), as SB3 and CleanRL initialise them
            for layer in body:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, gain=2 ** 0.5)
                    nn.init.zeros_(layer.bias)

    def forward(self, input, state_in=None, **kwargs):
        x = input["obs"].float()
        return {"pi_logits": self.pi_head(self.pi_body(x)), "vpred": self.value_head(self.vf_body(x))}, []


class CartPoleEnv(gym.Wrapper):
    """CartPole with MineStudio-style dict observations {"obs": float32 (4,)} and an integer action."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return {"obs": obs.astype(np.float32, copy=False)}, info

    def step(self, action):
        # A worker's action is a numpy integer: passed as it is, since Discrete.contains checks one in 1.2 us and
        # a Python int in 1.6 (it looks the dtype's limits up each time).
        obs, reward, terminated, truncated, info = self.env.step(action)
        return {"obs": obs.astype(np.float32, copy=False)}, float(reward), terminated, truncated, info


def env_generator():
    return CartPoleEnv(gym.make("CartPole-v1"))


def policy_generator():
    torch.set_num_threads(1)
    return CartPolePolicy()


online_dict = {
    "trainer_name": "PPOTrainer",
    "detach_rollout_manager": True,
    "rollout_config": {
        "num_rollout_workers": 1,
        "num_gpus_per_worker": 0,
        "num_cpus_per_worker": 1,
        "fragment_length": 16,
        "to_send_queue_size": 1,
        "worker_config": {
            "num_envs": 8,
            "batch_size": 8,
            "envs_per_process": 0,  # CartPole steps in microseconds: in the worker's thread, no pipe round trip
            "restart_interval": None,
            "video_fps": 20,
            "video_output_dir": "output/videos/cartpole",
        },
        "replay_buffer_config": {
            "max_chunks": 16,  # = fragments per iteration: each iteration takes the oldest unread, like a queue
            "max_reuse": 1,
            "max_staleness": 2,
            "fragments_per_report": 40,
            "fragments_per_chunk": 1,
        },
        "max_pending_fragments": 24,
    },
    "train_config": {
        "num_workers": 1,
        "num_gpus_per_worker": 0,
        "num_iterations": 390,
        "vf_warmup": 0,
        "learning_rate": 4e-3,
        "anneal_lr_linearly": True,
        "weight_decay": 0.0,
        "adam_eps": 1e-5,
        "batch_size_per_gpu": 16,
        "batches_per_iteration": 1,
        "gradient_accumulation": 1,
        "epochs_per_iteration": 5,
        "context_length": 16,
        "discount": 0.98,
        "gae_lambda": 0.8,
        "ppo_clip": 0.2,
        "clip_vloss": False,
        "max_grad_norm": 0.5,
        "zero_initial_vf": True,
        "ppo_policy_coef": 1.0,
        "ppo_vf_coef": 0.5,
        "kl_divergence_coef_rho": 0.0,
        "entropy_bonus_coef": 0.0,
        "coef_rho_decay": 1.0,
        "log_ratio_range": 50,
        "normalize_advantage_full_batch": True,
        "use_normalized_vf": False,
        "save_interval": 0,
        "keep_interval": 0,
        "record_video_interval": 0,
        "resume": None,
        "resume_optimizer": True,
        "save_path": None,
    },
    "logger_config": {"project": "mso", "name": "cartpole"},
}
