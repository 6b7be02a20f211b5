"""How a service joins Ray: the cluster at RAY_ADDRESS when set, otherwise a local instance of its own.
Actors live in the `online` namespace."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

import ray

from services.shared import ray_env

log = logging.getLogger(__name__)

NAMESPACE = "online"
WARM_READY_TIMEOUT = 60.0
HEAD_WAIT = 30.0   # seconds a service waits for a head that is still starting before ray.init waits its own way
HEAD_POLL = 0.05   # seconds between its looks
_lock = threading.Lock()
_early_done = threading.Event()  # connect_early's work (joining, warming) is over, or there was none
_early_done.set()


class _SigtermNotice(logging.Filter):
    """ray.init outside the main thread (connect_early's, a Start's) says it cannot install its own SIGTERM
    handler. The service's handler, installed in its main thread (rpc.Server), is the one that must run (it
    stops the service cleanly, where Ray's would sys.exit), so the notice only alarms users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


logging.getLogger("ray._private.worker").addFilter(_SigtermNotice())


def ensure() -> None:
    """Join Ray (see _join). A Start calls it: when connect_early is still joining and starting the warm
    actors, it waits for that first, or it would start actors of its own beside the warm ones (each a process
    importing torch, on a machine that is still starting everything else)."""
    _early_done.wait()
    _join()


def _join() -> None:
    with _lock:
        if ray.is_initialized():
            return
        address, kwargs = os.environ.get("RAY_ADDRESS") or None, {}
        if not address:
            # "local": a new instance. Without an address ray.init joins the last cluster `ray start` started on
            # this machine (/tmp/ray/ray_current_cluster: `mso run`'s head, a user's own, or a dead one). It
            # serves this machine only: on loopback, where the container's network (an address that changes
            # when it is reconnected, a partition) cannot cut the service off its actors.
            address, kwargs = "local", {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
            ray_env.set_fast_start()
            ray_env.leave_out_unused()
        else:
            wait_for_head(address, time.monotonic() + HEAD_WAIT)
        ray_env.leave_out_addon_serializers()
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True, configure_logging=False, **kwargs)


def wait_for_head(address: str, deadline: float) -> None:
    """Return once the head at address ("host:port") has a live node, looking every HEAD_POLL seconds, or at
    deadline (time.monotonic()). ray.init, joining a head whose raylet has not registered yet, looks again
    once a second (services.get_node_to_connect_for_driver): the services of `mso run`, which start with the
    head, waited half a second on average with the machine idle before their warm actors could start. Nothing
    else depends on this wait: on any failure ray.init waits, and reports, as it always did."""
    host, _, port = address.rpartition(":")
    if not host or "/" in host or not port.isdigit():  # "auto", "ray://...": left to ray.init
        return
    from ray._raylet import GcsClient  # Ray's own GCS client (ray.init's), not part of its public API
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:
        while True:  # the port first: a GcsClient made before the GCS listens blocks for up to ~40 s
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()  # [::1]: IPv6
                break
            except OSError:
                if time.monotonic() >= deadline:
                    return
                time.sleep(HEAD_POLL)
        client = GcsClient(address=address)
        while time.monotonic() < deadline:
            if client.get_all_node_info(timeout=1, state_filter=GcsNodeInfo.GcsNodeState.ALIVE):
                return
            time.sleep(HEAD_POLL)
    except Exception as exc:  # only the head start lost
        log.debug("could not watch the Ray head at %s start: %r", address, exc)


def cause(exc: BaseException) -> BaseException:
    """The error an actor raised, out of the RayTaskErrors that carried it through other actors (whose text
    is a traceback per hop)."""
    while isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


class Unplaceable(RuntimeError):
    """A session asks for more CPUs or GPUs than the whole Ray cluster has."""


