"""PPO as mso runs it, top to bottom: one iteration on a rank's fragments (re-evaluation, GAE, advantage
normalisation, the epochs of minibatches with gradient accumulation, the KL and NaN guard, value-normaliser
updates, the optimizer step), then the loss on one BPTT window. MineStudio's maths (reference §4.5), with the
ratio taken against the behaviour policy so stale and reused data are corrected for. Collectives come in as
`ranks` (one rank or many: learner.Ranks), so nothing here knows about torch.distributed.

The loss on one window:

    mu       the behaviour policy that acted (its log-prob travels in the fragment)
    pi_old   the learner at the start of the iteration (the max_approx_kl guard measures the epochs from it)
    log_r    = min(log pi(a|s) - log mu(a|s), log_ratio_range)
    pg   = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))
    vf   = mean(0.5 * (V - target)^2)          (target normalised by the EWMA head if use_normalized_vf)
    kl   = mean(KL(pi || pi_ref))              (pi_ref: the frozen initial policy; weight rho decays)
    ent  = mean(H(pi))
    loss = policy_coef * pg + rho * kl + vf_coef * vf - entropy_coef * ent
During vf_warmup iterations: loss = vf_coef * vf + kl. Where A < 0, log pi is floored at -11 as in the
reference, so a near-impossible action cannot blow the ratio up; log mu is floored there too (the reference
floors only log pi, so an action the policy gave e^-30 showed a ratio of e^19, a policy loss of 10^8 with no
gradient, on VPT's 8641-way button head).

Why the ratio against mu: PPO's ratio is against the policy that collected the data, and its clip bounds how far
an update moves from it. The reference takes it against pi_old and ignores mu, so data up to max_staleness
versions old is trained on as if it were on-policy. mso took it against pi_old too, times a truncated
importance weight min(pi_old / mu, 1) (Hilton et al. 2021's decoupled PPO) until session 41: on cartpole, where
about half of an iteration's fragments were stepped by the version before (benchmarks/README.md), that weight
counted the older half less, and 48 seeds reached a mean return of 475 in a median of 42.7 k env steps against
37.1 k with the ratio against mu. On fresh data pi_old = mu and both are exactly the reference's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from services.shared.fragment import Fragment
from services.shared.trees import leaves, stack, tree_map
from services.trainer.gae import chains, gae

CPU_EVAL_STEPS = 128  # time steps per re-evaluation forward pass on a CPU (benchmarks/learner.py, crafter)
CPU_EVAL_BYTES = CPU_EVAL_STEPS * 64 * 64 * 3  # ... or more steps while their observations are smaller than crafter's
# -- one iteration ------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A rank's fragments of one iteration as tensors on its device: n fragments of L steps."""
    obs: object                 # tree of (n, L, ...)
    action: object              # tree of (n, L, ...)
    first: torch.Tensor         # (n, L) bool
    behaviour_logp: torch.Tensor  # (n, L) log mu
    next_obs: object            # tree of (n, 1, ...): o_L of each fragment
    in_states: list             # each fragment's recurrent state before step 0
    rewards: np.ndarray         # (n, L)
    next_done: np.ndarray       # (n, L) bool
    cut_values: np.ndarray      # (n, L): V(final obs) where a time limit cut an episode, else 0
    chains: list                # contiguous fragments of one slot, in order (gae.chains)

    @classmethod
    def of(cls, fragments: list[Fragment], device: torch.device) -> Batch:
        to_tensor = lambda leaves: torch.as_tensor(np.stack(leaves), device=device)  # noqa: E731
        return cls(
            obs=stack([f.obs for f in fragments], to_tensor), action=stack([f.action for f in fragments], to_tensor),
            first=to_tensor([f.first for f in fragments]), behaviour_logp=to_tensor([f.logp for f in fragments]),
            next_obs=stack([tree_map(lambda a: np.asarray(a)[None], f.next_obs) for f in fragments], to_tensor),
            # copied: decoded arrays are read-only views of the entry's bytes, which torch will not share
            in_states=[tree_map(lambda a: torch.tensor(a, device=device), f.in_state) for f in fragments],
            rewards=np.stack([f.reward for f in fragments]), next_done=np.stack([f.next_done for f in fragments]),
            cut_values=np.stack([f.truncation_value * f.next_truncated for f in fragments]),
            chains=chains([f.slot for f in fragments], [f.seq for f in fragments],
                          [f.contiguous for f in fragments]))


