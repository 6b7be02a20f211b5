"""Cutting an env slot's step stream into fragments (MineStudio's alignment, reference §3.2/§4.1).

A step record holds o_t, the agent's a_t (with its behaviour log-prob and value) and the reward/done flags
of the transition that *led to* o_t. A fragment of L steps is cut when L+1 records exist: record L supplies
r_{L-1}, next_done_{L-1} and next_obs = o_L, and then becomes step 0 of the next fragment, so fragments of
one slot tile its stream exactly. When a slot's stream breaks (env restart, stale partial buffer) the
partial buffer is dropped and the next fragment says contiguous=False, so GAE never chains across the gap.

A worker's slots finish their fragments in the same step, so the ready ones of a batch are built together, as
one Fragments record with every field stacked: that is what crosses to the sender process, which splits it.
Built and pickled one by one, a CartPole worker's 8 fragments cost 320 us every 16 steps of the stepping
thread (more than a tenth of its time); together, about 100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.shared.fragment import Fragment
from services.shared.trees import stack, tree_map, unstack


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

    def add(self, step: Step) -> bool:
        """Append a step; whether a fragment is now ready (cut takes it). A worker appends a step when its
        observation arrives and sets its action, log-prob, version and (starts_fragment) in-state once chosen:
        the fragment the step completes needs none of them."""
        self.buffer.append(step)
        return len(self.buffer) > self.length

    def starts_fragment(self) -> bool:
        """Whether the newest step is step 0 of a fragment (its in-state is the fragment's). Asked after cut."""
        return len(self.buffer) == 1


@dataclass
class Fragments:
    """The fragments of several slots of one worker, cut in the same step: every Fragment field, stacked along
    a new axis 0 (one entry per fragment), except the recurrent in-states, which are kept one per fragment."""
    session_id: str
    slots: list[str]
    seqs: list[int]
    contiguous: list[bool]
    in_states: list
    obs: object                 # tree of (K, L, ...) arrays
    action: object
    next_obs: object            # tree of (K, ...) arrays
    reward: np.ndarray          # (K, L), and so on: Fragment's per-step fields
    first: np.ndarray
    next_done: np.ndarray
    next_truncated: np.ndarray
    truncation_value: np.ndarray
    logp: np.ndarray
    model_version: np.ndarray

    def __len__(self) -> int:
        return len(self.slots)

    def split(self) -> list[Fragment]:
        k = len(self)
        return [Fragment(session_id=self.session_id, slot=self.slots[i], seq=self.seqs[i],
                         contiguous=self.contiguous[i], version_first=int(self.model_version[i, 0]), obs=obs,
                         action=action, next_obs=next_obs, in_state=self.in_states[i], reward=self.reward[i],
                         first=self.first[i], next_done=self.next_done[i], next_truncated=self.next_truncated[i],
                         truncation_value=self.truncation_value[i], logp=self.logp[i],
                         model_version=self.model_version[i])
                for i, obs, action, next_obs in zip(range(k), unstack(self.obs, k), unstack(self.action, k),
                                                    unstack(self.next_obs, k))]


def cut(cutters: list[FragmentCutter]) -> Fragments:
    """Take the ready fragment of each cutter (cutters of one worker: one length, one observation shape); the
    last step of each stays as step 0 of its next fragment."""
    k, length = len(cutters), cutters[0].length
    steps = [s for c in cutters for s in c.buffer[:length]]   # fragment after fragment, K x L
    nxt = [c.buffer[length] for c in cutters]
    # Step t's reward and done flags arrive with step t + 1.
    following = [s for c in cutters for s in c.buffer[1:length + 1]]

    def per_step(values, dtype):
        return np.array(values, dtype=dtype).reshape(k, length)

    def per_step_trees(trees):
        return tree_map(lambda a: a.reshape(k, length, *a.shape[1:]), stack(trees))

    fragments = Fragments(
        session_id=cutters[0].session_id, slots=[c.slot_id for c in cutters], seqs=[c.seq for c in cutters],
        contiguous=[c.contiguous for c in cutters], in_states=[c.buffer[0].state for c in cutters],
        obs=per_step_trees([s.obs for s in steps]), action=per_step_trees([s.action for s in steps]),
        next_obs=stack([s.obs for s in nxt]),
        reward=per_step([s.last_reward for s in following], np.float32),
        first=per_step([s.last_terminated or s.last_truncated for s in steps], bool),
        next_done=per_step([s.last_terminated or s.last_truncated for s in following], bool),
        next_truncated=per_step([s.last_truncated for s in following], bool),
        truncation_value=per_step([s.last_truncation_value for s in following], np.float32),
        logp=per_step([s.logp for s in steps], np.float32),
        model_version=per_step([s.version for s in steps], np.int64))
    for c, n in zip(cutters, nxt):
        c.buffer, c.seq, c.contiguous = [n], c.seq + 1, True
    return fragments
