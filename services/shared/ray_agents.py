"""What a raylet of mso's runs in place of Ray's two node agents (ray_env.leave_out_unused arranges it). Run by the
raylet as `python ray_agents.py AGENT_SCRIPT ARGS...`, with the arguments Ray gives the agent it replaces; it
imports nothing of Ray's, and of mso's only services.shared.ports.

A raylet registers its node, which is when the node can run an actor, only once both agents have written their
ports into the session directory, and each writes them after importing most of Ray (~0.5 CPU-s apiece, beside
everything else a starting session imports). Here:
- the dashboard agent is left out. Without Ray's dashboard dependencies (aiohttp, opentelemetry's Prometheus
  exporter; mso installs none) it loads no module and serves nothing: it writes -1 ("not in use") for its three
  ports and waits for the raylet to die. This does the same, at once, and costs no import;
- the runtime env agent, which only Ray Train's ranks need (their runtime env sets environment variables; a
  session with one learner rank has none), is started when first called: this listens on a port reserved and
  written at once, and on the first connection closes it and becomes the agent on that port. The raylet, whose
  first call is refused, calls again as it does for an agent still starting (the first task with a runtime env
  waits for the agent's imports, ~1 s); until then the agent costs neither its ~0.6 CPU-s of imports, which
  came while a session started, nor its ~60 MB."""

from __future__ import annotations

import os
import select
import socket
import stat
import sys

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


def wait_for_raylet(listener: socket.socket | None = None) -> bool:
    """Return False when the raylet that started this process is gone, as its agents do: it hands them a pipe
    on stdin whose end closes with it; without one, the parent's pid changes when it dies. Return True as soon
    as someone connects to listener (when given)."""
    pipe = stat.S_ISFIFO(os.fstat(0).st_mode)
    parent = os.getppid()
    while True:
        ready, _, _ = select.select(([0] if pipe else []) + ([listener] if listener else []), [], [],
                                    None if pipe else 1.0)  # the parent is looked at only without a pipe
        if listener in ready:
            return True
        if (0 in ready and not os.read(0, 4096)) or (not pipe and os.getppid() != parent):
            return False


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
        # Free now and outside the ephemeral range, where no outgoing connection can take it between the
        # listener's close below and the agent's bind.
        from services.shared.ports import free_port

        port = free_port(args["node-ip-address"])
        rest = [f"--runtime-env-agent-port={port}" if arg.startswith("--runtime-env-agent-port=") else arg
                for arg in rest]
    family, kind, proto, _, address = socket.getaddrinfo(args["node-ip-address"], port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent binds it
    listener.bind(address)
    listener.listen()
    write_port(args["session-dir"], args["node-id"], RUNTIME_ENV_PORT, port)
    if not wait_for_raylet(listener):
        return
    listener.close()  # the call that woke us is refused; the raylet calls again, as for an agent still starting
    os.execv(sys.executable, [sys.executable, "-u", script, *rest])


if __name__ == "__main__":
    {"dashboard": dashboard_agent, "runtime_env": runtime_env_agent}[sys.argv[1]](sys.argv[2:])
