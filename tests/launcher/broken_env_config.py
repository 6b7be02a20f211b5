"""A config module whose env_generator raises: a stand-in for a simulator that cannot be built here."""

from configs.cartpole import online_dict, policy_generator  # noqa: F401


def env_generator():
    raise RuntimeError("stand-in simulator: no engine installed")
