"""The Minecraft-shaped stand-in of minecraft_standin_config.py (no Minecraft engine here: 128x128x3 frames,
steps of 30-70 ms) with a recurrent policy that acts in VPT's action dict: a CNN, a GRU whose state resets at
episode starts, and two categorical heads, `buttons` (8641 choices) and `camera` (121), as MineStudio's VPT
policies act. What a rollout worker does per step for it (recurrent state per env, dict actions) is what a
MinePolicy costs beyond a feed-forward one."""

import torch
from torch import nn

from benchmarks.minecraft_standin_config import env_generator, online_dict  # noqa: F401  (same env and config)
from services.shared.policy import CategoricalHead, ValueHead

HIDDEN = 128
ACTIONS = {"buttons": 8641, "camera": 121}


class DictHead(nn.Module):
    """One categorical head per action key; logits and actions are dicts with the same keys."""

    def __init__(self, hidsize: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: CategoricalHead(hidsize, n) for k, n in ACTIONS.items()})

    def forward(self, x):
        return {k: head(x) for k, head in self.heads.items()}

    def sample(self, logits, deterministic=False):
        return {k: self.heads[k].sample(logits[k], deterministic) for k in self.heads}

    def logprob(self, action, logits):
        return sum(self.heads[k].logprob(action[k], logits[k]) for k in self.heads)

    def entropy(self, logits):
        return sum(self.heads[k].entropy(logits[k]) for k in self.heads)

    def kl_divergence(self, q, p):
        return sum(self.heads[k].kl_divergence(q[k], p[k]) for k in self.heads)


class GruPolicy(nn.Module):
    """MinePolicy's interface with a recurrent state: [h] of shape (B, HIDDEN)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 8, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=4),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, HIDDEN), nn.ReLU())
        self.gru = nn.GRUCell(HIDDEN, HIDDEN)
        self.pi_head = DictHead(HIDDEN)
        self.value_head = ValueHead(HIDDEN)

    @property
    def device(self):
        return self.gru.weight_ih.device

    def initial_state(self, batch_size=None):
        return [torch.zeros(batch_size or 1, HIDDEN)]

    def merge_state(self, states):
        return [torch.cat([s[0] for s in states])]

    def split_state(self, state, n):
        return [[state[0][i:i + 1]] for i in range(n)]

    def forward(self, input, state_in=None, context=None):
        image = input["image"]
        b, t = image.shape[:2]
        x = self.body(image.reshape(b * t, *image.shape[2:]).permute(0, 3, 1, 2).float() / 255).reshape(b, t, -1)
        h = (state_in or self.initial_state(b))[0]
        first = context["first"] if context else torch.zeros(b, t, dtype=torch.bool)
        out = []
        for i in range(t):
            h = self.gru(x[:, i], torch.where(first[:, i:i + 1], torch.zeros_like(h), h))
            out.append(h)
        y = torch.stack(out, 1)
        return {"pi_logits": self.pi_head(y), "vpred": self.value_head(y)}, [h]


def policy_generator():
    torch.set_num_threads(1)
    return GruPolicy()
