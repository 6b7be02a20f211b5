"""The Python worker process (what runs an actor or a task) of the Ray nodes mso starts: Ray's own worker
(ray/_private/workers/default_worker.py, run as it is, with the arguments the raylet gives it), less the
serializers ray_env.leave_out_addon_serializers leaves out. ray_env.leave_out_unused makes a raylet started from
mso run this file in place of Ray's.

Run as a script, Python puts this file's folder first on sys.path, where modules of mso's (queue.py) would
shadow the standard library's for everything the worker imports; Ray's worker, run as a script, has its own
folder there instead, and so it has here."""

import os  # (loaded with the interpreter: no lookup on sys.path)
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):  # (not with -P)
    del sys.path[0]  # before any import that folder could shadow

import importlib.util  # noqa: E402
import runpy  # noqa: E402

from services.shared import ray_env, startup_gc  # noqa: E402


def main() -> None:
    startup_gc.defer()
    script = os.path.join(os.path.dirname(importlib.util.find_spec("ray").origin), "_private", "workers",
                          "default_worker.py")
    sys.path.insert(0, os.path.dirname(script))
    ray_env.leave_out_addon_serializers()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
