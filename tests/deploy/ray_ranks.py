"""Run in the trainer container of deploy/docker-compose.ray.yml, with tests/ copied to /opt/mso on every
node of its Ray cluster (tests/deploy/test_podman.py does both): the update of tests/trainer/test_ddp.py with
its two gloo ranks placed by Ray one on each node (two containers: two network hosts), then one rank alone
on the same fragments. Prints JSON: each run's hosts, how many parameters moved, the largest difference
between the two runs' parameters, and whether they match within test_ddp's tolerance."""

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ROOT = "/opt/mso"


@ray.remote(num_cpus=0)  # placed by node affinity; the node's CPU may be held by the trainer's warm learner
def rank(r: int, world: int, port: int, master: str, session: str, batch: int):
    sys.path.insert(0, ROOT)
    from safetensors.torch import load_file

    from tests.trainer import ddp_rank
    from tests.trainer.test_ddp import spec

    tmp = Path(tempfile.mkdtemp())
    out = tmp / "params.safetensors"
    ddp_rank.run(r, world, port, spec(os.environ["REDIS_URL"], session, batch, tmp), 8, str(out), master)
    return socket.gethostname(), (dict(load_file(out)) if r == 0 else None)


def main() -> None:
    sys.path.insert(0, ROOT)
    import torch

    from services.shared.ports import free_port
    from tests.trainer.test_ddp import ATOL, RTOL, ddp_rank_initial_state

    ray.init(address="auto")
    here = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + 120
    while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
        time.sleep(1)  # ray-worker joining
    (head,) = [n for n in nodes if n["NodeID"] == here]
    (other,) = [n for n in nodes if n["NodeID"] != here]

    def on(node):
        return NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)

    port = free_port("0.0.0.0")
    two = ray.get([rank.options(scheduling_strategy=on(node)).remote(r, 2, port, head["NodeManagerAddress"],
                                                                      "ray-ddp2", 4)
                   for r, node in enumerate((head, other))], timeout=600)
    one = ray.get(rank.options(scheduling_strategy=on(head)).remote(0, 1, 0, "", "ray-ddp1", 8), timeout=600)
    a, b = one[1], two[0][1]
    initial = ddp_rank_initial_state()
    match, why = True, ""
    for k in a:
        try:
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL)
        except AssertionError as exc:
            match, why = False, f"{k}: {exc}"
            break
    print(json.dumps({"two_rank_hosts": [h for h, _ in two], "one_rank_host": one[0],
                      "moved": sum(not torch.equal(a[k], initial[k]) for k in a), "parameters": len(a),
                      "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a), "match": match, "why": why}))


if __name__ == "__main__":
    main()
