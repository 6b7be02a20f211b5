"""GAE against a direct evaluation of its definition, and chaining rules."""

import numpy as np
import pytest

from services.trainer.gae import chains, gae


def direct_gae(r, v, done, bootstrap, gamma, lam):
    """Sum over k of (gamma lam)^k delta_{t+k}, stopping at episode ends: the definition, not the recursion."""
    t_len = len(r)
    values = np.append(v, bootstrap)
    deltas = [r[t] + gamma * values[t + 1] * (1 - done[t]) - v[t] for t in range(t_len)]
    adv = np.zeros(t_len)
    for t in range(t_len):
        coef = 1.0
        for k in range(t, t_len):
            adv[t] += coef * deltas[k]
            if done[k]:
                break
            coef *= gamma * lam
    return adv


def test_matches_the_definition_within_one_fragment():
    rng = np.random.default_rng(1)
    r, v = rng.standard_normal((1, 12)), rng.standard_normal((1, 12))
    done = np.zeros((1, 12), dtype=bool)
    done[0, 5] = True
    adv, target = gae(r, v, done, np.array([0.7]), [[0]], 0.99, 0.9)
    np.testing.assert_allclose(adv[0], direct_gae(r[0], v[0], done[0], 0.7, 0.99, 0.9), rtol=1e-5)
    np.testing.assert_allclose(target, adv + v, rtol=1e-5)


def test_chained_fragments_equal_one_long_fragment():
    rng = np.random.default_rng(2)
    r, v = rng.standard_normal((2, 6)), rng.standard_normal((2, 6))
    done = np.zeros((2, 6), dtype=bool)
    long_adv, _ = gae(r.reshape(1, 12), v.reshape(1, 12), done.reshape(1, 12), np.array([0.3]), [[0]], 0.9, 0.8)
    adv, _ = gae(r, v, done, np.array([v[1, 0], 0.3]), chains(["a", "a"], [0, 1], [True, True]), 0.9, 0.8)
    np.testing.assert_allclose(adv.reshape(-1), long_adv[0], rtol=1e-5)


def test_chains_break_on_other_slot_gap_or_discontinuity():
    assert chains(["a", "a", "b", "a", "a"], [0, 1, 0, 3, 4], [True, True, True, True, False]) == \
        [[0, 1], [3], [4], [2]]


def test_truncation_bootstraps_from_the_cut_value_and_termination_does_not():
    r = np.array([[1.0, 1.0, 1.0, 1.0]])
    v = np.array([[0.5, 0.4, 0.3, 0.2]])
    done = np.array([[False, True, False, False]])
    gamma, lam, cut = 0.9, 0.8, 7.0
    truncated = gae(r, v, done, np.array([0.0]), [[0]], gamma, lam, np.array([[0.0, cut, 0.0, 0.0]]))[0]
    terminated = gae(r, v, done, np.array([0.0]), [[0]], gamma, lam)[0]
    # step 1 ends the episode either way (no advantage flows from step 2 back), but only a cut adds gamma*V(final)
    assert truncated[0, 1] == pytest.approx(1.0 + gamma * cut - 0.4)
    assert terminated[0, 1] == pytest.approx(1.0 - 0.4)
    assert truncated[0, 0] == pytest.approx(1.0 + gamma * 0.4 - 0.5 + gamma * lam * truncated[0, 1])
    np.testing.assert_allclose(truncated[0, 2:], terminated[0, 2:])
