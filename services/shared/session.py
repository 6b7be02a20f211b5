"""The session record and the node registry in Redis: the one owner of both records.

A session record holds the resolved config (YAML), the config module's name, the hash of its bytes and its
source, the phase and why it failed. A node that joins runs its own copy of the module, and only when that
copy's bytes hash the same (config.import_verified). Each service node keeps a heartbeat record that expires
when the node dies, which is how the launcher lists live nodes and what is wrong with each.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import msgpack
import redis

from services.shared import keys
from services.shared.config import ConfigSource, LoadedConfig, from_yaml
from services.shared.schema import OnlineConfig

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 2.0
HEARTBEAT_TTL = 10
SESSION_ID = re.compile(r"[0-9a-f]{1,64}")


class SessionError(LookupError):
    """A session that cannot be used as asked; the message says which and why."""


class SessionNotFound(SessionError):
    """No record of this session in Redis."""


class WrongState(SessionError):
    """A call that does not fit what a node is doing (it runs another session, or none)."""


def valid_id(session_id: str) -> bool:
    """Session ids are short lowercase hex strings; anything else is a malformed request, not a lookup."""
    return bool(SESSION_ID.fullmatch(session_id))


@dataclass
class Record:
    """A session as Redis keeps it (the hash at keys.SessionKeys(id).record)."""
    session_id: str
    config_name: str          # how the launch named the config module
    config_yaml: str          # the resolved config (config.to_yaml)
    source_hash: str          # SHA-256 of the module's bytes
    source: str               # the module's source text, as launched (never executed from here)
    phase: str                # a launcher_pb2.SessionPhase name
    error: str = ""           # why it failed
    created: float = 0.0
    restarts: int = 0         # service processes restarted by `mso run`'s supervision


def create(client: redis.Redis, loaded: LoadedConfig) -> str:
    session_id = uuid.uuid4().hex[:12]
    record = Record(session_id=session_id, config_name=loaded.name, config_yaml=loaded.to_yaml(),
                    source_hash=loaded.source_hash, source=loaded.source, phase="SESSION_PHASE_STARTING_ROLLOUTS",
                    created=time.time())
    client.hset(keys.SessionKeys(session_id).record, mapping={k: str(v) for k, v in asdict(record).items()})
    client.set(keys.CURRENT_SESSION, session_id)
    return session_id


def read(client: redis.Redis, session_id: str) -> Record:
    raw = client.hgetall(keys.SessionKeys(session_id).record)
    if not raw:
        raise SessionNotFound(f"no session {session_id!r} in Redis")
    fields = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
    try:
        return Record(session_id=session_id, config_name=fields["config_name"], config_yaml=fields["config_yaml"],
                      source_hash=fields["source_hash"], source=fields.get("source", ""), phase=fields["phase"],
                      error=fields.get("error", ""), created=float(fields.get("created", 0)),
                      restarts=int(fields.get("restarts", 0)))
    except (KeyError, ValueError) as exc:
        raise SessionError(f"the record of session {session_id!r} is malformed: {exc!r}") from None


def current(client: redis.Redis) -> str | None:
    sid = client.get(keys.CURRENT_SESSION)
    return sid.decode() if sid else None


def update(client: redis.Redis, session_id: str, *, phase: str | None = None, error: str | None = None,
           restarts: int | None = None) -> None:
    fields = {"phase": phase, "error": error, "restarts": restarts}
    client.hset(keys.SessionKeys(session_id).record, mapping={k: str(v) for k, v in fields.items() if v is not None})


@dataclass(frozen=True)
class Joined:
    """A session as a node that joins it knows it: read and checked once, then handed as it is to the node's
    actors and processes (Ray carries it between our own processes; nothing is parsed again)."""
    session_id: str
    cfg: OnlineConfig
    source: ConfigSource      # the config module to run: its name and the SHA-256 of the bytes launched
    source_text: str          # the module's source as launched (kept in checkpoints as text)

    @classmethod
    def of(cls, session_id: str, loaded: LoadedConfig) -> Joined:
        """A session as it would be joined, from a config loaded in this process (benchmarks, tests)."""
        return cls(session_id, loaded.cfg, ConfigSource(loaded.name, loaded.source_hash), loaded.source)


def join(client: redis.Redis, session_id: str) -> Joined:
    """What a node needs to join session_id, once its copy of the config module passed the allow-list and its
    bytes matched the session's. The module is not run here: the node's actors run it (import_verified, the
    same checks again). Raises SessionNotFound, or config.ConfigError (SourceMismatch when this node's copy
    differs)."""
    record = read(client, session_id)
    source = ConfigSource(record.config_name, record.source_hash)
    source.verify()
    return Joined(session_id, from_yaml(record.config_yaml), source, record.source)


@dataclass
class Node:
    """A service node's heartbeat record (keys.node(node_id)), refreshed while the node lives."""
    node_id: str
    kind: str                 # "rollout" or "trainer"
    address: str              # host:port of its gRPC server
    state: str                # a common_pb2.ServiceState name
    time: float               # when it last beat
    session_id: str = ""      # the session it serves, if any
    fault: str = ""           # what is wrong with it right now, if anything

    def serving(self, session_id: str) -> bool:
        """Whether it is starting or running session_id."""
        return self.session_id == session_id and self.state in ("SERVICE_STATE_STARTING", "SERVICE_STATE_RUNNING")


class Heartbeat:
    """Refreshes a node's registry entry every HEARTBEAT_SECONDS from a background thread. `address()` gives
    where others reach the node now; `report()` gives (state name, session id, fault): what the node is doing,
    and what is wrong with it right now ("" if nothing)."""

    def __init__(self, client: redis.Redis, node_id: str, kind: str, address: Callable[[], str], report):
        self.client, self.node_id, self.kind, self.address, self.report = client, node_id, kind, address, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        # A beat reports and writes under this lock: an immediate beat (a Start's) must never be overwritten by
        # a periodic one whose report was taken before it (the registry said IDLE again until the next beat).
        self._beating = threading.Lock()

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        with self._beating:
            state, session_id, fault = self.report()
            entry = Node(self.node_id, self.kind, self.address(), state, time.time(), session_id, fault)
            pipe = self.client.pipeline(transaction=False)
            pipe.set(keys.node(self.node_id), msgpack.packb(asdict(entry)), ex=HEARTBEAT_TTL)
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


def list_nodes(client: redis.Redis) -> list[Node]:
    """The live nodes' heartbeat records; an unreadable one is skipped (and logged), never fatal."""
    ids = sorted(i.decode(errors="replace") for i in client.smembers(keys.NODES))
    nodes = []
    for node_id, raw in zip(ids, client.mget([keys.node(i) for i in ids]) if ids else []):
        if raw is None:
            client.srem(keys.NODES, node_id)  # expired: the node is gone
            continue
        try:
            entry = msgpack.unpackb(raw)
            node = Node(**entry)
            if not all(isinstance(getattr(node, k), str) for k in ("node_id", "kind", "address", "state",
                                                                  "session_id", "fault")) \
                    or not isinstance(node.time, (int, float)):
                raise TypeError("a field of the wrong type")
        except Exception as exc:
            log.warning("ignoring the malformed heartbeat of %r: %s", node_id[:80], exc)
            continue
        nodes.append(node)
    return nodes
