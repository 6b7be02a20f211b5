"""The learner's optimizer (services/trainer/optim.py): it steps exactly as torch.optim.AdamW, shares its
checkpoints both ways, and a learner that warms, trains, checkpoints and resumes never imports torch._dynamo
(1.0-1.2 CPU-s that torch.optim's own AdamW paid on the path to a run's first update)."""

import copy
import json
import subprocess
import sys
import textwrap

import torch

from services.trainer.optim import AdamW


def step_both(models, optimizers, seed):
    for model, optimizer in zip(models, optimizers):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def test_it_steps_exactly_as_torch_adamw_and_their_checkpoints_load_into_each_other():
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    torch_model = copy.deepcopy(ours_model)
    kwargs = dict(lr=3e-3, weight_decay=0.05, eps=1e-5, fused=True)
    ours, theirs = AdamW(ours_model.parameters(), **kwargs), torch.optim.AdamW(torch_model.parameters(), **kwargs)
    models, optimizers = (ours_model, torch_model), (ours, theirs)
    initial = ours_model[0].weight.detach().clone()
    for seed in range(4):
        step_both(models, optimizers, seed)
    for optimizer in optimizers:  # annealed as ppo.anneal_lr does
        optimizer.param_groups[0]["lr"] = 1e-3
    for seed in range(4, 8):
        step_both(models, optimizers, seed)
    assert all(torch.equal(a, b) for a, b in zip(ours_model.parameters(), torch_model.parameters()))
    assert not torch.equal(ours_model[0].weight, initial)  # they moved, and alike

    # Their states swapped: each goes on from the other's, still in step.
    ours_state, torch_state = ours.state_dict(), theirs.state_dict()
    assert ours_state["param_groups"] == torch_state["param_groups"]
    ours.load_state_dict(torch_state)
    theirs.load_state_dict(ours_state)
    for seed in range(8, 10):
        step_both(models, optimizers, seed)
    assert all(torch.equal(a, b) for a, b in zip(ours_model.parameters(), torch_model.parameters()))
    assert int(ours.state_dict()["state"][0]["step"]) == 10


def test_a_learner_warms_trains_checkpoints_and_resumes_without_importing_torch_dynamo(redis_server, tmp_path):
    script = textwrap.dedent("""
        import json, pathlib, sys, types
        from services.shared.redis_server import connect
        from services.trainer import learner as learner_module
        from tests.trainer.test_learner import make_spec, produce
        server, tmp = types.SimpleNamespace(url=sys.argv[1]), pathlib.Path(sys.argv[2])
        learner_module.warm()
        produce(connect(server.url), "nodynamo", 2)
        saved = [f"train_config.save_path={tmp / 'ck'}"]
        learner = learner_module.Learner(make_spec(server, tmp, "nodynamo", "train_config.num_iterations=2",
                                                   "train_config.save_interval=1", *saved))
        result = learner.run()
        resumed = learner_module.Learner(make_spec(server, tmp, "nodynamo2", "train_config.resume=latest", *saved))
        print(json.dumps({"iterations": result["iterations"], "resumed_at": resumed.start_iteration,
                          "optimizer_steps": int(resumed.optimizer.state_dict()["state"][0]["step"]),
                          "dynamo": "torch._dynamo" in sys.modules}))
    """)
    out = subprocess.run([sys.executable, "-c", script, redis_server.url, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["iterations"] == 2 and result["resumed_at"] == 2 and result["optimizer_steps"] > 0
    assert result["dynamo"] is False
