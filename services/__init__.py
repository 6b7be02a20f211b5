"""mso: MineStudio online RL training as gRPC services (rollout, trainer, launcher) with Redis between them."""
