"""A fault schedule against a real `mso run`: CartPole trains while, in a seeded order, a rollout service, an
env process and the trainer service are killed with kill -9 (supervision restarts the services) and Redis is
killed and restarted from its append-only file. At the end: training finished, the model version grew across
every restart, the fragment ledger balances exactly, no process of the run is left, and GetSession told the
truth all along: never RUNNING while nothing trained for longer than the stall timeout, and each outage of a
node shown among its faults while it lasted."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import grpc
import psutil

from services.shared.ports import free_port
from services.shared.redis_server import RedisServer
from services.shared.rpc import channel
from services.shared.protos import launcher_pb2, launcher_pb2_grpc
from tests.conftest import wait_until

STALL = 60  # train_config.stall_timeout of the run
SEED = 14


class Watcher:
    """Polls GetSession every half second from its own thread and keeps what it saw."""

    def __init__(self, address: str):
        self.address = address
        self.seen: list[tuple[float, str, int, int, tuple]] = []  # (time, phase, iteration, version, faults)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.5):
            try:
                with channel(self.address) as ch:
                    s = launcher_pb2_grpc.LauncherServiceStub(ch).GetSession(launcher_pb2.GetSessionRequest(),
                                                                            timeout=5)
                self.seen.append((time.monotonic(), launcher_pb2.SessionPhase.Name(s.phase), s.progress.iteration,
                                  s.progress.model_version, tuple(s.faults)))
            except grpc.RpcError as exc:  # Redis down: the launcher cannot answer, which is no lie
                self.seen.append((time.monotonic(), f"unreachable:{exc.code().name}", -1, -1, ()))

    def last(self):
        return next((s for s in reversed(self.seen) if s[2] >= 0), (0, "", 0, 0, ()))


def services(proc: psutil.Process, kind: str) -> list[psutil.Process]:
    found = []
    for p in proc.children():
        try:
            if f"{kind} serve" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def env_processes(proc: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in proc.children(recursive=True):
        try:
            if "forkserver" in " ".join(p.cmdline()) and "forkserver" in " ".join(p.parent().cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, AttributeError):
            pass
    return found


def test_training_survives_a_fault_schedule_and_the_ledger_balances(tmp_path):
    data = tmp_path / "redis"
    data.mkdir()
    port, password = free_port(), "chaos-pw"
    redis = RedisServer(port=port, appendonly=True, data_dir=str(data), password=password)
    launcher = free_port()
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "run", "cartpole", "train_config.num_iterations=400",
         f"train_config.stall_timeout={STALL}", "rollout_config.worker_config.envs_per_process=1",
         f"--port={launcher}", "--quiet", f"--summary={summary}"],
        env=dict(os.environ, REDIS_URL=redis.url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    me = psutil.Process(proc.pid)
    everything: dict[int, psutil.Process] = {}
    said: list[str] = []
    watcher = None
    try:
        for line in proc.stderr:
            said.append(line)
            if "running (" in line:
                break
        threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
        watcher = Watcher(f"127.0.0.1:{launcher}")

        def remember():
            assert proc.poll() is None, "mso run ended during the schedule:\n" + "".join(said[-40:])
            for p in me.children(recursive=True):
                everything.setdefault(p.pid, p)

        def progressed(past_iteration: int, past_version: int, what: str, timeout: float = 120):
            wait_until(lambda: remember() or (watcher.last()[2] > past_iteration and watcher.last()[3] > past_version),
                       timeout, f"training to go on after {what}")

        def kill_rollout():
            victim = services(me, "rollout")[0]
            victim.send_signal(signal.SIGKILL)
            wait_until(lambda: (found := services(me, "rollout")) and found[0].pid != victim.pid, 60,
                       "supervision to restart the rollout service")

        def kill_env():
            victim = wait_until(lambda: env_processes(me), 60, "an env process")[0]
            victim.send_signal(signal.SIGKILL)

        def kill_trainer():
            victim = services(me, "trainer")[0]
            victim.send_signal(signal.SIGKILL)
            wait_until(lambda: any("no trainer node is training" in f or "trainer node" in f
                                   for s in watcher.seen[-6:] for f in s[4]), 60,
                       "GetSession to show the trainer missing while it is")

        def restart_redis():
            nonlocal redis
            redis.process.send_signal(signal.SIGKILL)
            redis.process.wait()
            redis = RedisServer(port=port, appendonly=True, data_dir=str(data), password=password)

        faults = {"rollout": kill_rollout, "env": kill_env, "trainer": kill_trainer, "redis": restart_redis}
        order = list(faults)
        random.Random(SEED).shuffle(order)
        versions = []
        for k, name in enumerate(order):  # faults at iterations 40, 100, 160, 220 of 400: training cannot outrun
            at = 40 + 60 * k              # a dead node's recovery (it needs fresh fragments and a trainer)
            wait_until(lambda: remember() or watcher.last()[2] >= at, 180, f"iteration {at}")
            _t, _phase, iteration, version, _f = watcher.last()
            versions.append(version)
            faults[name]()
            progressed(iteration, version, f"the {name} fault")
        assert proc.wait(300) == 0, "".join(said[-40:])
    finally:
        if watcher is not None:
            watcher.stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        redis.stop()

    result = json.loads(summary.read_text())
    assert result["phase"] == "SESSION_PHASE_FINISHED" and result["iterations"] == 400, result
    assert result["model_version"] > max(versions)
    ledger = result["ledger"]
    assert ledger["produced"] == ledger["consumed"] + ledger.get("dropped_stale", 0) + \
        ledger.get("dropped_corrupt", 0) + ledger["pending"], ledger
    # The version never went back, whatever restarted.
    seen_versions = [s[3] for s in watcher.seen if s[3] >= 0]
    assert seen_versions == sorted(seen_versions)
    # Never RUNNING while nothing trained for longer than the stall timeout.
    last_change, last_iteration = watcher.seen[0][0], -1
    for when, phase, iteration, _v, _f in watcher.seen:
        if iteration != last_iteration:
            last_change, last_iteration = when, iteration
        if phase == "SESSION_PHASE_RUNNING":
            assert when - last_change <= STALL + 5, f"RUNNING with no iteration for {when - last_change:.0f}s"
    # Nothing of the run is left.
    alive = [p for p in everything.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
    print(f"\nchaos ({', '.join(order)}): {result['iterations']} iterations, version {result['model_version']}, "
          f"{result['wall_seconds']:.0f}s, ledger {ledger}, restarts {result['service_restarts']}")
