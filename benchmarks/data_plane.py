"""Data plane: fragment bytes/s from rollout encode -> XADD -> XREADGROUP -> trainer decode, against raw
XADD/XREADGROUP/XACK+XDEL of byte blobs of the same size, measured in the same run on one redis-server.

    python -m benchmarks.data_plane [--fragments 300] [--frames 64]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from services.shared.codec import decode
from services.shared.fragment import Fragment
from services.shared.queue import FragmentConsumer, FragmentProducer
from services.shared.redis_server import RedisServer, connect


def make_fragment(length: int, rng: np.random.Generator) -> Fragment:
    """A Minecraft-shaped fragment: 128x128x3 frames (random, so they hardly compress) plus a recurrent
    state."""
    z = np.zeros(length, np.float32)
    return Fragment(session_id="bench", slot="s", seq=0, contiguous=True, version_first=0,
                    obs={"image": rng.integers(0, 255, (length, 128, 128, 3), dtype=np.uint8)},
                    action={"buttons": rng.integers(0, 8641, (length, 1)), "camera": rng.integers(0, 121, (length, 1))},
                    reward=z, first=np.zeros(length, bool), next_done=np.zeros(length, bool),
                    next_truncated=np.zeros(length, bool), truncation_value=z, logp=z,
                    model_version=np.zeros(length, np.int64), in_state=[rng.standard_normal((1, 64, 256), np.float32)],
                    next_obs={"image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)})


def run_pair(produce, consume, count: int) -> float:
    """Seconds for a producer and a consumer thread to move count items."""
    start = time.perf_counter()
    producer = threading.Thread(target=produce)
    producer.start()
    consume(count)
    producer.join()
    return time.perf_counter() - start


def measure(url: str, fragments: int, frames: int) -> dict:
    rng = np.random.default_rng(0)
    fragment = make_fragment(frames, rng)
    size = len(fragment.encode())
    blob = rng.bytes(size)
    client = connect(url)

    # Raw: the same bytes, the same stream commands, no encoding.
    client.xgroup_create("raw", "g", id="0", mkstream=True)

    def raw_produce():
        c = connect(url)
        for _ in range(fragments):
            while c.xlen("raw") >= 64:
                time.sleep(0.001)
            c.xadd("raw", {b"f": blob})

    def raw_consume(n):
        c = connect(url)
        got = 0
        while got < n:
            reply = c.xreadgroup("g", "c", {"raw": ">"}, count=8, block=1000)
            ids = [i for _s, entries in reply or [] for i, _f in entries]
            if ids:
                pipe = c.pipeline()
                pipe.xack("raw", "g", *ids)
                pipe.xdel("raw", *ids)
                pipe.execute()
            got += len(ids)

    raw_s = run_pair(raw_produce, raw_consume, fragments)

    def mso_produce():
        producer = FragmentProducer(connect(url), "bench", max_pending=64)
        for _ in range(fragments):
            producer.push(fragment)

    def mso_consume(n):
        consumer = FragmentConsumer(connect(url), "bench", "c")
        got = 0
        while got < n:
            entries = consumer.read(8, block_ms=1000)
            consumer.retire([i for i, _ in entries], "consumed")
            got += len(entries)

    mso_s = run_pair(mso_produce, mso_consume, fragments)
    encode_s = min(_timed(fragment.encode) for _ in range(3))
    payload = fragment.encode()
    decode_s = min(_timed(lambda: decode(payload)) for _ in range(3))
    mib = size * fragments / 2 ** 20
    return {"fragment_mib": size / 2 ** 20, "raw_mib_per_s": mib / raw_s, "mso_mib_per_s": mib / mso_s,
            "ratio": raw_s / mso_s, "encode_ms": encode_s * 1000, "decode_ms": decode_s * 1000}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fragments", type=int, default=200)
    parser.add_argument("--frames", type=int, default=64, help="steps per fragment (128x128x3 each)")
    args = parser.parse_args(argv)
    with RedisServer() as redis:
        results = measure(redis.url, args.fragments, args.frames)
    for k, v in results.items():
        print(f"{k:24s} {v:10.2f}")
    return results


if __name__ == "__main__":
    main()
