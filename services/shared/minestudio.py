"""MineStudio policies in mso: importing MineStudio's VPT without its model zoo, and the adapter that gives
any MineStudio MinePolicy mso's policy contract (services/policy.py) where MineStudio's classes differ.

Where they differ, and what adapt() does about it:
- VPTPolicy.forward ignores context["first"] (it passes first=False to its net), so an episode that starts
  inside a fragment would attend to the previous episode in training, unlike in rollout. The adapted VPT
  hands our `first` to its net, whose masked attention already hides the past at an episode start. Any
  other MinePolicy gets its state reset to the initial state at every episode start (the time axis is cut
  there), which is exact for any recurrent policy whose state tensors lead with the batch dim.
- initial_state(B) returns the same cached tensors on every call: the adapted one returns copies, so no
  state held by a rollout slot or a fragment aliases the cache.
- ScaledMSEHead's normalize/denormalize/loss broadcast a (B,T) input to (1,B,T) (they expect (B,T,1)): the
  adapted head returns its input's shape, as mso's ValueHead does.
The core of mso imports this module only for a policy that comes from minestudio.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch.nn import functional as F

INSTALL = ("pip install -e '.[minecraft]' && pip install --no-deps minestudio==1.1.6 gym3==0.3.3 "
           "(`make install` does both)")
VPT_BODY = "minestudio.models.vpt.body"


def vpt_module():
    """minestudio.models.vpt.body (VPTPolicy, load_vpt_policy).

    minestudio/models/__init__.py imports Rocket, Groot and SteveOne and with them torchvision, timm and
    transformers; torchvision does not load beside the CPU torch wheel. Unless minestudio.models was
    imported already, a bare package object with the real folder as its path stands in for it, so the VPT
    submodules import as usual and nothing else of the zoo is loaded.
    """
    if "minestudio.models" not in sys.modules:
        spec = importlib.util.find_spec("minestudio")
        if spec is None or spec.origin is None:
            raise ImportError(f"MineStudio is not installed; install the Minecraft extra: {INSTALL}")
        package = types.ModuleType("minestudio.models")
        package.__path__ = [str(Path(spec.origin).parent / "models")]
        sys.modules["minestudio.models"] = package
    try:
        return importlib.import_module(VPT_BODY)
    except ImportError as exc:
        raise ImportError(f"cannot import MineStudio's VPT ({exc}); install the Minecraft extra: {INSTALL}") \
            from exc


def load_vpt_policy(model_path: str, weights_path: str | None = None):
    """MineStudio's load_vpt_policy (a .model file of VPT kwargs, optional .weights), adapted. A missing
    path is an error naming it: MineStudio's own loader would download a model from a hub instead."""
    for what, path in (("model", model_path), ("weights", weights_path)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"VPT {what} file {path} does not exist")
    if model_path is None:
        raise FileNotFoundError("no VPT model file given")
    return adapt(vpt_module().load_vpt_policy(model_path, weights_path))


def adapt(policy):
    """policy with mso's contract (see the module doc) when its class is or derives from a minestudio class;
    any other policy is returned as it is."""
    from_minestudio = any(c.__module__.startswith("minestudio.") for c in type(policy).__mro__)
    if not from_minestudio or isinstance(policy, _FreshInitialState):
        return policy
    body = sys.modules.get(VPT_BODY)
    vpt = body is not None and type(policy).forward is body.VPTPolicy.forward
    policy.__class__ = _subclass(type(policy), _VPTFirst if vpt else _ResetAtFirst)
    head = getattr(policy, "value_head", None)
    if head is not None and hasattr(head, "normalize") and not isinstance(head, _ShapeKeepingValueHead):
        head.__class__ = _subclass(type(head), _ShapeKeepingValueHead)
    return policy


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    """base with mixin's methods in front (one class per pair, so adapted objects share their class)."""
    if (base, mixin) not in _SUBCLASSES:
        doc = f"{base.__doc__}\n(mso: {mixin.__doc__})"
        _SUBCLASSES[base, mixin] = type(base.__name__, (mixin, base), {"__module__": base.__module__, "__doc__": doc})
    return _SUBCLASSES[base, mixin]


def _first(context, b: int, t: int, device) -> torch.Tensor:
    first = (context or {}).get("first")
    if first is None:
        return torch.zeros(b, t, dtype=torch.bool, device=device)
    return torch.as_tensor(first, device=device).bool().reshape(b, t)


class _FreshInitialState:
    """initial_state returns copies of MineStudio's cached tensors."""

    def initial_state(self, batch_size=None):
        return [t.clone() for t in super().initial_state(batch_size)]


class _VPTFirst(_FreshInitialState):
    """episode starts (context["first"]) reach the VPT net, whose attention masks the past there."""

    def forward(self, input, state_in, context=None, **kwargs):
        # VPTPolicy.forward without its first=False and without its debugger trap on exceptions.
        b, t = input["image"].shape[:2]
        state_in = self.initial_state(b) if state_in is None else state_in
        (pi_h, v_h), state_out = self.net(input, state_in, context={"first": _first(context, b, t, self.device)})
        return {"pi_logits": self.pi_head(pi_h), "vpred": self.value_head(v_h)}, state_out


class _ResetAtFirst(_FreshInitialState):
    """the recurrent state is reset to the initial state at every episode start (context["first"])."""

    def forward(self, input, state_in, context=None, **kwargs):
        first = (context or {}).get("first")
        if first is None or not bool(torch.as_tensor(first).any()):
            return super().forward(input, state_in, context=context, **kwargs)
        first = torch.as_tensor(first, device=self.device).bool()
        b, t = first.shape
        state = self.initial_state(b) if state_in is None else state_in
        cuts = sorted({0, t, *first.any(0).nonzero().flatten().tolist()})
        parts = []
        for s, e in zip(cuts[:-1], cuts[1:]):
            state = _reset_rows(state, self.initial_state(b), first[:, s])
            latents, state = super().forward(_time_slice(input, s, e), state,
                                             context={**context, "first": first[:, s:e]}, **kwargs)
            parts.append(latents)
        return _time_cat(parts), state


class _ShapeKeepingValueHead:
    """normalize, denormalize and loss keep their input's shape."""

    def normalize(self, x):
        return super().normalize(x).reshape(x.shape)

    def denormalize(self, y):
        return super().denormalize(y).reshape(y.shape)

    def loss(self, pred, target, reduction="mean"):
        return F.mse_loss(pred, self.normalize(target), reduction=reduction)


def _reset_rows(state, initial, rows: torch.Tensor):
    return [torch.where(rows.reshape(-1, *[1] * (s.dim() - 1)), i, s) for s, i in zip(state, initial)]


def _time_slice(tree, s: int, e: int):
    if isinstance(tree, dict):
        return {k: _time_slice(v, s, e) for k, v in tree.items()}
    return tree[:, s:e]


def _time_cat(trees: list):
    if isinstance(trees[0], dict):
        return {k: _time_cat([t[k] for t in trees]) for k in trees[0]}
    return torch.cat(trees, dim=1)
