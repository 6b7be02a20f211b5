"""What `mso run` shows and reports of its session (services.launcher.run starts and stops everything): a
progress line while it trains, the milestones and curve of its summary, and the lines it ends with."""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.launcher.embedded import Embedded
from services.launcher.launch import ENDED, RUNNING, Launcher, Progress
from services.shared import episode, queue, trainer_status

if TYPE_CHECKING:
    from services.launcher.run import RunOptions

MILESTONES = [195.0, 475.0]  # mean returns whose first-reached times the summary reports (CartPole's bars)


def clock(seconds: float) -> str:
    """1h02m03s, 4m05s or 6s."""
    seconds = int(max(seconds, 0))
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class ProgressLine:
    """On a terminal a progress bar (rich) with the numbers, elapsed time and ETA; otherwise a plain line every
    print_interval seconds with the same. The goal is num_iterations, or --until-steps env steps when given
    (whichever is nearer)."""

    def __init__(self, options: RunOptions):
        self.progress = None
        self.interval, self.last = options.print_interval, 0.0
        self.until_steps = options.until_steps
        self.started = time.monotonic()
        self.first: tuple[float, float] | None = None  # (when, fraction done) at the first update seen
        if not options.quiet and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.progress = Bar(BarColumn(bar_width=30), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                TextColumn("ETA {task.fields[eta]}  {task.description}"), transient=False)
            self.task = self.progress.add_task("starting", total=1.0, eta="-")
            self.progress.start()

    def done(self, p: Progress) -> float:
        """The fraction of the run done: of num_iterations, or of --until-steps if nearer."""
        fractions = [p.iteration / p.num_iterations] if p.num_iterations else []
        if self.until_steps:
            fractions.append(p.env_steps / self.until_steps)
        return min(max(fractions, default=0.0), 1.0)

    def eta(self, done: float) -> str:
        """From the rate since the first update seen (start-up is not training)."""
        now = time.monotonic()
        if self.first is None and done > 0:
            self.first = (now, done)
        if self.first is None or done <= self.first[1] or now - self.first[0] < 1:
            return "-"
        rate = (done - self.first[1]) / (now - self.first[0])
        return clock((1 - done) / rate)

    def show(self, p: Progress) -> None:
        done = self.done(p)
        eta = self.eta(done)
        if self.progress is not None:
            self.progress.update(self.task, completed=done, eta=eta, description=describe(p))
        elif time.monotonic() - self.last >= self.interval:
            print(f"mso: {describe(p)}  elapsed {clock(time.monotonic() - self.started)}  ETA {eta}", flush=True)
            self.last = time.monotonic()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def describe(p: Progress) -> str:
    ret = "   n/a" if math.isnan(p.mean_return) else f"{p.mean_return:6.1f}"
    return (f"iter {p.iteration}/{p.num_iterations}  env steps {p.env_steps}  {p.env_steps_per_second:7.0f} steps/s  "
            f"return {ret}  version {p.model_version}  lag {p.policy_lag:.2f}  queue {p.queue_depth}"
            + ("" if math.isnan(p.score) else f"  score {p.score:.1f}%")
            + (f"  restarts {p.restarts}" if p.restarts else ""))


def report(summary: dict, name: str, overrides: list[str]) -> str:
    """The lines mso run ends with: what the run did, where its logs and checkpoints are, how to go on."""
    phase = summary.get("phase", "").replace("SESSION_PHASE_", "").lower()
    lines = [f"mso: {phase} after {clock(summary.get('wall_seconds', 0))}: {summary.get('env_steps', 0)} env steps, "
             f"{summary.get('iterations', 0)} iterations, model version {summary.get('model_version', 0)}"]
    best, last = summary.get("best_mean_return"), summary.get("mean_return")
    if last is not None and not math.isnan(last):
        lines.append(f"mso: mean return (last 20 episodes): final {last:.2f}, best {best:.2f}"
                     + ("" if math.isnan(summary.get("score", math.nan)) else
                        f"; Crafter score {summary['score']:.2f}% over {summary['scored_episodes']} episodes"))
    if summary.get("error"):
        lines.append(f"mso: error: {summary['error']}")
    if summary.get("log_dir"):
        lines.append(f"mso: TensorBoard logs in {summary['log_dir']}: mso tensorboard {summary['log_dir']}")
    checkpoint = summary.get("last_checkpoint")
    if checkpoint:
        command = " ".join(["mso run", name, *overrides, f"train_config.resume={checkpoint}"])
        lines.append(f"mso: last checkpoint {checkpoint}; to go on from it: {command}")
    else:
        lines.append("mso: no checkpoint was written (train_config.save_interval=N saves every N iterations)")
    return "\n".join(lines)


