"""MineStudio's VPTPolicy under mso's policy contract: imported without the model zoo, episode starts reset
it in training as in rollout, fresh initial states, value-head shapes, loading from .model/.weights files."""

import copy
import subprocess
import sys

import pytest
import torch

from services.shared import minestudio
from tests.minestudio.standin_config import TINY_VPT


@pytest.fixture(scope="module")
def body():
    return minestudio.vpt_module()


def tiny(body, seed=0):
    torch.manual_seed(seed)
    return body.VPTPolicy(policy_kwargs=TINY_VPT, temperature=2.0).eval()


def frames(b, t, seed=1):
    return {"image": torch.randint(0, 256, (b, t, 128, 128, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed))}


def test_vpt_imports_without_the_model_zoo_and_the_core_without_minestudio():
    code = ("import sys; import services.rollout.worker, services.trainer.learner, services.cli; "
            "assert not [m for m in sys.modules if m.startswith('minestudio')], 'core imported minestudio'; "
            "from services.shared.minestudio import vpt_module; vpt_module(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'timm', 'transformers'}), "
            "sorted(m for m in sys.modules if m.startswith('minestudio.models.') and 'vpt' not in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "['minestudio.models.base_policy']"]


def test_an_episode_start_inside_a_chunk_resets_the_vpt_as_a_rollout_does(body):
    policy = minestudio.adapt(tiny(body))
    x = frames(2, 8)
    first = torch.zeros(2, 8, dtype=torch.bool)
    first[0, 3] = first[1, 5] = True
    with torch.no_grad():
        _, warm = policy(frames(2, 8, seed=2), policy.initial_state(2), context={"first": torch.zeros(2, 8).bool()})
        chunk, _ = policy(x, warm, context={"first": first})
        # A rollout steps one frame at a time from a fresh state at the episode start (the worker resets it).
        for row, start in ((0, 3), (1, 5)):
            state = policy.initial_state(1)
            for t in range(start, 8):
                step, state = policy({"image": x["image"][row:row + 1, t:t + 1]}, state,
                                     context={"first": torch.tensor([[t == start]])})
                # float32 sums in another order (one frame vs a chunk): equal to ~5e-5 on logits near -9
                assert torch.allclose(step["vpred"][0, 0], chunk["vpred"][row, t], atol=2e-4)
                for k in ("buttons", "camera"):
                    assert torch.allclose(step["pi_logits"][k][0, 0], chunk["pi_logits"][k][row, t], atol=2e-4)
        # MineStudio's own forward ignores `first`: the previous episode leaks into the new one.
        raw = copy.deepcopy(policy)
        raw.__class__ = body.VPTPolicy
        leaked, _ = raw(x, warm, context={"first": first})
    assert (leaked["vpred"][0, 3:] - chunk["vpred"][0, 3:]).abs().max() > 1e-2


def test_any_other_minepolicy_is_reset_by_cutting_the_chunk_at_episode_starts(body):
    native = minestudio.adapt(tiny(body))
    cutting = copy.deepcopy(native)
    cutting.__class__ = minestudio._subclass(body.VPTPolicy, minestudio._ResetAtFirst)  # as for a non-VPT policy
    first = torch.zeros(2, 8, dtype=torch.bool)
    first[0, 2] = first[0, 6] = first[1, 4] = True
    with torch.no_grad():
        _, warm = native(frames(2, 8, seed=2), native.initial_state(2), context={"first": torch.zeros(2, 8).bool()})
        a, sa = native(frames(2, 8), warm, context={"first": first})
        b, sb = cutting(frames(2, 8), warm, context={"first": first})
        assert torch.allclose(a["vpred"], b["vpred"], atol=2e-4)
        assert torch.allclose(a["pi_logits"]["buttons"], b["pi_logits"]["buttons"], atol=2e-4)
        # The states differ in what they hold behind the mask, not in what follows from them.
        a2, _ = native(frames(2, 8, seed=3), sa, context={"first": torch.zeros(2, 8).bool()})
        b2, _ = cutting(frames(2, 8, seed=3), sb, context={"first": torch.zeros(2, 8).bool()})
    assert torch.allclose(a2["vpred"], b2["vpred"], atol=2e-4)


def test_initial_states_are_fresh_copies_and_value_heads_keep_shapes(body):
    policy = minestudio.adapt(tiny(body))
    assert minestudio.adapt(policy) is policy and type(minestudio.adapt(policy)) is type(policy)
    state = policy.initial_state(2)
    state[1].fill_(7.0)  # what any in-place use of a state would do to MineStudio's cache
    assert policy.initial_state(2)[1].abs().sum() == 0
    assert [s.dtype for s in state] == [torch.bool, torch.float32, torch.float32]
    head = policy.value_head
    x = torch.randn(3, 5)
    assert head.normalize(x).shape == head.denormalize(x).shape == head.loss(x, x, reduction="none").shape == (3, 5)
    ref = copy.deepcopy(policy)  # the trainer's frozen reference policy
    assert type(ref) is type(policy) and type(ref.value_head) is type(head)
    other = torch.nn.Linear(2, 2)
    assert minestudio.adapt(other) is other and type(other) is torch.nn.Linear

    class ConfigsOwnVPT(body.VPTPolicy):  # a subclass in a user's config module is still MineStudio's VPT
        pass

    torch.manual_seed(0)
    assert isinstance(minestudio.adapt(ConfigsOwnVPT(policy_kwargs=TINY_VPT, temperature=2.0)), minestudio._VPTFirst)


def test_load_vpt_policy_from_model_and_weights_files(body, tmp_path, tiny_model_file):
    model = tiny_model_file
    weights = tmp_path / "tiny.weights"
    torch.save(tiny(body, seed=5).state_dict(), weights)
    policy = minestudio.load_vpt_policy(str(model), str(weights))
    assert isinstance(policy, minestudio._VPTFirst)
    for k, v in tiny(body, seed=5).state_dict().items():
        assert torch.equal(policy.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="missing.weights"):
        minestudio.load_vpt_policy(str(model), str(tmp_path / "missing.weights"))
