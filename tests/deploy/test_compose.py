"""deploy/docker-compose.yml, checked without a Docker engine: it validates against the compose-spec schema,
and its services' own commands and environments, run as local processes (compose hostnames mapped to
loopback, ports to free ones, rollout started twice as `--scale rollout=2` would, the documented
deploy/mso.env.example standing in for mso.env, so Redis has a password and the token is on), train
cartpole through the launcher port with grpcurl and survive losing a rollout node."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services.launcher.embedded import ChildProcess, start_ray_head
from services.shared import ray_env
from services.shared.ports import free_port
from services.shared.redis_server import RedisServer
from services.shared.rpc import wait_serving
from tests.conftest import grpcurl, wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "mso.env.example"
MSO = [sys.executable, "-m", "services.cli"]


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.podman.yml", "docker-compose.ray.yml"])
def test_compose_files_validate_against_the_compose_spec(name):
    out = subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
                          "vendor.compose-spec", str(COMPOSE.with_name(name))], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_shape_scales_rollout_and_orders_by_health():
    spec = yaml.safe_load(COMPOSE.read_text())["services"]
    rollout = spec["rollout"]
    assert "container_name" not in rollout and "ports" not in rollout  # so --scale works
    assert rollout["healthcheck"]["test"][1:3] == ["mso", "health"]
    assert spec["launcher"]["ports"] == ["50050:50050"]
    assert spec["launcher"]["depends_on"]["rollout"]["condition"] == "service_healthy"
    assert "--appendonly yes" in spec["redis"]["command"][-1] and spec["redis"]["healthcheck"]


def test_the_image_gives_the_ray_heads_it_runs_the_settings_of_ray_env():
    """`ray start` in docker-compose.ray.yml is a shell command, not a head mso starts: the image's environment
    carries services/shared/ray_env.py's settings to it, and must carry the same ones."""
    env = {}
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in line.split()[1:])
    assert {k: env.get(k) for k in ray_env.FAST_START} == ray_env.FAST_START


def env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """An env file (deploy/mso.env.example unless told) as compose reads it: KEY=VALUE lines, # comments."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_secrets_come_from_the_env_file():
    spec = yaml.safe_load(COMPOSE.read_text())["services"]
    secrets = env_file()
    for name in ("redis", "trainer", "rollout", "launcher"):
        assert spec[name]["env_file"] == "mso.env", name
        assert not {"REDIS_URL", "MSO_TOKEN", "REDIS_PASSWORD"} & set(spec[name].get("environment", {})), name
    assert secrets["MSO_TOKEN"]
    # The services' URL carries the very password the redis service requires and its healthcheck sends.
    assert secrets["REDIS_URL"] == f"redis://:{secrets['REDIS_PASSWORD']}@redis:6379/0"
    assert '--requirepass "$${REDIS_PASSWORD:?' in spec["redis"]["command"][-1]
    assert 'REDISCLI_AUTH="$$REDIS_PASSWORD"' in spec["redis"]["healthcheck"]["test"][1]
    assert "deploy/mso.env" in (ROOT / ".gitignore").read_text().splitlines()
    # Without the password, the redis container stops at once, saying where to set it.
    shell = [part.replace("$$", "$") for part in spec["redis"]["command"]]
    out = subprocess.run(shell, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "set REDIS_PASSWORD in deploy/mso.env" in out.stderr


def localise(service: dict, redis_url: str, ports: dict) -> tuple[list[str], dict]:
    """The service's command and environment as a local process: hostnames -> loopback, ports -> free."""
    command = list(service["command"])
    for flag in ("--port", "--metrics-port"):
        if flag in command:
            i = command.index(flag) + 1
            ports[(flag, command[i])] = port = free_port()
            command[i] = str(port)
    env = dict(os.environ)
    for key, value in {**env_file(), **service.get("environment", {})}.items():
        value = str(value).replace("@redis:6379/0", "@" + redis_url.split("@", 1)[1])
        if value.startswith("${"):
            value = ""  # an unset interpolation
        env[key] = value
    env["MSO_CONFIG_PATH"] = str(ROOT / "configs")
    env["MSO_LOG_DIR"] = str(Path(env.get("TMPDIR", "/tmp")) / "mso-compose-test-runs")
    return MSO + command, env


