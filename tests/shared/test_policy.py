"""The categorical head's sampling: the distribution its logits say, and never a choice without mass."""

import math

import torch
from torch.nn import functional as F

from services.shared.policy import CategoricalHead


def test_samples_follow_the_logits_and_never_take_a_choice_without_mass():
    torch.manual_seed(0)
    head = CategoricalHead(1, 6)
    # masses 0 at both ends and in the middle, as exp of log-softmax underflows for a near-impossible choice
    raw = torch.tensor([-1e4, 0.0, math.log(3.0), -1e4, math.log(6.0), -1e4])
    logits = F.log_softmax(raw, -1).expand(4, 50_000, 6)         # (B, T, n), as a worker's batch
    actions = head.sample(logits)
    assert actions.shape == (4, 50_000) and actions.dtype == torch.long
    counts = torch.bincount(actions.reshape(-1), minlength=6).double()
    assert counts[0] == counts[3] == counts[5] == 0
    n = counts.sum()
    for choice, p in ((1, 0.1), (2, 0.3), (4, 0.6)):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[choice] - n * p) < 5 * sd, (choice, counts[choice].item(), n * p)


def test_a_row_whose_draw_rounds_up_to_its_total_still_takes_a_choice_with_mass(monkeypatch):
    """rand() * total can round to total in float32; the draw is kept below it, so the last choices, here
    without mass, are not taken."""
    head = CategoricalHead(1, 4)
    logits = F.log_softmax(torch.tensor([[0.0, 0.0, -1e4, -1e4]]), -1)
    monkeypatch.setattr(torch, "rand_like", torch.ones_like)     # the draw at (beyond) its largest value
    assert head.sample(logits).item() == 1
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)    # and at its smallest
    assert head.sample(logits).item() == 0


def test_deterministic_takes_the_most_likely_choice():
    logits = F.log_softmax(torch.tensor([[0.1, 2.0, 0.3]]), -1)
    assert CategoricalHead(1, 3).sample(logits, deterministic=True).item() == 1
