"""The rollout service: a gRPC server that runs a RolloutManager and RolloutWorker Ray actors."""
