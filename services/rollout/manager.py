"""RolloutManager: a Ray actor that starts this node's RolloutWorker actors for a session, scales them up
and down, replaces the ones that die, stops them, and sums their status (env steps/s is measured here, over
the last services.shared.rate.WINDOW seconds of status calls)."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field

import ray

from services.shared.rate import Rate
from services.shared.session import Joined

log = logging.getLogger(__name__)
STATUS_TIMEOUT = 5.0
STOP_TIMEOUT = 60.0        # seconds a node's workers have to stop (drain their senders, close their envs)
MAX_WORKER_RESTARTS = 10   # replacements of one worker before the node stops replacing it (and says so)
SUMMED = ("env_steps", "fragments_pushed", "bytes_pushed", "episodes", "env_restarts", "env_timeouts",
          "steps_dropped", "live_envs", "videos", "malformed_obs")


@ray.remote
class RolloutWorker:
    """The Ray boundary around a RolloutLoop (services/rollout/worker.py) running in a thread of the actor
    process. It is created without a session, so a spare starts and imports torch before one exists; this
    module does not import torch, so the service and the manager that create workers never pay for it."""

    def __init__(self):
        from services.rollout.sender import Sender

        self._sender = Sender()  # its process does its imports while this one does its own
        from services.rollout.worker import RolloutLoop  # torch, the env stack: in this actor's process only

        self._loop_type = RolloutLoop
        self.loop = None
        self.thread: threading.Thread | None = None

    def start(self, worker_index: int, joined: Joined, redis_url: str, node_id: str) -> bool:
        self.loop = self._loop_type(worker_index, joined, redis_url, node_id, self._sender)
        self._sender = None  # the loop's now: it ends it
        self.thread = threading.Thread(target=self.loop.run, name="rollout-loop", daemon=True)
        self.thread.start()
        return True

    def status(self) -> dict:
        return {**self.loop.stats, "running": self.thread.is_alive()}

    def stop(self) -> dict:
        self.loop.stop_event.set()
        self.thread.join(timeout=30)
        return dict(self.loop.stats)


def worker_resources(rc) -> dict:
    return {"num_cpus": rc.num_cpus_per_worker, "num_gpus": rc.num_gpus_per_worker}


def new_worker(node_id: str, resources: dict):
    return RolloutWorker.options(**resources, name=f"rollout-worker-{node_id}-{uuid.uuid4().hex[:6]}",
                                 namespace="online").remote()


@dataclass
class _Worker:
    """One worker as the manager sees it: its actor, its last status, and what became of it."""
    index: int
    handle: object
    restarts: int = 0
    state: str = "running"     # running, dead, failed, not answering
    last: dict = field(default_factory=dict)
    error: str = ""


@ray.remote(num_cpus=0)
class RolloutManager:
    def __init__(self, node_id: str):
        self.node_id = node_id
        self.args: tuple = ()
        self.rc = None
        self.workers: list[_Worker] = []
        self.next_index = 0
        self.restarts = 0
        self.retired = {k: 0 for k in SUMMED}  # counters of workers gone (scaled away, died), so totals never go back
        self.rate = Rate()  # env steps/s

    def start(self, joined: Joined, redis_url: str, spare=None) -> int:
        """Start the session's workers; `spare`, a worker the service started ahead, becomes the first."""
        self.args = (joined, redis_url, self.node_id)
        self.rc = joined.cfg.rollout_config
        return self.scale(self.rc.num_rollout_workers, spare)

    def scale(self, num_workers: int, spare=None) -> int:
        """Grow or shrink to num_workers workers; a removed worker's partial fragments are never produced."""
        added = []
        while len(self.workers) + len(added) < num_workers:
            handle, spare = spare or new_worker(self.node_id, worker_resources(self.rc)), None
            added.append(_Worker(self.next_index, handle))
            self.next_index += 1
        if spare is not None:
            ray.kill(spare)
        ray.get([w.handle.start.remote(w.index, *self.args) for w in added])
        self.workers += added
        removed, self.workers = self.workers[num_workers:], self.workers[:num_workers]
        self._retire(removed)
        return len(self.workers)

    def _retire(self, workers: list[_Worker]) -> None:
        """Stop workers, all at once: a worker's stop drains its sender and closes its envs, and one after
        another a node's stop took the sum of theirs."""
        refs = [w.handle.stop.remote() for w in workers]
        ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT)
        for worker, ref in zip(workers, refs):
            try:
                final = ray.get(ref, timeout=0)
            except Exception as exc:  # dead, or hung past STOP_TIMEOUT: its last status is what it did
                log.warning("worker %d did not stop cleanly: %s", worker.index, exc)
                final = worker.last
            self._keep_counts(final)
            ray.kill(worker.handle)

    def _keep_counts(self, stats: dict) -> None:
        for k in SUMMED:
            if k != "live_envs":
                self.retired[k] += stats.get(k, 0)

    def supervise(self) -> dict:
        """Replace every worker whose actor died, or whose loop ended though its envs could run (a crash of
        the loop itself); returns the status after. A worker replaced MAX_WORKER_RESTARTS times is left dead,
        and says so in its status."""
        self._poll()
        for w in self.workers:
            if w.state != "dead" or w.restarts >= MAX_WORKER_RESTARTS:
                continue
            log.warning("rollout worker %d of node %s is dead (%s): replacing it", w.index, self.node_id, w.error)
            self._keep_counts(w.last)
            try:
                ray.kill(w.handle)
            except Exception:
                pass
            w.handle, w.index, w.last = new_worker(self.node_id, worker_resources(self.rc)), self.next_index, {}
            self.next_index += 1
            w.restarts += 1
            self.restarts += 1
            try:
                ray.get(w.handle.start.remote(w.index, *self.args), timeout=120)
                w.state, w.error = "running", ""
            except Exception as exc:
                w.error = f"replacement failed to start: {exc}"[:500]
        return self.status()

    def _poll(self) -> None:
        """Ask every worker for its status; a worker that cannot answer is dead, not a failed status call."""
        refs = [w.handle.status.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STATUS_TIMEOUT)
        ready = set(ready)
        for w, ref in zip(self.workers, refs):
            if ref not in ready:
                w.state = "not answering"
                continue
            try:
                w.last = ray.get(ref)
            except Exception as exc:  # RayActorError: its process died (OOM, a segfault, kill -9)
                w.state, w.error = "dead", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                continue
            if w.last["running"]:
                w.state, w.error = "running", ""
            elif w.last["fatal"]:
                w.state, w.error = "failed", w.last["last_error"]
            else:  # its loop ended by itself: a bug or an error outside the envs
                w.state, w.error = "dead", w.last["last_error"] or "its rollout loop ended"

    def status(self) -> dict:
        self._poll()
        stats = [w.last for w in self.workers if w.last]  # a dead worker's last counters still count
        total = {k: self.retired[k] + sum(s.get(k, 0) for s in stats) for k in SUMMED if k != "live_envs"}
        total["live_envs"] = sum(w.last.get("live_envs", 0) for w in self.workers if w.state != "dead")
        total["workers"] = len(self.workers)
        total["worker_restarts"] = self.restarts
        total["model_version"] = min((s["model_version"] for s in stats), default=0)
        total["inference_ms"] = sum(s.get("inference_ms", 0.0) for s in stats) / max(len(stats), 1)
        total["last_error"] = next((w.error for w in self.workers if w.error), "") or \
            next((s["last_error"] for s in stats if s.get("last_error")), "")
        total["worker_status"] = [{"index": w.index, "state": w.state, "env_steps": w.last.get("env_steps", 0),
                                   "live_envs": w.last.get("live_envs", 0) if w.state != "dead" else 0,
                                   "restarts": w.restarts, "last_error": w.error} for w in self.workers]
        total["env_steps_per_second"] = self.rate.update(total["env_steps"])
        return total

    def stop(self) -> dict:
        workers, self.workers = self.workers, []
        self._retire(workers)
        return dict(self.retired)
