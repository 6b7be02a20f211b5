"""`ray start` for the head `mso run` starts on its machine, less the head processes nothing of mso uses
(the dashboard head and the client server: ray_env.leave_out_unused). Run as `python -m
services.launcher.ray_head start --head --block ...` with `ray start`'s own arguments; everything else is
`ray start` as it is: its checks, its raylet, log monitor and agents, its `--block` supervision and its stop on
SIGTERM."""

from __future__ import annotations

import sys

from services.shared import ray_env, startup_gc


def main() -> None:
    startup_gc.defer()
    from ray.scripts import scripts

    ray_env.leave_out_unused()
    sys.argv[0] = "ray"
    scripts.main()


if __name__ == "__main__":
    main()
