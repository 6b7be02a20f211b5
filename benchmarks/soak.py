"""Soak: `mso run cartpole` for a long time, sampling the RSS of every process of the run (the launcher,
Redis, Ray, both services, actors, env processes) and the Redis memory; prints the first and last samples
per process kind and the growth. Not run in CI: 30 minutes is the intended length.

    python -m benchmarks.soak [--minutes 30] [--envs 4] [--interval 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import psutil

from services.shared.ports import free_port


def kind(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    for name in ("rollout serve", "trainer serve", "redis-server", "raylet", "gcs_server", "forkserver",
                 "RolloutWorker", "RolloutManager", "LearnerActor", "ray::", "services.cli run"):
        if name in cmd or name in p.name():
            return name
    return p.name()


def sample(root: psutil.Process) -> dict[str, float]:
    rss = defaultdict(float)
    for p in [root, *root.children(recursive=True)]:
        try:
            rss[kind(p)] += p.memory_info().rss / 2 ** 20
        except psutil.Error:
            pass
    return dict(rss)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--interval", type=float, default=30)
    args = parser.parse_args(argv)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "cartpole",
                             "train_config.num_iterations=10000000", f"rollout_config.worker_config.num_envs={args.envs}",
                             f"rollout_config.worker_config.batch_size={args.envs}", f"--port={port}", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    samples = []
    try:
        time.sleep(60)  # past start-up: the first sample is of the running system
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end and proc.poll() is None:
            samples.append((time.monotonic(), sample(root)))
            print(f"{len(samples):4d}  total RSS {sum(samples[-1][1].values()):8.0f} MiB", flush=True)
            time.sleep(args.interval)
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(120)
    first, last = samples[0][1], samples[-1][1]
    print(f"\n{'process kind':28s} {'first MiB':>10s} {'last MiB':>10s} {'growth':>8s}")
    for k in sorted(set(first) | set(last)):
        a, b = first.get(k, 0.0), last.get(k, 0.0)
        print(f"{k:28s} {a:10.0f} {b:10.0f} {b - a:+8.0f}")


if __name__ == "__main__":
    main()
