"""TrainerService: translates gRPC calls into the TrainerManager's, and its status into TrainerStatus."""

from __future__ import annotations

import time
import uuid

import grpc
import redis

from services.shared import achievements, episode, ray_runtime, session
from services.shared.config import ConfigError
from services.shared.protos import common_pb2, trainer_pb2, trainer_pb2_grpc
from services.shared.queue import ledger
from services.shared.rpc import Server, abort_for, require_session_id
from services.trainer.manager import TrainerManager

S = common_pb2.ServiceState
ENDED = (S.SERVICE_STATE_FINISHED, S.SERVICE_STATE_FAILED, S.SERVICE_STATE_IDLE)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, manager: TrainerManager):
        self.manager = manager
        self.announce = lambda: None  # the node's heartbeat, sent at once when a Start changed what it does

    def Start(self, request, context):
        sid = request.session_id.strip()
        if not sid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        require_session_id(context, sid)
        try:
            self.manager.start(sid)
        except (session.SessionError, ConfigError) as exc:
            abort_for(context, exc)
        # The registry says at once that this node serves the session: the launcher's watcher reads it to
        # tell a session without a trainer, and took this one, between Start and its next beat, for missing.
        self.announce()
        return self._status()

    def Stop(self, request, context):
        self.manager.stop()
        return self._status()

    def GetStatus(self, request, context):
        return self._status()

    def SaveCheckpoint(self, request, context):
        try:
            return trainer_pb2.SaveCheckpointResponse(path=self.manager.save_checkpoint(context.is_active))
        except session.SessionError as exc:
            abort_for(context, exc)
        except TimeoutError as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))

    def WatchMetrics(self, request, context):
        sid = request.session_id or self.manager.session_id
        if not sid:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no session to watch: give session_id")
        require_session_id(context, sid)
        if sid != self.manager.session_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this trainer is not running session {sid!r}")
        last = -1
        while context.is_active():
            status = self._status()
            if status.iteration != last:
                last = status.iteration
                yield status
            if status.state in ENDED:
                return
            time.sleep(0.5)

    def _status(self) -> trainer_pb2.TrainerStatus:
        m = self.manager
        state, st = m.status()
        reply = trainer_pb2.TrainerStatus(node_id=m.node_id, session_id=m.session_id, last_error=m.last_error,
                                          state=S.Value(state) if state in S.keys() else S.SERVICE_STATE_UNSPECIFIED)
        if st is None:
            return reply
        if not reply.last_error and state not in ("SERVICE_STATE_FAILED", "SERVICE_STATE_STOPPING"):
            reply.last_error = st.waiting  # training, but nothing usable to train on
        reply.iteration, reply.num_iterations, reply.model_version = st.iteration, st.num_iterations, st.model_version
        metrics = st.metrics
        reply.samples_per_second = metrics.get("samples_per_second", 0.0)
        reply.approx_kl = metrics.get("approx_kl", 0.0)
        reply.policy_lag = metrics.get("policy_lag", 0.0)
        for k in ("policy_loss", "value_loss", "entropy", "kl_divergence", "total_loss"):
            if k in metrics:
                reply.losses[k] = metrics[k]
        reply.replay_fragments = int(metrics.get("replay_fragments", 0))
        reply.replay_capacity = int(metrics.get("replay_capacity", 0))
        reply.metrics.update(metrics)
        counts = ledger(m.client, m.session_id)
        reply.fragments_consumed = counts.get("consumed", 0)
        reply.fragments_reused = counts.get("reused", 0)
        reply.fragments_dropped = counts.get("dropped_stale", 0) + counts.get("dropped_corrupt", 0)
        recent = episode.latest(m.client, m.session_id, episode.RECENT)
        if recent:
            reply.mean_return = sum(e.episode_return for e in recent) / len(recent)
            reply.mean_episode_length = sum(e.length for e in recent) / len(recent)
        reply.episodes = counts.get("episodes", 0)
        _scored, rates = achievements.success_rates(m.client, m.session_id)
        reply.score = achievements.score(rates) if rates else 0.0
        return reply


def serve(address: str, redis_url: str, advertise: str | None = None, warm_again: bool = True) -> None:
    from services.shared.redis_server import connect

    client: redis.Redis = connect(redis_url)
    manager = TrainerManager(client, redis_url, "trainer-" + uuid.uuid4().hex[:8], warm_again=warm_again)
    server = Server(address)
    servicer = TrainerServicer(manager)
    server.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, "mso.v1.TrainerService")
    server.start()
    ray_runtime.connect_early(then=manager.warm.fill)
    heartbeat = session.Heartbeat(client, manager.node_id, "trainer", lambda: advertise or server.address,
                                  lambda: (manager.status()[0], manager.session_id, manager.fault())).start()
    servicer.announce = heartbeat.beat
    server.wait_for_termination(on_stop=lambda: (heartbeat.stop(), manager.shutdown()))
