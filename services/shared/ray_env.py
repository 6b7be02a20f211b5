"""Environment for the Ray processes mso starts (a head of `mso run`, a service's own local instance); kept
apart from ray_runtime so `mso run` sets it without importing Ray.

A raylet connects to the object store it has just started in a thread of its own, and Ray 2.60's client
retries that connection once a second (raylet_client_connect_timeout_milliseconds = 1000): the store is
seldom up at the first attempt, so most heads waited a full second there before they registered (the
raylet's log: "Plasma store debug dump" at t, "ObjectManager server started" at t + 1.000 s). Retrying every
50 ms with the same ten-second budget removes that second; worker processes, which connect to the raylet and
the store the same way, inherit it."""

from __future__ import annotations

import os

FAST_START = {"RAY_raylet_client_connect_timeout_milliseconds": "50",
              "RAY_raylet_client_num_connect_attempts": "200"}


def with_fast_start(env: dict) -> dict:
    """env with FAST_START added, where the user has not set those variables themselves."""
    return {**FAST_START, **env}


def set_fast_start() -> None:
    """FAST_START into this process's environment (what a local Ray instance started from here inherits)."""
    for key, value in FAST_START.items():
        os.environ.setdefault(key, value)
