"""configs/gate_kl, the Minecraft entry point: it loads and validates here, and what it cannot have here (the
simulator engine, a VPT model) is an error naming it, never MinecraftSim's stdin prompt."""

import pytest

from services.shared import minestudio
from services.shared.config import load


def test_gate_kl_resolves_with_the_reference_values():
    cfg = load("gate_kl", []).cfg
    assert cfg.rollout_config.fragment_length == 256 and cfg.train_config.kl_divergence_coef_rho == 0.2
    assert cfg.train_config.context_length == 64 and cfg.rollout_config.worker_config.num_envs == 16


def test_a_missing_engine_is_an_error_naming_where_it_was_looked_for(monkeypatch, tmp_path):
    from configs import gate_kl

    monkeypatch.setenv("MINESTUDIO_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=f"engine at {tmp_path}/engine/build/libs/mcprec-6.13.jar"):
        gate_kl.env_generator()


def test_the_vpt_comes_from_mso_vpt_model(monkeypatch, tmp_path, tiny_model_file):
    from configs import gate_kl

    monkeypatch.delenv("MSO_VPT_MODEL", raising=False)
    with pytest.raises(RuntimeError, match="set MSO_VPT_MODEL"):
        gate_kl.policy_generator()
    monkeypatch.setenv("MSO_VPT_MODEL", str(tiny_model_file))
    monkeypatch.setenv("MSO_VPT_WEIGHTS", str(tmp_path / "absent.weights"))
    with pytest.raises(FileNotFoundError, match="absent.weights"):
        gate_kl.policy_generator()
    monkeypatch.delenv("MSO_VPT_WEIGHTS")
    assert isinstance(gate_kl.policy_generator(), minestudio._VPTFirst)