@pytest.fixture(scope="module")
def topology():
    spec = yaml.safe_load(COMPOSE.read_text())["services"]
    redis = RedisServer(appendonly=True, password=env_file()["REDIS_PASSWORD"])
    head, ray_env = start_ray_head(4, dict(os.environ))
    procs = {}
    try:
        # depends_on order: trainer and rollout after redis, the launcher after both are healthy.
        for name, replicas in (("trainer", 1), ("rollout", 2), ("launcher", 1)):
            for replica in range(replicas):
                ports = {}
                command, env = localise(spec[name], redis.url, ports)
                env.update(ray_env)  # one shared Ray head instead of one per container: 2 cores
                child = ChildProcess(f"{name}-{replica}", command, env, quiet=True)
                port = ports[("--port", spec[name]["command"][spec[name]["command"].index("--port") + 1])]
                procs[f"{name}-{replica}"] = (child, f"127.0.0.1:{port}")
            for replica in range(replicas):
                child, address = procs[f"{name}-{replica}"]
                wait_serving(address, timeout=60)
                # The service's own healthcheck command, with the port it really has.
                check = MSO + spec[name]["healthcheck"]["test"][2:]  # ["CMD", "mso", "health", "HOST:PORT"]
                check[-1] = address
                assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0
        yield {**procs, "redis_url": redis.url, "ray_env": ray_env}
    finally:
        for child, _address in reversed(list(procs.values())):  # replicas first, as compose stops them
            child.stop(grace=20)
        head.stop(grace=10)
        redis.stop()


def status(address, service):
    return json.loads(grpcurl("-d", "{}", address, f"mso.v1.{service}/GetStatus").stdout)


def with_token():
    """grpcurl's header for the mutating calls, with the token of the env file."""
    return ("-H", f"authorization: Bearer {env_file()['MSO_TOKEN']}")


def test_two_rollout_replicas_feed_one_trainer_and_losing_one_does_not_stop_training(topology):
    launcher = topology["launcher-0"][1]
    request = json.dumps({"config": "cartpole", "overrides": ["train_config.num_iterations=100000",
                                                               "rollout_config.worker_config.num_envs=2",
                                                               "rollout_config.worker_config.batch_size=2",
                                                               "train_config.batch_size_per_gpu=4"]})
    started = time.monotonic()
    refused = grpcurl("-d", request, launcher, "mso.v1.LauncherService/Launch", check=False)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    session = json.loads(grpcurl(*with_token(), "-d", request, launcher, "mso.v1.LauncherService/Launch",
                                 max_time=240).stdout)
    assert session["phase"] == "SESSION_PHASE_RUNNING"
    print(f"\nLaunch through the compose topology took {time.monotonic() - started:.1f}s")
    try:
        replicas = [topology["rollout-0"], topology["rollout-1"]]
        for _child, address in replicas:
            wait_until(lambda: int(status(address, "RolloutService").get("fragments_pushed", 0)) > 0, 60,
                       f"fragments from the rollout replica at {address}")
        trainer = topology["trainer-0"][1]
        wait_until(lambda: int(status(trainer, "TrainerService").get("iteration", 0)) >= 3, 60, "training")
        victim, _address = replicas[0]
        os.kill(victim.process.pid, signal.SIGKILL)
        after_kill = int(status(trainer, "TrainerService")["iteration"])
        wait_until(lambda: int(status(trainer, "TrainerService")["iteration"]) >= after_kill + 5, 120,
                   "training to go on with one rollout replica")
        got = json.loads(grpcurl("-d", "{}", launcher, "mso.v1.LauncherService/GetSession").stdout)
        assert got["phase"] == "SESSION_PHASE_RUNNING"
    finally:
        grpcurl(*with_token(), "-d", "{}", launcher, "mso.v1.LauncherService/StopSession")


def test_health_command_fails_for_a_dead_port():
    out = subprocess.run(MSO + ["health", f"127.0.0.1:{free_port()}", "--timeout", "2"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


def test_mso_autolaunch_starts_training_with_no_call(topology):
    """The compose launcher service's command with MSO_AUTOLAUNCH set launches on its own."""
    from services.shared.rpc import channel
    from services.shared.protos import launcher_pb2, launcher_pb2_grpc

    spec = yaml.safe_load(COMPOSE.read_text())["services"]["launcher"]
    first = topology["launcher-0"][1]
    # The rollout replica killed in the previous test must have left the registry before a new launch.
    wait_until(lambda: len(json.loads(grpcurl("-d", "{}", first, "mso.v1.LauncherService/ListNodes").stdout)
                           ["nodes"]) == 2, 30, "the killed replica's heartbeat to expire")
    ports = {}
    command, env = localise(spec, topology["redis_url"], ports)
    env.update(topology["ray_env"])
    env.update(MSO_AUTOLAUNCH="cartpole",
               MSO_AUTOLAUNCH_OVERRIDES="train_config.num_iterations=100000 rollout_config.worker_config.num_envs=2")
    launcher = ChildProcess("launcher-auto", command, env, quiet=True)
    address = f"127.0.0.1:{next(iter(ports.values()))}"
    try:
        wait_serving(address, timeout=60)

        def running():
            with channel(address) as ch:
                try:
                    s = launcher_pb2_grpc.LauncherServiceStub(ch).GetSession(launcher_pb2.GetSessionRequest(), timeout=10)
                except Exception:
                    return None
            return s.phase == launcher_pb2.SESSION_PHASE_RUNNING and s.progress.iteration > 0
        wait_until(running, 180, "the autolaunched session to train")
    finally:
        grpcurl(*with_token(), "-d", "{}", address, "mso.v1.LauncherService/StopSession", check=False)
        launcher.stop(grace=10)