def check_placeable(resources: dict[str, float], keys: dict[str, str], count: int, what: str) -> None:
    """Raise Unplaceable unless `count` actors, each created with the Ray options `resources` (num_cpus,
    num_gpus), fit in the Ray cluster's total of each; keys[option] names the config key that sets it. Ray
    leaves such actors pending without an error: a rollout Start timed out after 180 s saying only "Get timed
    out", and a learner waited for ever (the reference's num_gpus_per_worker default is 1, on a machine without
    a GPU)."""
    totals = ray.cluster_resources()
    for option, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        amount, have, key = resources.get(option, 0), totals.get(resource, 0.0), keys[option]
        if amount * count > have:
            who = f"a {what} asks" if count == 1 else f"{count} {what}s ask"
            raise Unplaceable(f"{key}={amount:g}: {who} for {amount * count:g} {resource} in all, and this Ray "
                              f"cluster has {have:g}"
                              + (f"; set {key}=0 to run on CPUs" if resource == "GPU" else ""))


def shutdown() -> None:
    """Leave Ray (and stop this service's own local instance, when it started one)."""
    with _lock:
        if ray.is_initialized():
            ray.shutdown()


def shared_cluster() -> bool:
    """Whether this service joins a Ray cluster at RAY_ADDRESS (rather than starting its own at a Start)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def connect_early(then: Callable[[], None] | None = None) -> None:
    """With RAY_ADDRESS set, join that cluster now in the background (waiting for its head if it is still
    starting), then call `then` (the service warms its actors), so a session's Start does not wait seconds
    for either. Without it, the service's own Ray instance starts at the first Start, as it costs memory
    even when idle. A failure here is only logged: Start tries again and reports it."""
    if not shared_cluster():
        return

    def connect() -> None:
        try:
            _join()
            if then is not None:
                then()
        except Exception as exc:  # reported by the Start that needs it
            log.warning("cannot join the Ray cluster at %s yet: %s", os.environ["RAY_ADDRESS"], exc)
        finally:
            _early_done.set()

    _early_done.clear()
    threading.Thread(target=connect, name="ray-connect", daemon=True).start()


class WarmActor:
    """One actor started before a session needs it, so a Start does not wait seconds for a process to start
    and import torch. Services make one when they join a shared cluster and, unless `again` is False, again
    after each session (a service of `mso run` serves one session: an actor started after it would only be
    killed half-started when the run stops). take() hands it over only to a session that asks for the same
    resources; a mismatched one is killed so its resources are free."""

    def __init__(self, make: Callable[[dict], object], resources: dict, again: bool = True):
        self._make, self.resources, self._again = make, resources, again
        self._handle = None
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    def fill(self) -> None:
        """Start the warm actor if there is none (only on a shared cluster: a service's own Ray instance
        starts at a Start, and an idle actor would keep it busy for nothing; never once closed, nor a second
        time unless `again`)."""
        with self._lock:
            if (self._handle is None and not self._closed and (self._again or not self._started)
                    and shared_cluster() and ray.is_initialized()):
                try:
                    self._handle = self._make(self.resources)
                    self._started = True
                except Exception as exc:  # only a head start lost: the next Start makes its own actor
                    log.warning("cannot start a warm actor: %s", exc)

    def close(self) -> None:
        """The service is stopping: kill the warm actor, and start no more."""
        with self._lock:
            self._closed = True
            handle, self._handle = self._handle, None
        if handle is not None:
            try:
                ray.kill(handle)
            except Exception as exc:  # the cluster is gone, and the actor with it
                log.warning("cannot kill the warm actor: %s", exc)

    def take(self, resources: dict | None):
        """The warm actor if it holds exactly these resources, else None (None: the session needs none)."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is None:
            return None
        if resources != self.resources:
            ray.kill(handle)
            return None
        try:  # waits while it is still starting, as a new one would
            ray.get(handle.__ray_ready__.remote(), timeout=WARM_READY_TIMEOUT)
        except Exception as exc:  # it died, or never got its resources: the caller starts a new one
            log.warning("the warm actor is not usable (%s); starting a new one", exc)
            ray.kill(handle)
            return None
        return handle
