"""LauncherService: Launch / GetSession / StopSession / ListNodes over the Launcher."""

from __future__ import annotations

import logging
import math
import os
import shlex
import threading

import grpc

from services.shared import session
from services.shared.config import ConfigError, check_remote_name, check_remote_overrides
from services.launcher.launch import Launcher, LaunchError, SessionBusy
from services.shared.rpc import Server, abort_for, require_session_id
from services.shared.protos import common_pb2, launcher_pb2, launcher_pb2_grpc

log = logging.getLogger(__name__)
S = common_pb2.ServiceState
MAX_OVERRIDES = 256


def node_message(n: session.Node) -> common_pb2.Node:
    return common_pb2.Node(node_id=n.node_id, kind=n.kind, address=n.address,
                           state=S.Value(n.state) if n.state in S.keys() else S.SERVICE_STATE_UNSPECIFIED,
                           last_heartbeat_unix=n.time, session_id=n.session_id[:64], fault=n.fault[:1000])


class LauncherServicer(launcher_pb2_grpc.LauncherServiceServicer):
    def __init__(self, launcher: Launcher):
        self.launcher = launcher

    def Launch(self, request, context):
        if not request.config.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config is empty: give a built-in name, a dotted "
                                                            "module path or a .py file path")
        if len(request.overrides) > MAX_OVERRIDES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{len(request.overrides)} overrides: at most {MAX_OVERRIDES} are accepted")
        try:
            check_remote_name(request.config.strip())
            check_remote_overrides(list(request.overrides))
            sid = self.launcher.launch(request.config.strip(), list(request.overrides))
        except ConfigError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SessionBusy as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except LaunchError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return self._session(sid)

    def GetSession(self, request, context):
        return self._session(self._resolve(request.session_id, context))

    def StopSession(self, request, context):
        sid = self._resolve(request.session_id, context)
        self.launcher.stop(sid)
        return self._session(sid)

    def ListNodes(self, request, context):
        return launcher_pb2.ListNodesResponse(nodes=[node_message(n) for n in session.list_nodes(self.launcher.client)])

    def _resolve(self, sid: str, context) -> str:
        sid = sid.strip() or session.current(self.launcher.client) or ""
        if not sid:
            context.abort(grpc.StatusCode.NOT_FOUND, "no session has been launched")
        require_session_id(context, sid)
        try:
            session.read(self.launcher.client, sid)
        except session.SessionError as exc:
            abort_for(context, exc)
        return sid

    def _session(self, sid: str) -> launcher_pb2.Session:
        record = session.read(self.launcher.client, sid)
        p = self.launcher.progress(sid)
        phase = record.phase
        return launcher_pb2.Session(
            session_id=sid, config_name=record.config_name, config_yaml=record.config_yaml,
            phase=launcher_pb2.SessionPhase.Value(phase) if phase in launcher_pb2.SessionPhase.keys() else 0,
            nodes=[node_message(n) for n in session.list_nodes(self.launcher.client)], error=record.error,
            faults=self.launcher.faults(sid) if phase == "SESSION_PHASE_RUNNING" else [],
            progress=launcher_pb2.Progress(
                iteration=p.iteration, num_iterations=p.num_iterations, env_steps=p.env_steps,
                env_steps_per_second=p.env_steps_per_second,
                mean_return=0.0 if math.isnan(p.mean_return) else p.mean_return, episodes=p.episodes,
                model_version=p.model_version, policy_lag=p.policy_lag, queue_depth=p.queue_depth,
                restarts=p.restarts, ledger=launcher_pb2.Ledger(produced_by_node=p.produced_by_node, **{
                    k: p.ledger.get(k, 0) for k in ("produced", "consumed", "dropped_stale", "dropped_corrupt",
                                                     "pending", "reused")}),
                scored_episodes=p.scored_episodes, success_rates=p.success_rates,
                score=0.0 if math.isnan(p.score) else p.score))


def start_server(launcher: Launcher, address: str) -> Server:
    server = Server(address)
    server.add(launcher_pb2_grpc.add_LauncherServiceServicer_to_server, LauncherServicer(launcher),
               "mso.v1.LauncherService")
    server.start()
    return server


def serve(address: str, redis_url: str) -> None:
    """`mso launcher serve`: the LauncherService until SIGTERM/SIGINT. It watches the session that runs when
    it starts (a restarted launcher), and with MSO_AUTOLAUNCH=CONFIG (and MSO_AUTOLAUNCH_OVERRIDES) launches
    that config at once: `MSO_AUTOLAUNCH=cartpole docker compose up` trains with no further call."""
    from services.shared.redis_server import connect

    launcher = Launcher(connect(redis_url))
    server = start_server(launcher, address)
    launcher.adopt()
    autolaunch = os.environ.get("MSO_AUTOLAUNCH", "").strip()
    if autolaunch:
        overrides = shlex.split(os.environ.get("MSO_AUTOLAUNCH_OVERRIDES", ""))

        def launch():
            try:
                log.info("MSO_AUTOLAUNCH: session %s running", launcher.launch(autolaunch, overrides))
            except Exception as exc:
                log.error("MSO_AUTOLAUNCH=%s failed: %s", autolaunch, exc)

        threading.Thread(target=launch, name="autolaunch", daemon=True).start()
    server.wait_for_termination()
