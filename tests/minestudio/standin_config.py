"""A config module for the MineStudio tests: a tiny randomly initialised VPTPolicy from minestudio (the real
class, built as MineStudio's configs build it, with small kwargs) on MinecraftStandIn, a stand-in for
MinecraftSim (named as such: the Minecraft engine cannot run here). The stand-in has MinecraftSim's shapes:
{"image": uint8 (128,128,3)} observations and the agent action dict {"buttons": (1,), "camera": (1,)}."""

import gymnasium as gym
import numpy as np
import torch

from services.shared.minestudio import vpt_module

EPISODE_LENGTH = 12   # longer than a fragment (8): episodes start inside fragments
NO_CAMERA_MOVE = 60   # MineStudio's camera index for no movement (11x11 mu-law bins)
TINY_VPT = dict(attention_heads=4, attention_mask_style="clipped_causal", attention_memory_size=24,
                diff_mlp_embedding=False, hidsize=64, img_shape=[128, 128, 3], impala_chans=[16, 32, 32],
                impala_kwargs={"post_pool_groups": 1}, impala_width=1,
                init_norm_kwargs={"batch_norm": False, "group_norm_groups": 1}, n_recurrence_layers=1,
                only_img_input=True, pointwise_ratio=4, pointwise_use_activation=False, recurrence_is_residual=True,
                recurrence_type="transformer", timesteps=8, use_pointwise_layer=True, use_pre_lstm_ln=False)


class MinecraftStandIn(gym.Env):
    """Stand-in for MinecraftSim: a textured 128x128 frame that pans with the camera action; reward 1 for
    each step that looks left (camera index below NO_CAMERA_MOVE); episodes end after EPISODE_LENGTH steps.
    An action not in VPT's format raises, so a wrongly shaped action cannot pass unnoticed."""

    observation_space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (128, 128, 3), np.uint8)})
    action_space = gym.spaces.Dict({"buttons": gym.spaces.MultiDiscrete([8641]),
                                    "camera": gym.spaces.MultiDiscrete([121])})

    def __init__(self):
        self.texture = np.random.default_rng(0).integers(0, 256, (128, 256, 3), dtype=np.uint8)
        self.t, self.pan = 0, 0

    def _obs(self):
        return {"image": np.ascontiguousarray(np.roll(self.texture, self.pan, axis=1)[:, :128])}

    def reset(self, seed=None, options=None):
        self.t, self.pan = 0, 0
        return self._obs(), {}

    def step(self, action):
        if set(action) != {"buttons", "camera"} or np.shape(action["buttons"]) != (1,) \
                or np.shape(action["camera"]) != (1,):
            raise ValueError(f"not a VPT agent action: { {k: np.shape(v) for k, v in action.items()} }")
        camera = int(action["camera"][0])
        if not (0 <= int(action["buttons"][0]) < 8641 and 0 <= camera < 121):
            raise ValueError(f"action index out of range: {action}")
        self.t += 1
        self.pan += camera // 11 - 5   # the horizontal camera bin: -5..5
        return self._obs(), float(camera < NO_CAMERA_MOVE), self.t >= EPISODE_LENGTH, False, {}


def env_generator():
    return MinecraftStandIn()


def policy_generator():
    torch.set_num_threads(1)
    return vpt_module().VPTPolicy(policy_kwargs=TINY_VPT, temperature=2.0)


online_dict = {
    "rollout_config": {
        "num_rollout_workers": 1,
        "num_gpus_per_worker": 0,
        "fragment_length": 8,
        "worker_config": {"num_envs": 2, "batch_size": 2, "restart_interval": None, "videos_per_worker": 1},
        "replay_buffer_config": {"max_staleness": 2, "max_reuse": 1},
        "max_pending_fragments": 64,
    },
    "train_config": {
        "num_workers": 1,
        "num_gpus_per_worker": 0,
        "num_iterations": 3,
        "learning_rate": 1e-4,
        "batch_size_per_gpu": 2,
        "batches_per_iteration": 1,
        "gradient_accumulation": 1,
        "epochs_per_iteration": 1,
        "context_length": 4,          # two chunks per fragment: the state is carried between them
        "discount": 0.99,
        "kl_divergence_coef_rho": 0.2,  # builds the frozen reference policy: pi_head.kl_divergence is used
        "use_normalized_vf": True,    # the value head's EWMA normaliser is used
        "record_video_interval": 1,
        "save_interval": 0,
    },
}
