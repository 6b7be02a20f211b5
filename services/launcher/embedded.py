"""Embedded mode of `mso run`: redis-server, one local Ray head, and the rollout and trainer services as
separate processes on this machine, stopped with nothing left behind: by stop() on any exit the command
handles (the end of training, Ctrl-C, SIGTERM), and by a reaper process when the command dies without
stopping them (kill -9)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

from services.launcher.reaper import signal_sessions
from services.shared.ports import free_port
from services.shared.ray_env import with_fast_start
from services.shared.redis_server import RedisServer

log = logging.getLogger(__name__)


class ChildProcess:
    """A child in a session of its own (so the terminal's Ctrl-C reaches only us, and we stop it in order;
    every process it starts stays in that session, Ray's workers and env processes included), whose output
    is copied to our stderr with a prefix."""

    def __init__(self, name: str, args: list[str], env: dict, ready_line: str | None = None, quiet: bool = False):
        self.name, self.args, self.env = name, args, env
        self.ready = threading.Event()
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, text=True, bufsize=1)
        self.lines: list[str] = []
        self._ready_line, self._quiet = ready_line, quiet
        threading.Thread(target=self._pump, name=f"{name}-output", daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines = (self.lines + [line])[-200:]
            if self._ready_line and self._ready_line in line:
                self.ready.set()
            if not self._quiet:
                sys.stderr.write(f"[{self.name}] {line}")

    def ask_to_stop(self) -> None:
        """Signal the process to stop on its own. A service stops on SIGINT as on SIGTERM, but Ray's
        fatal-signal handler, installed in every process that joined Ray, dumps a stack trace for SIGTERM on
        a perfectly clean stop."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM if self.name == "ray" else signal.SIGINT)
            except ProcessLookupError:
                pass

    def finish(self, deadline: float) -> None:
        """Wait until deadline (time.monotonic()) for the process to exit, then kill whatever its session
        still holds (Ray's raylet and workers, env processes)."""
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        signal_sessions({self.process.pid}, signal.SIGKILL)
        self.process.wait()

    def stop(self, grace: float) -> None:
        self.ask_to_stop()
        self.finish(time.monotonic() + grace)


def spawn_ray_head(num_cpus: int, env: dict) -> tuple[ChildProcess, dict]:
    """A Ray head on free loopback ports (never Redis's 6379), without the dashboard or the client server
    (services.launcher.ray_head), starting; returns it and what a process needs in its environment to join
    it: RAY_ADDRESS, and a token of this head only (a ~/.ray/auth_token left by another Ray, which Ray would
    otherwise pick up on one side and not the other, cannot lock anyone out, and nobody without the token can
    join). Its raylet and workers share its session, so stopping it stops them. wait_ray_head() waits until
    it is up."""
    port = free_port()
    join = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = ChildProcess("ray", [sys.executable, "-m", "services.launcher.ray_head", "start", "--head", "--block",
                                f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                                f"--num-cpus={num_cpus}",
                                # No autoscaler monitor: this one machine's cluster never scales (~50 MB PSS).
                                "--disable-usage-stats", "--no-monitor"],
                        # No drain on SIGTERM: Ray 2.60 waits for a drain (made for Serve) before stopping.
                        with_fast_start(dict(env, RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                                             RAY_AUTH_MODE=join["RAY_AUTH_MODE"], RAY_AUTH_TOKEN=join["RAY_AUTH_TOKEN"])),
                        ready_line="Ray runtime started", quiet=True)
    return head, join


def wait_ray_head(head: ChildProcess) -> None:
    if not head.ready.wait(60) or head.process.poll() is not None:
        head.stop(grace=5)
        raise RuntimeError("Ray head did not start:\n" + "".join(head.lines[-20:]))


def start_ray_head(num_cpus: int, env: dict) -> tuple[ChildProcess, dict]:
    head, join = spawn_ray_head(num_cpus, env)
    wait_ray_head(head)
    return head, join


class Embedded:
    """Everything a session needs, started locally. `redis_url` and `ray_env` (what joins its Ray head) are
    set once start() returns. supervise() restarts a service process that died, as `restart: unless-stopped` does
    for the compose containers: with a doubling backoff and at most MAX_RESTARTS restarts per service."""

    MAX_RESTARTS = 5
    FIRST_BACKOFF = 1.0

    def __init__(self, num_cpus: int, quiet: bool = False, one_session: bool = False):
        self.num_cpus = num_cpus
        self.quiet = quiet
        self.one_session = one_session  # the services serve one session (`mso run`): they warm actors once
        self.redis: RedisServer | None = None
        self.children: list[ChildProcess] = []
        self._head: ChildProcess | None = None
        self.reaper: Reaper | None = None
        self.redis_url = os.environ.get("REDIS_URL") or ""
        self.ray_env: dict = {}
        self.restarts: dict[str, int] = {"rollout": 0, "trainer": 0}
        self.addresses: dict[str, str] = {}  # kind -> the gRPC address its service listens on
        self._dead_since: dict[str, float] = {}

    def start(self) -> None:
        self.spawn()
        self.wait()

    def spawn(self) -> None:
        """Start Redis and begin starting the Ray head and both services (each spends seconds importing);
        wait() waits until they serve. Either stops everything when it fails."""
        try:
            self._spawn()
        except BaseException:
            self.stop()
            raise

    def wait(self) -> None:
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> None:
        self.reaper = Reaper()
        if not self.redis_url:
            # A password nobody else knows: anyone who can write this Redis can steer every node. Waited for
            # once the others have started: everything here takes seconds of imports, Redis milliseconds.
            self.redis = RedisServer(password=secrets.token_urlsafe(24), wait=False)
            self.redis_url = self.redis.url
            self.reaper.watch(self.redis.process.pid)
        env = dict(os.environ, REDIS_URL=self.redis_url, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        # The head and both services start together; the services join the head as soon as it is up.
        self._head, self.ray_env = spawn_ray_head(self.num_cpus, env)
        env.update(self.ray_env)
        self._add(self._head)
        for kind in ("rollout", "trainer"):
            port = free_port()
            self._add(ChildProcess(kind, [sys.executable, "-m", "services.cli", kind, "serve", "--host=127.0.0.1",
                                          f"--port={port}", *(["--warm-once"] if self.one_session else [])],
                                   env, quiet=self.quiet))  # REDIS_URL: not in `ps`
            self.addresses[kind] = f"127.0.0.1:{port}"
        if self.redis is not None:
            self.redis.wait_ready()

    def _wait(self) -> None:
        from services.shared.rpc import wait_serving  # gRPC's import, after the processes spawn() started

        wait_ray_head(self._head)
        for child in self.children:
            if child.name in self.addresses:
                try:
                    wait_serving(self.addresses[child.name], timeout=60)
                except TimeoutError as exc:
                    raise RuntimeError(f"{child.name} service did not come up: {exc}\n"
                                       + "".join(child.lines[-20:])) from None

    def supervise(self) -> list[str]:
        """Restart dead service processes whose backoff has passed; returns what was restarted. Raises
        RuntimeError when the Ray head died or a service exceeded its restarts."""
        restarted = []
        for i, child in enumerate(self.children):
            code = child.process.poll()
            if code is None:
                continue
            if child.name == "ray":
                raise RuntimeError(f"the Ray head exited with code {code}")
            if self.restarts[child.name] >= self.MAX_RESTARTS:
                raise RuntimeError(f"the {child.name} service died {self.restarts[child.name] + 1} times "
                                   f"(last exit code {code}); giving up")
            now = time.monotonic()
            died = self._dead_since.setdefault(child.name, now)
            if now - died < self.FIRST_BACKOFF * 2 ** self.restarts[child.name]:
                continue
            log.warning("%s service exited with code %s; restarting it", child.name, code)
            child.stop(grace=1)  # whatever of its process group survived it
            self.children[i] = ChildProcess(child.name, child.args, child.env, quiet=self.quiet)
            self.reaper.watch(self.children[i].process.pid)
            self.restarts[child.name] += 1
            del self._dead_since[child.name]
            restarted.append(child.name)
        return restarted

    def post_mortem(self) -> str:
        """What each process that has exited printed last (its output is hidden with --quiet): said with a
        launch that failed, whose cause is often a process that died under it."""
        dead = [c for c in self.children if c.process.poll() is not None]
        return "".join(f"\nthe {c.name} process exited with code {c.process.returncode}; its last lines:\n"
                       + "".join(f"  {line}" for line in c.lines[-30:]) for c in dead)

    def _add(self, child: ChildProcess) -> None:
        self.children.append(child)
        self.reaper.watch(child.process.pid)

    def stop(self, grace: float = 10.0) -> None:
        """Stop everything within about grace seconds: the services together (each stops its actors and env
        processes), then the Ray head, then Redis; whatever has not exited by its deadline is killed."""
        deadline = time.monotonic() + grace
        services = [c for c in self.children if c.name != "ray"]
        for child in services:
            child.ask_to_stop()
        for child in services:
            child.finish(deadline - 1.0)
        for child in self.children:
            # A private head that served only this run, whose services have gone: its graceful teardown takes
            # 2-3 s on these machines, and the second it was given ended in a kill all the same.
            if child.name == "ray":
                child.stop(grace=0)
        self.children = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.reaper is not None:
            self.reaper.done()
            self.reaper = None


class Reaper:
    """The reaper process (mso/launcher/reaper.py) that kills the sessions watched when this process dies
    without calling done()."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "services.launcher.reaper"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, start_new_session=True, text=True)

    def watch(self, sid: int) -> None:
        self._say(f"session {sid}")

    def done(self) -> None:
        self._say("done")
        self.process.stdin.close()
        self.process.wait(5)

    def _say(self, line: str) -> None:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # the reaper died: nothing guards a kill -9 of ours now
            log.warning("the reaper process is gone; a kill -9 of this process would leave its children")
