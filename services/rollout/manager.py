"""RolloutManager: a Ray actor that starts this node's RolloutWorker actors for a session, scales them up
and down, stops them, and sums their status (env steps/s is measured here, between two status calls)."""

from __future__ import annotations

import time
import uuid

import ray

from mso.config import from_yaml
from mso.rollout.worker import RolloutWorker

STATUS_TIMEOUT = 5.0
SUMMED = ("env_steps", "fragments_pushed", "bytes_pushed", "episodes", "env_restarts", "env_timeouts",
          "steps_dropped", "live_envs", "videos", "malformed_obs")


def worker_resources(rc) -> dict:
    return {"num_cpus": rc.num_cpus_per_worker, "num_gpus": rc.num_gpus_per_worker}


def new_worker(node_id: str, resources: dict):
    return RolloutWorker.options(**resources, name=f"rollout-worker-{node_id}-{uuid.uuid4().hex[:6]}",
                                 namespace="online").remote()


@ray.remote(num_cpus=0)
class RolloutManager:
    def __init__(self, node_id: str):
        self.node_id = node_id
        self.args: tuple = ()
        self.rc = None
        self.workers: list = []
        self.next_index = 0
        self.retired = {k: 0 for k in SUMMED}  # counters of workers scaled away, so totals never go back
        self._last = (time.monotonic(), 0)
        self._rate = 0.0

    def start(self, session_id: str, redis_url: str, config_name: str, config_yaml: str, spare=None) -> int:
        """Start the session's workers; `spare`, a worker the service started ahead, becomes the first."""
        self.args = (session_id, redis_url, config_name, config_yaml, self.node_id)
        self.rc = from_yaml(config_yaml).rollout_config
        return self.scale(self.rc.num_rollout_workers, spare)

    def scale(self, num_workers: int, spare=None) -> int:
        """Grow or shrink to num_workers workers; a removed worker's partial fragments are never produced."""
        added = []
        while len(self.workers) < num_workers:
            worker, spare = spare or new_worker(self.node_id, worker_resources(self.rc)), None
            self.workers.append(worker)
            added.append(worker)
        if spare is not None:
            ray.kill(spare)
        ray.get([w.start.remote(self.next_index + i, *self.args) for i, w in enumerate(added)])
        self.next_index += len(added)
        while len(self.workers) > num_workers:
            self._retire(self.workers.pop())
        return len(self.workers)

    def _retire(self, worker) -> None:
        final = ray.get(worker.stop.remote(), timeout=60)
        for k in SUMMED:
            if k != "live_envs":
                self.retired[k] += final[k]
        ray.kill(worker)

    def status(self) -> dict:
        refs = [w.status.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STATUS_TIMEOUT)
        stats = [ray.get(r) for r in ready]
        total = {k: self.retired[k] * (k != "live_envs") + sum(s[k] for s in stats) for k in SUMMED}
        total["workers"] = len(self.workers)
        total["workers_answering"] = len(stats)
        total["model_version"] = min((s["model_version"] for s in stats), default=0)
        total["inference_ms"] = sum(s["inference_ms"] for s in stats) / max(len(stats), 1)
        total["last_error"] = next((s["last_error"] for s in stats if s["last_error"]), "")
        now = time.monotonic()
        then, steps = self._last
        if now - then >= 1.0:
            self._rate = (total["env_steps"] - steps) / (now - then)
            self._last = (now, total["env_steps"])
        total["env_steps_per_second"] = self._rate
        return total

    def stop(self) -> dict:
        while self.workers:
            self._retire(self.workers.pop())
        return dict(self.retired)
