"""RolloutService: translates gRPC calls into the RolloutManager actor's lifecycle, nothing more."""

from __future__ import annotations

import logging
import threading
import uuid

import grpc
import msgpack
import ray
import redis

from mso import keys, ray_runtime, session
from mso.config import ConfigError
from mso.rpc import Server
from mso.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)
S = common_pb2.ServiceState


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, client: redis.Redis, redis_url: str, node_id: str):
        self.client, self.redis_url, self.node_id = client, redis_url, node_id
        self.state = S.SERVICE_STATE_IDLE
        self.session_id = ""
        self.manager = None
        self.last_error = ""
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------
    def Start(self, request, context):
        sid = request.session_id.strip()
        if not sid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        with self._lock:
            if self.manager is not None:
                if sid == self.session_id:
                    return self._status()
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"already running session {self.session_id}; Stop it first")
            try:
                record, cfg = session.join(self.client, sid)
            except session.SessionError as exc:
                code = grpc.StatusCode.NOT_FOUND if "no session" in str(exc) else grpc.StatusCode.FAILED_PRECONDITION
                context.abort(code, str(exc))
            except (ConfigError, ImportError) as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load the session's config: {exc}")
            self.state, self.session_id, self.last_error = S.SERVICE_STATE_STARTING, sid, ""
            try:
                from mso.rollout.manager import RolloutManager

                ray_runtime.ensure()
                self.manager = RolloutManager.options(name=f"rollout-manager-{self.node_id}").remote(
                    self.node_id, sid, self.redis_url, record["config_name"], record["config_yaml"])
                ray.get(self.manager.start.remote(), timeout=120)
            except Exception as exc:
                self.last_error = f"cannot start rollout workers: {exc}"
                self.state = S.SERVICE_STATE_FAILED
                self._release()
                context.abort(grpc.StatusCode.INTERNAL, self.last_error)
            self.state = S.SERVICE_STATE_RUNNING
            log.info("rollout node %s running session %s", self.node_id, sid)
            return self._status()

    def Stop(self, request, context):
        with self._lock:
            if self.manager is not None:
                self.state = S.SERVICE_STATE_STOPPING
                self._release()
            self.state = S.SERVICE_STATE_IDLE
            return self._status()

    def GetStatus(self, request, context):
        return self._status()

    def Scale(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Scale is not implemented yet: restart the session with "
                                                     "rollout_config.num_rollout_workers=N")

    def WatchEpisodes(self, request, context):
        sid = request.session_id or self.session_id or session.current(self.client)
        if not sid:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no session to watch: give session_id")
        if not self.client.exists(keys.SessionKeys(sid).record):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {sid!r}")
        stream, last = keys.SessionKeys(sid).episodes, "$"
        while context.is_active():
            for _name, entries in self.client.xread({stream: last}, block=1000, count=100) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    e = msgpack.unpackb(fields[b"e"])
                    yield rollout_pb2.Episode(episode_id=entry_id.decode(), episode_return=e["return"],
                                              length=e["length"], model_version=e["version"])

    # -- helpers ---------------------------------------------------------------------------------------
    def _release(self) -> None:
        manager, self.manager = self.manager, None
        if manager is None:
            return
        try:
            ray.get(manager.stop.remote(), timeout=60)
        except Exception as exc:
            log.warning("rollout manager did not stop cleanly: %s", exc)
        ray.kill(manager)

    def _status(self) -> rollout_pb2.RolloutStatus:
        reply = rollout_pb2.RolloutStatus(node_id=self.node_id, session_id=self.session_id, state=self.state,
                                          last_error=self.last_error)
        manager = self.manager
        if manager is not None:
            try:
                st = ray.get(manager.status.remote(), timeout=10)
            except Exception as exc:
                reply.last_error = f"rollout manager not answering: {exc}"
                return reply
            reply.workers = st["workers"]
            reply.live_envs = st["live_envs"]
            reply.env_steps = st["env_steps"]
            reply.env_steps_per_second = st["env_steps_per_second"]
            reply.fragments_pushed = st["fragments_pushed"]
            reply.model_version = st["model_version"]
            reply.env_restarts = st["env_restarts"]
            reply.last_error = reply.last_error or st["last_error"]
        return reply

    def shutdown(self) -> None:
        with self._lock:
            self._release()


def serve(address: str, redis_url: str, advertise: str | None = None) -> None:
    from mso.redis_server import connect

    client = connect(redis_url)
    node_id = "rollout-" + uuid.uuid4().hex[:8]
    server = Server(address)
    servicer = RolloutServicer(client, redis_url, node_id)
    server.add(rollout_pb2_grpc.add_RolloutServiceServicer_to_server, servicer, "mso.v1.RolloutService")
    server.start()
    heartbeat = session.Heartbeat(client, node_id, "rollout", advertise or server.address,
                                  lambda: S.Name(servicer.state)).start()
    server.wait_for_termination(on_stop=lambda: (heartbeat.stop(), servicer.shutdown()))
