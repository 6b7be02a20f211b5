"""Environment for the Ray processes mso starts (a head of `mso run`, a service's own local instance); kept
apart from ray_runtime so `mso run` sets it without importing Ray (leave_out_unused imports it when called).

A raylet connects to the object store it has just started in a thread of its own, and Ray 2.60's client
retries that connection once a second (raylet_client_connect_timeout_milliseconds = 1000): the store is
seldom up at the first attempt, so most heads waited a full second there before they registered (the
raylet's log: "Plasma store debug dump" at t, "ObjectManager server started" at t + 1.000 s). Retrying every
50 ms with the same ten-second budget removes that second; worker processes, which connect to the raylet and
the store the same way, inherit it.

And a raylet prestarts worker processes for the first driver that connects. On `mso run`'s head (1024 logical
CPUs: services.launcher.run.HEAD_CPUS) every actor got a process of its own all the same, and the prestarted one
sat idle (`ray::IDLE`) for the whole run, having spent 0.3-0.5 CPU-s importing Ray in the second when the rollout
worker and the learner import torch: without it, `mso run cartpole` reached its first update 0.14 s sooner (a
median over 16 interleaved pairs, sooner in 13)."""

from __future__ import annotations

import os

from services.shared import ray_agents

LOG_MONITOR_NICE = 10  # added to the log monitor's nice value (leave_out_unused)
FAST_START = {"RAY_raylet_client_connect_timeout_milliseconds": "50",
              "RAY_raylet_client_num_connect_attempts": "200",
              "RAY_prestart_worker_first_driver": "0"}


def with_fast_start(env: dict) -> dict:
    """env with FAST_START added, where the user has not set those variables themselves."""
    return {**FAST_START, **env}


def set_fast_start() -> None:
    """FAST_START into this process's environment (what a local Ray instance started from here inherits)."""
    for key, value in FAST_START.items():
        os.environ.setdefault(key, value)


def leave_out_unused() -> None:
    """Make a Ray head started from this process (`ray start` in services.launcher.ray_head, a service's local
    ray.init) leave out what nothing of mso uses:
    - the dashboard head: with include_dashboard=False Ray 2.60 still starts it, loading only its usage-stats
      module (usage stats are off in every Ray mso starts), and waits for it to register before it starts the
      raylet, so its imports (~0.6 CPU-s) sat on the path to the first actor. A head was ready 0.7-1.0 s later
      with it than without, on an idle 2-core machine;
    - Ray's client server (ray:// connections; ~0.8 CPU-s of imports beside the services' and actors'):
      `ray start` starts one whenever grpcio is installed and offers no switch to leave it out;
    - the autoscaler's monitor, which a one-machine instance never needs (~50 MB): `ray start --no-monitor`
      leaves it out, ray.init has no such switch;
    - the raylet's wait for its two agents' imports before it registers the node (~1 s, the last wait before
      the first actor): services.shared.ray_agents runs in their place, and says what it keeps;
    - in every worker process (each actor's), the imports of leave_out_addon_serializers: the raylet runs
      services.shared.ray_worker in place of Ray's default_worker.py.
    And the log monitor (it carries the actors' output to their drivers, the services) runs at a lower priority
    (LOG_MONITOR_NICE): its ~0.45 CPU-s of imports came while the actors imported torch, and nothing waits for
    it then; tailing log files afterwards takes it little.
    All of these are private parts of Ray (Node's methods, the function that builds an agent's command line,
    the names of the port files, start_raylet's worker_path, start_log_monitor), replaced in this process
    only. Ray is pinned; a Ray without them fails here by name rather than starting them unnoticed."""
    import inspect

    from ray import _raylet
    from ray._private import node, ray_constants, services

    for name in ("start_api_server", "start_ray_client_server", "start_monitor"):
        getattr(node.Node, name)
        setattr(node.Node, name, _left_out)
    ports = (_raylet.METRICS_AGENT_PORT_NAME, _raylet.METRICS_EXPORT_PORT_NAME,
             _raylet.DASHBOARD_AGENT_LISTEN_PORT_NAME, _raylet.RUNTIME_ENV_AGENT_PORT_NAME)
    if ports != (*ray_agents.DASHBOARD_PORTS, ray_agents.RUNTIME_ENV_PORT):
        raise RuntimeError(f"this Ray names its agents' port files {ports}, not "
                           f"{(*ray_agents.DASHBOARD_PORTS, ray_agents.RUNTIME_ENV_PORT)}")
    python_command = services._build_python_executable_command_memory_profileable
    if getattr(python_command, "replaces", None):  # replaced already, by an earlier call in this process
        return
    stand_ins = {ray_constants.PROCESS_TYPE_DASHBOARD_AGENT: "dashboard",
                 ray_constants.PROCESS_TYPE_RUNTIME_ENV_AGENT: "runtime_env"}

    def command(component: str, session_dir: str, unbuffered: bool = True) -> list[str]:
        if component in stand_ins:
            return ray_agents.command(stand_ins[component])
        return python_command(component, session_dir, unbuffered)

    command.replaces = python_command
    services._build_python_executable_command_memory_profileable = command

    start_raylet, signature = services.start_raylet, inspect.signature(services.start_raylet)
    if "worker_path" not in signature.parameters:
        raise RuntimeError("this Ray's services.start_raylet takes no worker_path")

    def start_raylet_with_mso_worker(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["worker_path"] = ray_worker_script()
        return start_raylet(*bound.args, **bound.kwargs)

    services.start_raylet = start_raylet_with_mso_worker

    start_log_monitor = services.start_log_monitor

    def start_log_monitor_at_low_priority(*args, **kwargs):
        started = start_log_monitor(*args, **kwargs)
        os.setpriority(os.PRIO_PROCESS, started.process.pid,
                       min(os.getpriority(os.PRIO_PROCESS, 0) + LOG_MONITOR_NICE, 19))
        return started

    services.start_log_monitor = start_log_monitor_at_low_priority


def ray_worker_script() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_worker.py")


def leave_out_addon_serializers() -> None:
    """Make this process's Ray (a service's driver, a worker process: services.shared.ray_worker) register
    none of the serializers Ray adds for other libraries when they are installed: pydantic v1's ModelField
    (FastAPI's, for Ray Serve), starlette's State, pyarrow's tables and JSON options (Ray Data's). Ray imports
    all three libraries in every driver and worker to register them, whether or not anything of theirs is ever
    serialized: ~0.3 CPU-s of imports in each of a session's five Ray processes (its two services, learner,
    rollout manager and rollout worker), while everything starts at once. Nothing mso passes through Ray is
    of those types (fragments and weights go through Redis; actors get configs and get back records of
    plain Python types). Replaces ray.util.serialization_addons.apply, which Ray calls when it makes a
    serialization context, in this process only."""
    from ray.util import serialization_addons

    serialization_addons.apply = _left_out


def _left_out(*args, **kwargs) -> None:
    return None
