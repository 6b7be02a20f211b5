"""The trainer node's manager: takes a session (its lease first), runs the learner for it on Ray (one Ray
actor for one rank, Ray Train's TorchTrainer for several) in a thread, passes it the requests to stop and to
save a checkpoint, and says what it is doing. TrainerService (server.py) translates gRPC into these calls."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid

import ray
import redis

from services.shared import ray_runtime, session, trainer_status
from services.shared.session import WrongState
from services.trainer.lease import Lease
from services.trainer.spec import LearnerSpec

log = logging.getLogger(__name__)
STOP_GRACE = 60.0
SAVE_TIMEOUT = 300.0


@ray.remote
class LearnerActor:
    """The single-rank learner as a plain Ray actor (no Ray Train start-up cost). The learner's module (torch)
    is imported in the actor's process only: this module has no torch, so the service never pays for it."""

    def warm(self) -> None:
        from services.trainer import learner

        learner.warm()

    def run(self, spec: LearnerSpec) -> dict:
        from services.trainer.learner import train_loop

        return train_loop({"spec": spec})


def start_learner_actor(node_id: str, resources: dict):
    """A single-rank learner actor, warming up (its imports) as soon as its process runs."""
    actor = LearnerActor.options(**resources, name=f"learner-{node_id}-{uuid.uuid4().hex[:6]}").remote()
    actor.warm.remote()
    return actor


def run_learner(spec: LearnerSpec, warm: ray_runtime.WarmActor) -> None:
    """Run the learner to completion (blocking) with as many ranks as train_config.num_workers."""
    tc = spec.joined.cfg.train_config
    resources = {"num_cpus": 1, "num_gpus": tc.num_gpus_per_worker}  # a rank's, as an actor or a Ray Train worker
    ray_runtime.check_placeable(resources, {"num_cpus": "train_config.num_workers",
                                            "num_gpus": "train_config.num_gpus_per_worker"},
                                tc.num_workers, "trainer rank")
    if tc.num_workers == 1:
        actor = warm.take(resources) or start_learner_actor(spec.node_id, resources)
        try:
            ray.get(actor.run.remote(spec))
        finally:
            ray.kill(actor)
        return
    warm.take(None)  # its CPU belongs to Ray Train's ranks
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from services.trainer.learner import train_loop

    use_gpu = tc.num_gpus_per_worker > 0
    TorchTrainer(
        train_loop, train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": tc.num_gpus_per_worker}
                                                                         if use_gpu else {})}),
        run_config=RunConfig(name=f"mso-{spec.joined.session_id}",
                             storage_path=os.path.join(tempfile.gettempdir(), "mso-ray-train"))).fit()


class TrainerManager:
    """What one trainer node does for one session at a time. `state` is a common_pb2.ServiceState name."""

    def __init__(self, client: redis.Redis, redis_url: str, node_id: str, warm_again: bool = True):
        self.client, self.redis_url, self.node_id = client, redis_url, node_id
        self.session_id = ""
        self.state = "SERVICE_STATE_IDLE"
        self.last_error = ""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # A learner started ahead of a session (on a shared Ray cluster), for single-rank CPU learners; again
        # after each session unless warm_again is False (ray_runtime.WarmActor).
        self.warm = ray_runtime.WarmActor(lambda resources: start_learner_actor(node_id, resources),
                                          {"num_cpus": 1, "num_gpus": 0}, again=warm_again)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, session_id: str) -> None:
        """Train session_id. Raises session.SessionNotFound, config.ConfigError (this node cannot run its
        config), WrongState (training another session), or lease.LeaseHeld (another node trains it)."""
        with self._lock:
            if self.running():
                if session_id == self.session_id:
                    return
                raise WrongState(f"already training session {self.session_id}; Stop it first")
            joined = session.join(self.client, session_id)
            lease = Lease(self.client, session_id, self.node_id)
            lease.take()  # exactly one trainer node trains a session
            lease.keep()
            self.session_id, self.last_error, self.state = session_id, "", "SERVICE_STATE_STARTING"
            trainer_status.start(self.client, session_id, joined.cfg.train_config.num_iterations, time.time())
            spec = LearnerSpec(joined, self.redis_url, self.node_id, os.environ.get("MSO_LOG_DIR", "runs"))
            self._thread = threading.Thread(target=self._run, args=(spec, lease), name="learner", daemon=True)
            self._thread.start()

    def _run(self, spec: LearnerSpec, lease: Lease) -> None:
        try:
            ray_runtime.ensure()
            run_learner(spec, self.warm)
            self.state = "SERVICE_STATE_IDLE"
        except Exception as exc:
            self.last_error = f"learner failed: {exc}"
            log.exception("learner failed")
            self.state = "SERVICE_STATE_FAILED"
            trainer_status.report(self.client, spec.joined.session_id, state="SERVICE_STATE_FAILED",
                                  error=self.last_error)
        finally:
            lease.release()
            self.warm.fill()  # for the next session

    def stop(self) -> None:
        """Ask the learner to stop at its next iteration (all ranks together) and wait for it."""
        with self._lock:
            if not self.running():
                return
            self.state = "SERVICE_STATE_STOPPING"
            trainer_status.request_stop(self.client, self.session_id)
            self._thread.join(timeout=STOP_GRACE)
            if self._thread.is_alive():
                self.last_error = f"learner did not stop within {STOP_GRACE:.0f}s"
            else:
                self.state = "SERVICE_STATE_IDLE"

    def save_checkpoint(self, still_wanted=lambda: True) -> str:
        """Ask the learner for a checkpoint, which it writes at the end of the first iteration that begins after
        the request; its path once written.
        Raises WrongState when nothing trains here, TimeoutError after SAVE_TIMEOUT."""
        if not self.running():
            raise WrongState("no training running on this node")
        before = trainer_status.read(self.client, self.session_id).last_checkpoint
        trainer_status.request_checkpoint(self.client, self.session_id)
        deadline = time.monotonic() + SAVE_TIMEOUT
        while time.monotonic() < deadline and still_wanted():
            path = trainer_status.read(self.client, self.session_id).last_checkpoint
            if path and path != before:
                return path
            time.sleep(0.1)
        raise TimeoutError(f"no checkpoint within {SAVE_TIMEOUT:.0f}s: the learner saves at the end of an iteration")

    def status(self) -> tuple[str, trainer_status.TrainerStatus | None]:
        """(this node's state, the session's trainer status or None when it has no session). While the
        learner runs, its own report says the state."""
        if not self.session_id:
            return self.state, None
        reported = trainer_status.read(self.client, self.session_id)
        state = self.state
        if state not in ("SERVICE_STATE_FAILED", "SERVICE_STATE_STOPPING") and reported.state:
            state = reported.state
        return state, reported

    def fault(self) -> str:
        """What is wrong with this node's training right now: why it failed, or that it has nothing usable
        to train on (the learner says so while it waits)."""
        if self.state == "SERVICE_STATE_FAILED":
            return self.last_error
        if not self.running():
            return ""
        return trainer_status.read(self.client, self.session_id).waiting

    def shutdown(self) -> None:
        self.warm.close()
        self.stop()
