"""The Redis key layout. Everything of a session lives under mso:s:{session_id}:, so sessions never mix."""

from __future__ import annotations

from dataclasses import dataclass

CURRENT_SESSION = "mso:session:current"
NODES = "mso:nodes"                      # set of node ids ever registered
GROUP = "learners"                       # the trainer ranks' consumer group on the fragment stream


def node(node_id: str) -> str:
    """Heartbeat key of a node: a msgpack record that expires when the node stops refreshing it."""
    return f"mso:node:{node_id}"


@dataclass(frozen=True)
class SessionKeys:
    session_id: str

    def _k(self, suffix: str) -> str:
        return f"mso:s:{self.session_id}:{suffix}"

    @property
    def record(self) -> str:          # hash: config_yaml, config_name, module, source_hash, phase, error
        return self._k("record")

    @property
    def fragments(self) -> str:       # stream of encoded fragments
        return self._k("fragments")

    @property
    def room_channel(self) -> str:    # pub/sub: a trainer rank retired entries, so the stream has room again
        return self._k("fragments:room")

    @property
    def ledger(self) -> str:          # hash of counters: produced, consumed, dropped_stale, ...
        return self._k("ledger")

    @property
    def produced_by_node(self) -> str:  # hash: rollout node id -> fragments it produced
        return self._k("produced-by-node")

    @property
    def uses(self) -> str:            # hash: stream entry id -> times a trainer has used it (replay reuse)
        return self._k("uses")

    @property
    def episodes(self) -> str:        # capped stream of finished-episode statistics
        return self._k("episodes")

    @property
    def achievements(self) -> str:    # hash: episodes that reported achievements, and each one's unlock count
        return self._k("achievements")

    @property
    def trainer(self) -> str:         # hash: the trainer's latest status
        return self._k("trainer")

    @property
    def trainer_lease(self) -> str:   # the node id of the one trainer node that trains the session (TTL)
        return self._k("trainer:lease")

    @property
    def weights_latest(self) -> str:  # msgpack pointer to the newest published version
        return self._k("weights:latest")

    @property
    def weights_channel(self) -> str:  # pub/sub notification of a new version
        return self._k("weights:new")

    def weights_chunk(self, version: int, index: int) -> str:
        return self._k(f"weights:{version}:{index}")
