"""The Ray head `mso run` starts (services.launcher.ray_head): `ray start` without the dashboard head and the
client server, which Ray 2.60 starts even with --include-dashboard=false and which nothing of mso uses. A
driver still joins it, runs an actor and sees the actor's output (the log monitor stays), and SIGTERM still
stops every process of the head."""

import os
import subprocess
import sys
import textwrap

import psutil

from services.launcher.embedded import start_ray_head
from tests.conftest import wait_until


def session_commands(sid: int) -> list[str]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(" ".join(p.cmdline()))
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    return found


def test_the_head_runs_actors_without_a_dashboard_or_client_server_and_stops_on_sigterm():
    head, join = start_ray_head(1, dict(os.environ))
    try:
        script = textwrap.dedent("""
            import ray
            ray.init()
            @ray.remote
            class Echo:
                def hello(self, word):
                    print("actor says", word, flush=True)
                    return word * 2
            assert ray.get(Echo.remote().hello.remote("hi")) == "hihi"
            print("driver done", flush=True)
        """)
        out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **join), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "driver done" in out.stdout
        assert "actor says hi" in out.stdout + out.stderr  # carried by the log monitor
        commands = session_commands(head.process.pid)
        assert any("gcs_server" in c for c in commands) and any("raylet" in c for c in commands), commands
        assert any("log_monitor" in c for c in commands), commands
        assert not [c for c in commands if "dashboard/dashboard.py" in c or "ray.util.client.server" in c], commands
        assert head.process.poll() is None
    finally:
        head.stop(grace=10)
    wait_until(lambda: not session_commands(head.process.pid), 10, "every process of the head gone")
