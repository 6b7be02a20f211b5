"""Every term of the PPO loss against values computed by hand (plain Python floats) on tiny tensors."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from services.shared.config import validate
from services.shared.policy import CategoricalHead, StatelessPolicy, ValueHead
from services.trainer.ppo import Surrogate, Window, window_loss


class TablePolicy(StatelessPolicy):
    """A policy whose logits and values are a table indexed by the observation: every number is known."""

    def __init__(self, logits, values):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(logits, dtype=torch.float32))
        self.values = nn.Parameter(torch.tensor(values, dtype=torch.float32))
        self.pi_head = CategoricalHead(1, len(logits[0]))
        self.value_head = ValueHead(1)

    def forward(self, input, state_in, context=None):
        x = input["x"]
        return {"pi_logits": F.log_softmax(self.table[x], -1), "vpred": self.values[x][..., None]}, state_in


LOGITS = [[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]
VALUES = [0.3, -0.2, 1.1]


def log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def make_window(action, behaviour, old, adv, target, old_vpred=None):
    t = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
    return Window.of(obs={"x": t([0, 1, 2], torch.long)}, action=t(action, torch.long), first=t([False] * 3, torch.bool),
                     behaviour_logp=t(behaviour), old_logp=t(old), advantage=t(adv), target=t(target),
                     old_vpred=t(old_vpred if old_vpred is not None else VALUES))


def tc(*overrides):
    return validate({}, ["train_config.entropy_bonus_coef=0.01", "train_config.use_normalized_vf=false",
                         *overrides]).train_config


def expected(action, behaviour, old, adv, target, cfg, rho=0.0, ref_logits=None, warmup=False):
    pg, vf, ent, kl = [], [], [], []
    for i in range(3):
        lp = log_softmax(LOGITS[i])
        new, mu = lp[action[i]], behaviour[i]  # the ratio is against the policy that acted
        if adv[i] < 0:
            new, mu = max(new, -11.0), max(mu, -11.0)
        r = math.exp(min(new - mu, cfg.log_ratio_range))
        clipped = min(max(r, 1 - cfg.ppo_clip), 1 + cfg.ppo_clip)
        pg.append(max(-adv[i] * r, -adv[i] * clipped))
        vf.append(0.5 * (VALUES[i] - target[i]) ** 2)
        ent.append(-sum(math.exp(v) * v for v in lp))
        if ref_logits is not None:
            q = log_softmax(ref_logits[i])
            kl.append(sum(math.exp(a) * (a - b) for a, b in zip(lp, q)))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    k = mean(kl) if kl else 0.0
    if warmup:
        return cfg.ppo_vf_coef * mean(vf) + k, mean(pg), mean(vf), mean(ent)
    total = cfg.ppo_policy_coef * mean(pg) + rho * k + cfg.ppo_vf_coef * mean(vf) - cfg.entropy_bonus_coef * mean(ent)
    return total, mean(pg), mean(vf), mean(ent)


CASES = {
    # on-policy: pi_old = mu, so this is the reference's loss
    "on_policy": dict(action=[1, 0, 1], behaviour=[-0.3, -0.05, -0.7], old=[-0.3, -0.05, -0.7],
                      adv=[1.0, -0.5, 2.0], target=[0.5, 0.0, 1.0]),
    # the ratio leaves the clip range in both directions
    "clipped": dict(action=[1, 1, 0], behaviour=[-1.5, -1.0, -0.2], old=[-1.5, -1.0, -0.2],
                    adv=[1.0, -1.0, 0.7], target=[0.0, 0.0, 0.0]),
    # stale data: pi_old has moved from mu, out of the clip range on steps 0 and 2, inside it on step 1
    "stale": dict(action=[1, 0, 1], behaviour=[-2.0, -0.01, -0.9], old=[-0.3, -0.05, -0.7],
                  adv=[0.4, 0.9, -0.3], target=[0.2, 0.3, 0.4]),
}


@pytest.mark.parametrize("name", CASES)
def test_loss_terms_match_hand_computation(name):
    case, cfg = CASES[name], tc()
    policy = TablePolicy(LOGITS, VALUES)
    loss, m, _s, _r = window_loss(policy, None, make_window(**case), [], None, cfg, rho=0.0, warmup=False)
    total, pg, vf, ent = expected(**case, cfg=cfg)
    assert m["policy_loss"] == pytest.approx(pg, rel=1e-5)
    assert m["value_loss"] == pytest.approx(vf, rel=1e-5)
    assert m["entropy"] == pytest.approx(ent, rel=1e-5)
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_stale_data_is_clipped_around_the_policy_that_acted():
    """Fragments a version old: pi_old (the learner at the iteration's start) has already moved from mu. PPO's
    trust region is around mu, so an action pi_old already made 1.2x more likely than mu did, with A > 0, gets no
    more gradient, and one it made less likely gets a ratio below 1. (mso took the ratio against pi_old, times
    min(pi_old / mu, 1), until session 41: the same step had a ratio of 1, a full gradient, and the weight
    counted the stale half of cartpole's iterations less.)"""
    cfg = tc()
    logits = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]                    # pi = pi_old: the first epoch's ratio
    half = math.log(0.5)
    window = make_window(action=[1, 0, 1], behaviour=[half - 0.5, half + 0.1, half], old=[half] * 3,
                         adv=[1.0, 1.0, 0.0], target=[0.0, 0.0, 0.0])
    policy = TablePolicy(logits, VALUES)
    _l, m, _s, _r = window_loss(policy, None, window, [], None, cfg, 0.0, False)
    r0, r1 = math.exp(0.5), math.exp(-0.1)                              # pi / mu on steps 0 and 1
    assert m["policy_loss"] == pytest.approx((-(1 + cfg.ppo_clip) - r1) / 3, rel=1e-5)
    assert m["clip_fraction"] == pytest.approx(1 / 3) and r0 > 1 + cfg.ppo_clip
    assert m["approx_kl"] == pytest.approx(0.0, abs=1e-7)              # the epochs have not moved pi from pi_old
    policy.table.grad = None
    loss, *_ = window_loss(policy, None, window, [], None, cfg, 0.0, False)
    loss.backward()
    grad = policy.table.grad
    assert grad[0].abs().max().item() == 0.0 and grad[1].abs().max().item() > 0  # step 0 is past the clip


def test_low_probability_clamp_applies_only_where_advantage_is_negative():
    logits = [[0.0, -30.0], [0.0, -30.0], [0.0, 0.0]]
    policy = TablePolicy(logits, VALUES)
    chunk = make_window(action=[1, 1, 0], behaviour=[-11.0, -30.0, -0.69], old=[-11.0, -30.0, -0.69],
                       adv=[-1.0, 1.0, 0.0], target=[0.0, 0.0, 0.0])
    cfg = tc()
    _l, m, _s, _r = window_loss(policy, None, chunk, [], None, cfg, 0.0, False)
    # step 0: A<0, log pi = -30 floored to -11 = old: ratio 1, pg = 1 (unfloored, the ratio would be e^-19: pg ~ 0.8)
    # step 1: A>0, not floored, -30 = old: ratio 1, pg = -1; step 2: A = 0
    assert m["policy_loss"] == pytest.approx((1.0 - 1.0 + 0.0) / 3, abs=1e-5)


def test_floor_applies_to_both_log_probs_and_approx_kl_ignores_it():
    # pi has not moved from pi_old, which gave the taken action e^-30. The reference floored only log pi:
    # ratio e^19 and a policy loss of 1.8e8. Flooring both gives ratio 1; the KL estimate is 0.
    policy = TablePolicy([[0.0, -30.0], [0.0, -30.0], [0.0, 0.0]], VALUES)
    lp = log_softmax([0.0, -30.0])[1]
    chunk = make_window(action=[1, 1, 0], behaviour=[lp, lp, math.log(0.5)], old=[lp, lp, math.log(0.5)],
                       adv=[-1.0, -2.0, 0.5], target=[0.0, 0.0, 0.0])
    _l, m, _s, _r = window_loss(policy, None, chunk, [], None, tc(), 0.0, False)
    assert m["policy_loss"] == pytest.approx((1.0 + 2.0 - 0.5) / 3, abs=1e-4)
    assert m["approx_kl"] == pytest.approx(0.0, abs=1e-6) and m["clip_fraction"] == 0.0


def test_kl_to_the_reference_policy_and_rho():
    case, cfg = CASES["on_policy"], tc()
    ref_logits = [[1.0, 0.0], [0.0, 0.0], [-1.0, 2.0]]
    ref = TablePolicy(ref_logits, VALUES)
    loss, m, _s, _r = window_loss(TablePolicy(LOGITS, VALUES), ref, make_window(**case), [], [], cfg, rho=0.3,
                                 warmup=False)
    total = expected(**case, cfg=cfg, rho=0.3, ref_logits=ref_logits)[0]
    kl = sum(sum(math.exp(a) * (a - b) for a, b in zip(log_softmax(p), log_softmax(q)))
             for p, q in zip(LOGITS, ref_logits)) / 3
    assert m["kl_divergence"] == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_vf_warmup_trains_value_and_kl_only():
    case, cfg = CASES["clipped"], tc()
    ref_logits = [[1.0, 0.0], [0.0, 0.0], [-1.0, 2.0]]
    loss, _m, _s, _r = window_loss(TablePolicy(LOGITS, VALUES), TablePolicy(ref_logits, VALUES), make_window(**case),
                                  [], [], cfg, rho=0.3, warmup=True)
    assert loss.item() == pytest.approx(expected(**case, cfg=cfg, ref_logits=ref_logits, warmup=True)[0], rel=1e-5)


def test_normalised_value_loss_and_value_clipping():
    cfg = tc("train_config.use_normalized_vf=true", "train_config.clip_vloss=true")
    policy = TablePolicy(LOGITS, VALUES)
    norm = policy.value_head.normalizer
    with torch.no_grad():  # statistics of mean 2 and std 3 (debiased)
        norm.debiasing_term.fill_(0.5)
        norm.running_mean.fill_(2.0 * 0.5)
        norm.running_mean_sq.fill_((9.0 + 4.0) * 0.5)
    policy.value_head.eval()
    target, old_vpred = [5.0, -1.0, 2.0], [0.0, 0.5, 1.0]
    case = dict(CASES["on_policy"], target=target)
    _l, m, _s, _r = window_loss(policy, None, make_window(**case, old_vpred=old_vpred), [], None, cfg, 0.0, False)
    vf = []
    for v, t, o in zip(VALUES, target, old_vpred):
        nt = (t - 2.0) / 3.0
        clipped = o + min(max(v - o, -cfg.ppo_clip), cfg.ppo_clip)
        vf.append(max(0.5 * (v - nt) ** 2, 0.5 * (clipped - nt) ** 2))
    assert m["value_loss"] == pytest.approx(sum(vf) / 3, rel=1e-5)
    assert norm.debiasing_term.item() == 0.5  # the loss does not move the statistics; the learner does, once a step


def test_fragments_decoded_from_redis_become_a_batch_without_a_warning():
    """Decoded arrays are read-only views of the entry's bytes; torch warned ("The given NumPy array is not
    writable") once per learner when a fragment's recurrent in_state became a tensor."""
    import warnings

    import numpy as np

    from services.shared.codec import decode
    from services.trainer.ppo import Batch
    from tests.fragment_factory import make

    fragment = make(in_state=[np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32)])
    decoded = type(fragment)(**decode(fragment.encode()))
    assert not decoded.in_state[0].flags.writeable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = Batch.of([decoded], torch.device("cpu"))
    assert [str(w.message) for w in caught] == []
    assert batch.in_states[0][0].tolist() == [[1.0] * 4]


