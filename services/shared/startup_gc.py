"""Cyclic garbage collection deferred while a process of mso's starts.

A process's first seconds are imports (Ray, gRPC, torch, the env stack) and the objects it keeps for its whole
life. CPython's cyclic collector meanwhile runs a young collection every 700 allocations and, each time the
heap has grown by a quarter, a full one over everything imported so far: work that finds next to nothing (at
the end of an 8-second deferral, 0.7-7 % of a process's objects were garbage). With collection deferred in
every process, `mso run cartpole`'s first update came ~0.3 s sooner on 2 cores (3.16 -> 2.82 s, medians of 26
pairs; benchmarks/README, session 39); in the steady state collection costs nothing measurable, so it resumes after START_SECONDS and the
garbage of the start is collected with the rest."""

from __future__ import annotations

import gc
import os
import threading

START_SECONDS = 10.0  # longer than a start-up of mso run's on a slow hour of a 2-core machine (~7 s)

_deferred = False  # a deferral is under way in this process
_hooked = False


def defer(seconds: float = START_SECONDS) -> None:
    """No cyclic collection in this process for `seconds` from now (the first thing an entry point does).

    Where collection is off already (a deferral under way, or the program's own choice) it stays as it is."""
    global _deferred, _hooked
    if not gc.isenabled():
        return
    if not _hooked:  # a child forked meanwhile has no timer thread: it collects as usual from its start
        os.register_at_fork(after_in_child=_resume_in_child)
        _hooked = True
    gc.disable()
    _deferred = True
    timer = threading.Timer(seconds, _resume)
    timer.daemon = True
    timer.start()


def _resume() -> None:
    global _deferred
    _deferred = False
    gc.enable()


def _resume_in_child() -> None:
    if _deferred:
        _resume()
