"""Fragments for tests: a valid Fragment with every field filled unless given, and raw entries written as a
foreign or hostile producer would (bypassing the Fragment record)."""

from __future__ import annotations

import numpy as np

from services.shared import keys
from services.shared.codec import encode
from services.shared.fragment import Fragment


def make(session_id: str = "s1", length: int = 4, slot: str = "a", seq: int = 0, version: int = 0,
         contiguous: bool = True, **fields) -> Fragment:
    z = np.zeros(length, dtype=np.float32)
    values = dict(session_id=session_id, slot=slot, seq=seq, contiguous=contiguous, version_first=version,
                  obs={"x": np.full((length, 2), seq, dtype=np.float32)}, action=np.zeros(length, dtype=np.int64),
                  next_obs={"x": np.zeros(2, dtype=np.float32)}, in_state=[], reward=z, first=np.zeros(length, bool),
                  next_done=np.zeros(length, bool), next_truncated=np.zeros(length, bool), truncation_value=z,
                  logp=z, model_version=np.full(length, version, dtype=np.int64))
    values.update(fields)
    return Fragment(**values)


def tree(fragment: Fragment) -> dict:
    """A fragment's fields as the plain tree an entry decodes to."""
    return {name: getattr(fragment, name) for name in fragment.__dataclass_fields__}


def push_raw(client, session_id: str, trees: list) -> None:
    """Entries some other writer put in the session's stream, counted as produced as the producer would."""
    sk = keys.SessionKeys(session_id)
    for t in trees:
        client.xadd(sk.fragments, {b"f": encode(t)})
    client.hincrby(sk.ledger, "produced", len(trees))
