"""`mso run`: everything on this machine (embedded.py), one session driven through the Launcher and followed
(follow.py), and a stop that leaves nothing behind however the command ends: at the end of training, on Ctrl-C
(SIGINT), SIGTERM or SIGHUP (exit 128 + the signal), or killed (the reaper).

This module imports only what it needs to start those processes (Redis, the Ray head, both services), which
then spend seconds importing and starting: what drives and follows the session (the Launcher, its gRPC
server, the Redis client, numpy; ~0.5 CPU-s) is imported once they are on their way, not before."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass

from services.launcher.embedded import Embedded
from services.shared import process_start
from services.shared.config import ConfigError, LaunchLoad, allow_locally
from services.shared.redis_server import connect, redact

# The private head's logical CPUs: Ray only counts them to place actors, and the head starts before the
# config that says how many actors it needs is resolved, so it has enough for any config.
HEAD_CPUS = 1024


@dataclass
class RunOptions:
    host: str = "127.0.0.1"
    port: int = 50050             # the LauncherService (0: any free port)
    summary: str | None = None    # write a JSON summary of the run here
    quiet: bool = False           # no live line, no service logs
    print_interval: float = 2.0   # seconds between progress lines when stdout is not a terminal
    until_return: float | None = None  # finish once the mean return of the last 20 episodes reaches this
    until_steps: int | None = None     # finish once the rollouts have taken this many env steps
    curve_interval: float = 10.0  # seconds between the summary's curve points


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, systemd, docker stop) or SIGHUP (a closed terminal): `mso run` stops
    everything exactly as on Ctrl-C, and exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminated(signum, _frame):
    raise Terminated(signum)


def run(name: str, overrides: list[str], options: RunOptions) -> int:
    """Train config `name` here; the exit code (0 finished, 1 failed, 2 a bad config, 128 + a signal)."""
    if os.environ.get("MSO_TLS_CERT") and not os.environ.get("MSO_TLS_CA"):
        print("error: mso run calls the services it serves: with --tls-cert/MSO_TLS_CERT give --tls-ca/MSO_TLS_CA "
              "(the CA that signed the certificate) too", file=sys.stderr)
        return 2
    started_at = process_start.wall_time()  # start-up is counted from the command, imports included
    # The config is read (or its module run in a child: torch and the env stack stay out of this process) while
    # Redis, the Ray head and the services start: each takes seconds on a small machine.
    loading = LaunchLoad(name, overrides)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminated)
    embedded = Embedded(num_cpus=HEAD_CPUS, quiet=options.quiet, one_session=True)
    started = time.monotonic()
    server = None
    summary: dict = {"config": name, "overrides": overrides}
    code, grace = 1, 10.0  # seconds the processes get to stop: less when interrupted, none when nothing ran
    try:
        try:
            allow_locally(name)  # before the services start: they inherit the allow-list from this environment
            embedded.spawn()
            loaded = loading.result()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            summary.update(phase="CONFIG_ERROR", error=str(exc))
            code, grace = 2, 0.0
            return code
        finally:
            loading.cancel()
        from services.launcher import follow  # (this module's docstring says why here)
        from services.launcher.launch import FINISHED, STOPPED, Launcher
        from services.launcher.server import start_server

        followed = follow.Followed()
        embedded.wait()
        client = connect(embedded.redis_url)
        launcher = Launcher(client)
        server = start_server(launcher, f"{options.host}:{options.port}")
        # Free ports, not the services' defaults (50051, 50052: inside the kernel's ephemeral range, where any
        # outgoing connection may hold them): said here, and by ListNodes on the launcher.
        print(f"mso: launcher on {server.address}, rollout service on {embedded.addresses['rollout']}, trainer "
              f"service on {embedded.addresses['trainer']}, Redis {redact(embedded.redis_url)}", file=sys.stderr)
        sid = launcher.launch(name, overrides, loaded)
        summary["session_id"] = sid
        print(f"mso: session {sid} running ({time.monotonic() - started:.1f}s after start)", file=sys.stderr)
        follow.follow(launcher, sid, embedded, options, started_at, followed)
        phase, error = launcher.record(sid).phase, launcher.record(sid).error
        summary.update(startup_seconds=follow.startup(client, sid, started_at), phase=phase, error=error)
        code = 0 if phase in (FINISHED, STOPPED) else 1  # stopped as asked (StopSession) is not a failure
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"\nmso: {signal.Signals(signum).name}: stopping", file=sys.stderr)
        summary["phase"] = "INTERRUPTED"
        code, grace = 128 + signum, 4.0
    except (ConfigError, RuntimeError, ConnectionError) as exc:  # a LaunchError is a RuntimeError
        print(f"mso: error: {exc}{embedded.post_mortem()}", file=sys.stderr)
        summary.update(phase="FAILED", error=str(exc))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abandon the stop half way
        if "session_id" in summary:  # what it did, while Redis (stopped below) can still say where things went
            try:
                follow.conclude(summary, followed, embedded, client, name, overrides, options,
                                time.monotonic() - started)
            except Exception as exc:  # a report that failed must not leave the processes running
                print(f"mso: no summary: {exc!r}", file=sys.stderr)
        if server is not None:
            server.stop(grace=2.0 if grace >= 10.0 else 0.5)  # its calls in flight: less when hurried
        embedded.stop(grace=grace)
        if options.summary:
            with open(options.summary, "w") as f:
                json.dump(summary, f, indent=2, default=float)
    return code
