"""TrainerService: starts the learner for a session (one Ray actor, or Ray Train's TorchTrainer for
several ranks), stops it, and reports the status rank 0 writes to Redis."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid

import grpc
import msgpack
import ray
import redis

from services.shared import keys, ray_runtime, session
from services.shared.config import ConfigError
from services.shared.queue import ledger
from services.shared.rpc import Server, require_session_id
from services.trainer.lease import Lease, LeaseHeld
from services.shared.protos import common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)
S = common_pb2.ServiceState
STOP_GRACE = 60.0
SAVE_TIMEOUT = 300.0


def start_learner_actor(node_id: str, resources: dict):
    """A single-rank learner actor, warming up (its imports) as soon as its process runs."""
    from services.trainer.learner import LearnerActor

    actor = LearnerActor.options(**resources, name=f"learner-{node_id}-{uuid.uuid4().hex[:6]}").remote()
    actor.warm.remote()
    return actor


def run_learner(spec: dict, cfg, warm: ray_runtime.WarmActor) -> dict:
    """Run the learner to completion (blocking) with as many ranks as train_config.num_workers."""
    from services.trainer.learner import train_loop

    tc = cfg.train_config
    if tc.num_workers == 1:
        resources = {"num_cpus": 1, "num_gpus": tc.num_gpus_per_worker}
        actor = warm.take(resources) or start_learner_actor(spec["node_id"], resources)
        try:
            return ray.get(actor.run.remote(spec))
        finally:
            ray.kill(actor)
    warm.take(None)  # its CPU belongs to Ray Train's ranks
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = tc.num_gpus_per_worker > 0
    trainer = TorchTrainer(
        train_loop, train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": tc.num_gpus_per_worker}
                                                                         if use_gpu else {})}),
        run_config=RunConfig(name=f"mso-{spec['session_id']}",
                             storage_path=os.path.join(tempfile.gettempdir(), "mso-ray-train")))
    trainer.fit()
    return {}


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, client: redis.Redis, redis_url: str, node_id: str):
        self.client, self.redis_url, self.node_id = client, redis_url, node_id
        self.session_id = ""
        self.state = S.SERVICE_STATE_IDLE
        self.last_error = ""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # A learner started ahead of a session (on a shared Ray cluster), for single-rank CPU learners.
        self.warm = ray_runtime.WarmActor(lambda resources: start_learner_actor(node_id, resources),
                                          {"num_cpus": 1, "num_gpus": 0})

    def Start(self, request, context):
        sid = request.session_id.strip()
        if not sid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        require_session_id(context, sid)
        with self._lock:
            if self._running():
                if sid == self.session_id:
                    return self._status()
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"already training session {self.session_id}; Stop it first")
            try:
                record, cfg = session.join(self.client, sid)
            except session.SessionError as exc:
                code = grpc.StatusCode.NOT_FOUND if "no session" in str(exc) else grpc.StatusCode.FAILED_PRECONDITION
                context.abort(code, str(exc))
            except (ConfigError, ImportError) as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load the session's config: {exc}")
            lease = Lease(self.client, sid, self.node_id)
            try:
                lease.take()  # exactly one trainer node trains a session
            except LeaseHeld as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            lease.keep()
            self.session_id, self.last_error, self.state = sid, "", S.SERVICE_STATE_STARTING
            sk = keys.SessionKeys(sid)
            self.client.hdel(sk.trainer, "stop", "waiting")
            self.client.hset(sk.trainer, mapping={"state": "SERVICE_STATE_STARTING", "started_at": time.time(),
                                                   "num_iterations": cfg.train_config.num_iterations})
            spec = {"session_id": sid, "redis_url": self.redis_url, "config_name": record["config_name"],
                    "source_hash": record["source_hash"],
                    "config_yaml": record["config_yaml"], "node_id": self.node_id, "config_source": record["source"],
                    "log_dir": os.environ.get("MSO_LOG_DIR", "runs")}
            self._thread = threading.Thread(target=self._run, args=(spec, cfg, lease), name="learner", daemon=True)
            self._thread.start()
            return self._status()

    def _run(self, spec: dict, cfg, lease: Lease) -> None:
        try:
            ray_runtime.ensure()
            run_learner(spec, cfg, self.warm)
            self.state = S.SERVICE_STATE_IDLE
        except Exception as exc:
            self.last_error = f"learner failed: {exc}"
            log.exception("learner failed")
            self.state = S.SERVICE_STATE_FAILED
            self.client.hset(keys.SessionKeys(spec["session_id"]).trainer,
                             mapping={"state": "SERVICE_STATE_FAILED", "error": self.last_error})
        finally:
            lease.release()
            self.warm.fill()  # for the next session

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def Stop(self, request, context):
        with self._lock:
            self._stop()
            return self._status()

    def _stop(self) -> None:
        if not self._running():
            return
        self.state = S.SERVICE_STATE_STOPPING
        self.client.hset(keys.SessionKeys(self.session_id).trainer, "stop", "1")
        self._thread.join(timeout=STOP_GRACE)
        if self._thread.is_alive():
            self.last_error = f"learner did not stop within {STOP_GRACE:.0f}s"
        else:
            self.state = S.SERVICE_STATE_IDLE

    def GetStatus(self, request, context):
        return self._status()

    def fault(self) -> str:
        """What is wrong with this node's training right now: why it failed, or that it has nothing usable
        to train on (the learner says so while it waits)."""
        if self.state == S.SERVICE_STATE_FAILED:
            return self.last_error
        if not self._running():
            return ""
        waiting = self.client.hget(keys.SessionKeys(self.session_id).trainer, "waiting")
        return waiting.decode() if waiting else ""

    def SaveCheckpoint(self, request, context):
        """Ask the learner for a checkpoint at the end of the current iteration and wait for its path."""
        if not self._running():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no training running on this node")
        sk = keys.SessionKeys(self.session_id)
        before = self.client.hget(sk.trainer, "last_checkpoint")
        self.client.hset(sk.trainer, "save_now", "1")
        deadline = time.monotonic() + SAVE_TIMEOUT
        while time.monotonic() < deadline and context.is_active():
            path = self.client.hget(sk.trainer, "last_checkpoint")
            if path is not None and path != before:
                return trainer_pb2.SaveCheckpointResponse(path=path.decode())
            time.sleep(0.1)
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no checkpoint within {SAVE_TIMEOUT:.0f}s: the "
                                                         "learner saves at the end of an iteration")

    def WatchMetrics(self, request, context):
        sid = request.session_id or self.session_id
        if not sid:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no session to watch: give session_id")
        require_session_id(context, sid)
        if sid != self.session_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this trainer is not running session {sid!r}")
        last = -1
        while context.is_active():
            status = self._status()
            if status.iteration != last:
                last = status.iteration
                yield status
            if status.state in (S.SERVICE_STATE_FINISHED, S.SERVICE_STATE_FAILED, S.SERVICE_STATE_IDLE):
                return
            time.sleep(0.5)

    def _status(self) -> trainer_pb2.TrainerStatus:
        reply = trainer_pb2.TrainerStatus(node_id=self.node_id, session_id=self.session_id, state=self.state,
                                          last_error=self.last_error)
        if not self.session_id:
            return reply
        raw = {k.decode(): v for k, v in self.client.hgetall(keys.SessionKeys(self.session_id).trainer).items()}
        if self.state not in (S.SERVICE_STATE_FAILED, S.SERVICE_STATE_STOPPING):
            reported = raw.get("state", b"").decode()
            if reported in S.keys():
                reply.state = S.Value(reported)
            if "waiting" in raw and not reply.last_error:  # training, but nothing usable to train on
                reply.last_error = raw["waiting"].decode()
        reply.iteration = int(raw.get("iteration", 0))
        reply.num_iterations = int(raw.get("num_iterations", 0))
        reply.model_version = int(raw.get("model_version", 0))
        if "metrics" in raw:
            m = msgpack.unpackb(raw["metrics"])
            reply.samples_per_second = m.get("samples_per_second", 0.0)
            reply.approx_kl = m.get("approx_kl", 0.0)
            reply.policy_lag = m.get("policy_lag", 0.0)
            for k in ("policy_loss", "value_loss", "entropy", "kl_divergence", "total_loss"):
                if k in m:
                    reply.losses[k] = m[k]
            reply.replay_fragments = int(m.get("replay_fragments", 0))
            reply.replay_capacity = int(m.get("replay_capacity", 0))
            for k, v in m.items():
                reply.metrics[k] = float(v)
        counts = ledger(self.client, self.session_id)
        reply.fragments_consumed = counts.get("consumed", 0)
        reply.fragments_reused = counts.get("reused", 0)
        reply.fragments_dropped = counts.get("dropped_stale", 0) + counts.get("dropped_corrupt", 0)
        return reply

    def shutdown(self) -> None:
        self.warm.close()
        with self._lock:
            self._stop()


def serve(address: str, redis_url: str, advertise: str | None = None) -> None:
    from services.shared.redis_server import connect

    client = connect(redis_url)
    node_id = "trainer-" + uuid.uuid4().hex[:8]
    server = Server(address)
    servicer = TrainerServicer(client, redis_url, node_id)
    server.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, "mso.v1.TrainerService")
    server.start()
    ray_runtime.connect_early(then=servicer.warm.fill)
    heartbeat = session.Heartbeat(client, node_id, "trainer", advertise or server.address,
                                  lambda: (S.Name(servicer.state), servicer.session_id, servicer.fault())).start()
    server.wait_for_termination(on_stop=lambda: (heartbeat.stop(), servicer.shutdown()))

