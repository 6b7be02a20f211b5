"""Generalised advantage estimation over fragments, chained across contiguous fragments of one env slot.

For each step t (all values in the return scale, i.e. denormalised):
    nonterminal_t = 1 - next_done_t
    delta_t = r_t + gamma * (V_{t+1} * nonterminal_t + B_t) - V_t
    A_t     = delta_t + gamma * lambda * nonterminal_t * A_{t+1}
    target_t = A_t + V_t                                     (the TD(lambda) return)
B_t is V(final obs) when the episode was cut by a time limit after step t (truncated, not terminated) and 0
otherwise: a truncation bootstraps from the value of the observation it cut at, a termination does not.
(The reference reports time limits as terminations, so it never bootstraps them.) The rollout worker
values the final observation with the behaviour policy, as the learner never sees it.

At the end of a chain, V_{t+1} is V(next_obs) of the chain's last fragment and A_{t+1} = 0. Fragments chain
when they come from the same slot, their sequence numbers are consecutive and the later one says it is
contiguous (no env restart or dropped buffer between them).
"""

from __future__ import annotations

import numpy as np


def chains(slots: list[str], seqs: list[int], contiguous: list[bool]) -> list[list[int]]:
    """Fragment indices grouped into chains, each chain in time order."""
    order = sorted(range(len(slots)), key=lambda i: (slots[i], seqs[i]))
    out: list[list[int]] = []
    for i in order:
        if out and slots[out[-1][-1]] == slots[i] and seqs[out[-1][-1]] + 1 == seqs[i] and contiguous[i]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def gae(rewards: np.ndarray, values: np.ndarray, next_done: np.ndarray, bootstrap: np.ndarray,
        chain_list: list[list[int]], gamma: float, lam: float,
        cut_values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """rewards, values, next_done: (N, T); bootstrap: (N,) V(next_obs); cut_values: (N, T) B_t (None: no
    truncations). Returns advantages and targets (N, T)."""
    n, t_len = rewards.shape
    # The recursion runs on Python floats (float64, as numpy's scalars would): a numpy scalar's arithmetic
    # costs several times a float's, and this loop visits every step of every iteration's batch.
    r_rows, v_rows = rewards.tolist(), values.tolist()
    nt_rows = (1.0 - next_done.astype(np.float64)).tolist()
    b_rows = [[0.0] * t_len] * n if cut_values is None else cut_values.astype(np.float64).tolist()
    adv_rows = [[0.0] * t_len for _ in range(n)]
    for chain in chain_list:
        a_next, v_next = 0.0, float(bootstrap[chain[-1]])
        for i in reversed(chain):
            r, v, nt, b, a = r_rows[i], v_rows[i], nt_rows[i], b_rows[i], adv_rows[i]
            for t in range(t_len - 1, -1, -1):
                delta = r[t] + gamma * (v_next * nt[t] + b[t]) - v[t]
                a_next = delta + gamma * lam * nt[t] * a_next
                a[t] = a_next
                v_next = v[t]
    adv = np.array(adv_rows, dtype=np.float64)
    return adv.astype(np.float32), (adv + values).astype(np.float32)
