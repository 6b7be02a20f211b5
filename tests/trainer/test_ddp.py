"""DDP: two trainer ranks (torch.distributed, gloo) give the same update as one rank on the same fragments:
gradients are averaged, advantage normalisation and the value normaliser are global, the skip guard agrees."""

import multiprocessing as mp

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from services.shared.config import load
from services.shared.ports import free_port
from services.shared.session import Joined
from services.trainer.spec import LearnerSpec
from tests.trainer import ddp_rank

OVERRIDES = ["train_config.use_normalized_vf=true", "train_config.clip_vloss=true", "train_config.epochs_per_iteration=3",
             "train_config.kl_divergence_coef_rho=0.1", "train_config.entropy_bonus_coef=0.01",
             f"rollout_config.fragment_length={ddp_rank.L}", "train_config.context_length=4",
             "train_config.save_interval=0"]
RTOL, ATOL = 1e-4, 1e-5  # two ranks against one: float sums in another order


def spec(redis_url, session_id, batch, tmp_path):
    loaded = load("cartpole", OVERRIDES + [f"train_config.batch_size_per_gpu={batch}"])
    return LearnerSpec(Joined.of(session_id, loaded), redis_url, "ddp-test", str(tmp_path / "runs"))


def test_two_ranks_update_like_one_rank_on_the_same_data(redis_server, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    ctx = mp.get_context("spawn")
    single = ctx.Process(target=ddp_rank.run, args=(0, 1, 0, spec(redis_server.url, "ddp1", 8, tmp_path), 8, str(one)))
    port = free_port()
    ranks = [ctx.Process(target=ddp_rank.run, args=(r, 2, port, spec(redis_server.url, "ddp2", 4, tmp_path), 8, str(two)))
             for r in range(2)]
    for p in [single, *ranks]:
        p.start()
    for p in [single, *ranks]:
        p.join(timeout=240)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    a, b = load_file(one), load_file(two)
    assert set(a) == set(b)
    initial = ddp_rank_initial_state()
    moved = [k for k in a if not torch.equal(a[k], initial[k])]
    assert moved, "the update changed nothing: the comparison would prove nothing"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    explained = [float(safe_open(str(p), "pt").metadata()["explained_var"]) for p in (one, two)]
    assert abs(explained[0] - explained[1]) < 1e-6


def ddp_rank_initial_state():
    from configs import cartpole

    torch.manual_seed(load("cartpole").cfg.seed)
    return {k: v.detach().clone() for k, v in cartpole.policy_generator().state_dict().items()}
