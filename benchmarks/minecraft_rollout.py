"""Minecraft-shaped rollout efficiency: N stand-in envs whose steps take 30-70 ms (20 FPS on average) with
128x128x3 frames, through a rollout worker, with two policies on the CPU: a small feed-forward CNN, and a
recurrent one acting in VPT's action dict (a GRU, `buttons` and `camera` heads: MinePolicy's shape).
Efficiency = achieved env FPS / (N x 20), the envs' own speed. Goal >= 0.90 for N = 8.

    python -m benchmarks.minecraft_rollout [--envs 8] [--seconds 20] [--policy cnn|gru|both]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from services.shared import session
from services.shared.config import load
from services.shared.session import Joined
from services.shared.queue import FragmentConsumer, ledger
from services.shared.redis_server import RedisServer, connect
from services.rollout.worker import RolloutLoop

CONFIGS = {"cnn": str(Path(__file__).with_name("minecraft_standin_config.py")),
           "gru": str(Path(__file__).with_name("minecraft_gru_standin_config.py"))}
# Nodes run only config modules an operator allowed: this folder's stand-in is one.
os.environ["MSO_CONFIG_PATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                              os.environ.get("MSO_CONFIG_PATH")]))


def measure(url: str, envs: int, seconds: float, policy: str = "cnn") -> dict:
    client = connect(url)
    loaded = load(CONFIGS[policy], [f"rollout_config.worker_config.num_envs={envs}",
                           f"rollout_config.worker_config.batch_size={envs}"])
    sid = session.create(client, loaded)
    loop = RolloutLoop(0, Joined.of(sid, loaded), url, "bench")
    stop = threading.Event()

    def drain():
        consumer = FragmentConsumer(connect(url), sid, "bench")
        while not stop.is_set():
            consumer.retire([i for i, _ in consumer.read(64, block_ms=100)], "consumed")

    threads = [threading.Thread(target=loop.run, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while ledger(client, sid).get("produced", 0) < envs and time.monotonic() < deadline:
        time.sleep(0.1)  # warm-up: every env has started and produced
    s0, t0 = loop.stats["env_steps"], time.perf_counter()
    time.sleep(seconds)
    s1, t1 = loop.stats["env_steps"], time.perf_counter()
    loop.stop_event.set()
    stop.set()
    for t in threads:
        t.join(30)
    fps = (s1 - s0) / (t1 - t0)
    return {"policy": policy, "envs": envs, "env_fps": fps, "ideal_fps": envs / 0.05, "efficiency": fps / (envs / 0.05),
            "inference_ms": loop.stats["inference_ms"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--policy", choices=["cnn", "gru", "both"], default="both")
    args = parser.parse_args(argv)
    results = {}
    with RedisServer() as redis:
        for policy in (["cnn", "gru"] if args.policy == "both" else [args.policy]):
            r = results[policy] = measure(redis.url, args.envs, args.seconds, policy)
            print(f"{policy}: {r['envs']} envs: {r['env_fps']:.1f} env FPS of {r['ideal_fps']:.0f} ideal -> "
                  f"efficiency {r['efficiency']:.2f} (goal >= 0.90); inference {r['inference_ms']:.1f} ms per batch")
    return results


if __name__ == "__main__":
    main()
