"""A plain single-process PPO on CartPole-v1 with the cartpole config's network and hyper-parameters: the
baseline of the learning benchmark. Returns the wall seconds to a mean return (last 20 episodes) of 475.

An iteration steps each env as many times as mso's learner takes in one (iteration_steps: 32 for cartpole,
rl-zoo's n_steps). Until session 39 it stepped fragment_length (16) times, half an iteration of mso's: twice the
updates per env step, and a learning rate annealed over half the env steps.

Its episodes end as mso's do: an env that ends is reset in the same step (gymnasium's SAME_STEP autoreset,
as a rollout worker resets its envs), and an episode cut by the time limit bootstraps from the value of the
observation it was cut at (services/trainer/gae.py). gymnasium's default, NEXT_STEP, spends one step per
episode on a reset whose action is ignored and whose transition, from the final observation to the first,
is learnt as if it were real."""

from __future__ import annotations

import time
from collections import deque

import gymnasium as gym
import numpy as np
import torch

from services.shared.config import fragments_per_rank, load


def run(target: float = 475.0, max_iterations: int = 400, seed: int = 0) -> dict:
    start = time.time()
    loaded = load("cartpole")
    rc, tc = loaded.cfg.rollout_config, loaded.cfg.train_config
    n_envs = rc.worker_config.num_envs
    t_len = iteration_steps(loaded.cfg) // n_envs  # rl-zoo's n_steps (32): each env's steps in an iteration
    torch.manual_seed(seed)
    policy = loaded.module.policy_generator()
    opt = torch.optim.AdamW(policy.parameters(), lr=tc.learning_rate, eps=tc.adam_eps, weight_decay=tc.weight_decay)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(n_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=seed)
    returns, running = deque(maxlen=20), np.zeros(n_envs)
    steps = 0
    for it in range(max_iterations):
        for g in opt.param_groups:
            g["lr"] = (1 - it / tc.num_iterations) * tc.learning_rate if tc.anneal_lr_linearly else tc.learning_rate
        b_obs, b_act, b_logp, b_val, b_rew, b_done, b_cut = [], [], [], [], [], [], []
        with torch.no_grad():
            for _ in range(t_len):
                o = torch.as_tensor(obs, dtype=torch.float32)[:, None]
                lat, _ = policy({"obs": o}, [])
                act = policy.pi_head.sample(lat["pi_logits"])
                b_obs.append(o[:, 0]), b_act.append(act[:, 0])
                b_logp.append(policy.pi_head.logprob(act, lat["pi_logits"])[:, 0]), b_val.append(lat["vpred"][:, 0, 0])
                obs, rew, term, trunc, info = envs.step(act[:, 0].numpy())
                done = term | trunc
                cut = torch.zeros(n_envs)  # V(final obs) where the time limit cut an episode, else 0
                at = np.flatnonzero(trunc & ~term)
                if at.size:
                    final = torch.as_tensor(np.stack([info["final_obs"][i] for i in at]), dtype=torch.float32)
                    cut[at] = policy({"obs": final[:, None]}, [])[0]["vpred"][:, 0, 0]
                running += rew
                for i in np.flatnonzero(done):
                    returns.append(running[i])
                    running[i] = 0
                b_rew.append(torch.as_tensor(rew, dtype=torch.float32)), b_done.append(torch.as_tensor(done))
                b_cut.append(cut)
                steps += n_envs
            next_v = policy({"obs": torch.as_tensor(obs, dtype=torch.float32)[:, None]}, [])[0]["vpred"][:, 0, 0]
        values = torch.stack(b_val)
        adv = advantages(torch.stack(b_rew), values, torch.stack(b_done), torch.stack(b_cut), next_v,
                         tc.discount, tc.gae_lambda)
        target_v = (adv + values).reshape(-1)
        adv = adv.reshape(-1)
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
        o, a, lp = torch.stack(b_obs).reshape(-1, 4), torch.stack(b_act).reshape(-1), torch.stack(b_logp).reshape(-1)
        for _ in range(tc.epochs_per_iteration):
            lat, _ = policy({"obs": o[None]}, [])
            new_lp = policy.pi_head.logprob(a[None], lat["pi_logits"])[0]
            ratio = (new_lp - lp).exp()
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - tc.ppo_clip, 1 + tc.ppo_clip)).mean()
            vf = 0.5 * ((lat["vpred"][0, :, 0] - target_v) ** 2).mean()
            loss = pg + tc.ppo_vf_coef * vf
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
            opt.step()
        if len(returns) == 20 and np.mean(returns) >= target:
            return {"seconds": time.time() - start, "env_steps": steps, "iterations": it + 1, "reached": True}
    return {"seconds": time.time() - start, "env_steps": steps, "iterations": max_iterations, "reached": False}


def iteration_steps(cfg) -> int:
    """The env steps of one of mso's iterations on one rank: the learner's fragments_per_rank fragments of
    fragment_length steps (cartpole: 16 x 16 = 256, rl-zoo's 8 envs x 32)."""
    rc = cfg.rollout_config
    steps = fragments_per_rank(cfg) * rc.fragment_length
    if steps % rc.worker_config.num_envs:
        raise ValueError(f"an iteration's {steps} env steps do not divide among {rc.worker_config.num_envs} envs")
    return steps


def advantages(rew: torch.Tensor, val: torch.Tensor, done: torch.Tensor, cut: torch.Tensor, next_v: torch.Tensor,
               gamma: float, lam: float) -> torch.Tensor:
    """GAE over (T, N) steps of N envs: done ends an episode after step t, cut is V(final obs) where the time
    limit cut it (0 elsewhere), next_v the value of the observation after the last step."""
    adv, last = torch.zeros_like(rew), torch.zeros_like(next_v)
    for t in reversed(range(rew.shape[0])):
        nv = next_v if t == rew.shape[0] - 1 else val[t + 1]
        nonterm = 1.0 - done[t].float()
        delta = rew[t] + gamma * (nv * nonterm + cut[t]) - val[t]
        last = delta + gamma * lam * nonterm * last
        adv[t] = last
    return adv


if __name__ == "__main__":
    print(run())
