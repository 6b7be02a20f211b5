"""The Ray instances mso starts leave out the head processes nothing of mso uses (ray_env.leave_out_unused): the
dashboard head, which Ray 2.60 starts even with the dashboard off and waits for before it starts the raylet,
Ray's client server, the autoscaler's monitor, and the dashboard agent (services.shared.ray_agents stands in for
it, and starts the runtime env agent after the raylet's wait). `mso run`'s head (`ray start` in
services.launcher.ray_head) and a service's own local instance (ray_runtime without RAY_ADDRESS) still run
actors, actors with a runtime env (Ray Train's ranks have one), still carry an actor's output to its driver (the
log monitor stays), and the head still stops every process of it on SIGTERM. Neither the driver nor its workers
(services.shared.ray_worker) import the libraries of Ray's addon serializers (ray_env.leave_out_addon_serializers),
a worker's standard library is the standard library's, not a module of mso's of the same name, and a worker
defers garbage collection while it starts (services.shared.startup_gc). No worker is prestarted beside the actors'
own processes (ray_env.FAST_START)."""

import os
import subprocess
import sys
import textwrap

import psutil
from ray._private import ray_constants

from services.launcher.embedded import start_ray_head
from services.launcher.reaper import members
from services.launcher.run import HEAD_CPUS
from services.shared import ray_agents, ray_env
from tests.conftest import wait_until

UNUSED = ("dashboard/dashboard.py", "ray.util.client.server", "autoscaler/_private/monitor.py")
STAND_IN = " ".join(ray_agents.command("dashboard")) + " "  # (the raylet names it in its own arguments too)
AGENT_TITLES = (ray_constants.AGENT_PROCESS_TYPE_DASHBOARD_AGENT, ray_constants.AGENT_PROCESS_TYPE_RUNTIME_ENV_AGENT)

DRIVER = textwrap.dedent("""
    import sys, psutil, ray
    from services.shared import ray_runtime
    ADDON_LIBRARIES = ("pydantic", "pyarrow", "starlette")
    ray_runtime.ensure()
    @ray.remote
    class Echo:
        def hello(self, word):
            import gc, queue, time
            print("actor says", word, flush=True)
            age = time.time() - psutil.Process().create_time()
            return word * 2, [m for m in ADDON_LIBRARIES if m in sys.modules], queue.__file__, gc.isenabled(), age
    word, imported, queue_file, collecting, age = ray.get(Echo.remote().hello.remote("hi"))
    assert word == "hihi"
    from services.shared import startup_gc
    if age < startup_gc.START_SECONDS - 1:  # (a machine so loaded that an actor takes 9 s to start asserts nothing)
        assert not collecting, f"the actor's process, {age:.1f} s old, collects garbage while it starts"
    assert imported == [], f"the actor's process imported {imported}"
    assert "/services/shared/" not in queue_file, queue_file
    @ray.remote
    def variable():
        import os
        return os.environ.get("MSO_TEST_VARIABLE"), [m for m in ADDON_LIBRARIES if m in sys.modules]
    value, imported = ray.get(variable.options(runtime_env={"env_vars": {"MSO_TEST_VARIABLE": "set"}}).remote())
    assert value == "set"
    assert imported == [], f"the task's process imported {imported}"
    imported = [m for m in ADDON_LIBRARIES if m in sys.modules]
    assert imported == [], f"the driver imported {imported}"
    for p in psutil.Process().children(recursive=True):
        print("child:", " ".join(p.cmdline()), flush=True)
        print("nice:", p.nice(), " ".join(p.cmdline()), flush=True)
    print("driver done", flush=True)
""")


def session_commands(sid: int, nice: bool = False) -> list[str]:
    found = []
    for pid in members({sid}):
        try:
            p = psutil.Process(pid)
            found.append((f"{p.nice()} " if nice else "") + " ".join(p.cmdline()))
        except psutil.Error:
            pass
    return found


def assert_log_monitor_lower(nice_commands: list[str]) -> None:
    """The log monitor runs below the actors' priority (ray_env.leave_out_unused)."""
    found = [int(c.split()[0]) for c in nice_commands if "log_monitor.py" in c]
    assert found == [min(os.nice(0) + ray_env.LOG_MONITOR_NICE, 19)], nice_commands


def drive(env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "driver done" in out.stdout
    assert "actor says hi" in out.stdout + out.stderr  # carried by the log monitor
    return out


def test_mso_runs_head_runs_actors_without_the_unused_processes_and_stops_on_sigterm():
    head, join = start_ray_head(1, dict(os.environ))
    try:
        drive(dict(os.environ, **join))
        commands = session_commands(head.process.pid)
        assert any("gcs_server" in c for c in commands) and any("raylet" in c for c in commands), commands
        assert any("log_monitor" in c for c in commands), commands
        assert_agents(commands)
        assert_log_monitor_lower(session_commands(head.process.pid, nice=True))
        assert head.process.poll() is None
    finally:
        head.stop(grace=10)
    wait_until(lambda: not session_commands(head.process.pid), 10, "every process of the head gone")


def test_a_services_local_instance_runs_actors_without_the_unused_processes():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = drive(env)
    children = [line.removeprefix("child: ") for line in out.stdout.splitlines() if line.startswith("child: ")]
    assert any("raylet" in c for c in children) and any("log_monitor" in c for c in children), children
    assert_agents(children)
    assert_log_monitor_lower([line.removeprefix("nice: ") for line in out.stdout.splitlines()
                              if line.startswith("nice: ")])


def assert_agents(commands: list[str]) -> None:
    assert not [c for c in commands if any(u in c for u in UNUSED)], commands
    assert len([c for c in commands if c.startswith(STAND_IN)]) == 1, commands
    # Each agent names its process once it has imported Ray: the runtime env agent does (the stand-in started it),
    # the dashboard agent does not run.
    titles = [c.strip() for c in commands if c.strip() in AGENT_TITLES]
    assert titles == [ray_constants.AGENT_PROCESS_TYPE_RUNTIME_ENV_AGENT], commands


IDLE_DRIVER = textwrap.dedent("""
    import sys, ray
    from services.shared import ray_runtime
    ray_runtime.ensure()
    @ray.remote(num_cpus=1)
    class Actor:
        def pid(self):
            import os
            return os.getpid()
    actor = Actor.remote()
    print("actor", ray.get(actor.pid.remote()), flush=True)
    sys.stdin.readline()
""")


def test_mso_runs_head_prestarts_no_worker_that_nothing_uses():
    """A raylet prestarts workers for the first driver that connects; on `mso run`'s head (HEAD_CPUS logical
    CPUs) one sat idle for the whole run beside the actors' own processes, importing Ray while they imported
    torch (ray_env.FAST_START)."""
    head, join = start_ray_head(HEAD_CPUS, dict(os.environ))
    try:
        driver = subprocess.Popen([sys.executable, "-c", IDLE_DRIVER], env=dict(os.environ, **join),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert driver.stdout.readline().startswith("actor")
            # The driver registered (and any prestart began) before it asked for the actor, which has answered.
            workers = [c for c in session_commands(head.process.pid)
                       if c.startswith("ray::") or ray_env.ray_worker_script() in c.split()[:3]]
            assert len(workers) == 1 and workers[0].startswith("ray::Actor"), workers
        finally:
            driver.communicate("\n", timeout=60)
    finally:
        head.stop(grace=10)

