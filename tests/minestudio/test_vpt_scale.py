"""VPT-sized data through the real Redis: a VPT state dict larger than one 64 MiB weight chunk is published
and loaded by a rollout-side policy bit-exact, and a fragment shaped like a 2x-VPT one (128x128 frames, the
bool attention masks and K/V state) crosses the fragment stream bit-exact. The 248.5 M-parameter sizes are
measured by benchmarks/vpt_scale.py."""

import numpy as np
import torch

from services.shared import minestudio, weights
from services.shared.queue import FragmentConsumer, FragmentProducer
from tests.fragment_factory import make
from tests.minestudio.standin_config import TINY_VPT


def test_a_vpt_state_dict_over_one_chunk_is_loaded_bit_exact(redis_client):
    body = minestudio.vpt_module()
    kwargs = {**TINY_VPT, "hidsize": 1024, "attention_heads": 8}  # 25 M parameters, ~100 MB
    torch.manual_seed(0)
    trainer_side = body.VPTPolicy(policy_kwargs=kwargs, temperature=2.0)
    state = trainer_side.state_dict()
    size = sum(v.numel() * v.element_size() for v in state.values())
    assert size > weights.CHUNK_BYTES, f"{size} bytes fit one chunk: the test would not cross a chunk boundary"
    pointer = weights.publish(redis_client, "s", 1, state)
    assert pointer["chunks"] >= 2
    torch.manual_seed(1)
    rollout_side = minestudio.adapt(body.VPTPolicy(policy_kwargs=kwargs, temperature=2.0))
    rollout_side.load_state_dict(weights.fetch(redis_client, "s", weights.latest_pointer(redis_client, "s")))
    for k, v in rollout_side.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k


def test_a_2x_vpt_shaped_fragment_crosses_the_stream_bit_exact(redis_client):
    rng = np.random.default_rng(0)
    length, maxlen, hidsize, blocks = 256, 128, 2048, 4  # the 2x VPT of gate_kl (reference §3.2)
    in_state = []
    for _ in range(blocks):
        in_state += [rng.random((1, 1, maxlen)) < 0.5, rng.standard_normal((1, maxlen, hidsize), dtype=np.float32),
                     rng.standard_normal((1, maxlen, hidsize), dtype=np.float32)]
    fragment = make("s", length, obs={"image": rng.integers(0, 256, (length, 128, 128, 3), dtype=np.uint8)},
                    action={"buttons": rng.integers(0, 8641, (length, 1)), "camera": rng.integers(0, 121, (length, 1))},
                    in_state=in_state)
    FragmentProducer(redis_client, "s", max_pending=4).push(fragment)
    (_id, got), = FragmentConsumer(redis_client, "s", "c").read(1, block_ms=1000)
    assert np.array_equal(got["obs"]["image"], fragment.obs["image"])
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got["in_state"], in_state))
    assert got["in_state"][0].dtype == np.bool_ and got["action"]["buttons"].dtype == np.int64
