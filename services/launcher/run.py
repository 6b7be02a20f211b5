"""`mso run`: everything on this machine (embedded.py), one session driven through the Launcher, a progress
line while it trains, and a stop that leaves nothing behind however the command ends: at the end of
training, on Ctrl-C (SIGINT), SIGTERM or SIGHUP (exit 128 + the signal), or killed (the reaper)."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import psutil

from services.launcher.embedded import Embedded
from services.launcher.launch import ENDED, FINISHED, RUNNING, Launcher, LaunchError, Progress
from services.launcher.server import start_server
from services.shared import queue, trainer_status
from services.shared.config import ConfigError, allow_locally, load
from services.shared.redis_server import connect, redact

MILESTONES = [195.0, 475.0]  # mean returns whose first-reached times the summary reports (CartPole's bars)


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


class ProgressLine:
    """The live line on a terminal (rich), or a plain line every print_interval seconds otherwise."""

    def __init__(self, options: RunOptions):
        self.live = None
        self.interval, self.last = options.print_interval, 0.0
        if not options.quiet and sys.stdout.isatty():
            from rich.live import Live
            from rich.text import Text

            self.text = Text
            self.live = Live(Text(""), refresh_per_second=4, transient=False)
            self.live.start()

    def show(self, p: Progress) -> None:
        if self.live is not None:
            self.live.update(self.text(describe(p)))
        elif time.monotonic() - self.last >= self.interval:
            print(f"mso: {describe(p)}", flush=True)
            self.last = time.monotonic()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def describe(p: Progress) -> str:
    ret = "   n/a" if math.isnan(p.mean_return) else f"{p.mean_return:6.1f}"
    return (f"iter {p.iteration}/{p.num_iterations}  env steps {p.env_steps}  {p.env_steps_per_second:7.0f} steps/s  "
            f"return {ret}  version {p.model_version}  lag {p.policy_lag:.2f}  queue {p.queue_depth}"
            + ("" if math.isnan(p.score) else f"  score {p.score:.1f}%")
            + (f"  restarts {p.restarts}" if p.restarts else ""))


def run(name: str, overrides: list[str], options: RunOptions) -> int:
    """Train config `name` here; the exit code (0 finished, 1 failed, 2 a bad config, 128 + a signal)."""
    if os.environ.get("MSO_TLS_CERT") and not os.environ.get("MSO_TLS_CA"):
        print("error: mso run calls the services it serves: with --tls-cert/MSO_TLS_CERT give --tls-ca/MSO_TLS_CA "
              "(the CA that signed the certificate) too", file=sys.stderr)
        return 2
    started_at = psutil.Process().create_time()  # start-up is counted from the command, imports included
    try:
        loaded = load(name, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    allow_locally(name)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminated)
    cfg = loaded.cfg
    needed = (cfg.rollout_config.num_rollout_workers * cfg.rollout_config.num_cpus_per_worker
              + cfg.train_config.num_workers + 1)
    embedded = Embedded(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), quiet=options.quiet)
    started = time.monotonic()
    server = None
    summary: dict = {"config": name, "overrides": overrides}
    code = 1
    try:
        embedded.start()
        client = connect(embedded.redis_url)
        launcher = Launcher(client)
        server = start_server(launcher, f"{options.host}:{options.port}")
        print(f"mso: launcher on {server.address}, Redis {redact(embedded.redis_url)}", file=sys.stderr)
        sid = launcher.launch(name, overrides, loaded)
        summary["session_id"] = sid
        print(f"mso: session {sid} running ({time.monotonic() - started:.1f}s after start)", file=sys.stderr)
        p, best, milestones, curve = _follow(launcher, sid, embedded, options, started_at)
        phase, error = launcher.record(sid).phase, launcher.record(sid).error
        summary.update(startup_seconds=_startup(client, sid, started_at), return_milestones=milestones,
                       service_restarts=dict(embedded.restarts), phase=phase, error=error,
                       mean_return=p.mean_return, best_mean_return=best, env_steps=p.env_steps,
                       iterations=p.iteration, model_version=p.model_version,
                       rollout_model_version=p.rollout_model_version, ledger=p.ledger,
                       wall_seconds=time.monotonic() - started, scored_episodes=p.scored_episodes,
                       success_rates=p.success_rates, score=p.score, curve=curve)
        print(f"mso: {phase}: {describe(p)}" + (f"  error: {error}" if error else ""))
        code = 0 if phase == FINISHED else 1
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"\nmso: {signal.Signals(signum).name}: stopping", file=sys.stderr)
        summary["phase"] = "INTERRUPTED"
        code = 128 + signum
    except (LaunchError, ConfigError, RuntimeError, ConnectionError) as exc:
        print(f"mso: error: {exc}{embedded.post_mortem()}", file=sys.stderr)
        summary.update(phase="FAILED", error=str(exc))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abandon the stop half way
        interrupted = summary.get("phase") == "INTERRUPTED"
        if server is not None:
            server.stop(grace=0.5 if interrupted else 2.0)
        embedded.stop(grace=4.0 if interrupted else 10.0)
        if options.summary:
            with open(options.summary, "w") as f:
                json.dump(summary, f, indent=2, default=float)
    return code


def _follow(launcher: Launcher, sid: str, embedded: Embedded, options: RunOptions, started_at: float):
    """Show progress until the session has ended (not merely STOPPING: a StopSession in flight gets its
    answer); restart dead services meanwhile. (last progress, best mean return, {level: seconds to it}, the
    curve: a point every curve_interval seconds)."""
    best, milestones, curve, last_point = -math.inf, {}, [], -math.inf
    line = ProgressLine(options)
    try:
        while True:
            if embedded.supervise():
                launcher.count_restarts(sid, sum(embedded.restarts.values()))
            phase, p = launcher.phase(sid), launcher.progress(sid)
            if not math.isnan(p.mean_return):
                best = max(best, p.mean_return)
                for level in MILESTONES + ([options.until_return] if options.until_return else []):
                    if p.mean_return >= level:
                        milestones.setdefault(str(level), time.time() - started_at)
            if time.monotonic() - last_point >= options.curve_interval or phase in ENDED:
                last_point = time.monotonic()
                curve.append({"seconds": round(time.time() - started_at, 1), "env_steps": p.env_steps,
                              "iteration": p.iteration, "mean_return": p.mean_return, "score": p.score,
                              "episodes": p.episodes})
            reached = (options.until_return and best >= options.until_return) or \
                (options.until_steps and p.env_steps >= options.until_steps)
            if reached and phase == RUNNING:
                launcher.finish(sid)
                continue
            line.show(p)
            if phase in ENDED:
                return p, best, milestones, curve
            time.sleep(0.5)
    finally:
        line.close()


def _startup(client, sid: str, started_at: float) -> dict:
    """Seconds from `mso run` to the first fragment in Redis and to the first trainer update."""
    first_fragment = queue.first_fragment_at(client, sid)
    first_update = trainer_status.read(client, sid).first_update_at
    return {"first_fragment": first_fragment - started_at if first_fragment else None,
            "first_update": first_update - started_at if first_update else None}
