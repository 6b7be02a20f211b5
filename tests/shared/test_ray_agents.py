"""services.shared.ray_agents, the process a raylet of mso's runs in place of each of its two agents: the
dashboard agent's stand-in writes its three ports as not in use at once and lives exactly as long as its raylet
(the pipe the raylet hands it on stdin, or its parent when there is none); the runtime env agent's holds a port
it reserved and becomes the agent on that port when first called, and never when never called. A raylet running them is tested in test_ray_head_processes."""

import os
import signal
import socket
import subprocess

import psutil

from services.shared import ports, ray_agents
from tests.conftest import wait_until

NODE = "ab" * 28


def port_file(session: str, name: str) -> str:
    return os.path.join(session, f"{name}_{NODE}")


def stand_in(kind: str, session, script: str = "/ray/dashboard/agent.py", *args: str) -> list[str]:
    """The command a raylet runs (ray_env.leave_out_unused's): the stand-in, then the agent's own script and
    arguments."""
    return [*ray_agents.command(kind), script, f"--node-id={NODE}",
            f"--session-dir={session}", "--node-manager-port=1234", *args]


def start_runtime_env_stand_in(tmp_path, port: int) -> tuple[subprocess.Popen, int]:
    """The stand-in, with an agent that prints what it was started with, after its niceness (Ray's own runs in
    test_ray_head_processes), once the port file is written; the port it holds."""
    agent = tmp_path / "agent.py"
    agent.write_text("import os, sys\nprint(os.nice(0), *sys.argv[1:])\n")
    child = subprocess.Popen(stand_in("runtime_env", tmp_path, str(agent), "--node-ip-address=127.0.0.1",
                                      f"--runtime-env-agent-port={port}"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    path = port_file(tmp_path, ray_agents.RUNTIME_ENV_PORT)
    wait_until(lambda: os.path.exists(path), 10, "the runtime env agent's port file")
    return child, int(open(path).read())


def call_agent(child: subprocess.Popen, port: int) -> list[str]:
    """Connect as the raylet does; what the agent the stand-in then became printed. The stand-in refuses the call
    that wakes it (it closes its listener with the call queued): the reset can reach the caller before connect()
    has returned, and is the refusal, not a failure."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionResetError:
        pass
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    return out.split()


def test_the_dashboard_stand_in_writes_its_ports_as_unused_and_ends_with_the_raylets_pipe(tmp_path):
    child = subprocess.Popen(stand_in("dashboard", tmp_path), stdin=subprocess.PIPE)
    try:
        wait_until(lambda: all(os.path.exists(port_file(tmp_path, n)) for n in ray_agents.DASHBOARD_PORTS), 10,
                   "the three port files")
        assert [open(port_file(tmp_path, n)).read() for n in ray_agents.DASHBOARD_PORTS] == ["-1"] * 3
        assert child.poll() is None  # alive while the raylet is
        child.stdin.close()  # the raylet's end of the pipe goes when the raylet dies
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()


def test_the_dashboard_stand_in_without_a_pipe_ends_when_its_parent_dies(tmp_path):
    # A shell stands for the raylet; a background job of a non-interactive shell has /dev/null on stdin.
    raylet = subprocess.Popen(["sh", "-c", " ".join(stand_in("dashboard", tmp_path)) + " & echo $!; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    agent = psutil.Process(int(raylet.stdout.readline()))
    try:
        wait_until(lambda: os.path.exists(port_file(tmp_path, "dashboard_agent_listen_port")), 10, "a port file")
        assert agent.is_running()
        raylet.send_signal(signal.SIGKILL)
        raylet.wait()
        wait_until(lambda: not agent.is_running() or agent.status() == psutil.STATUS_ZOMBIE, 10, "the stand-in gone")
    finally:
        raylet.kill()
        agent.kill() if agent.is_running() else None


def test_the_runtime_env_stand_in_holds_a_reserved_port_and_becomes_the_agent_on_the_first_call(tmp_path):
    child, port = start_runtime_env_stand_in(tmp_path, 0)
    try:
        low, high = ports.ephemeral_range()
        assert 0 < port < 65536 and not low <= port <= high  # services.shared.ports' choice, not the kernel's
        assert child.poll() is None and not [p for p in psutil.Process(child.pid).children()]
        assert psutil.Process(child.pid).cmdline()[:len(ray_agents.command("runtime_env"))] == \
            ray_agents.command("runtime_env")  # not the agent yet: nobody has called
        niceness, *args = call_agent(child, port)
        assert int(niceness) == os.nice(0)  # someone waits for it now
        assert f"--runtime-env-agent-port={port}" in args and "--runtime-env-agent-port=0" not in args
        assert f"--session-dir={tmp_path}" in args and "--node-manager-port=1234" in args
    finally:
        child.kill()


def test_a_runtime_env_agent_never_called_is_never_started_and_ends_with_the_raylets_pipe(tmp_path):
    child, _port = start_runtime_env_stand_in(tmp_path, 0)
    try:
        child.stdin.close()  # the raylet died
        assert child.wait(timeout=10) == 0
        assert child.stdout.read() == ""  # the agent never ran
    finally:
        child.kill()


def test_a_runtime_env_agent_port_given_is_kept(tmp_path):
    child, port = start_runtime_env_stand_in(tmp_path, ports.free_port("127.0.0.1"))
    try:
        assert f"--runtime-env-agent-port={port}" in call_agent(child, port)
    finally:
        child.kill()
