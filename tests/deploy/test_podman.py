"""deploy/docker-compose.yml for real: the image built from this repo, the stack brought up with Docker Compose
v2 over podman (deploy/podman-ci.sh), cartpole launched with grpcurl through the published launcher port and
trained by three rollout containers, a fourth added while it trains, faults injected the way an operator
meets them (a killed container, a frozen one, a network partition, a restarted trainer, a restarted Redis),
then `down -v` leaving nothing. CI installs podman (.ci/run); where it cannot be installed (not root, not
Debian) the module is skipped saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import grpcurl, wait_until
from tests.deploy.test_compose import env_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "podman-ci.sh"
ENV_FILE = ROOT / "deploy" / "mso.env"
LAUNCHER = "127.0.0.1:50050"


# debootstrap, rootful podman and its firewall rules need root; CI runs as root (.ci/run installs podman).
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the podman stack needs root (debootstrap, rootful "
                                "podman, iptables); .ci/run runs as root and installs podman")


def sh(*args, timeout=900, check=True, skip_code=None) -> subprocess.CompletedProcess:
    """podman-ci.sh ARGS; a `skip_code` exit skips the module (the script cannot install podman here)."""
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if skip_code is not None and out.returncode == skip_code:
        pytest.skip(f"podman-ci.sh {' '.join(args)}: {out.stderr.strip()}")
    if check and out.returncode != 0:
        pytest.fail(f"podman-ci.sh {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def podman(*args, check=True) -> str:
    env = dict(os.environ, CONTAINERS_CONF=os.environ.get("MSO_PODMAN_STATE", "/tmp/mso-podman") + "/containers.conf")
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, env=env)
    if check and out.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed: {out.stderr[-2000:]}")
    return out.stdout


def grpc(method: str, data: dict, token: str | None = None, max_time: int = 60) -> dict:
    """The call's reply; RuntimeError with grpcurl's message when it fails (the test waits through some)."""
    headers = ["-H", f"authorization: Bearer {token}"] if token else []
    out = grpcurl(*headers, "-d", json.dumps(data), LAUNCHER, method, check=False, max_time=max_time)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return json.loads(out.stdout or "{}")


def session() -> dict:
    """GetSession, or {} while the launcher cannot answer (Redis restarting)."""
    try:
        return grpc("mso.v1.LauncherService/GetSession", {}, max_time=15)
    except RuntimeError:
        return {}


def containers(service: str) -> list[str]:
    return podman("ps", "--filter", "label=com.docker.compose.project=mso",
                  "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}").split()


@pytest.fixture(scope="module")
def stack():
    """The image built and the stack up with three rollout replicas; everything removed afterwards."""
    if not ENV_FILE.exists():
        shutil.copy(ROOT / "deploy" / "mso.env.example", ENV_FILE)
        made_env = True
    else:
        made_env = False
    timings = {}
    health = None
    try:
        for step in ("setup", "base", "wheels"):
            started = time.monotonic()
            sh(step, skip_code=3)  # 3: nothing to run containers with, and no way to install it here
            timings[step] = time.monotonic() - started
        started = time.monotonic()
        sh("compose", "build", timeout=1800)
        timings["build"] = time.monotonic() - started
        health = subprocess.Popen(["bash", str(SCRIPT), "health"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        started = time.monotonic()
        sh("compose", "up", "-d", "--scale", "rollout=3", "--wait", "--wait-timeout", "300", timeout=400)
        timings["up"] = time.monotonic() - started
        yield {"timings": timings, "token": env_file(ENV_FILE)["MSO_TOKEN"]}
    finally:
        if health is not None:
            os.killpg(health.pid, 9)
            health.wait()
        sh("teardown", check=False)
        print(f"\npodman stack timings (s): { {k: round(v) for k, v in timings.items()} }")
        if made_env:
            ENV_FILE.unlink()


def container_ip(name: str) -> str:
    return podman("inspect", name, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").split()[0]


def node_of(name: str) -> dict:
    """The registered node a rollout container runs (its heartbeat's address is the container's address)."""
    ip = container_ip(name)
    return wait_until(lambda: next((n for n in session().get("nodes", []) if n["address"].startswith(ip + ":")), None),
                      60, f"{name} to be registered at {ip}")


def produced(node_id: str) -> int:
    return int(session().get("progress", {}).get("ledger", {}).get("produced_by_node", {}).get(node_id, 0))


def test_every_service_is_healthy_and_the_launcher_port_is_published(stack):
    names = {s: containers(s) for s in ("redis", "trainer", "rollout", "launcher")}
    assert len(names["rollout"]) == 3 and all(len(names[s]) == 1 for s in ("redis", "trainer", "launcher"))
    for name in sum(names.values(), []):
        state = json.loads(podman("inspect", name))[0]["State"]
        assert state["Running"] and state["Health"]["Status"] == "healthy", (name, state)
    nodes = grpc("mso.v1.LauncherService/ListNodes", {})["nodes"]
    assert sorted(n["kind"] for n in nodes) == ["rollout"] * 3 + ["trainer"]
    assert {n["state"] for n in nodes} == {"SERVICE_STATE_IDLE"}


def test_cartpole_trains_across_three_containers_and_a_fourth_joins(stack):
    with pytest.raises(RuntimeError, match="Unauthenticated"):  # the token from deploy/mso.env guards Launch
        grpc("mso.v1.LauncherService/Launch", {"config": "cartpole"})
    started = time.monotonic()
    launched = grpc("mso.v1.LauncherService/Launch", {"config": "cartpole", "overrides": [
        "train_config.num_iterations=100000", "rollout_config.worker_config.num_envs=4"]}, stack["token"],
        max_time=300)
    assert launched["phase"] == "SESSION_PHASE_RUNNING"
    stack["timings"]["launch"] = time.monotonic() - started
    wait_until(lambda: session().get("progress", {}).get("mean_return", 0) >= 195, 600, "a mean return of 195",
               interval=2)
    stack["timings"]["to_return_195"] = time.monotonic() - started
    first = [node_of(name)["node_id"] for name in containers("rollout")]
    wait_until(lambda: all(produced(n) > 0 for n in first), 120, "all three rollout containers to produce")
    wait_until(lambda: {n["state"] for n in session()["nodes"]} == {"SERVICE_STATE_RUNNING"}, 30,
               "every node to say RUNNING")
    sh("compose", "up", "-d", "--scale", "rollout=4", "--no-recreate", "--wait", "--wait-timeout", "300", timeout=400)
    (fourth,) = [name for name in containers("rollout") if node_of(name)["node_id"] not in first]
    new = node_of(fourth)["node_id"]
    wait_until(lambda: produced(new) > 0, 180, "the fourth rollout container to join the session and produce")
    assert node_of(fourth)["session_id"] == launched["session_id"]


def fault(name: str, inject, repair, shown, recovered, seconds: float = 0) -> dict:
    """Inject a fault while training runs, wait until GetSession shows it (`shown(session)`), keep it for
    `seconds`, repair it, and wait until `recovered()` and training goes on at a higher version. Returns what
    it cost: the fault's duration and env steps/s before, at worst during it, and after."""
    before = session()["progress"]
    rates = []
    started = time.monotonic()
    inject()

    def showing():
        s = session()
        rates.append(s.get("progress", {}).get("env_steps_per_second", 0))
        return shown(s)

    wait_until(showing, 120, f"GetSession to show the {name}", interval=1)
    while time.monotonic() - started < seconds:  # the fault's own duration (a frozen node)
        assert showing(), f"GetSession stopped showing the {name} while it lasted"
        time.sleep(1)
    repair()
    wait_until(recovered, 300, f"the recovery from the {name}", interval=1)
    after = wait_until(lambda: (p := session().get("progress", {})) and int(p.get("model_version", 0)) >
                       int(before.get("model_version", 0)) + 2 and p, 300, f"training to go on after the {name}",
                       interval=2)
    return {"seconds": round(time.monotonic() - started), "steps_per_s_before": round(before.get("env_steps_per_second", 0)),
            "steps_per_s_worst": round(min(rates)), "steps_per_s_after": round(after.get("env_steps_per_second", 0))}


