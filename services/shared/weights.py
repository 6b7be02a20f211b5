"""The weight store: the trainer publishes each model version as safetensors bytes in chunks (a Redis value
is capped at 512 MB), then flips a `latest` pointer and notifies; rollout nodes pull, verify and load it.

The pointer carries the size and an XXH3-64 of the bytes: it guards against truncation and corruption at
tens of GB/s, where SHA-256 (2 GB/s) cost a fifth of a small model's publish+load and CRC32 (6 GB/s) still
a tenth. Who may write the weights at all is Redis's business (its password), not the checksum's.
"""

from __future__ import annotations

import logging
import threading
import time

import msgpack
import redis
import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services.shared import keys
from services.shared.minestudio import adapt

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024 * 1024
GRACE_SECONDS = 120  # a superseded version stays readable this long for nodes mid-download
STOP_SLICE = 0.05    # seconds: how soon a WeightWatcher notices stop() while no version is announced


def initial_policy(module, cfg) -> torch.nn.Module:
    """Version 0, which is never published: the config module's policy_generator() under the session's seed,
    with mso's contract (adapt), its value head zeroed when train_config.zero_initial_vf. The learner and every
    rollout worker build it here, so that they start from one set of weights."""
    torch.manual_seed(cfg.seed)
    policy = adapt(module.policy_generator())
    if cfg.train_config.zero_initial_vf:
        with torch.no_grad():
            for p in policy.value_head.parameters():
                p.zero_()
    return policy


class WeightError(ValueError):
    """A published version that fails verification (missing chunk, size or checksum mismatch)."""


def publish(client: redis.Redis, session_id: str, version: int, state_dict: dict[str, torch.Tensor],
            previous: dict | None = None) -> dict:
    """Write version's chunks, flip the pointer to it, let the version before expire, notify; returns the
    pointer. previous: the pointer this replaces when the caller knows it (the learner keeps the one it last
    published, which saves a round trip an iteration); None: read from Redis."""
    sk = keys.SessionKeys(session_id)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    n = max(1, -(-len(data) // CHUNK_BYTES))
    pointer = {"version": version, "chunks": n, "size": len(data), "xxh3": xxhash.xxh3_64_intdigest(data)}
    previous = previous or latest_pointer(client, session_id)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        # A bytes slice, not a memoryview: hiredis's packer copies a memoryview into bytes before copying it
        # again, and a one-chunk model's full slice is the object itself.
        pipe.set(sk.weights_chunk(version, i), data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
    pipe.set(sk.weights_latest, msgpack.packb(pointer))
    if previous is not None and previous["version"] != version:
        for i in range(previous["chunks"]):
            pipe.expire(sk.weights_chunk(previous["version"], i), GRACE_SECONDS)
    pipe.publish(sk.weights_channel, str(version))
    pipe.execute()
    return pointer


def latest_pointer(client: redis.Redis, session_id: str) -> dict | None:
    raw = client.get(keys.SessionKeys(session_id).weights_latest)
    if raw is None:
        return None
    try:
        pointer = msgpack.unpackb(raw)
        int(pointer["version"]), int(pointer["chunks"]), int(pointer["size"]), int(pointer["xxh3"])
    except Exception as exc:
        raise WeightError(f"unreadable weights pointer: {exc}") from exc
    return pointer


def fetch(client: redis.Redis, session_id: str, pointer: dict) -> dict[str, torch.Tensor]:
    """The state dict of pointer's version, verified against its size and checksum."""
    sk = keys.SessionKeys(session_id)
    version = pointer["version"]
    parts = client.mget([sk.weights_chunk(version, i) for i in range(pointer["chunks"])])
    missing = [i for i, p in enumerate(parts) if p is None]
    if missing:
        raise WeightError(f"version {version}: chunks {missing} of {pointer['chunks']} are missing")
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) != pointer["size"]:
        raise WeightError(f"version {version}: {len(data)} bytes, pointer says {pointer['size']}")
    if xxhash.xxh3_64_intdigest(data) != pointer["xxh3"]:
        raise WeightError(f"version {version}: checksum mismatch")
    return st_load(data)


class WeightWatcher:
    """Follows a session's published versions in a background thread and hands the newest verified one to
    whoever calls take() (the inference loop, between batches). A failed load keeps the old weights."""

    def __init__(self, client: redis.Redis, session_id: str, poll_seconds: float = 1.0):
        self.client = client
        self.session_id = session_id
        self.poll_seconds = poll_seconds
        self.version = -1
        self.last_error = ""
        self._ready: tuple[int, dict] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weight-watcher", daemon=True)

    def start(self) -> WeightWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def take(self) -> tuple[int, dict] | None:
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.SessionKeys(self.session_id).weights_channel)
                while not self._stop.is_set():
                    self._check()
                    self._await_notice(pubsub)
            except redis.RedisError as exc:  # Redis restarting: keep the weights we have, resubscribe
                self.last_error = f"weight watcher lost Redis, retrying: {exc}"
                log.warning(self.last_error)
                self._stop.wait(1.0)
            except Exception as exc:  # anything else must not end the thread: the node would act on old
                self.last_error = f"weight watcher failed, retrying: {type(exc).__name__}: {exc}"  # weights forever
                log.exception("weight watcher")
                self._stop.wait(1.0)
            finally:
                pubsub.close()

    def _await_notice(self, pubsub) -> None:
        """Until a version is announced, poll_seconds pass (the fallback for a missed notice) or stop() is called:
        the wait is cut in slices of STOP_SLICE, since nothing wakes a pubsub read but a message, and a stopping
        worker waited out the whole poll (a node's Stop took a second a worker)."""
        deadline = time.monotonic() + self.poll_seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or pubsub.get_message(timeout=min(left, STOP_SLICE)) is not None:
                return

    def _check(self) -> None:
        try:
            pointer = latest_pointer(self.client, self.session_id)
            if pointer is None or pointer["version"] <= self.version:
                return
            state = fetch(self.client, self.session_id, pointer)
        except (WeightError, SafetensorError) as exc:
            self.last_error = str(exc)
            log.warning("keeping weights of version %d: %s", self.version, exc)
            return
        with self._lock:
            self._ready = (pointer["version"], state)
        self.version = pointer["version"]
