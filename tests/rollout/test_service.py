"""The rollout service as a real process with real Ray actors: Scale while running, a second node joining
a running session on its own, heartbeat expiry of a killed node, WatchEpisodes, Prometheus metrics."""

import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from services.shared import session
from services.shared.config import load
from services.launcher.embedded import ChildProcess, start_ray_head
from services.shared.queue import FragmentConsumer
from services.shared.ports import free_port
from services.shared.redis_server import RedisServer, connect
from services.shared.rpc import channel, wait_serving
from services.shared.session import HEARTBEAT_TTL
from services.shared.protos import rollout_pb2, rollout_pb2_grpc
from tests.conftest import wait_until

CONFIG = str(Path(__file__).with_name("scenario_config.py"))


def start_node(redis_url, env, metrics_port=0):
    port = free_port()
    node = ChildProcess("rollout", [sys.executable, "-m", "services.cli", "rollout", "serve", "--host=127.0.0.1",
                                    f"--port={port}", f"--redis-url={redis_url}", f"--metrics-port={metrics_port}"],
                        env, quiet=True)
    wait_serving(f"127.0.0.1:{port}", timeout=60)
    return node, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster():
    redis = RedisServer()
    head, ray_env = start_ray_head(4, dict(os.environ))
    env = dict(os.environ, **ray_env)
    metrics_port = free_port()
    node, address = start_node(redis.url, env, metrics_port)
    try:
        yield {"redis": redis, "client": connect(redis.url), "env": env, "address": address,
               "metrics": metrics_port, "ray_head": head.process.pid}
    finally:
        node.stop(grace=30)
        head.stop(grace=10)
        redis.stop()


def env_processes(ray_head_pid):
    """Live env processes under the Ray head: the children of the actors' forkservers (which fork them
    without exec, so they share the forkserver's command line)."""
    found = []
    for p in psutil.Process(ray_head_pid).children(recursive=True):
        try:
            if "forkserver" in " ".join(p.cmdline()) and "forkserver" in " ".join(p.parent().cmdline()):
                found.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess, AttributeError):
            pass  # already dead
    return found


def status(address):
    with channel(address) as ch:
        return rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10)


