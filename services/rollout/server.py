"""RolloutService: translates gRPC calls into the RolloutManager actor's lifecycle, and joins a running
session on its own (elastic scale-out: a node started while a session runs just adds throughput)."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc
import msgpack
import ray
import redis

from services.shared import keys, ray_runtime, session
from services.shared.config import ConfigError, ConfigSource
from services.shared.rpc import Server, require_session_id
from services.shared.protos import common_pb2, rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)
S = common_pb2.ServiceState
JOIN_POLL_SECONDS = 2.0
FAULT_MEMORY_SECONDS = 60.0  # a replaced worker stays in the node's faults this long
JOINABLE_PHASES = ("SESSION_PHASE_STARTING_TRAINER", "SESSION_PHASE_RUNNING")
ENDED_PHASES = ("SESSION_PHASE_FINISHED", "SESSION_PHASE_FAILED", "SESSION_PHASE_STOPPED")
STATUS_FIELDS = ("workers", "live_envs", "env_steps", "env_steps_per_second", "fragments_pushed", "bytes_pushed",
                 "episodes", "model_version", "env_restarts", "env_timeouts", "steps_dropped", "inference_ms",
                 "videos", "worker_restarts")


class StartError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, client: redis.Redis, redis_url: str, node_id: str):
        self.client, self.redis_url, self.node_id = client, redis_url, node_id
        self.state = S.SERVICE_STATE_IDLE
        self.session_id = ""
        self.stopped_session = ""  # a session this node was told to leave: never rejoined on its own
        self.manager = None
        self.last_error = ""
        self.fault = ""            # what is wrong with this node's session right now (its heartbeat says)
        self._restarts_seen, self._replaced_at = 0, -FAULT_MEMORY_SECONDS
        self._lock = threading.Lock()
        self._closing = threading.Event()
        # A manager and one worker started ahead of a session (on a shared Ray cluster), with the default
        # CPU resources: a session that wants other resources gets new ones.
        self.warm_manager = ray_runtime.WarmActor(self._new_manager, {})
        self.warm_worker = ray_runtime.WarmActor(self._new_worker, {"num_cpus": 1, "num_gpus": 0})

    # -- lifecycle -------------------------------------------------------------------------------------
    def Start(self, request, context):
        sid = request.session_id.strip()
        if not sid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        require_session_id(context, sid)
        try:
            self._start(sid)
        except StartError as exc:
            context.abort(exc.code, str(exc))
        return self._status()

    def _start(self, sid: str) -> None:
        with self._lock:
            if self.manager is not None:
                if sid == self.session_id:
                    return
                raise StartError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"already running session {self.session_id}; Stop it first")
            try:
                record, cfg = session.join(self.client, sid)
            except session.SessionError as exc:
                code = grpc.StatusCode.NOT_FOUND if "no session" in str(exc) else grpc.StatusCode.FAILED_PRECONDITION
                raise StartError(code, str(exc)) from None
            except (ConfigError, ImportError) as exc:
                raise StartError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load the session's config: {exc}") from None
            self.state, self.session_id, self.last_error = S.SERVICE_STATE_STARTING, sid, ""
            spare = None
            try:
                from services.rollout.manager import worker_resources

                ray_runtime.ensure()
                self.manager = self.warm_manager.take({}) or self._new_manager({})
                spare = self.warm_worker.take(worker_resources(cfg.rollout_config))
                ray.get(self.manager.start.remote(sid, self.redis_url, ConfigSource(record["config_name"],
                                                  record["source_hash"]), record["config_yaml"], spare), timeout=180)
            except Exception as exc:
                self.last_error = f"cannot start rollout workers: {exc}"
                self.state = S.SERVICE_STATE_FAILED
                if spare is not None:  # the manager may have failed before it took the spare over
                    ray.kill(spare)
                self._release()
                raise StartError(grpc.StatusCode.INTERNAL, self.last_error) from None
            self.state = S.SERVICE_STATE_RUNNING
            log.info("rollout node %s running session %s", self.node_id, sid)

    def Stop(self, request, context):
        with self._lock:
            if self.manager is not None:
                self.stopped_session = self.session_id
                self.state = S.SERVICE_STATE_STOPPING
                self._release()
            self.state = S.SERVICE_STATE_IDLE
        return self._status()

    def GetStatus(self, request, context):
        return self._status()

    def Scale(self, request, context):
        if request.num_workers < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"num_workers must be at least 1, got {request.num_workers} (Stop removes them all)")
        with self._lock:
            if self.manager is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no session running on this node: Start first")
            try:
                ray.get(self.manager.scale.remote(request.num_workers), timeout=180)
            except Exception as exc:
                context.abort(grpc.StatusCode.INTERNAL, f"scaling to {request.num_workers} workers failed: {exc}")
        return self._status()

    def WatchEpisodes(self, request, context):
        sid = request.session_id or self.session_id or session.current(self.client)
        if not sid:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no session to watch: give session_id")
        require_session_id(context, sid)
        if not self.client.exists(keys.SessionKeys(sid).record):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {sid!r}")
        stream, last = keys.SessionKeys(sid).episodes, "$"
        while context.is_active() and not self._closing.is_set():
            for _name, entries in self.client.xread({stream: last}, block=1000, count=100) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    e = msgpack.unpackb(fields[b"e"])
                    yield rollout_pb2.Episode(
                        episode_id=entry_id.decode(), episode_return=e["return"], length=e["length"],
                        model_version=e["version"], discounted_return=e.get("discounted_return", 0.0),
                        slot=e.get("slot", ""), task=e.get("task") or "", truncated=e.get("truncated", False),
                        video=e.get("video") or "")

    # -- elastic join ----------------------------------------------------------------------------------
    def join_loop(self) -> None:
        """Join the current session when it is running and this node is idle (and was not told to leave);
        leave a session once it has ended, even if nobody called Stop."""
        while not self._closing.wait(JOIN_POLL_SECONDS):
            if self.manager is not None:
                self._supervise()
                try:
                    if session.read(self.client, self.session_id)["phase"] in ENDED_PHASES:
                        log.info("session %s has ended: stopping its workers", self.session_id)
                        with self._lock:
                            self.stopped_session = self.session_id
                            self._release()
                            self.state = S.SERVICE_STATE_IDLE
                except (redis.RedisError, session.SessionError) as exc:
                    log.warning("session check: %s", exc)
                continue
            try:
                sid = session.current(self.client)
                if not sid or sid == self.stopped_session:
                    continue
                if session.read(self.client, sid)["phase"] in JOINABLE_PHASES:
                    log.info("joining running session %s", sid)
                    self._start(sid)
            except StartError as exc:
                self.stopped_session = sid  # do not retry a session this node cannot run
                log.error("cannot join session %s: %s", sid, exc)
            except (redis.RedisError, session.SessionError) as exc:
                log.warning("session discovery: %s", exc)

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

    # -- helpers ---------------------------------------------------------------------------------------
    def _new_manager(self, _resources: dict):
        from services.rollout.manager import RolloutManager

        return RolloutManager.options(name=f"rollout-manager-{self.node_id}-{uuid.uuid4().hex[:6]}").remote(
            self.node_id)

    def _new_worker(self, resources: dict):
        from services.rollout.manager import new_worker

        return new_worker(self.node_id, resources)

    def fill_warm(self) -> None:
        self.warm_manager.fill()
        self.warm_worker.fill()

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

    def status_dict(self) -> dict | None:
        manager = self.manager
        if manager is None:
            return None
        return ray.get(manager.status.remote(), timeout=10)

    def _status(self) -> rollout_pb2.RolloutStatus:
        reply = rollout_pb2.RolloutStatus(node_id=self.node_id, session_id=self.session_id, state=self.state,
                                          last_error=self.last_error)
        try:
            st = self.status_dict()
        except Exception as exc:
            reply.last_error = f"rollout manager not answering: {exc}"
            return reply
        if st is not None:
            for name in STATUS_FIELDS:
                setattr(reply, name, st[name])
            reply.last_error = reply.last_error or st["last_error"]
            reply.worker_status.extend(rollout_pb2.WorkerStatus(**w) for w in st["worker_status"])
        return reply

    def shutdown(self) -> None:
        self._closing.set()
        self.warm_manager.close()
        self.warm_worker.close()
        with self._lock:
            self._release()


class RolloutMetrics:
    """Prometheus collector: reads the manager's status at scrape time, so no counter can drift."""

    def __init__(self, servicer: RolloutServicer):
        self.servicer = servicer

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            st = self.servicer.status_dict() or {}
        except Exception:
            st = {}
        labels = {"node": self.servicer.node_id}
        for name, doc in (("env_steps", "environment steps taken"), ("fragments_pushed", "fragments written"),
                          ("bytes_pushed", "fragment bytes written"), ("env_restarts", "env processes rebuilt"),
                          ("episodes", "episodes finished")):
            c = CounterMetricFamily(f"mso_rollout_{name}", doc, labels=list(labels))
            c.add_metric(list(labels.values()), st.get(name, 0))
            yield c
        for name, doc in (("env_steps_per_second", "env steps per second"), ("live_envs", "env processes"),
                          ("inference_ms", "mean inference batch latency in ms"), ("model_version", "weights in use"),
                          ("workers", "RolloutWorker actors")):
            g = GaugeMetricFamily(f"mso_rollout_{name}", doc, labels=list(labels))
            g.add_metric(list(labels.values()), st.get(name, 0))
            yield g


def serve(address: str, redis_url: str, advertise: str | None = None, metrics_port: int = 0) -> None:
    from services.shared.redis_server import connect

    client = connect(redis_url)
    node_id = "rollout-" + uuid.uuid4().hex[:8]
    server = Server(address)
    servicer = RolloutServicer(client, redis_url, node_id)
    server.add(rollout_pb2_grpc.add_RolloutServiceServicer_to_server, servicer, "mso.v1.RolloutService")
    server.start()
    ray_runtime.connect_early(then=servicer.fill_warm)
    if metrics_port:
        from prometheus_client import REGISTRY, start_http_server

        REGISTRY.register(RolloutMetrics(servicer))
        start_http_server(metrics_port)
        log.info("Prometheus metrics on :%d/metrics", metrics_port)
    heartbeat = session.Heartbeat(client, node_id, "rollout", advertise or server.address,
                                  lambda: (S.Name(servicer.state), servicer.session_id, servicer.fault)).start()
    threading.Thread(target=servicer.join_loop, name="session-join", daemon=True).start()
    server.wait_for_termination(on_stop=lambda: (heartbeat.stop(), servicer.shutdown()))
