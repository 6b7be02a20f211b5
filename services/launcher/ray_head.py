"""`ray start` for the head `mso run` starts on its machine, without two head processes nothing of mso uses:
run as `python -m services.launcher.ray_head start --head --block ...` with `ray start`'s own arguments.

- The dashboard head. With `--include-dashboard=false` Ray 2.60 still starts it, loading only its usage-stats
  module (usage stats are off in mso's heads), and `ray start` waits for it to register before it starts the
  raylet: its imports (~0.6 CPU-s) sat on the path to the first actor. The head was ready 0.7-1.0 s later
  with it than without on an idle 2-core machine.
- Ray's client server (ray:// connections; ~0.8 CPU-s of imports while the services and actors import
  theirs). `ray start` starts one whenever grpcio is installed and offers no switch to leave it out.

Both are methods of Ray's private `Node` class, replaced in this process only: Ray is pinned, and a Ray
without them fails here by name rather than starting them unnoticed. Everything else is `ray start` as it
is: its checks, its raylet, log monitor and agents, its `--block` supervision and its stop on SIGTERM."""

from __future__ import annotations

import sys


def _not_started(*args, **kwargs) -> None:
    return None


def main() -> None:
    from ray._private import node
    from ray.scripts import scripts

    for name in ("start_api_server", "start_ray_client_server"):
        getattr(node.Node, name)  # an AttributeError names a Ray this module no longer fits
        setattr(node.Node, name, _not_started)
    sys.argv[0] = "ray"
    scripts.main()


if __name__ == "__main__":
    main()