class Returns:
    """The mean return of the newest episode.RECENT episodes as it was after each episode, read from the
    session's episode stream at every poll: its best, and when each level was first reached, to the episode
    that reached it (its entry's time in Redis, on this machine's clock), not to the poll that saw it, with the
    env steps then (interpolated between two polls' counts: the ledger counts a fragment at a time). A peak
    between two polls counts too."""

    def __init__(self, client, sid: str, started_at: float, levels: list[float]):
        self.client, self.sid, self.started_at, self.levels = client, sid, started_at, levels
        seconds, micros = client.time()
        self.clock = time.time() - (seconds + micros / 1e6)  # add to a Redis time for this machine's
        self.last_id, self.recent = "", deque(maxlen=episode.RECENT)
        self.best = -math.inf
        self.seconds: dict[str, float] = {}    # {level: seconds from the command to the episode that reached it}
        self.env_steps: dict[str, int] = {}    # {level: env steps then}
        self.polled = (started_at, 0)          # (time, env steps) at the previous poll

    def update(self, env_steps: int) -> None:
        now = time.time()
        for entry_id, e in episode.after(self.client, self.sid, self.last_id):
            self.last_id = entry_id
            self.recent.append(e.episode_return)
            mean = sum(self.recent) / len(self.recent)
            self.best = max(self.best, mean)
            for level in self.levels:
                if mean >= level and str(level) not in self.seconds:
                    at = min(int(entry_id.split("-")[0]) / 1000 + self.clock, now)
                    (then, steps_then), share = self.polled, 1.0
                    if now > then:
                        share = min(max((at - then) / (now - then), 0.0), 1.0)
                    self.seconds[str(level)] = at - self.started_at
                    self.env_steps[str(level)] = round(steps_then + share * (env_steps - steps_then))
        self.polled = (now, env_steps)


@dataclass
class Followed:
    """What follow() saw, kept where an interrupted run can still report it."""
    progress: Progress = field(default_factory=Progress)
    best: float = -math.inf                                # the best mean return of 20 episodes
    milestones: dict = field(default_factory=dict)         # {level: seconds from the command to it}
    milestone_env_steps: dict = field(default_factory=dict)  # {level: env steps then}, not at the run's end
    curve: list = field(default_factory=list)              # a point every curve_interval seconds


def conclude(summary: dict, followed: Followed, embedded: Embedded, client, name: str, overrides: list[str],
              options: RunOptions, wall_seconds: float) -> None:
    """Fill the summary with what the run did and print the closing lines."""
    p, sid = followed.progress, summary["session_id"]
    summary.update(return_milestones=followed.milestones, return_milestone_env_steps=followed.milestone_env_steps,
                   service_restarts=dict(embedded.restarts),
                   mean_return=p.mean_return, best_mean_return=followed.best, env_steps=p.env_steps,
                   iterations=p.iteration, model_version=p.model_version,
                   rollout_model_version=p.rollout_model_version, ledger=p.ledger, wall_seconds=wall_seconds,
                   scored_episodes=p.scored_episodes, success_rates=p.success_rates, score=p.score,
                   curve=followed.curve,
                   log_dir=os.path.abspath(os.path.join(os.environ.get("MSO_LOG_DIR", "runs"), sid)))
    try:
        summary["last_checkpoint"] = trainer_status.read(client, sid).last_checkpoint
    except Exception:  # Redis is what failed: the rest of the summary stands
        pass
    print(report(summary, name, overrides), file=sys.stderr if options.quiet else sys.stdout, flush=True)


def follow(launcher: Launcher, sid: str, embedded: Embedded, options: RunOptions, started_at: float,
            followed: Followed) -> None:
    """Show progress until the session has ended (not merely STOPPING: a StopSession in flight gets its
    answer); restart dead services meanwhile; keep in `followed` the last progress, the best mean return, the
    milestones and the curve."""
    last_point = -math.inf
    line = ProgressLine(options)
    returns = Returns(launcher.client, sid, started_at,
                      MILESTONES + ([options.until_return] if options.until_return else []))
    followed.milestones, followed.milestone_env_steps = returns.seconds, returns.env_steps
    try:
        while True:
            if embedded.supervise():
                launcher.count_restarts(sid, sum(embedded.restarts.values()))
            phase, p = launcher.phase(sid), launcher.progress(sid)
            followed.progress = p
            returns.update(p.env_steps)
            followed.best = returns.best
            if time.monotonic() - last_point >= options.curve_interval or phase in ENDED:
                last_point = time.monotonic()
                followed.curve.append({"seconds": round(time.time() - started_at, 1), "env_steps": p.env_steps,
                                       "iteration": p.iteration, "mean_return": p.mean_return, "score": p.score,
                                       "episodes": p.episodes})
            reached = (options.until_return and followed.best >= options.until_return) or \
                (options.until_steps and p.env_steps >= options.until_steps)
            if reached and phase == RUNNING:
                launcher.finish(sid)
                continue
            line.show(p)
            if phase in ENDED:
                return
            time.sleep(0.5)
    finally:
        line.close()


def startup(client, sid: str, started_at: float) -> dict:
    """Seconds from `mso run` to the first fragment in Redis and to the first trainer update."""
    first_fragment = queue.first_fragment_at(client, sid)
    first_update = trainer_status.read(client, sid).first_update_at
    return {"first_fragment": first_fragment - started_at if first_fragment else None,
            "first_update": first_update - started_at if first_update else None}
