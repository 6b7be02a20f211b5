"""Operations on trees: nested dicts and lists whose leaves are arrays. Observations, actions and recurrent
states are trees (MineStudio's are dicts of arrays; its VPT state is a list), and every part of mso handles
them through these functions."""

from __future__ import annotations

import numpy as np


def tree_map(fn, tree):
    """The same tree with fn applied to every leaf."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [tree_map(fn, v) for v in tree]
    return fn(tree)


def leaves(tree) -> list:
    """The tree's leaves, in tree_map's order."""
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in leaves(v)]
    return [tree]


def stack(trees: list, leaf_stack=np.array):
    """Trees of the same structure -> one tree whose leaves are the leaves stacked along a new axis 0. By
    default np.array, which stacks arrays of one shape as np.stack does (and refuses others as it does) at a
    third of its cost: a rollout worker stacks every batch's observations and every fragment's steps."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: stack([t[k] for t in trees], leaf_stack) for k in first}
    if isinstance(first, (list, tuple)):
        return [stack([t[i] for t in trees], leaf_stack) for i in range(len(first))]
    return leaf_stack([np.asarray(t) for t in trees])


def unstack(tree, n: int) -> list:
    """stack's inverse: one tree whose leaves have n entries along axis 0 -> n trees of those entries."""
    if isinstance(tree, dict):
        parts = {k: unstack(v, n) for k, v in tree.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(n)]
    if isinstance(tree, (list, tuple)):
        parts = [unstack(v, n) for v in tree]
        return [[p[i] for p in parts] for i in range(n)]
    return list(tree)
