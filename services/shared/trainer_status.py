"""The trainer's status in Redis (the hash at keys.SessionKeys(id).trainer): what rank 0 of the learner
reports each iteration, what its trainer node says when it starts or fails, and the two requests a trainer
node passes to its learner (stop; save a checkpoint). The one owner of that hash: the trainer wing writes it
through this module, and the launcher and TrainerService read it through this module."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import msgpack
import redis

from services.shared import keys


@dataclass
class TrainerStatus:
    state: str = ""               # a common_pb2.ServiceState name
    iteration: int = 0
    num_iterations: int = 0
    model_version: int = 0
    time: float = 0.0             # of the last report
    started_at: float = 0.0       # when a trainer node took the session
    first_update_at: float = 0.0  # when the first iteration ended
    metrics: dict[str, float] = field(default_factory=dict)  # every metric of the last iteration
    waiting: str = ""             # while the learner has nothing usable to train on: for how long, and why
    error: str = ""               # why it failed
    last_checkpoint: str = ""     # the path of the newest checkpoint


_CASTS = {f.name: {"int": int, "float": float, "str": str}.get(f.type) for f in fields(TrainerStatus)}
_STOP, _SAVE = "stop", "save_now"  # the requests


def read(client: redis.Redis, session_id: str) -> TrainerStatus:
    """The status as reported; a field that does not parse keeps its default."""
    raw = {k.decode(): v for k, v in client.hgetall(keys.SessionKeys(session_id).trainer).items()}
    status = TrainerStatus()
    for name, cast in _CASTS.items():
        if name not in raw:
            continue
        try:
            if name == "metrics":
                metrics = msgpack.unpackb(raw[name])
                status.metrics = {str(k): float(v) for k, v in metrics.items()}
            else:
                setattr(status, name, cast(raw[name].decode()))
        except Exception:
            pass
    return status


def report(client: redis.Redis, session_id: str, **values) -> None:
    """Set the given fields (names of TrainerStatus); `waiting=""` clears the waiting notice."""
    unknown = set(values) - set(_CASTS)
    if unknown:
        raise TypeError(f"not trainer status fields: {sorted(unknown)}")
    key = keys.SessionKeys(session_id).trainer
    mapping = {k: msgpack.packb(v) if k == "metrics" else str(v) for k, v in values.items() if v != ""}
    pipe = client.pipeline(transaction=False)
    if mapping:
        pipe.hset(key, mapping=mapping)
    cleared = [k for k, v in values.items() if v == ""]
    if cleared:
        pipe.hdel(key, *cleared)
    pipe.execute()


def start(client: redis.Redis, session_id: str, num_iterations: int, started_at: float) -> None:
    """A trainer node takes the session: earlier requests and notices go."""
    key = keys.SessionKeys(session_id).trainer
    pipe = client.pipeline(transaction=True)
    pipe.hdel(key, _STOP, _SAVE, "waiting", "error")
    pipe.hset(key, mapping={"state": "SERVICE_STATE_STARTING", "started_at": started_at,
                            "num_iterations": num_iterations})
    pipe.execute()


def request_stop(client: redis.Redis, session_id: str) -> None:
    client.hset(keys.SessionKeys(session_id).trainer, _STOP, "1")


def stop_requested(client: redis.Redis, session_id: str) -> bool:
    return client.hget(keys.SessionKeys(session_id).trainer, _STOP) == b"1"


def request_checkpoint(client: redis.Redis, session_id: str) -> None:
    client.hset(keys.SessionKeys(session_id).trainer, _SAVE, "1")


def requests(client: redis.Redis, session_id: str) -> tuple[bool, bool]:
    """(a stop was asked, a checkpoint was asked), in one round trip: the learner asks at every iteration."""
    stop, save = client.hmget(keys.SessionKeys(session_id).trainer, [_STOP, _SAVE])
    return stop == b"1", save == b"1"


def checkpoint_written(client: redis.Redis, session_id: str, path: str) -> None:
    client.hset(keys.SessionKeys(session_id).trainer, mapping={"last_checkpoint": path, _SAVE: "0"})
