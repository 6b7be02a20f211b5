"""The learning benchmark's plain PPO baseline computes its advantages as mso's learner does
(services/trainer/gae.py): an episode the time limit cut bootstraps from the value of the observation it was
cut at, one that terminated does not. It did not bootstrap at all, a weaker baseline than the issue asks for.
And an iteration of it takes as many env steps as one of the learner's."""

import numpy as np
import torch

from benchmarks.plain_ppo import advantages
from services.trainer.gae import gae


def test_its_advantages_are_the_learners_with_truncations_and_terminations():
    rng = np.random.default_rng(0)
    t_len, n = 16, 8
    rew = rng.normal(size=(t_len, n)).astype(np.float32)
    val = rng.normal(size=(t_len, n)).astype(np.float32)
    done = rng.random((t_len, n)) < 0.15
    truncated = done & (rng.random((t_len, n)) < 0.5)
    assert truncated.any() and (done & ~truncated).any()
    cut = np.where(truncated, rng.normal(size=(t_len, n)), 0.0).astype(np.float32)
    next_v = rng.normal(size=n).astype(np.float32)

    ours = advantages(*(torch.as_tensor(x) for x in (rew, val, done, cut, next_v)), 0.98, 0.8).numpy()
    learner, _ = gae(rew.T, val.T, done.T, next_v, [[i] for i in range(n)], 0.98, 0.8, cut_values=cut.T)
    np.testing.assert_allclose(ours, learner.T, rtol=1e-5, atol=1e-5)


def test_an_iteration_takes_as_many_env_steps_as_the_learners():
    """256 for cartpole (16 fragments of 16 steps: rl-zoo's 8 envs x 32). It took fragment_length steps of each
    env (128), half an iteration of mso's: twice the updates per env step, a different algorithm."""
    from benchmarks.plain_ppo import run
    from services.shared.config import load

    tc, rc = load("cartpole").cfg.train_config, load("cartpole").cfg.rollout_config
    mso_iteration = tc.batch_size_per_gpu * tc.batches_per_iteration * rc.fragment_length
    out = run(target=float("inf"), max_iterations=3)
    assert (out["iterations"], out["env_steps"]) == (3, 3 * mso_iteration)
