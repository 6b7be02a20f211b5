"""A config module whose env never starts: a stand-in for a simulator that hangs while booting."""

import time

from configs.cartpole import online_dict, policy_generator  # noqa: F401


def env_generator():
    time.sleep(3600)
