"""A config module whose online_dict is a literal, so `mso run` reads it without running the module, and whose
top-level code then fails: the actors that run it must stop the session with the module's own error."""

from configs.cartpole import env_generator, policy_generator  # noqa: F401

online_dict = {
    "rollout_config": {"num_rollout_workers": 1, "num_gpus_per_worker": 0, "fragment_length": 16,
                       "worker_config": {"num_envs": 8, "batch_size": 8, "envs_per_process": 0}},
    "train_config": {"num_gpus_per_worker": 0, "num_iterations": 2, "batch_size_per_gpu": 16, "batches_per_iteration": 1,
                     "context_length": 16, "gradient_accumulation": 1},
}

raise RuntimeError("stand-in: this module fails wherever it runs")
