"""MineStudio's gate_kl task (build a nether portal) with a VPT policy: the Minecraft entry point.

Needs, on every rollout and trainer node:
- the Minecraft extra (`make install`, or pip install -e '.[minecraft]' and
  pip install --no-deps minestudio==1.1.6 gym3==0.3.3);
- MineStudio's simulator engine under $MINESTUDIO_DIR (default $TMPDIR/MineStudio), JDK 8 (`java` on PATH)
  and a display (Xvfb) for MinecraftSim;
- MSO_VPT_MODEL: a VPT .model file (e.g. foundation-model-2x.model), and MSO_VPT_WEIGHTS: its .weights
  file (optional: without it the policy starts from random weights).
Anything missing is an error naming it, raised where the env or the policy is built (so `mso config gate_kl`
works without them). Values are MineStudio's gate_kl.py as shipped, except the paths and the GPU counts,
which follow the machine (1 GPU per worker where CUDA is available, else none).
"""

import os
import shutil
from pathlib import Path

import torch

from services.shared.minestudio import INSTALL, load_vpt_policy

ENGINE_JAR = Path("engine", "build", "libs", "mcprec-6.13.jar")  # what MinecraftSim's check_engine looks for
GPUS = 1.0 if torch.cuda.is_available() else 0.0


def _simulator():
    try:
        from minestudio.simulator import MinecraftSim, callbacks
        from minestudio.utils import get_mine_studio_dir
    except ImportError as exc:
        raise RuntimeError(f"gate_kl needs MineStudio's simulator ({exc}); install the Minecraft extra: {INSTALL}") \
            from exc
    # MinecraftSim asks on stdin whether to download a missing engine: inside an env process that would hang,
    # so a missing engine or JDK is an error here instead.
    engine = Path(get_mine_studio_dir()) / ENGINE_JAR
    if not engine.is_file():
        raise RuntimeError(f"gate_kl needs MineStudio's simulator engine at {engine} (set MINESTUDIO_DIR to where it "
                           "is, or download it once: python -c 'from minestudio.simulator.entry import "
                           "download_engine; download_engine()')")
    if shutil.which("java") is None:
        raise RuntimeError("gate_kl needs JDK 8: no `java` on PATH")
    return MinecraftSim, callbacks


def env_generator():
    MinecraftSim, cb = _simulator()
    return MinecraftSim(
        obs_size=(128, 128),
        preferred_spawn_biome="plains",
        callbacks=[
            cb.MaskActionsCallback(inventory=0),
            cb.GateRewardsCallback(),
            cb.FastResetCallback(biomes=["plains"], random_tp_range=1000),
            cb.CommandsCallback(["/give @p minecraft:diamond_pickaxe 1",
                                 "/replaceitem entity @s weapon.offhand minecraft:obsidian 64"]),
            cb.JudgeResetCallback(2400),
            cb.VoxelsCallback(),
        ],
    )


def policy_generator():
    model = os.environ.get("MSO_VPT_MODEL")
    if not model:
        raise RuntimeError("gate_kl needs a VPT model: set MSO_VPT_MODEL to a .model file (and MSO_VPT_WEIGHTS to "
                           "its .weights file) on every rollout and trainer node")
    policy = load_vpt_policy(model, os.environ.get("MSO_VPT_WEIGHTS") or None)
    return policy.to("cuda" if torch.cuda.is_available() else "cpu")


online_dict = {
    "trainer_name": "PPOTrainer",
    "detach_rollout_manager": True,
    "rollout_config": {
        "num_rollout_workers": 2,
        "num_gpus_per_worker": GPUS,
        "num_cpus_per_worker": 1,
        "fragment_length": 256,
        "to_send_queue_size": 8,
        "worker_config": {
            "num_envs": 16,
            "batch_size": 8,
            "restart_interval": 3600,
            "video_fps": 20,
            "video_output_dir": "output/videos/gate_kl",
        },
        "replay_buffer_config": {
            "max_chunks": 4800,
            "max_reuse": 2,
            "max_staleness": 2,
            "fragments_per_report": 40,
            "fragments_per_chunk": 1,
            "database_config": {"path": "output/replay_buffer_cache", "num_shards": 8},
        },
        "episode_statistics_config": {},
    },
    "train_config": {
        "num_workers": 2,
        "num_gpus_per_worker": GPUS,
        "num_iterations": 4000,
        "vf_warmup": 0,
        "learning_rate": 0.00002,
        "anneal_lr_linearly": False,
        "weight_decay": 0.04,
        "adam_eps": 1e-8,
        "batch_size_per_gpu": 1,
        "batches_per_iteration": 200,
        "gradient_accumulation": 10,
        "epochs_per_iteration": 1,
        "context_length": 64,
        "discount": 0.999,
        "gae_lambda": 0.95,
        "ppo_clip": 0.2,
        "clip_vloss": False,
        "max_grad_norm": 5,
        "zero_initial_vf": True,
        "ppo_policy_coef": 1.0,
        "ppo_vf_coef": 0.5,
        "kl_divergence_coef_rho": 0.2,
        "entropy_bonus_coef": 0.0,
        "coef_rho_decay": 0.9995,
        "log_ratio_range": 50,
        "normalize_advantage_full_batch": True,
        "use_normalized_vf": True,
        "num_readers": 4,
        "num_cpus_per_reader": 0.1,
        "prefetch_batches": 2,
        "save_interval": 10,
        "keep_interval": 40,
        "record_video_interval": 2,
        "enable_ref_update": False,
        "resume": None,
        "resume_optimizer": True,
        "save_path": "output/gate_kl",
    },
    "logger_config": {"project": "minestudio_online", "name": "gate_kl"},
}
