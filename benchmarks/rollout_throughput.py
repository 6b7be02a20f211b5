"""CartPole env steps/s through the rollout service (env subprocesses -> batched inference -> fragments
into Redis, drained by a consumer) with 1 and 2 workers, against raw gymnasium vector-env stepping with the
same policy in as many processes at once (1 and 2), measured in the same run, before and after the service.

    python -m benchmarks.rollout_throughput [--seconds 15] [--envs 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time

import gymnasium as gym
import torch

from services.shared import session
from services.shared.config import load
from services.launcher.embedded import ChildProcess, start_ray_head
from services.shared.queue import FragmentConsumer, ledger
from services.shared.ports import free_port
from services.shared.redis_server import RedisServer, connect
from services.shared.rpc import channel, wait_serving
from services.shared.protos import rollout_pb2, rollout_pb2_grpc


def raw_vector_env(num_envs: int, seconds: float) -> float:
    """Steps/s of gymnasium's SyncVectorEnv with the cartpole policy choosing every action."""
    cfg = load("cartpole")
    torch.manual_seed(0)
    policy = cfg.module.policy_generator().eval()
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(num_envs)])
    obs, _ = envs.reset(seed=0)
    steps, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            latents, _ = policy({"obs": torch.as_tensor(obs[:, None], dtype=torch.float32)}, [])
            action = policy.pi_head.sample(latents["pi_logits"]).reshape(-1).numpy()
            obs, *_ = envs.step(action)
            steps += num_envs
    return steps / (time.perf_counter() - start)


def raw_in_processes(processes: int, num_envs: int, seconds: float) -> float:
    """The summed steps/s of raw_vector_env in `processes` processes stepping at the same time."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return sum(pool.starmap(raw_vector_env, [(num_envs, seconds)] * processes))


def through_service(workers: int, num_envs: int, seconds: float, redis_url: str, address: str) -> float:
    client = connect(redis_url)
    overrides = [f"rollout_config.num_rollout_workers={workers}", f"rollout_config.worker_config.num_envs={num_envs}",
                 f"rollout_config.worker_config.batch_size={num_envs}", "rollout_config.num_cpus_per_worker=0.5"]
    sid = session.create(client, load("cartpole", overrides))
    stop = threading.Event()

    def drain():
        consumer = FragmentConsumer(connect(redis_url), sid, "bench")
        while not stop.is_set():
            consumer.retire([i for i, _ in consumer.read(256, block_ms=100)], "consumed")

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    with channel(address) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        stub.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=180)
        deadline = time.monotonic() + 60
        while ledger(client, sid).get("produced", 0) < 10 * workers and time.monotonic() < deadline:
            time.sleep(0.1)  # warm-up: every worker's envs are up and fragments flow
        s0, t0 = ledger(client, sid)["env_steps"], time.perf_counter()
        time.sleep(seconds)
        s1, t1 = ledger(client, sid)["env_steps"], time.perf_counter()
        stub.Stop(rollout_pb2.RolloutStopRequest(), timeout=120)
    stop.set()
    drainer.join()
    session.update(client, sid, phase="SESSION_PHASE_STOPPED")
    return (s1 - s0) / (t1 - t0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    redis = RedisServer()
    head, ray_env = start_ray_head(4, dict(os.environ))
    env = dict(os.environ, **ray_env)
    port = free_port()
    node = ChildProcess("rollout", [sys.executable, "-m", "services.cli", "rollout", "serve", "--host=127.0.0.1",
                                    f"--port={port}", f"--redis-url={redis.url}"], env, quiet=True)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=60)
        results = {}
        for workers in (1, 2):
            # The baseline is measured before and after the service and averaged: this host's speed drifts by
            # tens of percent over a minute, and a baseline on one side only carries that drift into the ratio.
            before = raw_in_processes(workers, args.envs, args.seconds)
            rate = through_service(workers, args.envs, args.seconds, redis.url, f"127.0.0.1:{port}")
            after = raw_in_processes(workers, args.envs, args.seconds)
            raw = (before + after) / 2
            results[f"raw_{workers}_process_steps_per_s_before"] = before
            results[f"raw_{workers}_process_steps_per_s_after"] = after
            results[f"raw_{workers}_process_steps_per_s"] = raw
            results[f"service_{workers}_worker_steps_per_s"] = rate
            results[f"ratio_{workers}_worker"] = rate / raw
    finally:
        node.stop(grace=30)
        head.stop(grace=10)
        redis.stop()
    print(f"{'measure':38s} {'value':>12s}")
    for k, v in results.items():
        print(f"{k:38s} {v:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
