"""What the three services share, below them: the contracts of every record that crosses a process (fragment,
episode, trainer status, weights, session, config), the Redis queue and weight store, gRPC plumbing and the
generated protos. Nothing here imports a service."""
