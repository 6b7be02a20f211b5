"""The policy contract of MineStudio's MinePolicy, and the heads our built-in policies use.

A policy is a torch.nn.Module with:
  forward(input, state_in, context={"first": (B,T) bool}) -> ({"pi_logits": ..., "vpred": (B,T,1)}, state_out)
  initial_state(batch_size) -> list of tensors with leading dim batch_size
  merge_state(states) / split_state(state, n)
  pi_head: sample(logits, deterministic) / logprob(action, logits) / entropy(logits) / kl_divergence(q, p)
  value_head: normalize(x) / denormalize(y) / loss(pred, target, reduction)
MineStudio's VPTPolicy has exactly these members, so it runs here unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def full_precision(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A head's linear layer in float32 even inside autocast (train_config.use_amp): bfloat16's 8-bit mantissa
    would put steps of ~0.01 into the log-probs of PPO's ratio and into the values."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return linear(x.float())
    return linear(x)


class CategoricalHead(nn.Module):
    """One categorical action over n choices; logits are log-softmax normalised, shape (B,T,n)."""

    def __init__(self, hidsize: int, n: int, temperature: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(hidsize, n)
        self.temperature = temperature
        nn.init.orthogonal_(self.linear.weight, gain=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(full_precision(self.linear, x) / self.temperature, dim=-1)

    def sample(self, logits: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """One action per row, by inverting the cumulative distribution with one uniform draw a row: one exp
        per choice, where the Gumbel-max trick takes a uniform and two logs per choice (on VPT's 8641 buttons,
        a batch of 8 sampled in 0.11 ms instead of 0.33 ms on these CPUs)."""
        if deterministic:
            return logits.argmax(-1)
        cdf = logits.exp().cumsum(-1)
        total = cdf[..., -1:]
        # u < total strictly, so the answer is a choice with mass: the first whose cdf exceeds u.
        u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True).squeeze(-1)

    def logprob(self, action: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        return -(logits.exp() * logits).sum(-1)

    def kl_divergence(self, q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
        return (q_logits.exp() * (q_logits - p_logits)).sum(-1, keepdim=True)


class EwmaNormalizer(nn.Module):
    """Running mean/std of value targets (MineStudio's NormalizeEwma): updated by normalize() in training
    mode. The learner calls that once per optimizer step and averages the statistics across ranks."""

    def __init__(self, beta: float = 0.99999, epsilon: float = 1e-5):
        super().__init__()
        self.beta, self.epsilon = beta, epsilon
        self.running_mean = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.running_mean_sq = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.debiasing_term = nn.Parameter(torch.zeros(1), requires_grad=False)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.debiasing_term.clamp(min=self.epsilon)
        mean = self.running_mean / d
        var = (self.running_mean_sq / d - mean ** 2).clamp(min=1e-2)
        return mean, var.sqrt()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        b = self.beta
        self.running_mean.mul_(b).add_((1 - b) * x.mean())
        self.running_mean_sq.mul_(b).add_((1 - b) * (x ** 2).mean())
        self.debiasing_term.mul_(b).add_(1 - b)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x.detach())
        mean, std = self.mean_std()
        return (x - mean) / std

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean_std()
        return y * std + mean


class ValueHead(nn.Module):
    """Linear value output in normalised space (MineStudio's ScaledMSEHead with an EWMA normaliser)."""

    def __init__(self, hidsize: int):
        super().__init__()
        self.linear = nn.Linear(hidsize, 1)
        self.normalizer = EwmaNormalizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return full_precision(self.linear, x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer.normalize(x)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        return self.normalizer.denormalize(y)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.mse_loss(pred, self.normalize(target), reduction=reduction)


class StatelessPolicy(nn.Module):
    """Base for feed-forward policies: the recurrent-state members of MinePolicy with an empty state."""

    def initial_state(self, batch_size: int | None = None) -> list[torch.Tensor]:
        return []

    def merge_state(self, states: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return []

    def split_state(self, state: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
        return [[] for _ in range(n)]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
