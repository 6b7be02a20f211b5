"""Checkpoints: thinning keeps exactly the right set, a checkpoint restores everything, and `mso run` with
resume=latest continues at the same iteration and model version."""

import json
import subprocess
import sys

import torch

from services.trainer import checkpoints


def tiny():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_thinning_keeps_multiples_of_keep_interval_and_the_latest(tmp_path):
    model, opt = tiny()
    for iteration in range(5, 55, 5):
        checkpoints.save(tmp_path, iteration, model, opt, {"model_version": iteration})
        checkpoints.thin(tmp_path, keep_interval=20)
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [20, 40, 50]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    checkpoints.thin(tmp_path, keep_interval=0)
    assert [p.name for p in tmp_path.iterdir()] == ["00000050"]


def test_a_checkpoint_restores_model_optimizer_and_state(tmp_path):
    model, opt = tiny()
    path = checkpoints.save(tmp_path / "s1", 7, model, opt, {"model_version": 9, "rho": 0.1,
                                                              "config_source": "online_dict = {}"})
    fresh, fresh_opt = torch.nn.Linear(3, 2), None
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = checkpoints.load(path, fresh, fresh_opt)
    assert state["iteration"] == 7 and state["model_version"] == 9 and state["rho"] == 0.1
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["config_source"] == "online_dict = {}"
    assert not list(path.glob("*.py"))  # the source is kept as text, never as a module to import
    assert checkpoints.latest(tmp_path) == path


def test_mso_run_resumes_at_the_same_iteration_and_version(tmp_path):
    def run(*overrides):
        summary = tmp_path / "summary.json"
        proc = subprocess.run([sys.executable, "-m", "services.cli", "run", "cartpole", f"train_config.save_path={tmp_path}",
                               *overrides, "--port=0", "--quiet", f"--summary={summary}"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(summary.read_text())

    first = run("train_config.num_iterations=6", "train_config.save_interval=3")
    assert first["iterations"] == 6
    (saved,) = [p for p in tmp_path.glob("*/00000006")]
    assert json.loads((saved / "state.json").read_text())["model_version"] == 6
    second = run("train_config.num_iterations=9", "train_config.resume=latest")
    assert second["iterations"] == 9 and second["model_version"] == 9  # 3 more iterations, versions go on
