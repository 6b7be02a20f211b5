"""RolloutService: translates gRPC calls into the RolloutNode's, its status into RolloutStatus, and the
session's episode stream into WatchEpisodes."""

from __future__ import annotations

import logging
import threading
import uuid

import grpc
import redis

from services.rollout.node import RolloutNode, StartFailed
from services.shared import episode, ray_runtime, session
from services.shared.config import ConfigError
from services.shared.protos import common_pb2, rollout_pb2, rollout_pb2_grpc
from services.shared.rpc import Server, abort_for, require_session_id

log = logging.getLogger(__name__)
S = common_pb2.ServiceState
STATUS_FIELDS = ("workers", "live_envs", "env_steps", "env_steps_per_second", "fragments_pushed", "bytes_pushed",
                 "episodes", "model_version", "env_restarts", "env_timeouts", "steps_dropped", "inference_ms",
                 "videos", "worker_restarts")


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, node: RolloutNode):
        self.node = node

    def Start(self, request, context):
        sid = request.session_id.strip()
        if not sid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        require_session_id(context, sid)
        try:
            self.node.start(sid)
        except (session.SessionError, ConfigError, StartFailed) as exc:
            abort_for(context, exc)
        return self._status()

    def Stop(self, request, context):
        self.node.stop()
        return self._status()

    def GetStatus(self, request, context):
        return self._status()

    def Scale(self, request, context):
        if request.num_workers < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"num_workers must be at least 1, got {request.num_workers} (Stop removes them all)")
        try:
            self.node.scale(request.num_workers)
        except (session.SessionError, StartFailed) as exc:
            abort_for(context, exc)
        return self._status()

    def WatchEpisodes(self, request, context):
        client = self.node.client
        sid = request.session_id or self.node.session_id or session.current(client)
        if not sid:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no session to watch: give session_id")
        require_session_id(context, sid)
        try:
            session.read(client, sid)
        except session.SessionError as exc:
            abort_for(context, exc)
        last = "$"
        while context.is_active() and not self.node.closing.is_set():
            for entry_id, e in episode.follow(client, sid, last, block_ms=1000):
                last = entry_id
                yield rollout_pb2.Episode(
                    episode_id=entry_id, episode_return=e.episode_return, length=e.length, model_version=e.version,
                    discounted_return=e.discounted_return, slot=e.slot, task=e.task, truncated=e.truncated,
                    video=e.video)

    def _status(self) -> rollout_pb2.RolloutStatus:
        node = self.node
        reply = rollout_pb2.RolloutStatus(node_id=node.node_id, session_id=node.session_id,
                                          state=S.Value(node.state), last_error=node.last_error)
        try:
            st = node.status()
        except Exception as exc:
            reply.last_error = f"rollout manager not answering: {exc}"
            return reply
        if st is not None:
            for name in STATUS_FIELDS:
                setattr(reply, name, st[name])
            reply.last_error = reply.last_error or st["last_error"]
            reply.worker_status.extend(rollout_pb2.WorkerStatus(**w) for w in st["worker_status"])
        return reply


def serve(address: str, redis_url: str, advertise: str | None = None, metrics_port: int = 0,
          warm_again: bool = True) -> None:
    from services.shared.redis_server import connect

    client: redis.Redis = connect(redis_url)
    node = RolloutNode(client, redis_url, "rollout-" + uuid.uuid4().hex[:8], warm_again=warm_again)
    server = Server(address)
    server.add(rollout_pb2_grpc.add_RolloutServiceServicer_to_server, RolloutServicer(node), "mso.v1.RolloutService")
    server.start()
    ray_runtime.connect_early(then=node.fill_warm)
    if metrics_port:
        from services.rollout.metrics import serve_metrics

        serve_metrics(node, metrics_port)
        log.info("Prometheus metrics on :%d/metrics", metrics_port)
    heartbeat = session.Heartbeat(client, node.node_id, "rollout", lambda: advertise or server.address,
                                  lambda: (node.state, node.session_id, node.fault)).start()
    threading.Thread(target=node.follow_sessions, name="session-join", daemon=True).start()
    server.wait_for_termination(on_stop=lambda: (heartbeat.stop(), node.shutdown()))
