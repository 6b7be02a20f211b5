"""How a service joins a Ray head that is still starting (ray_runtime.wait_for_head): it returns once the head's
node is alive, so ray.init finds it at its first look (Ray's own lookup looks again once a second, which left
`mso run`'s services idle for half a second on average); and against an address where nothing listens it
gives up at its deadline rather than in Ray's client's ~40 s."""

import os
import subprocess
import sys
import textwrap
import time

from services.launcher.embedded import spawn_ray_head
from services.shared import ray_runtime
from services.shared.ports import free_port


def test_it_returns_once_a_starting_head_has_a_live_node():
    head, join = spawn_ray_head(1, dict(os.environ))
    # A fresh process with the head's address and token in its environment, as a service started beside it.
    script = textwrap.dedent("""
        import os, time
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        from services.shared import ray_runtime
        address = os.environ["RAY_ADDRESS"]
        ray_runtime.wait_for_head(address, time.monotonic() + 60)
        alive = GcsClient(address=address).get_all_node_info(timeout=5, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
        print(len(alive))
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **join), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["1"]
        assert head.process.poll() is None
    finally:
        head.stop(grace=5)


def test_it_gives_up_at_its_deadline_where_no_head_listens():
    started = time.monotonic()
    ray_runtime.wait_for_head(f"127.0.0.1:{free_port()}", started + 1.0)
    assert time.monotonic() - started < 10


def test_addresses_it_cannot_watch_are_left_to_ray_init():
    started = time.monotonic()
    for address in ("auto", "ray://127.0.0.1:10001"):
        ray_runtime.wait_for_head(address, started + 30)
    assert time.monotonic() - started < 1
