"""Cutting an env slot's step stream into fragments (MineStudio's alignment, reference §3.2/§4.1).

A step record holds o_t, the agent's a_t (with its behaviour log-prob and value) and the reward/done flags
of the transition that *led to* o_t. A fragment of L steps is cut when L+1 records exist: record L supplies
r_{L-1}, next_done_{L-1} and next_obs = o_L, and then becomes step 0 of the next fragment, so fragments of
one slot tile its stream exactly. When a slot's stream breaks (env restart, stale partial buffer) the
partial buffer is dropped and the next fragment says contiguous=False, so GAE never chains across the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.shared.fragment import Fragment
from services.shared.trees import stack


@dataclass
class Step:
    obs: object                 # tree of arrays: o_t
    state: list | None          # recurrent state before o_t (kept only for a fragment's step 0)
    action: object              # tree of arrays: a_t
    logp: float                 # behaviour log pi(a_t | o_t)
    last_reward: float
    last_terminated: bool
    last_truncated: bool
    version: int                # model version that chose a_t
    last_truncation_value: float = 0.0  # V(final obs) of the episode a time limit just cut (0 otherwise)


class FragmentCutter:
    """Accumulates one env slot's steps and returns a fragment every fragment_length steps."""

    def __init__(self, session_id: str, slot_id: str, fragment_length: int):
        self.session_id = session_id
        self.slot_id = slot_id
        self.length = fragment_length
        self.buffer: list[Step] = []
        self.seq = 0
        self.contiguous = True

    def drop(self) -> int:
        """Discard the partial buffer (the stream broke); returns how many steps were lost."""
        lost = len(self.buffer)
        self.buffer = []
        self.contiguous = False
        return lost

    def needs_state(self) -> bool:
        """Whether the next step will start a fragment (then its in-state must be recorded)."""
        return len(self.buffer) in (0, self.length)

    def add(self, step: Step) -> Fragment | None:
        self.buffer.append(step)
        if len(self.buffer) <= self.length:
            return None
        steps, nxt = self.buffer[:self.length], self.buffer[self.length]
        fragment = self._build(steps, nxt)
        self.buffer = [nxt]
        return fragment

    def _build(self, steps: list[Step], nxt: Step) -> Fragment:
        following = steps[1:] + [nxt]
        versions = np.array([s.version for s in steps], dtype=np.int64)
        fragment = Fragment(
            session_id=self.session_id, slot=self.slot_id, seq=self.seq, contiguous=self.contiguous,
            version_first=int(versions[0]), obs=stack([s.obs for s in steps]), action=stack([s.action for s in steps]),
            next_obs=nxt.obs, in_state=steps[0].state,
            reward=np.array([s.last_reward for s in following], dtype=np.float32),
            first=np.array([s.last_terminated or s.last_truncated for s in steps], dtype=bool),
            next_done=np.array([s.last_terminated or s.last_truncated for s in following], dtype=bool),
            next_truncated=np.array([s.last_truncated for s in following], dtype=bool),
            truncation_value=np.array([s.last_truncation_value for s in following], dtype=np.float32),
            logp=np.array([s.logp for s in steps], dtype=np.float32), model_version=versions)
        self.seq += 1
        self.contiguous = True
        return fragment
