"""What a raylet of mso's runs in place of Ray's two node agents (ray_env.leave_out_unused arranges it). Run by the
raylet as `python ray_agents.py AGENT_SCRIPT ARGS...`, with the arguments Ray gives the agent it replaces; it
imports nothing of Ray's, and of mso's only services.shared.ports.

A raylet registers its node, which is when the node can run an actor, only once both agents have written their
ports into the session directory, and each writes them after importing most of Ray (~0.5 CPU-s apiece, beside
everything else a starting session imports). Here:
- the dashboard agent is left out. Without Ray's dashboard dependencies (aiohttp, opentelemetry's Prometheus
  exporter; mso installs none) it loads no module and serves nothing: it writes -1 ("not in use") for its three
  ports and waits for the raylet to die. This does the same, at once, and costs no import;
- the runtime env agent, which Ray Train's ranks need (their runtime env sets environment variables), is
  started as it is, on a port reserved and written here first: the node registers without waiting for its
  imports, and a raylet that asks for a runtime env before it listens retries the connection as it would for
  a slow agent. It runs at a lower priority (nice 10): its ~0.7 CPU-s of imports are no longer waited for, and
  nothing waits for them while a session starts, so they yield to what is; serving Ray Train a runtime env
  of environment variables takes it milliseconds."""

from __future__ import annotations

import os
import stat
import sys
import time

# Ray 2.60's names for the port files, checked against ray._raylet by ray_env.leave_out_unused.
DASHBOARD_PORTS = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port")
RUNTIME_ENV_PORT = "runtime_env_agent_port"


def command(kind: str) -> list[str]:
    """How a raylet starts the stand-in of kind ("dashboard" or "runtime_env"), before the agent's own script and
    arguments. Isolated (-I): run as a script, it would otherwise have its own folder first on sys.path, where
    modules of mso's (queue.py) could shadow the standard library's."""
    return [sys.executable, "-I", "-u", __file__, kind]


def arguments(argv: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)


def write_port(session_dir: str, node_id: str, name: str, port: int) -> None:
    path = os.path.join(session_dir, f"{name}_{node_id}")
    with open(path + ".mso", "w") as f:
        f.write(str(port))
    os.replace(path + ".mso", path)  # the raylet polls for the file: it must never see it half written


def wait_for_raylet() -> None:
    """Return when the raylet that started this process is gone, as its agents do: it hands them a pipe on
    stdin whose end closes with it; without one, the parent's pid changes when it dies."""
    if stat.S_ISFIFO(os.fstat(0).st_mode):
        while os.read(0, 4096):
            pass
        return
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1.0)


def dashboard_agent(argv: list[str]) -> None:
    args = arguments(argv)
    for name in DASHBOARD_PORTS:
        write_port(args["session-dir"], args["node-id"], name, -1)
    wait_for_raylet()


def runtime_env_agent(argv: list[str]) -> None:
    script, rest = argv[0], argv[1:]
    args = arguments(rest)
    port = int(args.get("runtime-env-agent-port") or 0)
    if not port:
        # Free now and outside the ephemeral range, where no outgoing connection can take it before the agent
        # binds it (after its imports).
        from services.shared.ports import free_port

        port = free_port(args["node-ip-address"])
        rest = [f"--runtime-env-agent-port={port}" if arg.startswith("--runtime-env-agent-port=") else arg
                for arg in rest]
    write_port(args["session-dir"], args["node-id"], RUNTIME_ENV_PORT, port)
    os.nice(10)  # inherited by the agent
    os.execv(sys.executable, [sys.executable, "-u", script, *rest])


if __name__ == "__main__":
    {"dashboard": dashboard_agent, "runtime_env": runtime_env_agent}[sys.argv[1]](sys.argv[2:])
