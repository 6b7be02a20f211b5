"""The fragment: `fragment_length` consecutive steps of one env slot, the record that crosses from a rollout
worker to the trainer through the Redis stream. The one owner of its fields (Fragment), its encoding (the
codec's: a msgpack header and raw arrays, never pickle) and its validation (Checker): rollout/fragments.py
builds it, queue.py carries it, the trainer's replay checks it and the learner reads it.

A Checker is what a trainer runs on every decoded entry before it is trusted: anything read from Redis may be
foreign (another session, another model) or crafted, and must become a counted drop, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from services.shared.codec import CodecError, encode


@dataclass
class Fragment:
    """L = fragment_length steps; a tree is nested dicts and lists of arrays."""
    session_id: str
    slot: str                   # the env slot: node, worker and env
    seq: int                    # its number among the slot's fragments, from 0
    contiguous: bool            # false after a break of the slot's stream (an env restart): GAE must not chain
    version_first: int          # the model version that chose step 0 (staleness is measured from it)
    obs: object                 # tree of (L, ...) arrays: o_t
    action: object              # tree of (L, ...) arrays: the behaviour policy's a_t
    next_obs: object            # tree of (...) arrays: o_L, which bootstraps the last step
    in_state: object            # tree of arrays: the recurrent state before o_0
    reward: np.ndarray          # (L,) float32: r_t, the reward of a_t
    first: np.ndarray           # (L,) bool: o_t starts an episode
    next_done: np.ndarray       # (L,) bool: the episode ended after a_t
    next_truncated: np.ndarray  # (L,) bool: ... by a time limit
    truncation_value: np.ndarray  # (L,) float32: V(final obs) where a time limit cut the episode, else 0
    logp: np.ndarray            # (L,) float32: log mu(a_t | o_t) of the behaviour policy
    model_version: np.ndarray   # (L,) int64: the version that chose each action

    def encode(self) -> bytes:
        return encode({f.name: getattr(self, f.name) for f in fields(self)})

FIELDS = [f.name for f in fields(Fragment)]
PER_STEP = {"reward": np.float32, "truncation_value": np.float32, "logp": np.float32, "first": np.bool_,
            "next_done": np.bool_, "next_truncated": np.bool_, "model_version": np.int64}
FINITE = ("reward", "truncation_value", "logp")
TREES = ("obs", "action", "next_obs", "in_state")


def signature(tree):
    """The structure, dtypes and shapes of a tree of arrays, comparable with ==. A rollout worker takes the
    signature of every observation (8 a CartPole batch): dtype objects, not their `.str` (a property that
    builds a string each time)."""
    if isinstance(tree, np.ndarray):
        return (tree.dtype, tree.shape)
    if isinstance(tree, dict):
        return tuple(sorted([(str(k), signature(v)) for k, v in tree.items()]))
    if isinstance(tree, (list, tuple)):
        return tuple([signature(v) for v in tree])
    a = np.asarray(tree)
    return (a.dtype, a.shape)


def _leaves(tree, out: list) -> list:
    if isinstance(tree, dict):
        for v in tree.values():
            _leaves(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _leaves(v, out)
    else:
        out.append(tree)
    return out


def _int(fragment: dict, name: str, minimum: int | None = 0) -> None:
    value = fragment[name]
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        raise CodecError(f"fragment field {name} is {value!r:.40}, expected an integer >= {minimum}")


class Checker:
    """Checks decoded entries against the fragment contract of one session, and against the first
    fragment it accepted: every accepted fragment has the same observation, action and state layout, and
    the state that of the trainer's policy (`state_signature`, when known), so a batch can always be built.
    A rollout node with another model or another env fails here, not in the learner."""

    def __init__(self, session_id: str, length: int, state_signature=None):
        self.session_id, self.length = session_id, length
        self.state_signature = state_signature
        self.layout = None  # per-step signatures of obs, action; next_obs; in_state of the first accepted

    def check(self, fragment) -> Fragment:
        """The Fragment a decoded entry holds, or CodecError naming the first thing wrong with it."""
        if not isinstance(fragment, dict):
            raise CodecError(f"fragment is a {type(fragment).__name__}, not a dict")
        missing = [f for f in FIELDS if f not in fragment]
        if missing:
            raise CodecError(f"fragment lacks {', '.join(missing)}")
        if fragment["session_id"] != self.session_id:
            raise CodecError(f"fragment of session {fragment['session_id']!r:.80} in session {self.session_id!r}")
        if not isinstance(fragment["slot"], str) or not 0 < len(fragment["slot"]) <= 256:
            raise CodecError(f"fragment slot {fragment['slot']!r:.40} is not a string of 1-256 characters")
        _int(fragment, "seq")
        _int(fragment, "version_first")
        if not isinstance(fragment["contiguous"], bool):
            raise CodecError(f"fragment field contiguous is {fragment['contiguous']!r:.40}, expected a bool")
        n = self.length
        for name, dtype in PER_STEP.items():
            a = fragment[name]
            if not isinstance(a, np.ndarray) or a.shape != (n,) or a.dtype != dtype:
                raise CodecError(f"fragment field {name} is {_describe(a)}, expected ({n},) {np.dtype(dtype)}")
        for name in FINITE:
            if not np.isfinite(fragment[name]).all():
                raise CodecError(f"fragment field {name} holds a NaN or an infinity")
        for name in TREES:
            leaves = _leaves(fragment[name], [])
            if not all(isinstance(a, np.ndarray) for a in leaves):
                raise CodecError(f"fragment field {name} has a leaf that is not an array")
            if name in ("obs", "action") and (not leaves or any(a.ndim == 0 or a.shape[0] != n for a in leaves)):
                raise CodecError(f"fragment field {name} needs arrays of {n} steps, has "
                                 f"{[a.shape for a in leaves][:4]}")
        layout = (_strip_time(fragment["obs"]), _strip_time(fragment["action"]), signature(fragment["next_obs"]),
                  signature(fragment["in_state"]))
        if layout[2] != layout[0]:
            raise CodecError("fragment field next_obs differs in layout from a step of obs")
        if self.state_signature is not None and layout[3] != self.state_signature:
            raise CodecError(f"fragment in_state {_short(layout[3])} is not the trainer policy's state "
                             f"{_short(self.state_signature)} (a rollout node with another model?)")
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            which = [name for name, a, b in zip(("obs", "action", "next_obs", "in_state"), layout, self.layout)
                     if a != b]
            raise CodecError(f"fragment {', '.join(which)} differ in layout from the session's first fragment "
                             f"(a rollout node with another env or model?)")
        return Fragment(**{name: fragment[name] for name in FIELDS})


def _strip_time(tree):
    """The signature of a tree of (L, ...) arrays as of one step."""
    if isinstance(tree, dict):
        return tuple(sorted((str(k), _strip_time(v)) for k, v in tree.items()))
    if isinstance(tree, (list, tuple)):
        return tuple(_strip_time(v) for v in tree)
    return (tree.dtype, tree.shape[1:])


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.shape} {a.dtype}"
    return f"a {type(a).__name__}"


def _short(sig) -> str:
    text = repr(sig)
    return text if len(text) <= 120 else text[:117] + "..."