def test_scale_up_and_down_while_running(cluster):
    client = cluster["client"]
    sid = session.create(client, load(CONFIG))
    with channel(cluster["address"]) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        assert stub.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=120).workers == 1
        assert stub.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=120).workers == 1  # idempotent
        st = stub.Scale(rollout_pb2.ScaleRequest(num_workers=3), timeout=180)
        assert st.workers == 3
        consumer = FragmentConsumer(client, sid, "test")
        workers_seen = set()

        def three_workers_produce():
            for _id, f in consumer.read(100, block_ms=100):
                workers_seen.add(f["slot"].split("-w")[1].split("-")[0])
            return workers_seen >= {"0", "1", "2"}
        wait_until(three_workers_produce, 60, "fragments from all three workers")
        assert status(cluster["address"]).live_envs == 6
        steps = status(cluster["address"]).env_steps
        st = stub.Scale(rollout_pb2.ScaleRequest(num_workers=1), timeout=180)
        assert st.workers == 1 and st.live_envs == 2 and st.env_steps >= steps  # counters never go back
        assert len(env_processes(cluster["ray_head"])) == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.Scale(rollout_pb2.ScaleRequest(num_workers=0), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        st = stub.Stop(rollout_pb2.RolloutStopRequest(), timeout=120)
        assert st.workers == 0 and st.state == 1
        wait_until(lambda: not env_processes(cluster["ray_head"]), 10, "every env process to be gone")
        with pytest.raises(grpc.RpcError) as err:
            stub.Scale(rollout_pb2.ScaleRequest(num_workers=2), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_new_node_joins_a_running_session_and_its_heartbeat_expires_when_killed(cluster):
    client = cluster["client"]
    sid = session.create(client, load(CONFIG))
    session.update(client, sid, phase="SESSION_PHASE_RUNNING")
    node, address = start_node(cluster["redis"].url, cluster["env"])
    try:
        node_id = wait_until(lambda: status(address).state == 3 and status(address).node_id, 120,
                             "the new node to join on its own")
        consumer = FragmentConsumer(client, sid, "test")
        wait_until(lambda: any(f["slot"].startswith(node_id) for _i, f in consumer.read(100, block_ms=100)), 60,
                   "fragments from the new node")
        assert node_id in {n.node_id for n in session.list_nodes(client)}
        os.killpg(node.process.pid, signal.SIGKILL)
        wait_until(lambda: node_id not in {n.node_id for n in session.list_nodes(client)}, HEARTBEAT_TTL + 5,
                   "the killed node's heartbeat to expire")
    finally:
        node.stop(grace=5)
        session.update(client, sid, phase="SESSION_PHASE_STOPPED")
    # The fixture's node joined the running session too; it leaves on its own once the session has ended.
    wait_until(lambda: status(cluster["address"]).state == 1, 60, "the first node to leave the ended session")


def test_watch_episodes_streams_finished_episodes(cluster):
    client = cluster["client"]
    sid = session.create(client, load(CONFIG))
    with channel(cluster["address"]) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        stub.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=120)
        assert status(cluster["address"]).session_id == sid
        try:
            stream = stub.WatchEpisodes(rollout_pb2.WatchEpisodesRequest(session_id=sid), timeout=60)
            episode = next(iter(stream))
            stream.cancel()
            assert episode.length == 5 and episode.slot.startswith("rollout-") and episode.discounted_return > 0
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics']}/metrics", timeout=10).read().decode()
            steps = [line for line in metrics.splitlines() if line.startswith("mso_rollout_env_steps_total")]
            assert steps and float(steps[0].split()[-1]) > 0
            assert "mso_rollout_inference_ms" in metrics
        finally:
            stub.Stop(rollout_pb2.RolloutStopRequest(), timeout=120)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.WatchEpisodes(rollout_pb2.WatchEpisodesRequest(session_id="abc123"), timeout=10)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def worker_processes(ray_head_pid):
    found = []
    for p in psutil.Process(ray_head_pid).children(recursive=True):
        try:
            if "RolloutWorker" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return found


def test_a_worker_whose_process_dies_is_replaced_and_reported(cluster):
    """A RolloutWorker killed with kill -9 (an OOM kill, a segfault in a simulator binding): the node keeps
    answering GetStatus, says which worker died, replaces it, and keeps producing."""
    client = cluster["client"]
    sid = session.create(client, load(CONFIG))
    with channel(cluster["address"]) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        stub.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=120)
        try:
            consumer = FragmentConsumer(client, sid, "test")
            wait_until(lambda: consumer.read(100, block_ms=100), 60, "the first fragments")
            (victim,) = worker_processes(cluster["ray_head"])
            victim.kill()

            def replaced():
                st = status(cluster["address"])  # never fails, whatever state its workers are in
                return st.worker_restarts == 1 and [(w.state, w.restarts) for w in st.worker_status] == \
                    [("running", 1)] and st
            st = wait_until(replaced, 60, "the dead worker to be replaced")
            assert st.workers == 1 and st.worker_status[0].index == 1  # a replacement gets a new number
            new_slot = f"{st.node_id}-w1-"
            wait_until(lambda: any(f["slot"].startswith(new_slot) for _i, f in consumer.read(100, block_ms=100)),
                       60, "fragments from the replacement")
            wait_until(lambda: "dead workers replaced" in {n.node_id: n.fault for n in
                                                           session.list_nodes(client)}.get(st.node_id, ""), 10,
                       "the node's heartbeat to tell of the replacement (GetSession shows it)")
        finally:
            stub.Stop(rollout_pb2.RolloutStopRequest(), timeout=120)


def test_a_node_stops_its_workers_and_their_envs_together(cluster):
    """A node's Stop stops its workers, and each closes its env processes; a simulator's close may take seconds
    (MineRL's stops a Java process). One worker after another, and one env process after another within each,
    this node of 2 workers of 3 env processes took six closes in a row (9 s; `docker stop` allows 10), and each
    worker waited a second more for its weight watcher's poll. Together they take about one close."""
    from tests.rollout.slow_close_config import CLOSE_SECONDS

    client = cluster["client"]
    sid = session.create(client, load(str(Path(__file__).with_name("slow_close_config.py"))))
    with channel(cluster["address"]) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        assert stub.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=120).workers == 2
        consumer = FragmentConsumer(client, sid, "test")
        slots: set[str] = set()

        def every_env_steps():
            slots.update(f["slot"] for _id, f in consumer.read(1000, block_ms=100))
            return len(slots) == 6
        wait_until(every_env_steps, 120, "fragments from all six envs")
        assert len(env_processes(cluster["ray_head"])) == 6
        started = time.monotonic()
        st = stub.Stop(rollout_pb2.RolloutStopRequest(), timeout=120)
        took = time.monotonic() - started
        assert st.workers == 0 and st.state == 1
        assert took < 2 * CLOSE_SECONDS, f"Stop took {took:.1f}s for envs that close in {CLOSE_SECONDS}s"
        assert not env_processes(cluster["ray_head"])
