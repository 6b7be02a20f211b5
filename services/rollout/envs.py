"""Env subprocesses. Each env process runs `worker_config.envs_per_process` environments built by the
config's env_generator and talks to its RolloutWorker over one pipe, in lockstep: the worker sends one
action per env, the process steps each and answers with one message per env. One env per process (the
default, MineStudio's layout) isolates a slow or crashing simulator; several per process save a pipe
round trip per step, which is most of the cost of a fast env like CartPole. An env that raises is rebuilt
in its process, never fatal; a dead or hung process is respawned by the worker.

Child -> parent: a list with one EnvStep per env of the process or, when an env cannot be built and reset
BUILD_ATTEMPTS times in a row, a Fatal naming why, before exiting.
Parent -> child: a list of (action, video_path or None), one per env — a path asks to record that env's
next episode — or None to close.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
from multiprocessing.connection import Connection

from typing import NamedTuple

from services.rollout.video import VideoWriter, frame_of
from services.shared.config import ConfigSource
from services.shared.episode import Episode
from services.shared import startup_gc

log = logging.getLogger(__name__)
# A Ray worker process has threads, so forking it directly could copy held locks. A forkserver is a fresh,
# single-threaded process that imports the heavy modules once; each env process is forked from it in
# milliseconds instead of spending seconds importing torch again.
_ctx = mp.get_context("forkserver")
BUILD_ATTEMPTS = 3  # an env that cannot be built and reset this many times in a row is reported, not retried
_ctx.set_forkserver_preload(["numpy", "torch", "gymnasium", "services.shared.config", "services.rollout.video"])


class EnvStep(NamedTuple):
    """What an env answers for one step. `last_*` describe the transition that led to obs (MineStudio's
    alignment: the last observation of an episode is not acted on; its reward and done flags ride on the next
    episode's first observation)."""
    obs: object
    last_reward: float
    last_terminated: bool
    last_truncated: bool
    finished: Episode | None    # the episode that transition ended, if it ended one
    restarted: bool             # the env was rebuilt after an error: the slot's stream is broken here
    final_obs: object = None    # the episode's last observation when a time limit cut it (truncated, not
                                # terminated), so the worker can value it and the learner bootstrap from it


class Fatal(NamedTuple):
    """An env process's answer when its env cannot be built at all (a broken config, not a crash)."""
    reason: str


class _Episode:
    """Running statistics of the current episode, and its video when one was asked for."""

    def __init__(self, discount: float, video: VideoWriter | None):
        self.discount, self.video = discount, video
        self.ret = self.disc_ret = 0.0
        self.length = 0
        self.weight = 1.0  # discount ** length

    def add(self, reward: float) -> None:
        self.disc_ret += self.weight * reward
        self.weight *= self.discount
        self.ret += reward
        self.length += 1

    def finish(self, truncated: bool, task, stats) -> Episode:
        """The episode's record (the worker adds its version, slot and worker)."""
        return Episode(episode_return=self.ret, discounted_return=self.disc_ret, length=self.length,
                       truncated=bool(truncated), task=task if isinstance(task, str) else "",
                       video=(self.video.close() or "") if self.video else "",
                       stats={str(k): float(v) for k, v in stats.items()} if isinstance(stats, dict) else {})


def reseeded(seeds: list[int]) -> list[int]:
    """Fresh seeds for rebuilt envs, so a deterministic crash is not replayed."""
    return [s + 1000003 for s in seeds]


class _CannotBuild(Exception):
    """An env that cannot be built: reported to the worker, not retried forever."""


class _Runner:
    """One env inside an env process: builds and resets it, steps it, rebuilds it after an error."""

    def __init__(self, config_name: str, module, seed: int, discount: float, restart_interval, fps: int):
        self.config_name, self.module, self.seed, self.discount = config_name, module, seed, discount
        self.restart_interval, self.fps = restart_interval, fps
        self.env, self.episode, self.video_path, self.built = None, None, None, 0.0

    def start(self, carried=(0.0, True, False, None, None), restarted: bool = False) -> EnvStep:
        """Build and reset the env; the message of its first observation. `carried` is (reward, terminated,
        truncated, finished, final_obs) of the step that ended the previous env's last episode."""
        failures = 0
        while True:
            try:
                self.env = self.module.env_generator()
                self.built = time.monotonic()
                obs, _info = self.env.reset(seed=self.seed)
                break
            except Exception as exc:
                # It never got as far as an observation: a broken config, not a crash to ride out.
                self.close()
                failures += 1
                if failures >= BUILD_ATTEMPTS:
                    raise _CannotBuild(f"config {self.config_name}: building and resetting its env failed {failures} "
                                 f"times: {type(exc).__name__}: {exc}") from None
                log.error("building env failed, retrying:\n%s", traceback.format_exc())
                time.sleep(0.2 * 2 ** failures)
        self.seed = None
        self._new_episode()
        return self._emit(obs, *carried[:4], restarted, carried[4])

    def step(self, action, video_path: str | None) -> EnvStep:
        self.video_path = video_path or self.video_path
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
            reward = float(reward)
            self.episode.add(reward)
            finished = final_obs = None
            if terminated or truncated:
                finished = self.episode.finish(truncated, obs.get("task") if isinstance(obs, dict) else None,
                                               info.get("episode_stats") if isinstance(info, dict) else None)
                final_obs = obs if truncated and not terminated else None
                if self.restart_interval and time.monotonic() - self.built > self.restart_interval:
                    self.close()  # a planned rebuild at an episode boundary: the stream stays continuous
                    return self.start((reward, terminated, truncated, finished, final_obs))
                obs, _info = self.env.reset()
                self._new_episode()
            return self._emit(obs, reward, terminated, truncated, finished, False, final_obs)
        except _CannotBuild:
            raise
        except Exception:
            log.error("env crashed, rebuilding it:\n%s", traceback.format_exc())
            self.close()
            return self.start(restarted=True)

    def _new_episode(self) -> None:
        self.episode = _Episode(self.discount, VideoWriter(self.video_path, self.fps) if self.video_path else None)
        self.video_path = None

    def _emit(self, obs, reward, terminated, truncated, finished, restarted, final_obs) -> EnvStep:
        if self.episode.video is not None and (frame := frame_of(obs, self.env)) is not None:
            self.episode.video.write(frame)
        return EnvStep(obs, float(reward), bool(terminated), bool(truncated), finished, restarted, final_obs)

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            except Exception:
                pass
            self.env = None


def _env_main(conn: Connection, environ: dict, source: ConfigSource, seeds: list[int], discount: float,
              restart_interval, fps: int) -> None:
    """An env process: an EnvGroup behind the pipe, until the worker says None or an env cannot be built."""
    startup_gc.defer()  # while it imports the env stack and builds its envs
    # The forkserver's environment is that of when it started; an env sees its worker's, as with spawn.
    os.environ.clear()
    os.environ.update(environ)
    envs = None
    try:
        envs = EnvGroup(list(range(len(seeds))), source, seeds, discount, restart_interval, fps)
        while True:
            reply = envs.recv()
            conn.send(reply)
            if isinstance(reply, Fatal):
                return  # reported, and this process ends
            message = conn.recv()
            if message is None:
                return
            envs.send(message)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        if envs is not None:
            envs.close()


class EnvProcess:
    """One env process of a worker, stepping the env slots in `slots`: its pipe, when its answer is due,
    restarts."""

    def __init__(self, slots: list[int], source: ConfigSource, seeds: list[int], discount: float, restart_interval,
                 fps: int, step_timeout: float, start_timeout: float):
        self.slots = slots
        self.args = (source, seeds, discount, restart_interval, fps)
        self.step_timeout, self.start_timeout = step_timeout, start_timeout
        self.deadline = 0.0  # when the observations asked for (by spawning or by actions) are overdue
        self.conn: Connection | None = None
        self.process: mp.Process | None = None
        self.spawn()

    def spawn(self) -> None:
        parent, child = _ctx.Pipe()
        self.process = _ctx.Process(target=_env_main, args=(child, dict(os.environ), *self.args), daemon=True,
                                    name=f"mso-env-{self.slots[0]}")
        self.process.start()
        child.close()
        self.conn = parent
        self.deadline = time.monotonic() + self.start_timeout

    def recv(self):
        return self.conn.recv()

    def send(self, actions: list[tuple]) -> None:
        """One (action, video_path or None) per slot of this process."""
        self.conn.send(actions)
        self.deadline = time.monotonic() + self.step_timeout

    def restart(self) -> None:
        self.close(timeout=1.0)
        name, seeds, *rest = self.args
        self.args = (name, reseeded(seeds), *rest)
        self.spawn()

    def close(self, timeout: float = 5.0) -> None:
        self.ask_to_close()
        self.wait_closed(time.monotonic() + timeout)

    def ask_to_close(self) -> None:
        """Tell the process to close its envs and exit; wait_closed waits for it."""
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.conn.close()

    def wait_closed(self, deadline: float) -> None:
        """Wait for the process to exit until deadline (time.monotonic()), then kill it."""
        if self.process is not None:
            self.process.join(max(0.0, deadline - time.monotonic()))
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


def close_all(procs: list, timeout: float) -> None:
    """Close a worker's env processes (or its in-thread group) together: each is told first, then all are waited
    for until one deadline. An env's close may take seconds (MineRL's stops a Java process), and one process
    after another a worker's stop took the sum of theirs."""
    for proc in procs:
        proc.ask_to_close()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait_closed(deadline)


class EnvGroup:
    """The env slots `slots` stepped in the calling thread: what an env process runs behind its pipe, and
    what a worker runs itself with worker_config.envs_per_process=0 (no process and no pipe, for envs that
    step in microseconds, where the round trip to a process costs more than the step). The same interface
    as EnvProcess, answering at once. An env that raises is rebuilt; in the worker's thread, one that hangs
    or kills its process takes the worker with it (env_timeout cannot apply)."""

    conn = None
    deadline = float("inf")

    def __init__(self, slots: list[int], source: ConfigSource, seeds: list[int], discount: float, restart_interval,
                 fps: int):
        self.slots, self.source, self.seeds = slots, source, seeds
        self.settings = (discount, restart_interval, fps)
        self.module, self.runners = None, []
        self._start()

    def _start(self) -> None:
        try:
            if self.module is None:
                try:  # once: a module's globals live as long as the process, across env rebuilds
                    self.module = self.source.load()
                except Exception as exc:
                    raise _CannotBuild(f"config {self.source.name}: importing it failed: {type(exc).__name__}: "
                                 f"{exc}") from None
            self.runners = [_Runner(self.source.name, self.module, seed, *self.settings) for seed in self.seeds]
            self.reply = [r.start() for r in self.runners]
        except _CannotBuild as exc:
            self.reply = Fatal(str(exc))

    def recv(self):
        reply, self.reply = self.reply, None
        return reply

    def send(self, actions: list[tuple]) -> None:
        try:
            self.reply = [r.step(action, video) for r, (action, video) in zip(self.runners, actions)]
        except _CannotBuild as exc:
            self.reply = Fatal(str(exc))

    def restart(self) -> None:
        self.close()
        self.seeds = reseeded(self.seeds)
        self._start()

    def close(self, timeout: float = 0.0) -> None:
        for r in self.runners:
            r.close()

    def ask_to_close(self) -> None:  # close_all's interface: in this thread, closing is done at once
        self.close()

    def wait_closed(self, deadline: float) -> None:
        pass
