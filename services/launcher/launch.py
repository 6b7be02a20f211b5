"""The Launcher: brings a session up in order and watches it. Redis reachable -> rollout nodes registered ->
every rollout node Started and producing fragments -> trainer Started and training -> running -> finished.
Nodes are found through the registry in Redis, so compose replicas and remote nodes need no addresses. A
failure at any step stops what was started and says which node failed and why. LauncherService (server.py)
and `mso run` (run.py) drive sessions only through this class."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import redis

from services.shared import achievements, config, episode, session, trainer_status
from services.shared.config import LoadedConfig
from services.shared.protos import common_pb2, launcher_pb2, rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.shared.queue import ledger, produced_by_node
from services.shared.rate import Rate
from services.shared.rpc import CALL_TIMEOUT, START_TIMEOUT, channel
from services.shared.session import HEARTBEAT_TTL, Node

log = logging.getLogger(__name__)
P = launcher_pb2.SessionPhase
LAUNCH_LOCK = "mso:launch-lock"
LOST_NODE_MEMORY = 60.0  # seconds a node that stopped its heartbeat stays among the session's faults
WAIT_POLL = (0.01, 0.1)  # seconds between two looks while a launch waits: first, longest
RUNNING, FINISHED, FAILED = P.Name(P.SESSION_PHASE_RUNNING), P.Name(P.SESSION_PHASE_FINISHED), P.Name(P.SESSION_PHASE_FAILED)
STOPPED = P.Name(P.SESSION_PHASE_STOPPED)
ENDED = (FINISHED, FAILED, STOPPED)


class LaunchError(RuntimeError):
    """A session that could not be brought up; the message names the step, the node and the cause."""


class SessionBusy(RuntimeError):
    """Another session is running."""


@dataclass
class Timeouts:
    nodes: float = 60.0        # for a rollout and a trainer node to register
    fragments: float = 120.0   # for every rollout node's first fragment
    training: float = 120.0    # for the trainer to report RUNNING


@dataclass
class Progress:
    iteration: int = 0
    num_iterations: int = 0
    env_steps: int = 0
    env_steps_per_second: float = 0.0
    mean_return: float = float("nan")
    episodes: int = 0
    model_version: int = 0
    policy_lag: float = 0.0
    queue_depth: int = 0
    rollout_model_version: int = 0     # the version rollouts acted with in the newest finished episode
    restarts: int = 0                  # service processes restarted by supervision
    ledger: dict = field(default_factory=dict)
    produced_by_node: dict = field(default_factory=dict)
    scored_episodes: int = 0           # episodes that reported achievements (services/shared/achievements.py)
    success_rates: dict = field(default_factory=dict)
    score: float = float("nan")        # the Crafter score over them, in %


class Launcher:
    def __init__(self, client: redis.Redis, timeouts: Timeouts | None = None):
        self.client = client
        self.timeouts = timeouts or Timeouts()
        self._lock = threading.Lock()
        self._rates: dict[str, Rate] = {}  # session -> its env steps/s
        self._rates_lock = threading.Lock()  # GetSession, WatchMetrics and mso run's loop read progress at once
        self._watcher: threading.Thread | None = None
        self._members: dict[str, dict[str, tuple[str, float | None]]] = {}  # session -> node -> (kind, lost at)

    # -- launching -------------------------------------------------------------------------------------
    def launch(self, name: str, overrides: list[str], loaded: LoadedConfig | None = None) -> str:
        """Start a session and return its id; raises config.ConfigError for a bad config, LaunchError when
        a step fails, SessionBusy when another session runs. `loaded`: the config, when the caller has it."""
        loaded = loaded or config.LaunchLoad(name, list(overrides)).result()
        # The check-and-create is atomic across launchers (processes, machines), not only threads.
        with self._lock, self.client.lock(LAUNCH_LOCK, timeout=60, blocking_timeout=60):
            running = self.running_session()
            if running is not None:
                record = session.read(self.client, running)
                if record.source_hash == loaded.source_hash and record.config_yaml == loaded.to_yaml():
                    return running  # the same launch again: idempotent
                raise SessionBusy(f"session {running} ({record.config_name}) is running; stop it first")
            sid = session.create(self.client, loaded)
        try:
            self._bring_up(sid, loaded.cfg.rollout_config.fragment_length)
        except Exception as exc:
            session.update(self.client, sid, phase=FAILED, error=str(exc))
            self._stop_nodes(sid)
            raise
        self._watch_in_background(sid, loaded.cfg.train_config.stall_timeout)
        return sid

    def _bring_up(self, sid: str, fragment_length: int) -> None:
        session.update(self.client, sid, phase=P.Name(P.SESSION_PHASE_STARTING_ROLLOUTS))
        rollouts = self._wait_nodes("rollout")

        def start(node: Node) -> str | None:
            with channel(node.address) as ch:
                try:
                    rollout_pb2_grpc.RolloutServiceStub(ch).Start(
                        rollout_pb2.RolloutStartRequest(session_id=sid), timeout=START_TIMEOUT)
                except grpc.RpcError as exc:
                    return f"rollout node {node.node_id} at {node.address} failed to start: {exc.details()}"
            return None

        # All at once: one after another, the first nodes' envs would take the CPUs from the later nodes'
        # starts (and a launch of N nodes would last N starts).
        with ThreadPoolExecutor(max_workers=len(rollouts), thread_name_prefix="start-rollout") as pool:
            failures = [f for f in pool.map(start, rollouts) if f]
        if failures:
            raise LaunchError("; ".join(failures))

        def producing(node: Node) -> bool:
            # A fragment pushed, or one cut and waiting: with several nodes the first may fill the stream
            # before the others push anything, and the stream drains only once the trainer runs.
            st = self._rollout_status(node)
            if st.state == common_pb2.SERVICE_STATE_RUNNING and st.live_envs == 0 and st.last_error:
                raise LaunchError(f"rollout node {node.node_id} at {node.address} has no env that runs: "
                                  f"{st.last_error}")
            return st.fragments_pushed > 0 or st.env_steps >= fragment_length

        for node in rollouts:
            self._wait(lambda: producing(node), self.timeouts.fragments,
                       lambda: f"rollout node {node.node_id} at {node.address} produced no fragment within "
                               f"{self.timeouts.fragments:.0f}s (last error: "
                               f"{self._rollout_status(node).last_error or 'none'})")
        self._wait(lambda: ledger(self.client, sid).get("produced", 0) > 0, self.timeouts.fragments,
                   lambda: f"no fragment reached Redis within {self.timeouts.fragments:.0f}s")
        session.update(self.client, sid, phase=P.Name(P.SESSION_PHASE_STARTING_TRAINER))
        trainer = self._wait_nodes("trainer")[0]
        with channel(trainer.address) as ch:
            try:
                trainer_pb2_grpc.TrainerServiceStub(ch).Start(trainer_pb2.TrainerStartRequest(session_id=sid),
                                                              timeout=START_TIMEOUT)
            except grpc.RpcError as exc:
                raise LaunchError(f"trainer node {trainer.node_id} at {trainer.address} failed to start: "
                                  f"{exc.details()}") from None
        self._wait(lambda: trainer_status.read(self.client, sid).state in ("SERVICE_STATE_RUNNING",
                                                                           "SERVICE_STATE_FINISHED"),
                   self.timeouts.training,
                   lambda: f"trainer node {trainer.node_id} not training within {self.timeouts.training:.0f}s"
                           f" (state {trainer_status.read(self.client, sid).state}, "
                           f"error {trainer_status.read(self.client, sid).error!r})",
                   sid)
        session.update(self.client, sid, phase=RUNNING)

    def _wait_nodes(self, kind: str) -> list[Node]:
        found: list[Node] = []

        def ready():
            found[:] = [n for n in session.list_nodes(self.client) if n.kind == kind]
            return bool(found)

        self._wait(ready, self.timeouts.nodes, lambda: f"no {kind} node registered in Redis within "
                                                       f"{self.timeouts.nodes:.0f}s")
        return list(found)

    def _wait(self, predicate, timeout: float, message, sid: str | None = None) -> None:
        """Until predicate(), looking again after 10 ms, then twice as long each time up to WAIT_POLL[1]: what
        the launch waits for often comes within milliseconds (the first fragment once the workers run), and a
        fixed 0.1 s poll had the trainer started 0.08 s after it on average."""
        deadline, delay = time.monotonic() + timeout, WAIT_POLL[0]
        while not predicate():
            if time.monotonic() > deadline:
                raise LaunchError(message())
            time.sleep(delay)
            delay = min(delay * 2, WAIT_POLL[1])
            status = trainer_status.read(self.client, sid) if sid else None
            if status is not None and status.state == "SERVICE_STATE_FAILED":
                raise LaunchError(f"trainer failed: {status.error}")

    def _rollout_status(self, node: Node) -> rollout_pb2.RolloutStatus:
        try:
            with channel(node.address) as ch:
                return rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(rollout_pb2.RolloutStatusRequest(),
                                                                         timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return rollout_pb2.RolloutStatus(last_error=f"unreachable: {exc.code().name}")

    # -- watching --------------------------------------------------------------------------------------
    def adopt(self) -> None:
        """Watch the running session, if there is one (a launcher that restarted while a session ran)."""
        sid = self.running_session()
        if sid is not None and session.read(self.client, sid).phase == RUNNING:
            log.info("watching session %s, which was running when this launcher started", sid)
            stall = config.from_yaml(session.read(self.client, sid).config_yaml).train_config.stall_timeout
            self._watch_in_background(sid, stall)

    def _watch_in_background(self, sid: str, stall_timeout: float) -> None:
        self._watcher = threading.Thread(target=self._watch, args=(sid, stall_timeout), name="session-watch",
                                         daemon=True)
        self._watcher.start()

    def _watch(self, sid: str, stall_timeout: float) -> None:
        """Until the session ends: finish or fail it as its trainer does, start a trainer when none trains
        it, and fail it when nothing has trained it for stall_timeout (train_config's). An error (Redis away
        for longer than its clients retry, a malformed record) is logged and the watch goes on: a session
        nobody watches would stay RUNNING forever."""
        last_trained = time.monotonic()
        while True:
            try:
                ended, trained = self._check(sid)
                if ended:
                    return
                if trained:
                    last_trained = time.monotonic()
                elif stall_timeout and time.monotonic() - last_trained > stall_timeout:
                    reason = (f"no trainer has trained session {sid} for {time.monotonic() - last_trained:.0f}s "
                              f"(train_config.stall_timeout): its node died and no other took over")
                    self._end(sid, FAILED, reason)
                    return
            except Exception:
                log.exception("watching session %s; going on", sid)
            time.sleep(0.5)

    def _check(self, sid: str) -> tuple[bool, bool]:
        """One look at a running session: (whether it has ended, whether a trainer node is training it)."""
        if session.read(self.client, sid).phase != RUNNING:
            return True, False
        status = trainer_status.read(self.client, sid)
        if status.state == "SERVICE_STATE_FINISHED":
            self._end(sid, FINISHED)
            return True, False
        if status.state == "SERVICE_STATE_FAILED":
            self._end(sid, FAILED, f"trainer failed: {status.error}")
            return True, False
        nodes = session.list_nodes(self.client)
        self._remember(sid, nodes)
        training = [n for n in nodes if n.kind == "trainer" and n.serving(sid)]
        if not training:
            self._start_a_trainer(sid, nodes)
        return False, bool(training)

    def _start_a_trainer(self, sid: str, nodes: list[Node]) -> None:
        """No trainer node trains the running session (its process was restarted, or it died and another
        replaces it): start an idle one on it. It continues from the session's newest published weights once
        the dead one's lease has expired; until then its Start is refused and tried again."""
        for node in nodes:
            if node.kind != "trainer" or node.state not in ("SERVICE_STATE_IDLE", "SERVICE_STATE_FAILED"):
                continue
            try:
                with channel(node.address) as ch:
                    trainer_pb2_grpc.TrainerServiceStub(ch).Start(trainer_pb2.TrainerStartRequest(session_id=sid),
                                                                  timeout=START_TIMEOUT)
                log.warning("started idle trainer node %s on running session %s", node.node_id, sid)
                return
            except grpc.RpcError as exc:
                log.info("trainer node %s cannot take session %s yet: %s", node.node_id, sid, exc.details())

    def _remember(self, sid: str, nodes: list[Node]) -> None:
        """Keep which nodes served the session, so one that goes silent shows among its faults."""
        now = time.time()
        seen = self._members.setdefault(sid, {})
        live = {n.node_id for n in nodes}
        for n in nodes:
            if n.session_id == sid:
                seen[n.node_id] = (n.kind, None)
        for node_id, (kind, lost) in list(seen.items()):
            if node_id not in live and lost is None:
                seen[node_id] = (kind, now)
            elif lost is not None and now - lost > LOST_NODE_MEMORY:
                del seen[node_id]

    # -- what callers drive --------------------------------------------------------------------------------
    def record(self, sid: str) -> session.Record:
        return session.read(self.client, sid)

    def phase(self, sid: str) -> str:
        return self.record(sid).phase

    def stop(self, sid: str) -> None:
        """StopSession: stop the nodes, then STOPPED."""
        session.read(self.client, sid)  # raises SessionNotFound for an unknown session
        self._end(sid, STOPPED)

    def finish(self, sid: str) -> None:
        """End a running session as FINISHED now (`mso run --until-return/--until-steps` reached its goal)."""
        self._end(sid, FINISHED)

    def count_restarts(self, sid: str, restarts: int) -> None:
        """Service processes restarted by `mso run`'s supervision so far."""
        session.update(self.client, sid, restarts=restarts)

    def _end(self, sid: str, phase: str, error: str | None = None) -> None:
        # STOPPING first: a session still RUNNING whose trainer has just been stopped looked, to the watcher,
        # like one without a trainer, and it Started the idle trainer again (at every --until-steps finish).
        session.update(self.client, sid, phase=P.Name(P.SESSION_PHASE_STOPPING))
        self._stop_nodes(sid)
        session.update(self.client, sid, phase=phase, error=error)

    def _stop_nodes(self, sid: str) -> None:
        """Stop the trainer first (it stops consuming), then the rollout nodes; errors are logged only."""
        for node in sorted(session.list_nodes(self.client), key=lambda n: n.kind != "trainer"):
            try:
                with channel(node.address) as ch:
                    if node.kind == "trainer":
                        trainer_pb2_grpc.TrainerServiceStub(ch).Stop(trainer_pb2.TrainerStopRequest(), timeout=90)
                    else:
                        rollout_pb2_grpc.RolloutServiceStub(ch).Stop(rollout_pb2.RolloutStopRequest(), timeout=90)
            except grpc.RpcError as exc:
                log.warning("stopping %s: %s", node.node_id, exc.details())

    def running_session(self) -> str | None:
        sid = session.current(self.client)
        if sid is None:
            return None
        return None if session.read(self.client, sid).phase in ENDED else sid

    # -- reporting -------------------------------------------------------------------------------------
    def progress(self, sid: str) -> Progress:
        counts = ledger(self.client, sid)
        status = trainer_status.read(self.client, sid)
        recent = episode.latest(self.client, sid, episode.RECENT)
        env_steps = counts.get("env_steps", 0)
        with self._rates_lock:
            rate = self._rates.setdefault(sid, Rate()).update(env_steps)
        scored, rates = achievements.success_rates(self.client, sid)
        return Progress(iteration=status.iteration, num_iterations=status.num_iterations, env_steps=env_steps,
                        env_steps_per_second=rate,
                        mean_return=sum(e.episode_return for e in recent) / len(recent) if recent else float("nan"),
                        episodes=counts.get("episodes", 0), model_version=status.model_version,
                        policy_lag=status.metrics.get("policy_lag", 0.0), queue_depth=counts["pending"],
                        rollout_model_version=recent[0].version if recent else 0,
                        restarts=session.read(self.client, sid).restarts, ledger=counts,
                        produced_by_node=produced_by_node(self.client, sid), scored_episodes=scored,
                        success_rates=rates, score=achievements.score(rates))

    def faults(self, sid: str) -> list[str]:
        """What is wrong with a running session right now, for GetSession: each node's own fault, nodes that
        went silent, and a trainer missing."""
        out = []
        nodes = session.list_nodes(self.client)
        for n in nodes:
            if n.session_id == sid and n.fault:
                out.append(f"{n.kind} node {n.node_id}: {n.fault}")
        for node_id, (kind, lost) in sorted(self._members.get(sid, {}).items()):
            if lost is not None:
                out.append(f"{kind} node {node_id}: no heartbeat for {time.time() - lost + HEARTBEAT_TTL:.0f}s "
                           f"(dead, or cut off from Redis)")
        if self.phase(sid) == RUNNING and not any(n.kind == "trainer" and n.serving(sid) for n in nodes):
            out.append("no trainer node is training the session")
        return out
