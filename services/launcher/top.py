"""`mso top`: a live terminal view of a running session through its LauncherService, for when grpcurl is too
raw: the session's progress and ledger, its faults, and one row per node (state, its own env steps/s, live
envs, model version, restarts) read from each node's GetStatus at the address the registry gives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from services.shared.protos import (common_pb2, launcher_pb2, launcher_pb2_grpc, rollout_pb2, rollout_pb2_grpc,
                                    trainer_pb2, trainer_pb2_grpc)
from services.shared.rpc import CALL_TIMEOUT, channel

NODE_TIMEOUT = 3.0  # seconds a node's GetStatus may take before its row says it did not answer


@dataclass
class Snapshot:
    session: launcher_pb2.Session
    nodes: dict = field(default_factory=dict)  # node id -> its RolloutStatus or TrainerStatus, or the error


def snapshot(launcher: str, session_id: str = "") -> Snapshot:
    """GetSession from the launcher, then GetStatus from every node of the session."""
    with channel(launcher) as ch:
        s = launcher_pb2_grpc.LauncherServiceStub(ch).GetSession(
            launcher_pb2.GetSessionRequest(session_id=session_id), timeout=CALL_TIMEOUT)
    snap = Snapshot(s)
    for node in s.nodes:
        try:
            with channel(node.address) as ch:
                if node.kind == "rollout":
                    reply = rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(rollout_pb2.RolloutStatusRequest(),
                                                                              timeout=NODE_TIMEOUT)
                else:
                    reply = trainer_pb2_grpc.TrainerServiceStub(ch).GetStatus(trainer_pb2.TrainerStatusRequest(),
                                                                              timeout=NODE_TIMEOUT)
            snap.nodes[node.node_id] = reply
        except grpc.RpcError as exc:
            snap.nodes[node.node_id] = f"no answer: {exc.code().name}"
    return snap


def _state(value: int) -> str:
    return common_pb2.ServiceState.Name(value).replace("SERVICE_STATE_", "")


def render(snap: Snapshot):
    """The view as rich renderables: a header, the nodes table, the faults."""
    from rich import box
    from rich.console import Group
    from rich.table import Column, Table
    from rich.text import Text

    s, p = snap.session, snap.session.progress
    phase = launcher_pb2.SessionPhase.Name(s.phase).replace("SESSION_PHASE_", "")
    ledger = p.ledger
    score = f"  score {p.score:.2f}% ({p.scored_episodes} episodes)" if p.scored_episodes else ""
    header = Text(
        f"session {s.session_id} ({s.config_name})  {phase}\n"
        f"iteration {p.iteration}/{p.num_iterations}  env steps {p.env_steps}  {p.env_steps_per_second:.0f} steps/s  "
        f"mean return {p.mean_return:.2f}{score}\n"
        f"model version {p.model_version}  policy lag {p.policy_lag:.2f}  queue {p.queue_depth}  "
        f"restarts {p.restarts}  episodes {p.episodes}\n"
        f"ledger: produced {ledger.produced} = consumed {ledger.consumed} + dropped stale {ledger.dropped_stale} "
        f"+ dropped corrupt {ledger.dropped_corrupt} + pending {ledger.pending}")
    # Fits an 80-column terminal: a node's kind is its id's prefix, its address goes under its id.
    table = Table(Column("node", no_wrap=True, min_width=16), Column("state", no_wrap=True),
                  *(Column(h, no_wrap=True, justify="right") for h in ("steps/s", "envs", "version", "restarts",
                                                                       "frags")),
                  Column("note", overflow="fold"), title="nodes", box=box.SIMPLE_HEAD, padding=(0, 1))
    for node in sorted(s.nodes, key=lambda n: (n.kind, n.node_id)):
        status = snap.nodes.get(node.node_id)
        produced = str(ledger.produced_by_node.get(node.node_id, "")) if node.kind == "rollout" else ""
        if isinstance(status, rollout_pb2.RolloutStatus):
            cells = [f"{status.env_steps_per_second:.0f}", str(status.live_envs), str(status.model_version),
                     str(status.env_restarts), produced, node.fault or status.last_error]
        elif isinstance(status, trainer_pb2.TrainerStatus):
            cells = ["", "", str(status.model_version), "", "",
                     node.fault or status.last_error or f"{status.samples_per_second:.0f} samples/s"]
        else:
            cells = ["", "", "", "", produced, node.fault or str(status)]
        # the node's own answer is fresher than its registry entry (written every heartbeat)
        state = status.state if isinstance(status, (rollout_pb2.RolloutStatus, trainer_pb2.TrainerStatus)) else node.state
        table.add_row(f"{node.node_id}\n{node.address}", _state(state), *cells)
    faults = Text("\n".join(f"fault: {f}" for f in s.faults) or "no faults", style="red" if s.faults else "green")
    return Group(header, table, faults)


def watch(launcher: str, session_id: str, interval: float, once: bool) -> int:
    """Refresh the view every interval seconds until Ctrl-C (or print it once)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if once:
        console.print(render(snapshot(launcher, session_id)))
        return 0
    try:
        with Live(render(snapshot(launcher, session_id)), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                try:
                    live.update(render(snapshot(launcher, session_id)), refresh=True)
                except grpc.RpcError as exc:  # the launcher is away for a moment: say so, keep watching
                    from rich.text import Text

                    live.update(Text(f"launcher {launcher}: {exc.code().name}: {exc.details()}", style="red"),
                                refresh=True)
    except KeyboardInterrupt:
        return 0
