"""The learning benchmark's plain PPO baseline computes its advantages as mso's learner does
(services/trainer/gae.py): an episode the time limit cut bootstraps from the value of the observation it was
cut at, one that terminated does not. It did not bootstrap at all, a weaker baseline than the issue asks for."""

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
