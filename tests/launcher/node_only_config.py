"""A config module that runs where it is launched but not in a node's actors: a stand-in for a node that lacks
a package the module imports (its simulator's)."""

import ray

from configs.cartpole import env_generator, online_dict, policy_generator  # noqa: F401

if ray.is_initialized():  # in a Ray actor: a node's rollout worker or learner
    raise ImportError("stand-in: the simulator's package is not installed on this node")
