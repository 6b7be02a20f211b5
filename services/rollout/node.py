"""The rollout node: what one `mso rollout serve` does for one session at a time. It starts the session's
RolloutManager actor (which starts the RolloutWorkers), scales and stops it, joins a running session on its
own (elastic scale-out: a node started while a session runs just adds throughput) and leaves one that has
ended, has dead workers replaced, keeps what is wrong for its heartbeat, and keeps a manager and a worker
started ahead of a session on a shared Ray cluster. RolloutService (server.py) translates gRPC into these."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import ray
import redis

from services.shared import ray_runtime, session
from services.shared.session import WrongState

log = logging.getLogger(__name__)
JOIN_POLL_SECONDS = 2.0
FAULT_MEMORY_SECONDS = 60.0  # a replaced worker stays in the node's faults this long
JOINABLE_PHASES = ("SESSION_PHASE_STARTING_TRAINER", "SESSION_PHASE_RUNNING")
ENDED_PHASES = ("SESSION_PHASE_FINISHED", "SESSION_PHASE_FAILED", "SESSION_PHASE_STOPPED")


class StartFailed(RuntimeError):
    """The session's actors could not be started on this node; the message says why."""


class RolloutNode:
    """`state` is a common_pb2.ServiceState name; `fault` what is wrong with its session right now."""

    def __init__(self, client: redis.Redis, redis_url: str, node_id: str, warm_again: bool = True):
        self.client, self.redis_url, self.node_id = client, redis_url, node_id
        self.state = "SERVICE_STATE_IDLE"
        self.session_id = ""
        self.stopped_session = ""  # a session this node was told to leave: never rejoined on its own
        self.manager = None
        self.last_error = ""
        self.fault = ""
        self._restarts_seen, self._replaced_at = 0, -FAULT_MEMORY_SECONDS
        self._lock = threading.Lock()
        self.closing = threading.Event()
        # A manager and one worker started ahead of a session (on a shared Ray cluster), with the default
        # CPU resources: a session that wants other resources gets new ones. Again after each session
        # unless warm_again is False (ray_runtime.WarmActor).
        self.warm_manager = ray_runtime.WarmActor(self._new_manager, {}, again=warm_again)
        self.warm_worker = ray_runtime.WarmActor(self._new_worker, {"num_cpus": 1, "num_gpus": 0}, again=warm_again)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, session_id: str) -> None:
        """Run session_id here. Raises session.SessionNotFound, config.ConfigError (this node cannot run its
        config), WrongState (running another session) or StartFailed."""
        with self._lock:
            if self.manager is not None:
                if session_id == self.session_id:
                    return
                raise WrongState(f"already running session {self.session_id}; Stop it first")
            joined = session.join(self.client, session_id)
            from services.rollout.manager import worker_resources

            self.state, self.session_id, self.last_error = "SERVICE_STATE_STARTING", session_id, ""
            spare = None
            try:
                ray_runtime.ensure()
                rc = joined.cfg.rollout_config
                resources = worker_resources(rc)
                ray_runtime.check_placeable(resources, {"num_cpus": "rollout_config.num_cpus_per_worker",
                                                        "num_gpus": "rollout_config.num_gpus_per_worker"},
                                            rc.num_rollout_workers, "rollout worker")
                self.manager = self.warm_manager.take({}) or self._new_manager({})
                spare = self.warm_worker.take(resources)
                ray.get(self.manager.start.remote(joined, self.redis_url, spare), timeout=180)
            except Exception as exc:
                self.last_error = f"cannot start rollout workers: {ray_runtime.cause(exc)}"
                self.state = "SERVICE_STATE_FAILED"
                if spare is not None:  # the manager may have failed before it took the spare over
                    ray.kill(spare)
                self._release()
                raise StartFailed(self.last_error) from None
            self.state = "SERVICE_STATE_RUNNING"
            log.info("rollout node %s running session %s", self.node_id, session_id)

    def stop(self) -> None:
        with self._lock:
            if self.manager is not None:
                self.stopped_session = self.session_id
                self.state = "SERVICE_STATE_STOPPING"
                self._release()
            self.state = "SERVICE_STATE_IDLE"

    def scale(self, num_workers: int) -> None:
        """Raises WrongState when no session runs here, StartFailed when the new workers do not start."""
        with self._lock:
            if self.manager is None:
                raise WrongState("no session running on this node: Start first")
            try:
                ray.get(self.manager.scale.remote(num_workers), timeout=180)
            except Exception as exc:
                raise StartFailed(f"scaling to {num_workers} workers failed: {exc}") from None

    def status(self) -> dict | None:
        """The manager's sums over this node's workers, or None when no session runs here."""
        manager = self.manager
        if manager is None:
            return None
        return ray.get(manager.status.remote(), timeout=10)

    # The actors' modules import torch: only the actors' processes need it, not this service's.
    def _new_manager(self, _resources: dict):
        from services.rollout.manager import RolloutManager

        return RolloutManager.options(name=f"rollout-manager-{self.node_id}-{uuid.uuid4().hex[:6]}").remote(
            self.node_id)

    def _new_worker(self, resources: dict):
        from services.rollout.manager import new_worker

        return new_worker(self.node_id, resources)

    def fill_warm(self) -> None:
        # The worker first: Ray starts as many actor processes at once as the machine has cores, and the
        # worker's (torch, the envs) is the longer start that the first fragment waits for.
        self.warm_worker.fill()
        self.warm_manager.fill()

    def _release(self) -> None:
        manager, self.manager = self.manager, None
        self.fault = ""
        if manager is None:
            return
        try:
            ray.get(manager.stop.remote(), timeout=90)
        except Exception as exc:
            log.warning("rollout manager did not stop cleanly: %s", exc)
        ray.kill(manager)
        self.fill_warm()  # for the next session

    def shutdown(self) -> None:
        self.closing.set()
        self.warm_manager.close()
        self.warm_worker.close()
        with self._lock:
            self._release()

    # -- on its own ------------------------------------------------------------------------------------
    def follow_sessions(self) -> None:
        """Until shutdown: join the current session when it runs and this node is idle (and was not told to
        leave it); leave a session once it has ended, even if nobody called Stop; have dead workers replaced."""
        while not self.closing.wait(JOIN_POLL_SECONDS):
            if self.manager is not None:
                self._supervise()
                try:
                    if session.read(self.client, self.session_id).phase in ENDED_PHASES:
                        log.info("session %s has ended: stopping its workers", self.session_id)
                        with self._lock:
                            self.stopped_session = self.session_id
                            self._release()
                            self.state = "SERVICE_STATE_IDLE"
                except (redis.RedisError, session.SessionError) as exc:
                    log.warning("session check: %s", exc)
                continue
            sid = None
            try:
                sid = session.current(self.client)
                if not sid or sid == self.stopped_session:
                    continue
                if session.read(self.client, sid).phase in JOINABLE_PHASES:
                    log.info("joining running session %s", sid)
                    self.start(sid)
            except (redis.RedisError, session.SessionNotFound) as exc:
                log.warning("session discovery: %s", exc)
            except Exception as exc:  # it cannot run this session (its config, its actors): do not retry it
                self.stopped_session = sid
                log.error("cannot join session %s: %s", sid, exc)

    def _supervise(self) -> None:
        """Have the manager replace dead workers, and keep what is wrong for the node's heartbeat."""
        manager = self.manager
        try:
            st = ray.get(manager.supervise.remote(), timeout=180)
        except Exception as exc:
            if self.manager is manager:  # not merely stopped meanwhile
                self.fault = f"rollout manager not answering: {exc}"[:300]
                log.warning(self.fault)
            return
        now = time.monotonic()
        if st["worker_restarts"] > self._restarts_seen:
            self._restarts_seen, self._replaced_at = st["worker_restarts"], now
        faults = [f"worker {w['index']} {w['state']}: {w['last_error']}"[:300] for w in st["worker_status"]
                  if w["state"] != "running"]
        if now - self._replaced_at < FAULT_MEMORY_SECONDS:
            faults.append(f"{st['worker_restarts']} dead workers replaced so far, the last "
                          f"{now - self._replaced_at:.0f}s ago")
        self.fault = "; ".join(faults)
