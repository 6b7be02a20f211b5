"""One trainer rank of the DDP equality test, run in its own process (torch.distributed with gloo)."""

import os

import numpy as np
import torch.distributed as dist
from safetensors.torch import save_file

from services.shared.fragment import Fragment

L = 8


def fragments(n: int, session_id: str) -> list[Fragment]:
    """n CartPole-shaped fragments with fixed random contents: the same on every call."""
    rng = np.random.default_rng(42)
    out = []
    for i in range(n):
        done = rng.random(L) < 0.15
        first = np.concatenate([[i % 3 == 0], done[:-1]])
        out.append(Fragment(session_id=session_id, slot=f"slot{i}", seq=0, contiguous=True, version_first=0,
                            obs={"obs": rng.standard_normal((L, 4)).astype(np.float32)},
                            action=rng.integers(0, 2, L), reward=rng.standard_normal(L).astype(np.float32),
                            first=first, next_done=done, next_truncated=done & (rng.random(L) < 0.5),
                            truncation_value=rng.standard_normal(L).astype(np.float32),
                            logp=np.log(rng.uniform(0.3, 0.7, L)).astype(np.float32),
                            model_version=np.zeros(L, dtype=np.int64), in_state=[],
                            next_obs={"obs": rng.standard_normal(4).astype(np.float32)}))
    return out


def run(rank: int, world: int, port: int, spec: dict, all_fragments: int, out: str, master: str = "127.0.0.1") -> None:
    """Update once on this rank's share of the fragments; rank 0 (at `master`) writes the parameters to out."""
    from services.trainer.learner import Learner

    if world > 1:
        os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    learner = Learner(spec)
    mine = fragments(all_fragments, spec.joined.session_id)[rank::world]
    metrics = learner.update(mine, warmup=False)
    if rank == 0:
        state = {k: v.detach().clone().contiguous() for k, v in learner.policy.state_dict().items()}
        save_file(state, out, metadata={"explained_var": str(metrics["explained_var"])})
    if world > 1:
        dist.destroy_process_group()
