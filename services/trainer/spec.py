"""What every learner rank is given (it crosses from the trainer node to its Ray actor or Ray Train workers):
the session as the node joined it, where Redis is, the node it trains for, and where to log."""

from __future__ import annotations

from dataclasses import dataclass

from services.shared.session import Joined


@dataclass(frozen=True)
class LearnerSpec:
    joined: Joined
    redis_url: str
    node_id: str        # its consumers are named {node_id}-rank{rank}; the lease names it
    log_dir: str        # TensorBoard (and W&B) logs go under it
