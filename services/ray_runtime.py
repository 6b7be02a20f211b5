"""How a service joins Ray: the cluster at RAY_ADDRESS when set, otherwise a local instance of its own.
Actors live in the `online` namespace."""

from __future__ import annotations

import os
import threading

import ray

NAMESPACE = "online"
_lock = threading.Lock()


def ensure() -> None:
    with _lock:
        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS") or None
        kwargs = {} if address else {"include_dashboard": False}
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True, configure_logging=False, **kwargs)
