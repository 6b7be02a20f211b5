"""Bringing a session up: order, readiness failures that name the node and leave nothing running, one
trainer whatever the number of launchers, and `mso status` agreeing with grpcurl."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from services.shared import episode, keys, queue, ray_env, session, trainer_status
from services.launcher.embedded import ChildProcess
from services.launcher.launch import Launcher, LaunchError, SessionBusy, Timeouts
from services.shared.ports import free_port
from services.shared.rpc import channel
from services.shared.protos import common_pb2, rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import grpcurl, wait_until

HANGING = str(Path(__file__).with_name("hanging_config.py"))
SHORT = ["train_config.num_iterations=2", "rollout_config.worker_config.num_envs=2",
         "rollout_config.worker_config.batch_size=2", "train_config.batch_size_per_gpu=2"]


def rollout_status(stack):
    with channel(stack["rollout"]) as ch:
        return rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10)


def trainer_reply(stack):
    with channel(stack["trainer"]) as ch:
        return trainer_pb2_grpc.TrainerServiceStub(ch).GetStatus(trainer_pb2.TrainerStatusRequest(), timeout=10)


def wait_finished(client, sid):
    wait_until(lambda: session.read(client, sid).phase == "SESSION_PHASE_FINISHED", 120, "the session to finish",
               interval=0.2)


def test_a_rollout_node_that_never_produces_fails_the_launch_naming_it(stack):
    client = stack["redis"]
    launcher = Launcher(client, Timeouts(fragments=8))
    with pytest.raises(LaunchError) as err:
        launcher.launch(HANGING, [])
    node_id = rollout_status(stack).node_id
    assert node_id in str(err.value) and "produced no fragment within 8s" in str(err.value)
    sid = session.current(client)
    assert session.read(client, sid).phase == "SESSION_PHASE_FAILED"
    st = rollout_status(stack)
    assert st.state == 1 and st.workers == 0 and st.live_envs == 0  # what was started is stopped
    assert trainer_reply(stack).session_id != sid                   # the trainer was never started


def test_the_trainer_starts_only_after_fragments_flow(stack):
    client = stack["redis"]
    sid = Launcher(client).launch("cartpole", SHORT)
    assert trainer_status.read(client, sid).started_at > queue.first_fragment_at(client, sid)
    wait_finished(client, sid)


def test_rollout_nodes_are_started_all_at_once(stack):
    """Two more rollout services with Ray instances of their own (started at their Start, seconds each): the
    launcher Starts every node at once, so both are seen STARTING together. One after another, the first
    nodes' envs took the CPUs from the later nodes' starts, and on a loaded host a Start ran out of time.
    And each starts an instance of its own although the stack's `ray start` head is the machine's latest
    cluster (ray.init without an address joined that one, or a dead one, and the Start hung)."""
    client = stack["redis"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["REDIS_URL"] = stack["redis_url"]
    ports = [free_port(), free_port()]
    extra = [ChildProcess(f"rollout-{i}", [sys.executable, "-m", "services.cli", "rollout", "serve",
                                           "--host=127.0.0.1", f"--port={port}"], env, quiet=True)
             for i, port in enumerate(ports)]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        wait_until(lambda: len(session.list_nodes(client)) == 4, 60, "the two more rollout nodes registered")
        seen, done = [], threading.Event()

        def poll():
            while not done.is_set():
                states = []
                for address in addresses:
                    with channel(address) as ch:
                        states.append(rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(
                            rollout_pb2.RolloutStatusRequest(), timeout=10).state)
                seen.append(tuple(states))
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            sid = Launcher(client).launch("cartpole", SHORT)
        finally:
            done.set()
            poller.join()
        starting = common_pb2.SERVICE_STATE_STARTING
        assert (starting, starting) in seen, f"never both STARTING: {sorted(set(seen))}"
        for address in addresses:
            with channel(address) as ch:
                assert rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(
                    rollout_pb2.RolloutStatusRequest(), timeout=10).session_id == sid
        wait_finished(client, sid)
    finally:
        for child in extra:
            child.stop(grace=10)
    wait_until(lambda: len(session.list_nodes(client)) == 2, 60, "the two more rollout nodes gone")


def test_the_service_processes_never_import_torch(stack):
    """The actors run the config module and the learner; the services only verify the module and start them.
    A service that imported torch (through the config module at a Start, or an actor class's module) spent
    seconds of every start-up on 2 cores for nothing, and hundreds of MB for as long as it runs."""
    client = stack["redis"]
    wait_finished(client, Launcher(client).launch("cartpole", SHORT))
    for kind in ("rollout", "trainer"):
        port = stack[kind].rsplit(":", 1)[1]
        service = next(p for p in psutil.process_iter(["cmdline"])
                       if "serve" in (p.info["cmdline"] or []) and f"--port={port}" in p.info["cmdline"])
        assert not [m.path for m in service.memory_maps() if "libtorch" in m.path], f"the {kind} service has torch"


def test_the_ray_head_connects_its_raylet_to_the_object_store_without_the_one_second_retry(stack):
    """Ray's client retried the raylet's connection to the object store it had just started once a second, and
    the store was seldom up at the first attempt: most heads `mso run` started idled a full second before they
    registered ("Plasma store debug dump" at t, "ObjectManager server started" at t + 1.000 s in the raylet's
    log). The race makes the wait itself an unreliable witness; the retry interval the raylet runs with is not."""
    token = stack["ray_env"]["RAY_AUTH_TOKEN"]  # this stack's head only
    raylet = next(p for p in psutil.process_iter(["name"])
                  if p.info["name"] == "raylet" and p.environ().get("RAY_AUTH_TOKEN") == token)
    assert {k: raylet.environ().get(k) for k in ray_env.FAST_START} == ray_env.FAST_START


def test_concurrent_launchers_start_one_session_and_one_trainer(stack):
    client = stack["redis"]
    sessions_before = set(client.keys("mso:s:*:record"))
    results, errors = [], []

    def launch():
        try:
            results.append(Launcher(client).launch("cartpole", SHORT + ["train_config.num_iterations=30"]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(set(client.keys("mso:s:*:record")) - sessions_before) == 1
    with pytest.raises(SessionBusy, match=results[0]):
        Launcher(client).launch("cartpole", SHORT + ["train_config.learning_rate=0.1"])
    assert trainer_reply(stack).session_id == results[0]
    wait_finished(client, results[0])


def test_mso_status_and_grpcurl_get_session_agree(stack):
    client = stack["redis"]
    sid = Launcher(client).launch("cartpole", SHORT)
    wait_finished(client, sid)
    via_grpcurl = json.loads(grpcurl("-d", "{}", stack["launcher"], "mso.v1.LauncherService/GetSession").stdout)
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", f"--launcher={stack['launcher']}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    via_cli = json.loads(out.stdout)
    for field in ("session_id", "phase", "config_name"):
        assert via_cli[field] == via_grpcurl[field]
    assert via_cli["session_id"] == sid and via_cli["phase"] == "SESSION_PHASE_FINISHED"
    assert via_cli["progress"]["iteration"] == via_grpcurl["progress"]["iteration"] == "2"


def test_while_a_session_trains_every_node_registered_says_running(stack):
    """ListNodes and GetSession show each node's heartbeat state; a trainer node said STARTING for as long as
    it trained (its heartbeat sent its own start-up state, not its learner's)."""
    client = stack["redis"]
    launcher = Launcher(client)
    sid = launcher.launch("cartpole", SHORT[1:] + ["train_config.num_iterations=100000"])
    try:
        wait_until(lambda: {n.kind: n.state for n in session.list_nodes(client) if n.session_id == sid} ==
                   {"rollout": "SERVICE_STATE_RUNNING", "trainer": "SERVICE_STATE_RUNNING"},
                   3 * session.HEARTBEAT_SECONDS + 10, "every node's heartbeat to say RUNNING")
    finally:
        launcher.stop(sid)
        wait_until(lambda: session.read(client, sid).phase in ("SESSION_PHASE_STOPPED", "SESSION_PHASE_FINISHED"),
                   120, "the session to stop")


def test_the_trainer_reports_the_episodes_and_a_new_session_is_never_taken_for_one_without_a_trainer(stack, caplog):
    """TrainerService/GetStatus carries what a user looks for first (the return, episode length, episodes);
    and the launcher's watcher, which starts an idle trainer on a session none trains, never took the trainer
    that Launch had just started for missing (it did at every launch: the registry said IDLE until the
    trainer's next heartbeat)."""
    client = stack["redis"]
    launcher = Launcher(client)
    with caplog.at_level(logging.WARNING, logger="services.launcher.launch"):
        sid = launcher.launch("cartpole", SHORT[1:] + ["train_config.num_iterations=100000"])
        try:
            wait_until(lambda: trainer_reply(stack).episodes >= 30 and trainer_reply(stack).iteration >= 2, 120,
                       "30 episodes and two iterations")
        finally:
            launcher.stop(sid)
            wait_until(lambda: session.read(client, sid).phase == "SESSION_PHASE_STOPPED", 120, "the session to stop")
    reply = trainer_reply(stack)  # a quiet moment: nothing plays or trains
    recent = episode.latest(client, sid, 20)
    assert reply.session_id == sid and reply.episodes == queue.ledger(client, sid)["episodes"]
    assert reply.mean_return == pytest.approx(sum(e.episode_return for e in recent) / 20)
    assert reply.mean_episode_length == pytest.approx(sum(e.length for e in recent) / 20)
    assert reply.score == 0.0  # CartPole reports no achievements
    assert "started idle trainer node" not in caplog.text


def test_an_env_generator_that_raises_fails_the_launch_naming_the_module_and_the_error(stack):
    client = stack["redis"]
    broken = str(Path(__file__).with_name("broken_env_config.py"))
    started = time.monotonic()
    with pytest.raises(LaunchError) as err:
        Launcher(client, Timeouts(fragments=120)).launch(broken, [])
    assert time.monotonic() - started < 60  # reported as soon as known, not at the timeout
    message = str(err.value)
    assert "broken_env_config.py" in message and "RuntimeError: stand-in simulator: no engine installed" in message
    assert rollout_status(stack).workers == 0  # stopped again


def test_a_module_that_cannot_run_on_the_node_fails_its_start_with_the_module_s_own_error(stack):
    """The node's actors run the config module (its service only verifies it): the error they raise reaches
    the Launch as the module's own, not as Ray's traceback of every actor it passed through."""
    client = stack["redis"]
    started = time.monotonic()
    with pytest.raises(LaunchError) as err:
        Launcher(client).launch(str(Path(__file__).with_name("node_only_config.py")), [])
    assert time.monotonic() - started < 60  # the Start failed; nobody waited for fragments
    message = str(err.value)
    assert "node_only_config.py failed while loading: ImportError: stand-in: the simulator's package" in message
    assert "Traceback" not in message and "ray::" not in message, message
    assert rollout_status(stack).workers == 0


@pytest.fixture
def cluster_actors(stack):
    """The named actors on the stack's Ray cluster, seen from a driver of the test's own."""
    import ray

    from ray._private.authentication_test_utils import reset_auth_token_state

    saved = {k: os.environ.get(k) for k in stack["ray_env"]}
    os.environ.update(stack["ray_env"])  # the head's address and its token
    reset_auth_token_state()  # Ray reads the token settings once per process unless told to read them again
    ray.init(address=stack["ray_env"]["RAY_ADDRESS"], namespace="online", configure_logging=False,
             log_to_driver=False)
    try:
        yield lambda: {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()


def warm_set(names, rollout_node, trainer_node):
    """The learner, rollout manager and rollout worker of these nodes, one of each, or None."""
    mine = {prefix: [n for n in names if n.startswith(prefix)]
            for prefix in (f"learner-{trainer_node}-", f"rollout-manager-{rollout_node}-",
                           f"rollout-worker-{rollout_node}-")}
    return {found[0] for found in mine.values()} if all(len(f) == 1 for f in mine.values()) else None


def test_a_session_runs_in_actors_warmed_before_it_and_the_next_gets_new_ones(stack, cluster_actors):
    client = stack["redis"]
    rollout_node, trainer_node = rollout_status(stack).node_id, trainer_reply(stack).node_id
    warm = wait_until(lambda: warm_set(cluster_actors(), rollout_node, trainer_node), 60,
                      "a warm learner, rollout manager and rollout worker")
    sid = Launcher(client).launch("cartpole", SHORT + ["train_config.num_iterations=40"])
    assert warm_set(cluster_actors(), rollout_node, trainer_node) == warm  # the session's actors are those
    wait_finished(client, sid)

    def renewed():
        names = cluster_actors()
        fresh = warm_set(names, rollout_node, trainer_node)
        return fresh is not None and not fresh & warm and not names & warm  # the session's actors are gone

    wait_until(renewed, 60, "new warm actors for the next session, and the session's gone")


def test_a_session_that_needs_other_resources_gets_new_workers_and_frees_the_warm_ones(stack, cluster_actors):
    client = stack["redis"]
    rollout_node, trainer_node = rollout_status(stack).node_id, trainer_reply(stack).node_id
    warm = wait_until(lambda: warm_set(cluster_actors(), rollout_node, trainer_node), 60,
                      "a warm learner, rollout manager and rollout worker")
    sid = Launcher(client).launch("cartpole", SHORT + ["train_config.num_iterations=40",
                                                       "rollout_config.num_cpus_per_worker=2"])
    running = warm_set(cluster_actors(), rollout_node, trainer_node)
    worker = next(n for n in warm if n.startswith("rollout-worker-"))
    assert running is not None and worker not in running  # a 2-CPU worker, not the warm 1-CPU one
    assert running - {n for n in running if n.startswith("rollout-worker-")} <= warm
    wait_finished(client, sid)


def test_a_launcher_watches_a_running_session_through_malformed_heartbeats(redis_client):
    """A launcher that starts while a session runs watches it; a malformed heartbeat in the registry (or a
    Redis hiccup) must not end the watch, or the session would stay RUNNING forever."""
    from services.shared.config import load

    sid = session.create(redis_client, load("cartpole"))
    session.update(redis_client, sid, phase="SESSION_PHASE_RUNNING")
    redis_client.set(keys.node("junk"), b"\xc1\xc1")
    redis_client.sadd(keys.NODES, "junk")
    launcher = Launcher(redis_client)
    launcher.adopt()
    trainer_status.report(redis_client, sid, state="SERVICE_STATE_FINISHED")
    wait_until(lambda: session.read(redis_client, sid).phase == "SESSION_PHASE_FINISHED", 10,
               "the watch to finish the session")
