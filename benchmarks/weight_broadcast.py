"""Weight broadcast: publish (safetensors, chunks, pointer, notify) + fetch-and-verify on a rollout node,
for 5 M and 248.5 M parameters (VPT-small and VPT-2x sizes), against raw Redis SET+GET of the same bytes.

    python -m benchmarks.weight_broadcast [--sizes 5e6,248.5e6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from safetensors.torch import save

from services.shared import weights
from services.shared.redis_server import RedisServer, connect


def state_dict(params: int) -> dict[str, torch.Tensor]:
    """Layers of 1 M parameters each (a transformer-like spread of tensors), summing to params."""
    layer = 1_000_000
    out = {f"layer{i}.weight": torch.randn(layer // 1000, 1000) for i in range(int(params) // layer)}
    rest = int(params) - len(out) * layer
    if rest:
        out["rest"] = torch.randn(rest)
    return out


def raw_set_get(client, data: bytes) -> float:
    """Seconds for the baseline: SET the bytes in the weight store's chunks, then MGET and join them."""
    chunk = weights.CHUNK_BYTES
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(data), chunk):
        pipe.set(f"raw:{i}", data[i:i + chunk])
    pipe.execute()
    got = b"".join(client.mget([f"raw:{i}" for i in range(0, len(data), chunk)]))
    seconds = time.perf_counter() - start
    assert got == data
    client.delete(*[f"raw:{i}" for i in range(0, len(data), chunk)])
    return seconds


def measure(url: str, params: float) -> dict:
    """Raw and mso seconds, interleaved; the median of several rounds when a round takes well under a
    second (one 0.05 s round on a noisy machine says little)."""
    client = connect(url)
    sd = state_dict(int(params))
    rounds = 7 if params < 50e6 else 1
    raw, mso = [], []
    mib = 0.0

    def raw_round() -> None:
        nonlocal mib
        data = save(sd)
        raw.append(raw_set_get(client, data))
        mib = len(data) / 2 ** 20

    def mso_round(version: int) -> None:
        start = time.perf_counter()
        pointer = weights.publish(client, "bench", version, sd)
        loaded = weights.fetch(client, "bench", pointer)
        mso.append(time.perf_counter() - start)
        assert torch.equal(loaded[next(iter(sd))], sd[next(iter(sd))])

    for version in range(1, rounds + 1):
        # Alternate which goes first: the second finds memory the first freed, and skips its page faults.
        if version % 2:
            raw_round()
            mso_round(version)
        else:
            mso_round(version)
            raw_round()
    client.flushall()
    raw_s, mso_s = statistics.median(raw), statistics.median(mso)
    return {"params_m": params / 1e6, "mib": mib, "raw_s": raw_s, "mso_s": mso_s, "ratio": mso_s / raw_s,
            "rounds": rounds}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5e6,248.5e6", help="parameter counts, comma separated")
    args = parser.parse_args(argv)
    results = []
    with RedisServer() as redis:
        for params in (float(s) for s in args.sizes.split(",")):
            r = measure(redis.url, params)
            results.append(r)
            print(f"{r['params_m']:8.1f} M params  {r['mib']:8.1f} MiB  raw {r['raw_s']:6.2f} s  "
                  f"mso {r['mso_s']:6.2f} s  ratio {r['ratio']:5.2f} (goal <= 1.5)")
    return results


if __name__ == "__main__":
    main()
