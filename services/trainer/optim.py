"""The learner's optimizer: torch's AdamW, without the import of torch's compiler on its first use.

torch.optim wraps add_param_group (which the constructor calls), zero_grad, state_dict and load_state_dict in
torch._disable_dynamo, and step in a wrapper that marks graph breaks for torch.compile; each wrapper imports
torch._dynamo (sympy, FSDP, DTensor: 1.0-1.2 CPU-s on these machines, a third of a learner's start-up, on
the path to `mso run`'s first update) to guard code that mso never compiles. This AdamW calls the same methods
unwrapped (each wrapper keeps its method as __wrapped__), so its kernels, state, checkpoints and gradient
scaling are torch.optim.AdamW's own.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose methods run without torch._dynamo."""

    def add_param_group(self, param_group: dict) -> None:
        Optimizer.add_param_group.__wrapped__(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        Optimizer.zero_grad.__wrapped__(self, set_to_none)

    @torch.no_grad()  # what the wrapper set for a non-differentiable optimizer
    def step(self, closure=None):
        return torch.optim.AdamW.step.__wrapped__(self, closure)

    def state_dict(self) -> dict:
        return Optimizer.state_dict.__wrapped__(self)

    def load_state_dict(self, state_dict: dict) -> None:
        Optimizer.load_state_dict.__wrapped__(self, state_dict)