@dataclass
class Learning:
    """What an iteration changes: the policy, its optimizer and AMP scaler, and the frozen reference."""
    policy: torch.nn.Module
    ref_policy: torch.nn.Module | None   # the frozen initial policy of the KL term (None when rho is 0)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None             # autocast dtype of the forward passes (learner.autocast_dtype)
    device: torch.device


def autocast(learning: Learning) -> torch.autocast:
    return torch.autocast(learning.device.type, dtype=learning.amp, enabled=learning.amp is not None)


def anneal_lr(optimizer: torch.optim.Optimizer, tc, iteration: int) -> None:
    """lr = (1 - iteration / num_iterations) * learning_rate, when anneal_lr_linearly."""
    if tc.anneal_lr_linearly:
        for group in optimizer.param_groups:
            group["lr"] = (1 - iteration / tc.num_iterations) * tc.learning_rate


def decay_rho(rho: float, tc) -> float:
    """The KL coefficient after an iteration."""
    return rho * tc.coef_rho_decay


def iteration(learning: Learning, batch: Batch, tc, rho: float, warmup: bool, ranks) -> dict:
    """One PPO iteration on this rank's batch; returns its metrics (each a mean over the batch)."""
    policy, n, t_len = learning.policy, len(batch.in_states), batch.rewards.shape[1]
    with autocast(learning):  # pi_old in the precision the epochs compute pi in: the first ratio is exactly 1
        raw_v, old_logp, values, boot = evaluate(policy, batch, tc, learning.device)
    values, boot = values.cpu().numpy().astype(np.float64), boot.cpu().numpy()
    adv, target = gae(batch.rewards, values, batch.next_done, boot, batch.chains, tc.discount, tc.gae_lambda,
                      batch.cut_values)
    explained = explained_variance(values, target, ranks)
    adv, target = torch.as_tensor(adv, device=learning.device), torch.as_tensor(target, device=learning.device)
    if tc.normalize_advantage_full_batch:  # over all ranks' steps, not per rank
        total, total_sq, count = ranks.sum([adv.sum().item(), (adv ** 2).sum().item(), adv.numel()])
        mean = total / count
        adv = (adv - mean) / (max(total_sq / count - mean ** 2, 0.0) ** 0.5 + 1e-8)

    whole = Window.of(batch.obs, batch.action, batch.first, batch.behaviour_logp, old_logp, adv, target, raw_v)
    policy.train()
    policy.value_head.eval()  # the EWMA normaliser is updated once per optimizer step, below, not per loss
    params = [p for p in policy.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    weight_total, broken_nan, broken_kl = 0.0, 0, 0
    ga = tc.gradient_accumulation
    for _epoch in range(tc.epochs_per_iteration):
        # One minibatch of every fragment needs no shuffle (its loss is a mean), and its windows are views of
        # the batch where a shuffled one's are copies: cartpole's 20 epochs a minibatch each spent 9 % of the
        # update shuffling and gathering.
        minibatches = [np.arange(n)] if tc.batches_per_iteration == 1 else \
            np.array_split(torch.randperm(n).numpy(), tc.batches_per_iteration)
        learning.optimizer.zero_grad()
        for bi, idx in enumerate(minibatches):
            rows = slice(None) if len(idx) == n else idx
            if bi % ga == 0 and tc.use_normalized_vf:
                update_normalizer(policy, target[np.concatenate(minibatches[bi:bi + ga])], ranks)
            saved = [None if p.grad is None else p.grad.clone() for p in params] if bi % ga else None
            state = policy.merge_state([batch.in_states[i] for i in idx])
            ref_state = state if learning.ref_policy is not None else None
            batch_sums, batch_weight = {}, 0.0
            for s in range(0, t_len, tc.context_length):  # truncated BPTT: the state carries across windows
                e = min(s + tc.context_length, t_len)
                with autocast(learning):
                    loss, m, state, ref_state = window_loss(policy, learning.ref_policy, whole.rows(rows, s, e), state,
                                                            ref_state, tc, rho, warmup)
                state = tree_map(lambda x: x.detach(), state)
                nan, kl_high = ranks.any([not math.isfinite(m["total_loss"]), m["approx_kl"] > tc.max_approx_kl])
                if nan or kl_high:
                    # Skip the whole minibatch on every rank together: drop what its earlier windows added.
                    broken_nan, broken_kl = broken_nan + nan, broken_kl + (kl_high and not nan)
                    for p, g in zip(params, saved or [None] * len(params)):
                        p.grad = g
                    batch_sums, batch_weight = {}, 0.0
                    break
                weight = (e - s) / t_len
                learning.scaler.scale(loss * weight / ga).backward()
                for k, v in m.items():
                    batch_sums[k] = batch_sums.get(k, 0.0) + v * weight
                batch_weight += weight
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            weight_total += batch_weight
            if (bi + 1) % ga == 0:
                step(learning, params, tc, ranks)
    metrics = {k: v / max(weight_total, 1e-9) for k, v in sums.items()}
    metrics.update(broken_num_lossnan=broken_nan, broken_num_kl=broken_kl,
                   learning_rate=learning.optimizer.param_groups[0]["lr"], rho=rho,
                   buffer_reward=float(batch.rewards.sum(1).mean()), explained_var=explained,
                   abs_advantage=float(adv.abs().mean()), abs_td_target=float(target.abs().mean()),
                   truncations=int(np.count_nonzero(batch.cut_values)))
    return metrics


@torch.inference_mode()
def evaluate(policy, batch: Batch, tc, device: torch.device):
    """log pi_old(a|s) and V of the current model, carrying the recurrent state from each fragment's in_state
    (episode starts reset it, as in rollout), in groups of batch_size_per_gpu fragments on a GPU and of about
    CPU_EVAL_STEPS steps on a CPU, where a convolution over 128 frames ran 40% faster per frame than over 512
    (cache). Returns raw V (the head's space), log pi_old, V and V(next_obs) in the return scale."""
    n, t_len, c_len = len(batch.in_states), batch.rewards.shape[1], tc.context_length
    policy.eval()
    raw_v, old_logp = torch.zeros(n, t_len, device=device), torch.zeros(n, t_len, device=device)
    boot = torch.zeros(n, device=device)
    if device.type != "cpu":
        group = tc.batch_size_per_gpu
    else:  # cartpole's 16-byte observations: the whole batch in one pass, half the passes of 128-step groups
        step_bytes = sum(x[0, 0].nbytes for x in leaves(batch.obs))
        group = max(1, max(CPU_EVAL_STEPS, CPU_EVAL_BYTES // max(step_bytes, 1)) // t_len)
    for g in range(0, n, group):
        rows = slice(g, min(g + group, n))
        state = policy.merge_state(batch.in_states[rows])
        for s in range(0, t_len, c_len):
            e = min(s + c_len, t_len)
            sl = lambda x: x[rows, s:e]  # noqa: E731
            latents, state = policy(tree_map(sl, batch.obs), state, context={"first": sl(batch.first)})
            raw_v[rows, s:e] = latents["vpred"].reshape(-1, e - s)
            old_logp[rows, s:e] = policy.pi_head.logprob(tree_map(sl, batch.action),
                                                         latents["pi_logits"]).reshape(-1, e - s)
        latents, _ = policy(tree_map(lambda x: x[rows], batch.next_obs), state,
                            context={"first": torch.as_tensor(batch.next_done[rows, -1:], device=device)})
        boot[rows] = latents["vpred"].reshape(-1)
    if tc.use_normalized_vf:
        values, boot = policy.value_head.denormalize(raw_v).reshape(n, t_len), \
            policy.value_head.denormalize(boot).reshape(n)
    else:
        values = raw_v
    return raw_v, old_logp, values, boot


def step(learning: Learning, params: list, tc, ranks) -> None:
    """One optimizer step: gradients averaged over ranks, unscaled (AMP), clipped to max_grad_norm."""
    params = [p for p in params if p.grad is not None]
    ranks.mean_grads(params)
    if params:
        learning.scaler.unscale_(learning.optimizer)
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        learning.scaler.step(learning.optimizer)
        learning.scaler.update()
    learning.optimizer.zero_grad()


def update_normalizer(policy, targets: torch.Tensor, ranks) -> None:
    """One EWMA update of the value normaliser with this optimizer step's targets, averaged over ranks (the
    update is linear in the batch moments, so the average equals an update with all ranks' data)."""
    head = policy.value_head
    head.train()
    head.normalize(targets.float())
    head.eval()
    ranks.mean_buffers(head)


def explained_variance(values: np.ndarray, targets: np.ndarray, ranks) -> float:
    """1 - Var(target - V) / Var(target) over all ranks' steps."""
    d = targets - values
    s = ranks.sum([targets.sum(), (targets ** 2).sum(), d.sum(), (d ** 2).sum(), targets.size])
    var_t = s[1] / s[4] - (s[0] / s[4]) ** 2
    var_d = s[3] / s[4] - (s[2] / s[4]) ** 2
    return float(1 - var_d / var_t) if var_t > 1e-12 else 0.0


# -- the loss on one window ---------------------------------------------------------------------------------
LOGP_FLOOR = -11.0  # the reference's floor on log pi where the advantage is negative


@dataclass
class Window:
    """One BPTT window (train_config.context_length steps) of a minibatch, as the loss sees it. What stays the
    same across an iteration's epochs is computed once for the whole batch (Window.of) and each window is a
    slice of it (rows): on cartpole's 256-step windows every op in the loss's graph costs more than its
    arithmetic."""
    obs: object                 # tree of (B, C, ...) tensors
    action: object              # tree of (B, C, ...) tensors
    first: torch.Tensor         # (B, C) bool
    old_logp: torch.Tensor      # (B, C) log pi_old(a|s), at the iteration start
    logp_floor: torch.Tensor    # (B, C) LOGP_FLOOR where the advantage is negative, -inf elsewhere
    floored_behaviour_logp: torch.Tensor  # (B, C) log mu(a|s), floored so
    neg_advantage: torch.Tensor  # (B, C) -A
    target: torch.Tensor        # (B, C) TD(lambda) return, denormalised
    old_vpred: torch.Tensor     # (B, C) value at iteration start, in the head's space

    @classmethod
    def of(cls, obs, action, first, behaviour_logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor,
           target: torch.Tensor, old_vpred: torch.Tensor) -> Window:
        """From log mu (the fragment's), log pi_old and the advantages (normalised if configured)."""
        floor = torch.full_like(old_logp, -math.inf).masked_fill_(advantage < 0, LOGP_FLOOR)
        return cls(obs, action, first, old_logp, floor, behaviour_logp.clamp(min=floor), -advantage, target,
                   old_vpred)

    def rows(self, rows, start: int, end: int) -> Window:
        """Steps start:end of the fragments `rows` (an index array, or slice(None) for all: views, not copies)."""
        if isinstance(rows, slice) and start == 0 and end == self.first.shape[1]:
            return self
        return Window(*(tree_map(lambda x: x[rows, start:end], getattr(self, f.name)) for f in fields(self)))


def window_loss(policy, ref_policy, w: Window, state, ref_state, tc, rho: float, warmup: bool):
    """(loss, metrics, state_out, ref_state_out) for one window; the caller backpropagates."""
    latents, state_out = policy(w.obs, state, context={"first": w.first})
    logits = latents["pi_logits"]
    b, c = w.first.shape
    raw_logp = policy.pi_head.logprob(w.action, logits).reshape(b, c)
    pg, policy_stats = Surrogate.apply(raw_logp, w, tc.ppo_clip, tc.log_ratio_range)

    vpred = latents["vpred"].reshape(b, c)
    if tc.use_normalized_vf:
        vf_bt = 0.5 * policy.value_head.loss(vpred, w.target, reduction="none").reshape(b, c)
    else:
        vf_bt = 0.5 * (vpred - w.target) ** 2
    if tc.clip_vloss:
        clipped = w.old_vpred + (vpred - w.old_vpred).clamp(-tc.ppo_clip, tc.ppo_clip)
        if tc.use_normalized_vf:
            vf_c = 0.5 * policy.value_head.loss(clipped, w.target, reduction="none").reshape(b, c)
        else:
            vf_c = 0.5 * (clipped - w.target) ** 2
        vf_bt = torch.max(vf_bt, vf_c)
    vf = vf_bt.mean()
    with torch.set_grad_enabled(torch.is_grad_enabled() and tc.entropy_bonus_coef != 0 and not warmup):
        entropy = policy.pi_head.entropy(logits).reshape(b, c).mean()  # reported even when not in the loss

    kl = torch.zeros((), device=vpred.device)
    if ref_policy is not None:
        with torch.no_grad():
            ref_latents, ref_state = ref_policy(w.obs, ref_state, context={"first": w.first})
        kl = policy.pi_head.kl_divergence(logits, ref_latents["pi_logits"]).mean()

    # Terms whose coefficient is 0 stay out of the graph.
    loss = tc.ppo_vf_coef * vf if warmup else tc.ppo_policy_coef * pg + tc.ppo_vf_coef * vf
    if ref_policy is not None:
        loss = loss + (kl if warmup else rho * kl)
    if tc.entropy_bonus_coef != 0 and not warmup:
        loss = loss - tc.entropy_bonus_coef * entropy
    with torch.no_grad():
        values = torch.cat([torch.stack([pg, vf, entropy, kl, loss]), policy_stats]).tolist()
    return loss, dict(zip(METRICS, values)), state_out, ref_state


METRICS = ("policy_loss", "value_loss", "entropy", "kl_divergence", "total_loss", "approx_kl",
           "clip_fraction")  # what window_loss reports, one host transfer for all


class Surrogate(torch.autograd.Function):
    """PPO's policy loss on a window as one autograd node: pg = mean(max(-A r, -A clip(r))) with
    r = exp(min(floor(log pi) - floor(log mu), log_ratio_range)), and beside it [approx_kl, clip_fraction]
    (no gradient). Written as a dozen autograd ops it cost a tenth of cartpole's update in graph bookkeeping;
    its gradient is one product: d pg / d log pi = -A r / N where the unclipped term is the one taken (or
    ties), log pi is not below its floor and the log-ratio not above its cap, and 0 elsewhere, which is what
    autograd computes for the same expression (tests/trainer/test_ppo.py checks them against each other)."""

    @staticmethod
    def forward(ctx, logp: torch.Tensor, w: Window, clip: float, cap: float):
        log_ratio = logp.clamp(min=w.logp_floor) - w.floored_behaviour_logp
        ratio = log_ratio.clamp(max=cap).exp()
        clipped = ratio.clamp(1 - clip, 1 + clip)
        unclipped_term, clipped_term = w.neg_advantage * ratio, w.neg_advantage * clipped
        taken = unclipped_term >= clipped_term
        live = taken.logical_and_(logp >= w.logp_floor).logical_and_(log_ratio <= cap)
        ctx.save_for_backward(unclipped_term.where(live, 0.0))
        # KL(pi_old || pi) as mean((r - 1) - log r) (Schulman's k3), from the unfloored log-probs: the floor
        # at -11 would show a ratio of e^2 for an action pi_old gave e^-13, though pi has not moved, and trip
        # the max_approx_kl guard on a large action space (VPT's 8641 buttons) for nothing.
        raw = logp - w.old_logp
        per_step = torch.stack([torch.maximum(unclipped_term, clipped_term), raw.exp().sub_(1).sub_(raw),
                                clipped != ratio])
        pg, approx_kl, clip_fraction = per_step.view(3, -1).mean(1).unbind()
        stats = torch.stack([approx_kl, clip_fraction])
        ctx.mark_non_differentiable(stats)
        return pg, stats

    @staticmethod
    def backward(ctx, grad_pg: torch.Tensor, _grad_stats):
        (coef,) = ctx.saved_tensors
        return coef * (grad_pg / coef.numel()), None, None, None