def test_the_fused_surrogate_matches_autograd_on_the_plain_expression():
    """ppo.Surrogate computes the policy loss and its gradient by hand: both must equal what autograd gives for
    the loss written out op by op, on steps that are floored, capped, clipped on either side and inside."""
    g = torch.Generator().manual_seed(0)
    n, cap, clip = 4096, 1.5, 0.2
    old = -torch.rand(1, n, generator=g) * 20                 # log pi_old from 0 down to -20: some below the floor
    logp = old + torch.randn(1, n, generator=g)               # pi has moved: ratios e^-3..e^3, some above the cap
    behaviour = old + 0.3 * torch.randn(1, n, generator=g)    # stale data: pi_old has moved from mu
    adv = torch.randn(1, n, generator=g)
    window = Window.of({}, torch.zeros(1, n), torch.zeros(1, n, dtype=torch.bool), behaviour, old, adv,
                       torch.zeros(1, n), torch.zeros(1, n))

    fused_logp = logp.clone().requires_grad_()
    pg, (approx_kl, clip_fraction) = Surrogate.apply(fused_logp, window, clip, cap)
    pg.backward()

    plain_logp = logp.clone().requires_grad_()
    floor = adv < 0
    new = torch.where(floor, plain_logp.clamp(min=-11.0), plain_logp)
    mu = torch.where(floor, behaviour.clamp(min=-11.0), behaviour)
    log_ratio = new - mu
    ratio = log_ratio.clamp(max=cap).exp()
    plain = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    plain.backward()

    # every branch of the gradient is exercised
    assert (floor & (logp < -11)).sum() > 100 and (log_ratio > cap).sum() > 100
    assert (ratio > 1 + clip).sum() > 100 and (ratio < 1 - clip).sum() > 100 and ((ratio - 1).abs() < clip).sum() > 100
    assert pg.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(fused_logp.grad, plain_logp.grad, rtol=1e-5, atol=1e-9)
    raw = logp - old
    assert approx_kl.item() == pytest.approx(((raw.exp() - 1) - raw).mean().item(), rel=1e-5)
    assert clip_fraction.item() == pytest.approx(((ratio - 1).abs() > clip).float().mean().item(), abs=1e-7)