def test_faults_while_training_and_the_ledger_at_the_end(stack):
    victim, frozen, partitioned = sorted(containers("rollout"))[:3]
    ids = {name: node_of(name)["node_id"] for name in (victim, frozen, partitioned)}
    seen_ids = {n["node_id"] for n in session()["nodes"] if n["kind"] == "rollout"}
    network = podman("inspect", partitioned, "--format", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}").split()[0]

    def lost(node_id):
        return lambda s: any(f.startswith(f"rollout node {node_id}: no heartbeat") for f in s.get("faults", []))

    def producing_again(node_id):
        count = produced(node_id)
        return lambda: produced(node_id) > count

    def replaced():  # the killed container started again by compose: a new node that joins and produces
        new = node_of(victim)["node_id"]
        seen_ids.add(new)
        return new != ids[victim] and produced(new) > 0

    def partition_healed():
        node = node_of(partitioned)
        return (produced(ids[partitioned]) > partition_count and node["node_id"] == ids[partitioned]
                and not any(ids[partitioned] in f for f in session().get("faults", [])))

    effects = {}
    effects["killed rollout container"] = fault(
        "killed rollout container", lambda: podman("kill", victim),
        lambda: sh("compose", "up", "-d", "--scale", "rollout=4", "--no-recreate", "--wait", "--wait-timeout", "300",
                   timeout=400),
        lost(ids[victim]), replaced)
    frozen_again = producing_again(ids[frozen])
    effects["paused rollout container (30 s)"] = fault(
        "paused rollout container", lambda: podman("pause", frozen), lambda: podman("unpause", frozen),
        lost(ids[frozen]), frozen_again, seconds=30)
    partition_count = produced(ids[partitioned])
    effects["network partition"] = fault(
        "network partition", lambda: podman("network", "disconnect", network, partitioned),
        lambda: podman("network", "connect", network, partitioned), lost(ids[partitioned]), partition_healed)
    trainer_id = next(n["node_id"] for n in session()["nodes"] if n["kind"] == "trainer")
    effects["restarted trainer"] = fault(
        "restarted trainer", lambda: sh("compose", "restart", "-t", "10", "trainer"), lambda: None,
        lambda s: any(trainer_id in f or "no trainer" in f for f in s.get("faults", [])),
        lambda: any(n["kind"] == "trainer" and n["node_id"] != trainer_id for n in session().get("nodes", [])))
    # While Redis restarts the launcher cannot read the session: GetSession fails (or waits) until it is back,
    # from its append-only file, with the session where it was.
    effects["restarted redis"] = fault(
        "restarted redis", lambda: sh("compose", "restart", "-t", "10", "redis"), lambda: None,
        lambda s: True, lambda: session().get("phase") == "SESSION_PHASE_RUNNING")
    print(f"\nfault effects: {json.dumps(effects, indent=1)}")
    stopped = grpc("mso.v1.LauncherService/StopSession", {}, stack["token"], max_time=300)
    assert stopped["phase"] == "SESSION_PHASE_STOPPED"
    ledger = session()["progress"]["ledger"]  # quiet: nothing produces or consumes any more
    print(f"ledger at the end: {ledger}")
    counts = {k: int(ledger.get(k, 0)) for k in ("produced", "consumed", "dropped_stale", "dropped_corrupt", "pending")}
    assert counts["produced"] == counts["consumed"] + counts["dropped_stale"] + counts["dropped_corrupt"] + counts["pending"]
    by_node = {k: int(v) for k, v in ledger["produced_by_node"].items()}
    assert sum(by_node.values()) == counts["produced"]
    assert seen_ids <= {n for n, c in by_node.items() if c > 0}


