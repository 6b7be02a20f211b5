"""The PPO loss on one chunk of a batch: MineStudio's maths (reference §4.5), decoupled from the behaviour
policy so stale and reused data are corrected for.

    mu       the behaviour policy that acted (its log-prob travels in the fragment)
    pi_old   the learner at the start of the iteration (the proximal policy of the PPO trust region)
    w        = min(pi_old(a|s) / mu(a|s), is_weight_clip)     truncated importance weight, no gradient
    log_r    = min(log pi(a|s) - log pi_old(a|s), log_ratio_range)
    pg   = mean(w * max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))
    vf   = mean(0.5 * (V - target)^2)          (target normalised by the EWMA head if use_normalized_vf)
    kl   = mean(KL(pi || pi_ref))              (pi_ref: the frozen initial policy; weight rho decays)
    ent  = mean(H(pi))
    loss = policy_coef * pg + rho * kl + vf_coef * vf - entropy_coef * ent
During vf_warmup iterations: loss = vf_coef * vf + kl. Where A < 0, log pi is floored at -11 as in the
reference, so a near-impossible action cannot blow the ratio up; log pi_old is floored there too (the
reference floors only log pi, so an action pi_old gave e^-30 showed a ratio of e^19, a policy loss of 10^8
with no gradient, on VPT's 8641-way button head).

Why decoupled (Hilton et al. 2021, "Batch size-invariance for policy optimization"): the reference takes the
ratio against pi_old and ignores mu, so data up to max_staleness versions old is trained on as if it were
on-policy. Taking the ratio against mu instead would put stale data outside the clip range from the first
epoch and drop its gradient. Splitting the two keeps PPO's trust region around pi_old and corrects the
off-policyness with a V-trace-style truncated weight (is_weight_clip, default 1: never up-weight). On fresh
data pi_old = mu, w = 1 and this is exactly the reference's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOGP_FLOOR = -11.0  # the reference's floor on log pi where the advantage is negative


@dataclass
class Chunk:
    obs: object                 # tree of (B, C, ...) tensors
    action: object              # tree of (B, C, ...) tensors
    first: torch.Tensor         # (B, C) bool
    behaviour_logp: torch.Tensor  # (B, C) log mu(a|s), from the fragment
    old_logp: torch.Tensor      # (B, C) log pi_old(a|s), at the iteration start
    advantage: torch.Tensor     # (B, C), normalised if configured
    target: torch.Tensor        # (B, C) TD(lambda) return, denormalised
    old_vpred: torch.Tensor     # (B, C) value at iteration start, in the head's space


def chunk_loss(policy, ref_policy, chunk: Chunk, state, ref_state, tc, rho: float, warmup: bool):
    """(loss, metrics, state_out, ref_state_out) for one chunk; the caller backpropagates."""
    latents, state_out = policy(chunk.obs, state, context={"first": chunk.first})
    logits = latents["pi_logits"]
    b, c = chunk.first.shape
    raw_logp = policy.pi_head.logprob(chunk.action, logits).reshape(b, c)
    floor = chunk.advantage < 0
    new_logp = torch.where(floor, raw_logp.clamp(min=LOGP_FLOOR), raw_logp)
    old_logp = torch.where(floor, chunk.old_logp.clamp(min=LOGP_FLOOR), chunk.old_logp)
    log_ratio = (new_logp - old_logp).clamp(max=tc.log_ratio_range)
    ratio = log_ratio.exp()
    weight = (chunk.old_logp - chunk.behaviour_logp).exp().clamp(max=tc.is_weight_clip)
    adv = chunk.advantage
    pg = (weight * torch.max(-adv * ratio, -adv * ratio.clamp(1 - tc.ppo_clip, 1 + tc.ppo_clip))).mean()

    vpred = latents["vpred"].reshape(b, c)
    if tc.use_normalized_vf:
        vf_bt = 0.5 * policy.value_head.loss(vpred, chunk.target, reduction="none").reshape(b, c)
    else:
        vf_bt = 0.5 * (vpred - chunk.target) ** 2
    if tc.clip_vloss:
        clipped = chunk.old_vpred + (vpred - chunk.old_vpred).clamp(-tc.ppo_clip, tc.ppo_clip)
        if tc.use_normalized_vf:
            vf_c = 0.5 * policy.value_head.loss(clipped, chunk.target, reduction="none").reshape(b, c)
        else:
            vf_c = 0.5 * (clipped - chunk.target) ** 2
        vf_bt = torch.max(vf_bt, vf_c)
    vf = vf_bt.mean()
    with torch.set_grad_enabled(torch.is_grad_enabled() and tc.entropy_bonus_coef != 0 and not warmup):
        entropy = policy.pi_head.entropy(logits).reshape(b, c).mean()  # reported even when not in the loss

    kl = torch.zeros((), device=vpred.device)
    if ref_policy is not None:
        with torch.no_grad():
            ref_latents, ref_state = ref_policy(chunk.obs, ref_state, context={"first": chunk.first})
        kl = policy.pi_head.kl_divergence(logits, ref_latents["pi_logits"]).mean()

    if warmup:
        loss = tc.ppo_vf_coef * vf + kl
    else:
        loss = tc.ppo_policy_coef * pg + rho * kl + tc.ppo_vf_coef * vf - tc.entropy_bonus_coef * entropy
    with torch.no_grad():
        # KL(pi_old || pi) as mean((r - 1) - log r) (Schulman's k3), from the unfloored log-probs: the floor
        # at -11 would show a ratio of e^2 for an action pi_old gave e^-13, though pi has not moved, and trip
        # the max_approx_kl guard on a large action space (VPT's 8641 buttons) for nothing.
        raw_log_ratio = raw_logp - chunk.old_logp
        approx_kl = ((raw_log_ratio.exp() - 1) - raw_log_ratio).mean()
        clip_fraction = ((ratio - 1).abs() > tc.ppo_clip).float().mean()
        values = torch.stack([pg, vf, entropy, kl, approx_kl, clip_fraction, weight.mean(), loss]).tolist()
    return loss, dict(zip(METRICS, values)), state_out, ref_state


METRICS = ("policy_loss", "value_loss", "entropy", "kl_divergence", "approx_kl", "clip_fraction", "is_weight",
           "total_loss")  # what chunk_loss reports, one host transfer for all
