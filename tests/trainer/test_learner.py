"""The learner outside the services: on a CPU, use_amp is refused with a warning, not a crash; an update
on real fragments moves the parameters and reports finite metrics."""

import logging
import math

import torch

from mso.config import load
from mso.trainer.learner import Learner
from tests.trainer import ddp_rank


def test_use_amp_on_a_cpu_warns_and_trains_in_full_precision(redis_server, tmp_path, caplog):
    cfg = load("cartpole", ["train_config.use_amp=true", f"rollout_config.fragment_length={ddp_rank.L}",
                            "train_config.context_length=4"])
    spec = {"session_id": "amp1", "redis_url": redis_server.url, "config_name": "cartpole",
            "source_hash": cfg.source_hash, "config_yaml": cfg.to_yaml(), "node_id": "t", "config_source": cfg.source, "log_dir": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="mso.trainer.learner"):
        learner = Learner(spec)
    assert "use_amp=true needs CUDA" in caplog.text
    assert not learner.amp and learner.device.type == "cpu"
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    metrics = learner._update(ddp_rank.fragments(8, "amp1"), warmup=False)
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())
    assert all(p.dtype == torch.float32 for p in learner.policy.parameters())