def test_two_trainer_ranks_in_two_containers_of_a_ray_cluster(stack):
    """deploy/docker-compose.ray.yml: the trainer container becomes a Ray head and ray-worker joins it. The
    update of tests/trainer/test_ddp.py with one gloo rank in each container matches one rank alone on the
    same fragments; then a session with train_config.num_workers=2 trains with a rank in each."""
    started = time.monotonic()
    sh("compose", "-f", "deploy/docker-compose.ray.yml", "up", "-d", "--scale", "rollout=4", "--wait",
       "--wait-timeout", "300", timeout=400)
    stack["timings"]["ray_cluster_up"] = time.monotonic() - started
    (head,), (worker,) = containers("trainer"), containers("ray-worker")
    hosts = {name: podman("inspect", name, "--format", "{{.Config.Hostname}}").strip() for name in (head, worker)}
    for name in (head, worker):  # what the ranks import: the test's own code, on every node
        podman("cp", str(ROOT / "tests"), f"{name}:/opt/mso/")
    out = podman("exec", head, "python", "/opt/mso/tests/deploy/ray_ranks.py")
    found = json.loads(out.strip().splitlines()[-1])
    print(f"\nray cluster ranks: {found}")
    assert found["two_rank_hosts"] == [hosts[head], hosts[worker]] and found["one_rank_host"] == hosts[head]
    assert found["moved"] > 0, "the update changed nothing: the comparison would prove nothing"
    assert found["match"], found["why"]

    launched = grpc("mso.v1.LauncherService/Launch", {"config": "cartpole", "overrides": [
        "train_config.num_iterations=100000", "train_config.num_workers=2"]}, stack["token"], max_time=300)
    try:
        wait_until(lambda: int(session().get("progress", {}).get("iteration", 0)) >= 5, 300,
                   "five iterations of the two-rank session")
        for name in (head, worker):
            assert "RayTrainWorker" in podman("top", name, "args"), f"no Ray Train rank in {name}"
    finally:
        grpc("mso.v1.LauncherService/StopSession", {}, stack["token"], max_time=300)
    assert launched["phase"] == "SESSION_PHASE_RUNNING"


def test_down_leaves_nothing(stack):
    started = time.monotonic()
    sh("compose", "-f", "deploy/docker-compose.ray.yml", "down", "-v", "--timeout", "20")
    stack["timings"]["down"] = time.monotonic() - started
    assert podman("ps", "-aq", "--filter", "label=com.docker.compose.project=mso").split() == []
    assert podman("volume", "ls", "-q", "--filter", "label=com.docker.compose.project=mso").split() == []
    assert podman("network", "ls", "-q", "--filter", "label=com.docker.compose.project=mso").split() == []
    sh("teardown")  # what the script started (podman's API service) and the firewall chains of its networks
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert "NETAVARK" not in rules and "CNI-" not in rules, rules
