"""How a service joins Ray: the cluster at RAY_ADDRESS when set, otherwise a local instance of its own.
Actors live in the `online` namespace."""

from __future__ import annotations

import logging
import os
import threading

import ray

log = logging.getLogger(__name__)

NAMESPACE = "online"
_lock = threading.Lock()


def ensure() -> None:
    with _lock:
        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS") or None
        kwargs = {} if address else {"include_dashboard": False}
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True, configure_logging=False, **kwargs)


def connect_early() -> None:
    """With RAY_ADDRESS set, join that cluster now in the background, so a session's Start does not wait
    seconds for it. Without it, the service's own Ray instance starts at the first Start, as it costs
    memory even when idle. A failure here is only logged: Start tries again and reports it."""
    if not os.environ.get("RAY_ADDRESS"):
        return

    def connect() -> None:
        try:
            ensure()
        except Exception as exc:  # reported by the Start that needs it
            log.warning("cannot join the Ray cluster at %s yet: %s", os.environ["RAY_ADDRESS"], exc)

    threading.Thread(target=connect, name="ray-connect", daemon=True).start()
