"""A counter's rate over a trailing window: the env steps/s a user reads in `mso run`'s progress line, `mso top`,
GetSession and the rollout service's GetStatus. Env steps are counted a fragment at a time (Crafter's built-in
config: 64 steps each, a few fragments at once), so a rate over the last second alone read 0, 254, 510 or 764
steps/s for a steady 500; over WINDOW seconds it holds within a tenth of the truth."""

from __future__ import annotations

import time
from collections import deque

WINDOW = 10.0  # seconds


class Rate:
    """Feed it the counter whenever it is read; it answers the counter's rate over the last WINDOW seconds (over
    what it has seen, when that is shorter; 0 before a second of history)."""

    def __init__(self, window: float = WINDOW):
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()  # (when, count), oldest first

    def update(self, count: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        samples = self.samples
        if samples and count < samples[-1][1]:
            samples.clear()  # a counter that went back is a new one (a restarted service): no negative rate
        samples.append((now, count))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()
        then, before = samples[0]
        return (count - before) / (now - then) if now - then >= 1.0 else 0.0
