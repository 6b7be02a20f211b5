"""deploy/docker-compose.yml for real: the image built from this repo, the stack brought up with Docker Compose
v2 over podman (deploy/podman-ci.sh), cartpole launched with grpcurl through the published launcher port and
trained by three rollout containers, a fourth added while it trains, faults injected the way an operator
meets them (a killed container, a frozen one, a network partition, a restarted trainer, a restarted Redis),
then `down -v` leaving nothing. CI installs podman (.ci/run); on a machine without it and without root to
install it, the module is skipped saying so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import GRPCURL, wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "podman-ci.sh"
ENV_FILE = ROOT / "deploy" / "mso.env"
LAUNCHER = "127.0.0.1:50050"


def podman_usable() -> str:
    """Why this machine cannot run the stack, or "" when it can."""
    if not shutil.which("podman") and os.geteuid() != 0:
        return "podman is not installed and this is not root to install it (.ci/run installs it)"
    return ""


pytestmark = pytest.mark.skipif(bool(podman_usable()), reason=podman_usable() or "podman is usable")


def sh(*args, timeout=900, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"podman-ci.sh {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def podman(*args, check=True) -> str:
    env = dict(os.environ, CONTAINERS_CONF=os.environ.get("MSO_PODMAN_STATE", "/tmp/mso-podman") + "/containers.conf")
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, env=env)
    if check and out.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed: {out.stderr[-2000:]}")
    return out.stdout


def secrets() -> dict[str, str]:
    lines = [line.strip() for line in ENV_FILE.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def grpc(method: str, data: dict, token: str | None = None, max_time: int = 60) -> dict:
    headers = ["-H", f"authorization: Bearer {token}"] if token else []
    out = subprocess.run([GRPCURL, "-plaintext", "-max-time", str(max_time), *headers, "-d", json.dumps(data),
                          LAUNCHER, method], capture_output=True, text=True, timeout=max_time + 30)
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
            sh(step)
            timings[step] = time.monotonic() - started
        started = time.monotonic()
        sh("compose", "build", timeout=1800)
        timings["build"] = time.monotonic() - started
        health = subprocess.Popen(["bash", str(SCRIPT), "health"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        started = time.monotonic()
        sh("compose", "up", "-d", "--scale", "rollout=3", "--wait", "--wait-timeout", "300", timeout=400)
        timings["up"] = time.monotonic() - started
        yield {"timings": timings, "token": secrets()["MSO_TOKEN"]}
    finally:
        if health is not None:
            os.killpg(health.pid, 9)
            health.wait()
        started = time.monotonic()
        sh("teardown", check=False)
        timings["down"] = time.monotonic() - started
        print(f"\npodman stack timings (s): { {k: round(v) for k, v in timings.items()} }")
        if made_env:
            ENV_FILE.unlink()


def test_every_service_is_healthy_and_the_launcher_port_is_published(stack):
    names = {s: containers(s) for s in ("redis", "trainer", "rollout", "launcher")}
    assert len(names["rollout"]) == 3 and all(len(names[s]) == 1 for s in ("redis", "trainer", "launcher"))
    for name in sum(names.values(), []):
        state = json.loads(podman("inspect", name))[0]["State"]
        assert state["Running"] and state.get("Health", {}).get("Status", "healthy") == "healthy", (name, state)
    nodes = grpc("mso.v1.LauncherService/ListNodes", {})["nodes"]
    assert sorted(n["kind"] for n in nodes) == ["rollout"] * 3 + ["trainer"]


def test_cartpole_trains_across_three_containers_and_a_fourth_joins(stack):
    with pytest.raises(RuntimeError, match="Unauthenticated"):  # the token from deploy/mso.env guards Launch
        grpc("mso.v1.LauncherService/Launch", {"config": "cartpole"})
    launched = grpc("mso.v1.LauncherService/Launch", {"config": "cartpole", "overrides": [
        "train_config.num_iterations=100000", "rollout_config.worker_config.num_envs=4"]}, stack["token"],
        max_time=300)
    assert launched["phase"] == "SESSION_PHASE_RUNNING"
    wait_until(lambda: session().get("progress", {}).get("meanReturn", 0) >= 195, 600, "a mean return of 195",
               interval=2)
    producing = {n["nodeId"] for n in session()["nodes"] if n["kind"] == "rollout"}
    assert len(producing) == 3
    sh("compose", "up", "-d", "--scale", "rollout=4", "--no-recreate", "--wait", "--wait-timeout", "300", timeout=400)
    wait_until(lambda: len([n for n in session()["nodes"] if n["kind"] == "rollout" and
                            n.get("sessionId") == launched["sessionId"]]) == 4, 180,
               "the fourth rollout container to join the running session")


def fault(name: str, inject, repair, stack, expect: str | None, seconds: float = 0):
    """Inject a fault while training runs, check GetSession shows it while it lasts (`expect` in a fault or
    the session unreachable), repair it, and check training goes on at a higher version."""
    before = session()["progress"]
    started = time.monotonic()
    inject()
    seen = expect is None or wait_until(lambda: any(expect in f for f in (session().get("faults") or [])), 120,
                                        f"GetSession to show the {name}", interval=1)
    if seconds:
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))  # the fault's own duration (a paused node)
    repair()
    after = wait_until(lambda: (p := session().get("progress", {})) and int(p.get("modelVersion", 0)) >
                       int(before.get("modelVersion", 0)) + 2 and p, 300, f"training to go on after the {name}",
                       interval=2)
    return {"seconds": round(time.monotonic() - started), "shown": bool(seen),
            "steps_per_s_before": round(before.get("envStepsPerSecond", 0)),
            "steps_per_s_after": round(after.get("envStepsPerSecond", 0))}


def test_faults_while_training_and_the_ledger_at_the_end(stack):
    rollouts = containers("rollout")
    victim, frozen, partitioned = rollouts[0], rollouts[1], rollouts[2]
    network = podman("inspect", victim, "--format", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}").split()[0]
    effects = {
        "killed rollout container": fault("killed rollout container", lambda: podman("kill", victim),
                                          lambda: None, stack, "no heartbeat"),
        "paused rollout container": fault("paused rollout container", lambda: podman("pause", frozen),
                                          lambda: podman("unpause", frozen), stack, "no heartbeat", seconds=30),
        "network partition": fault("network partition", lambda: podman("network", "disconnect", network, partitioned),
                                   lambda: podman("network", "connect", network, partitioned), stack, "no heartbeat"),
        "restarted trainer": fault("restarted trainer", lambda: sh("compose", "restart", "-t", "10", "trainer"),
                                   lambda: None, stack, "trainer"),
        # While Redis restarts nobody can read the session; it is back from its append-only file.
        "restarted redis": fault("restarted redis", lambda: sh("compose", "restart", "-t", "10", "redis"),
                                 lambda: None, stack, None),
    }
    print(f"\nfault effects: {json.dumps(effects)}")
    grpc("mso.v1.LauncherService/StopSession", {}, stack["token"], max_time=300)
    ledger = session()["progress"]["ledger"]  # quiet: nothing produces or consumes any more
    produced = int(ledger.get("produced", 0))
    assert produced == sum(int(ledger.get(k, 0)) for k in ("consumed", "droppedStale", "droppedCorrupt", "pending"))
    by_node = {k: int(v) for k, v in ledger.get("producedByNode", {}).items()}
    assert sum(by_node.values()) == produced and len([n for n, c in by_node.items() if c > 0]) >= 4
    print(f"ledger at the end: {ledger}")
