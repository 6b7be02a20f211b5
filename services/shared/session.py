"""The session record and the node registry in Redis.

A session record holds the resolved config (YAML), the config module's name and the hash of its source;
a node that joins imports the module itself and refuses to join when its source differs. Each service node
keeps a heartbeat key that expires when the node dies, which is how the launcher lists live nodes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

import msgpack
import redis

from services.shared import keys
from services.shared.config import LoadedConfig, from_yaml, import_verified

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 2.0
HEARTBEAT_TTL = 10


class SessionError(LookupError):
    """An unknown session, or a node that cannot join it; the message says which and why."""


SESSION_ID = re.compile(r"[0-9a-f]{1,64}")


def valid_id(session_id: str) -> bool:
    """Session ids are short lowercase hex strings; anything else is a malformed request, not a lookup."""
    return bool(SESSION_ID.fullmatch(session_id))


def create(client: redis.Redis, loaded: LoadedConfig) -> str:
    session_id = uuid.uuid4().hex[:12]
    client.hset(keys.SessionKeys(session_id).record, mapping={
        "config_name": loaded.name, "config_yaml": loaded.to_yaml(), "source_hash": loaded.source_hash,
        "source": loaded.source, "created": time.time(), "phase": "SESSION_PHASE_STARTING_ROLLOUTS", "error": ""})
    client.set(keys.CURRENT_SESSION, session_id)
    return session_id


def read(client: redis.Redis, session_id: str) -> dict[str, str]:
    record = client.hgetall(keys.SessionKeys(session_id).record)
    if not record:
        raise SessionError(f"no session {session_id!r} in Redis")
    return {k.decode(): v.decode() for k, v in record.items()}


def current(client: redis.Redis) -> str | None:
    sid = client.get(keys.CURRENT_SESSION)
    return sid.decode() if sid else None


def update(client: redis.Redis, session_id: str, **fields) -> None:
    client.hset(keys.SessionKeys(session_id).record, mapping={k: str(v) for k, v in fields.items()})


def join(client: redis.Redis, session_id: str):
    """(record, resolved config) for a node joining session_id, once this node's copy of the config module
    passed the allow-list and its bytes matched the session's source hash (config.import_verified); raises
    config.ConfigError (SourceMismatch when the copy differs) otherwise."""
    record = read(client, session_id)
    import_verified(record["config_name"], record["source_hash"])
    return record, from_yaml(record["config_yaml"])


class Heartbeat:
    """Refreshes a node's registry entry every HEARTBEAT_SECONDS from a background thread. `report()` gives
    (state name, session id, fault): what the node is doing, and what is wrong with it right now ("" if
    nothing)."""

    def __init__(self, client: redis.Redis, node_id: str, kind: str, address: str, report):
        self.client, self.node_id, self.kind, self.address, self.report = client, node_id, kind, address, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        state, session_id, fault = self.report()
        entry = {"node_id": self.node_id, "kind": self.kind, "address": self.address, "state": state,
                 "session_id": session_id, "fault": fault, "time": time.time()}
        pipe = self.client.pipeline(transaction=False)
        pipe.set(keys.node(self.node_id), msgpack.packb(entry), ex=HEARTBEAT_TTL)
        pipe.sadd(keys.NODES, self.node_id)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.beat()
            except redis.RedisError:
                pass  # Redis away for a moment: the entry expires if it stays away, which is the truth
            except Exception:  # a report that failed must not end the heartbeat (the node would look dead)
                log.exception("heartbeat of %s", self.node_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.delete(keys.node(self.node_id))
            self.client.srem(keys.NODES, self.node_id)
        except redis.RedisError:
            pass


NODE_FIELDS = {"node_id": str, "kind": str, "address": str, "state": str, "time": (int, float)}


def list_nodes(client: redis.Redis) -> list[dict]:
    """The live nodes' heartbeat records; an unreadable one is skipped (and logged), never fatal."""
    ids = sorted(i.decode(errors="replace") for i in client.smembers(keys.NODES))
    nodes = []
    for node_id, raw in zip(ids, client.mget([keys.node(i) for i in ids]) if ids else []):
        if raw is None:
            client.srem(keys.NODES, node_id)  # expired: the node is gone
            continue
        try:
            entry = msgpack.unpackb(raw)
            bad = [k for k, t in NODE_FIELDS.items() if not isinstance(entry.get(k), t)]
        except Exception as exc:
            entry, bad = None, [f"unreadable ({type(exc).__name__})"]
        if bad:
            log.warning("ignoring the malformed heartbeat of %r: %s", node_id[:80], ", ".join(bad))
            continue
        entry.setdefault("session_id", "")
        entry.setdefault("fault", "")
        nodes.append(entry)
    return nodes
