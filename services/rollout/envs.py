"""Env subprocesses. Each env slot runs one environment built by the config's env_generator in its own
process and talks to its RolloutWorker over a pipe; a crashed or dead env is rebuilt, never fatal.

Child -> parent message, one per observation the agent must act on:
    (obs, last_reward, last_terminated, last_truncated, finished_episode or None, restarted)
`last_*` describe the transition that led to obs (MineStudio's alignment: the terminal observation is never
sent; its reward and done flag ride on the next episode's first observation). `restarted` is True when the
env was rebuilt after an error, so the worker knows the stream of this slot is broken there.
Parent -> child: an action, or None to close.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import traceback
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)
_ctx = mp.get_context("spawn")  # a Ray worker process has threads: fork would copy their locks


def _env_main(conn: Connection, config_name: str, seed: int) -> None:
    from mso.config import import_module

    module = import_module(config_name)
    restarted = False
    reward, terminated, truncated = 0.0, True, False  # the first obs starts an episode
    episode = None
    while True:
        try:
            env = module.env_generator()
            obs, _info = env.reset(seed=seed)
            seed = None
            ep_return, ep_len = 0.0, 0
            while True:
                conn.send((obs, reward, terminated, truncated, episode, restarted))
                restarted, episode = False, None
                action = conn.recv()
                if action is None:
                    env.close()
                    return
                obs, reward, terminated, truncated, _info = env.step(action)
                reward = float(reward)
                ep_return += reward
                ep_len += 1
                if terminated or truncated:
                    episode = {"return": ep_return, "length": ep_len, "truncated": bool(truncated)}
                    obs, _info = env.reset()
                    ep_return, ep_len = 0.0, 0
        except (EOFError, BrokenPipeError, KeyboardInterrupt):
            return
        except Exception:
            log.error("env crashed, rebuilding it:\n%s", traceback.format_exc())
            restarted, episode = True, None
            reward, terminated, truncated = 0.0, True, False
            try:
                env.close()
            except Exception:
                pass


class EnvSlot:
    """One env slot of a worker: its process, its pipe, and how often it was restarted."""

    def __init__(self, index: int, config_name: str, seed: int):
        self.index = index
        self.config_name = config_name
        self.seed = seed
        self.restarts = 0
        self.conn: Connection | None = None
        self.process: mp.Process | None = None
        self.spawn()

    def spawn(self) -> None:
        parent, child = _ctx.Pipe()
        self.process = _ctx.Process(target=_env_main, args=(child, self.config_name, self.seed), daemon=True,
                                    name=f"mso-env-{self.index}")
        self.process.start()
        child.close()
        self.conn = parent

    def restart(self) -> None:
        self.restarts += 1
        self.close(timeout=1.0)
        self.seed += 1000003  # a fresh seed, so a deterministic crash is not replayed forever
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
