"""RolloutManager: a Ray actor that starts this node's RolloutWorker actors for a session, stops them, and
sums their status (env steps/s is measured here, between two status calls)."""

from __future__ import annotations

import time

import ray

from mso.config import from_yaml
from mso.rollout.worker import RolloutWorker

STATUS_TIMEOUT = 5.0


@ray.remote(num_cpus=0)
class RolloutManager:
    def __init__(self, node_id: str, session_id: str, redis_url: str, config_name: str, config_yaml: str):
        cfg = from_yaml(config_yaml)
        rc = cfg.rollout_config
        self.session_id = session_id
        self.workers = [
            RolloutWorker.options(num_cpus=rc.num_cpus_per_worker, num_gpus=rc.num_gpus_per_worker,
                                  name=f"rollout-worker-{node_id}-{i}", namespace="online")
            .remote(i, session_id, redis_url, config_name, config_yaml)
            for i in range(rc.num_rollout_workers)]
        self._last = (time.monotonic(), 0)
        self._rate = 0.0

    def start(self) -> int:
        ray.get([w.start.remote() for w in self.workers])
        return len(self.workers)

    def status(self) -> dict:
        refs = [w.status.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STATUS_TIMEOUT)
        stats = [ray.get(r) for r in ready]
        total = {k: sum(s[k] for s in stats) for k in ("env_steps", "fragments_pushed", "episodes",
                                                          "env_restarts", "steps_dropped", "live_envs")}
        total["workers"] = len(self.workers)
        total["workers_answering"] = len(stats)
        total["model_version"] = min((s["model_version"] for s in stats), default=0)
        total["last_error"] = next((s["last_error"] for s in stats if s["last_error"]), "")
        now = time.monotonic()
        then, steps = self._last
        if now - then >= 1.0:
            self._rate = (total["env_steps"] - steps) / (now - then)
            self._last = (now, total["env_steps"])
        total["env_steps_per_second"] = self._rate
        return total

    def stop(self) -> dict:
        final = ray.get([w.stop.remote() for w in self.workers], timeout=60)
        for w in self.workers:
            ray.kill(w)
        return {"env_steps": sum(s["env_steps"] for s in final)}
