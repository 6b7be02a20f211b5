"""Env subprocesses. Each env slot runs one environment built by the config's env_generator in its own
process and talks to its RolloutWorker over a pipe; a crashed, dead or hung env is rebuilt, never fatal.

Child -> parent, one message per observation the agent must act on:
    (obs, last_reward, last_terminated, last_truncated, finished_episode or None, restarted, final_obs)
or, when the env cannot be built and reset BUILD_ATTEMPTS times in a row, ("fatal", reason) before exiting.
`last_*` describe the transition that led to obs (MineStudio's alignment: the last observation of an episode
is not acted on; its reward and done flags ride on the next episode's first observation). `final_obs` is
that last observation when the episode was cut by a time limit (truncated, not terminated), so the worker
can value it and the learner bootstrap from it; None otherwise. `restarted` is True when the env was
rebuilt after an error, so the worker knows the slot's stream is broken there.
Parent -> child: (action, video_path or None) — a path asks to record the next episode — or None to close.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
from multiprocessing.connection import Connection

from mso.rollout.video import VideoWriter, frame_of

log = logging.getLogger(__name__)
# A Ray worker process has threads, so forking it directly could copy held locks. A forkserver is a fresh,
# single-threaded process that imports the heavy modules once; each env process is forked from it in
# milliseconds instead of spending seconds importing torch again.
_ctx = mp.get_context("forkserver")
BUILD_ATTEMPTS = 3  # an env that cannot be built and reset this many times in a row is reported, not retried
_ctx.set_forkserver_preload(["numpy", "torch", "gymnasium", "mso.config", "mso.rollout.video"])


class _Episode:
    """Running statistics of the current episode, and its video when one was asked for."""

    def __init__(self, discount: float, video: VideoWriter | None):
        self.discount, self.video = discount, video
        self.ret = self.disc_ret = 0.0
        self.length = 0

    def add(self, reward: float) -> None:
        self.disc_ret += self.discount ** self.length * reward
        self.ret += reward
        self.length += 1

    def finish(self, truncated: bool, task, stats) -> dict:
        return {"return": self.ret, "discounted_return": self.disc_ret, "length": self.length,
                "truncated": bool(truncated), "task": task if isinstance(task, str) else None,
                "video": self.video.close() if self.video else None,
                "stats": {str(k): float(v) for k, v in stats.items()} if isinstance(stats, dict) else {}}


def _env_main(conn: Connection, environ: dict, config_name: str, seed: int, discount: float, restart_interval,
              fps: int) -> None:
    from mso.config import import_module

    # The forkserver's environment is that of when it started; an env sees its worker's, as with spawn.
    os.environ.clear()
    os.environ.update(environ)

    restarted = False
    reward, terminated, truncated = 0.0, True, False  # the first obs starts an episode
    finished, video_path, env, module, final_obs = None, None, None, None, None
    failures = 0  # consecutive builds that failed before their first observation
    while True:
        ready = False
        try:
            module = module or import_module(config_name)
            env = module.env_generator()
            built = time.monotonic()
            obs, _info = env.reset(seed=seed)
            seed = None
            ready, failures = True, 0
            episode = _Episode(discount, VideoWriter(video_path, fps) if video_path else None)
            video_path = None
            while True:
                if episode.video is not None and (frame := frame_of(obs, env)) is not None:
                    episode.video.write(frame)
                conn.send((obs, reward, terminated, truncated, finished, restarted, final_obs))
                restarted, finished, final_obs = False, None, None
                message = conn.recv()
                if message is None:
                    env.close()
                    return
                action, video_path = message[0], message[1] or video_path
                obs, reward, terminated, truncated, info = env.step(action)
                reward = float(reward)
                episode.add(reward)
                if terminated or truncated:
                    finished = episode.finish(truncated, obs.get("task") if isinstance(obs, dict) else None,
                                              info.get("episode_stats") if isinstance(info, dict) else None)
                    final_obs = obs if truncated and not terminated else None
                    if restart_interval and time.monotonic() - built > restart_interval:
                        env.close()
                        break  # a planned rebuild at an episode boundary: the stream stays continuous
                    obs, _info = env.reset()
                    episode = _Episode(discount, VideoWriter(video_path, fps) if video_path else None)
                    video_path = None
        except (EOFError, BrokenPipeError, KeyboardInterrupt):
            return
        except Exception as exc:
            if not ready:
                # It never got as far as an observation: a broken config, not a crash to ride out.
                failures += 1
                if failures >= BUILD_ATTEMPTS:
                    conn.send(("fatal", f"config {config_name}: building and resetting its env failed "
                                        f"{failures} times: {type(exc).__name__}: {exc}"))
                    return
                time.sleep(0.2 * 2 ** failures)
            log.error("env crashed, rebuilding it:\n%s", traceback.format_exc())
            restarted, finished, final_obs = True, None, None
            reward, terminated, truncated = 0.0, True, False
            try:
                env.close()
            except Exception:
                pass


class EnvSlot:
    """One env slot of a worker: its process, its pipe, when it was last asked for something, restarts."""

    def __init__(self, index: int, config_name: str, seed: int, discount: float, restart_interval, fps: int,
                 step_timeout: float, start_timeout: float):
        self.index = index
        self.args = (config_name, seed, discount, restart_interval, fps)
        self.step_timeout, self.start_timeout = step_timeout, start_timeout
        self.restarts = 0
        self.deadline = 0.0  # when the observation asked for (by spawning or by an action) is overdue
        self.conn: Connection | None = None
        self.process: mp.Process | None = None
        self.spawn()

    def spawn(self) -> None:
        parent, child = _ctx.Pipe()
        self.process = _ctx.Process(target=_env_main, args=(child, dict(os.environ), *self.args), daemon=True,
                                    name=f"mso-env-{self.index}")
        self.process.start()
        child.close()
        self.conn = parent
        self.deadline = time.monotonic() + self.start_timeout

    def send(self, action, video_path: str | None = None) -> None:
        self.conn.send((action, video_path))
        self.deadline = time.monotonic() + self.step_timeout

    def restart(self) -> None:
        self.restarts += 1
        self.close(timeout=1.0)
        name, seed, *rest = self.args
        self.args = (name, seed + 1000003, *rest)  # a fresh seed, so a deterministic crash is not replayed
        self.spawn()

    def close(self, timeout: float = 5.0) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.conn.close()
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
