"""The trainer service: a gRPC server that runs the PPO learner as Ray Train ranks (or one Ray actor)."""
