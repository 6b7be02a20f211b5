"""VPT at the size gate_kl trains (the 2x kwargs of reference §5.3: 248.5 M parameters, ~1 GB fp32), built
from minestudio with random weights:
- weights: publish (safetensors, 64 MiB chunks, pointer) + fetch-and-verify + load_state_dict on the
  rollout side, against raw Redis SET+GET of the same bytes;
- fragments: bytes per step of a 256-step fragment before and after the codec's lz4, split into frames and
  recurrent in-state. The in-state is the model's own after 128 frames. Frames are two bounds, as no real
  Minecraft frame is at hand: uniform noise (incompressible) and a flat colour (the most compressible).

    python -m benchmarks.vpt_scale
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from safetensors.torch import save

from benchmarks.weight_broadcast import raw_set_get
from services.shared import codec, minestudio, weights
from services.shared.redis_server import RedisServer, connect

VPT_2X = dict(attention_heads=16, attention_mask_style="clipped_causal", attention_memory_size=256,
              diff_mlp_embedding=False, hidsize=2048, img_shape=[128, 128, 3], impala_chans=[16, 32, 32],
              impala_kwargs={"post_pool_groups": 1}, impala_width=8,
              init_norm_kwargs={"batch_norm": False, "group_norm_groups": 1}, n_recurrence_layers=4,
              only_img_input=True, pointwise_ratio=4, pointwise_use_activation=False, recurrence_is_residual=True,
              recurrence_type="transformer", timesteps=128, use_pointwise_layer=True, use_pre_lstm_ln=False)
LENGTH = 256  # gate_kl's fragment_length


def measure_weights(url: str, policy) -> dict:
    client = connect(url)
    sd = policy.state_dict()
    data = save({k: v.contiguous() for k, v in sd.items()})
    raw_s = raw_set_get(client, data)

    start = time.perf_counter()
    pointer = weights.publish(client, "bench", 1, sd)
    publish_s = time.perf_counter() - start
    loaded = weights.fetch(client, "bench", pointer)
    fetch_s = time.perf_counter() - start - publish_s
    assert all(torch.equal(loaded[k], v) for k, v in sd.items()), "not bit-exact"
    t = time.perf_counter()
    policy.load_state_dict(loaded)
    load_s = time.perf_counter() - t
    client.flushall()
    total = publish_s + fetch_s + load_s
    return {"params_m": sum(v.numel() for v in sd.values()) / 1e6, "mib": len(data) / 2 ** 20,
            "chunks": pointer["chunks"], "publish_s": publish_s, "fetch_s": fetch_s, "load_s": load_s,
            "mso_s": total, "raw_s": raw_s, "ratio": total / raw_s}


def measure_fragment(policy) -> dict:
    with torch.inference_mode():
        frames = torch.randint(0, 256, (1, 128, 128, 128, 3), dtype=torch.uint8)
        _, state = policy({"image": frames}, policy.initial_state(1), context={"first": torch.zeros(1, 128).bool()})
    in_state = [s.numpy() for s in state]
    rng = np.random.default_rng(0)
    out = {"state_raw_per_step": sum(s.nbytes for s in in_state) / LENGTH}
    for name, image in (("noise", rng.integers(0, 256, (LENGTH, 128, 128, 3), dtype=np.uint8)),
                        ("flat", np.full((LENGTH, 128, 128, 3), 90, dtype=np.uint8))):
        fragment = {"obs": {"image": image},
                    "action": {"buttons": rng.integers(0, 8641, (LENGTH, 1)),
                               "camera": rng.integers(0, 121, (LENGTH, 1))},
                    "reward": np.zeros(LENGTH, np.float32), "first": np.zeros(LENGTH, bool),
                    "next_done": np.zeros(LENGTH, bool), "logp": np.zeros(LENGTH, np.float32),
                    "vpred": np.zeros(LENGTH, np.float32), "model_version": np.zeros(LENGTH, np.int64),
                    "in_state": in_state, "next_obs": {"image": image[0]}}
        raw = sum(a.nbytes for a in _leaves(fragment))
        start = time.perf_counter()
        encoded = codec.encode(fragment)
        out[f"{name}_encode_s"] = time.perf_counter() - start
        out[f"{name}_raw_per_step"] = raw / LENGTH
        out[f"{name}_encoded_per_step"] = len(encoded) / LENGTH
        out[f"{name}_frames_only_encoded_per_step"] = len(codec.encode({"image": image})) / LENGTH
    out["state_encoded_per_step"] = len(codec.encode(in_state)) / LENGTH
    return out


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    policy = minestudio.adapt(minestudio.vpt_module().VPTPolicy(policy_kwargs=VPT_2X, temperature=2.0)).eval()
    print(f"built VPT-2x in {time.perf_counter() - start:.1f} s")
    with RedisServer() as redis:
        w = measure_weights(redis.url, policy)
    print(f"weights {w['params_m']:.1f} M params {w['mib']:.0f} MiB in {w['chunks']} chunks: publish "
          f"{w['publish_s']:.2f} s + fetch/verify {w['fetch_s']:.2f} s + load_state_dict {w['load_s']:.2f} s = "
          f"{w['mso_s']:.2f} s; raw SET+GET {w['raw_s']:.2f} s; ratio {w['ratio']:.2f}")
    f = measure_fragment(policy)
    print(f"fragment of {LENGTH} steps, bytes per step (raw -> lz4): in-state {f['state_raw_per_step']:.0f} -> "
          f"{f['state_encoded_per_step']:.0f}")
    for name in ("noise", "flat"):
        print(f"  {name:5s} frames: whole fragment {f[f'{name}_raw_per_step']:.0f} -> "
              f"{f[f'{name}_encoded_per_step']:.0f} (frames alone -> {f[f'{name}_frames_only_encoded_per_step']:.0f}); "
              f"encode {f[f'{name}_encode_s']:.2f} s")
    return {**w, **f}


if __name__ == "__main__":
    main()
