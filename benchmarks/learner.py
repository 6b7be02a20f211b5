"""Learner: PPO samples/s of the trainer's update (re-evaluation, GAE, advantage normalisation, the PPO epochs
with every loss term, guards and metrics) against a plain torch forward+backward+step loop over the same
batches, chunks and epochs with the same policy, measured in the same run.

    python -m benchmarks.learner [--configs cartpole,crafter] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from services.shared.config import fragments_per_rank, load
from services.shared.redis_server import RedisServer
from services.shared.fragment import Fragment
from services.shared.session import Joined
from services.trainer.learner import Learner
from services.trainer.spec import LearnerSpec
from services.shared.trees import stack, tree_map


def fragments(name: str, cfg, n: int, rng: np.random.Generator) -> list[Fragment]:
    """n fragments shaped like the config's (CartPole vectors or Crafter frames), with a recurrent in_state
    from the policy's initial_state."""
    from services.shared.config import import_module

    length = cfg.rollout_config.fragment_length
    policy = import_module(name).policy_generator()
    out = []
    for i in range(n):
        if name == "crafter":
            obs = {"image": rng.integers(0, 255, (length, 64, 64, 3), dtype=np.uint8)}
            next_obs = {"image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)}
            n_actions = 17
        else:
            obs = {"obs": rng.standard_normal((length, 4)).astype(np.float32)}
            next_obs = {"obs": rng.standard_normal(4).astype(np.float32)}
            n_actions = 2
        done = rng.random(length) < 0.02
        out.append(Fragment(session_id="bench", slot=f"s{i}", seq=0, contiguous=True, version_first=0,
                            obs=obs, action=rng.integers(0, n_actions, length),
                            reward=rng.standard_normal(length).astype(np.float32),
                            first=np.concatenate([[True], done[:-1]]), next_done=done,
                            next_truncated=np.zeros(length, bool), truncation_value=np.zeros(length, np.float32),
                            logp=np.full(length, -np.log(n_actions), np.float32),
                            model_version=np.zeros(length, np.int64),
                            in_state=[s.numpy() for s in policy.initial_state(1)], next_obs=next_obs))
    return out


def plain_loop(policy, frags: list[Fragment], tc, length: int, amp: torch.dtype | None) -> None:
    """The same batches, chunks and epochs as the learner: forward (in the learner's autocast dtype), a
    policy-gradient + value loss (+ entropy when its coefficient is not 0), backward, grad-norm clip, a fused
    AdamW step. No re-evaluation, GAE, ratio, guards or metrics."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=tc.learning_rate, fused=True)
    to_tensor = lambda leaves: torch.as_tensor(np.stack(leaves))  # noqa: E731
    obs = stack([f.obs for f in frags], to_tensor)
    action = torch.as_tensor(np.stack([f.action for f in frags]))
    first = torch.as_tensor(np.stack([f.first for f in frags]))
    adv = torch.as_tensor(np.stack([f.reward for f in frags]))
    in_states = [tree_map(torch.as_tensor, f.in_state) for f in frags]
    n, c_len = len(frags), tc.context_length
    policy.train()
    for _ in range(tc.epochs_per_iteration):
        for idx in np.array_split(torch.randperm(n).numpy(), tc.batches_per_iteration):
            state = policy.merge_state([in_states[i] for i in idx])
            for s in range(0, length, c_len):
                e = min(s + c_len, length)
                with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                    latents, state = policy(tree_map(lambda x: x[idx, s:e], obs), state,
                                            context={"first": first[idx, s:e]})
                state = tree_map(lambda x: x.detach(), state)
                logp = policy.pi_head.logprob(action[idx, s:e], latents["pi_logits"])
                a = adv[idx, s:e]
                loss = -(logp * a).mean() + 0.5 * ((latents["vpred"].reshape(a.shape) - a) ** 2).mean()
                if tc.entropy_bonus_coef:
                    loss = loss - tc.entropy_bonus_coef * policy.pi_head.entropy(latents["pi_logits"]).mean()
                (loss * (e - s) / length).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()


def measure(redis_url: str, name: str, repeats: int) -> dict:
    torch.set_num_threads(1)
    loaded = load(name, ["train_config.save_interval=0"])
    cfg, tc = loaded.cfg, loaded.cfg.train_config
    n = fragments_per_rank(cfg)
    length = cfg.rollout_config.fragment_length
    frags = fragments(name, cfg, n, np.random.default_rng(0))
    learner = Learner(LearnerSpec(Joined.of(f"bench-{name}", loaded), redis_url, "bench", "/tmp/mso-bench-runs"))
    for f in frags:
        f.session_id = learner.session_id
    samples = n * length * tc.epochs_per_iteration
    mso, plain = [], []
    policy = loaded.policy_generator()
    learner.update(frags, warmup=False)  # warm-up: allocator, first-call costs
    plain_loop(policy, frags, tc, length, learner.amp)
    for _ in range(repeats):  # interleaved, so both see the same machine
        start = time.perf_counter()
        learner.update(frags, warmup=False)
        mso.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_loop(policy, frags, tc, length, learner.amp)
        plain.append(time.perf_counter() - start)
    mso_rate, plain_rate = samples / float(np.median(mso)), samples / float(np.median(plain))
    return {"config": name, "samples_per_iteration": samples, "mso_samples_per_s": mso_rate,
            "plain_samples_per_s": plain_rate, "ratio": mso_rate / plain_rate}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="cartpole,crafter")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = []
    with RedisServer() as redis:
        for name in args.configs.split(","):
            r = measure(redis.url, name, args.repeats)
            results.append(r)
            print(f"{name:10s} learner {r['mso_samples_per_s']:9.0f} samples/s   plain torch loop "
                  f"{r['plain_samples_per_s']:9.0f} samples/s   ratio {r['ratio']:.2f} (goal >= 0.90)")
    return results


if __name__ == "__main__":
    main()
