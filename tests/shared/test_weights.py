"""The weight store: chunked safetensors through real Redis, verified, followed by a watcher."""

import time

import pytest
import torch

from services.shared import keys, weights
from tests.conftest import wait_until


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(100, 10, generator=g), "b": torch.randn(5, generator=g)}


def test_publish_fetch_roundtrip_across_chunks(redis_client, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 1000)  # force several chunks for a 4 KB model
    pointer = weights.publish(redis_client, "s", 3, state(0))
    assert pointer["chunks"] > 1
    got = weights.fetch(redis_client, "s", weights.latest_pointer(redis_client, "s"))
    for k, v in state(0).items():
        assert torch.equal(got[k], v)


def test_corrupt_or_missing_chunk_is_refused(redis_client):
    pointer = weights.publish(redis_client, "s", 1, state(0))
    sk = keys.SessionKeys("s")
    data = redis_client.get(sk.weights_chunk(1, 0))
    redis_client.set(sk.weights_chunk(1, 0), data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(weights.WeightError, match="checksum"):
        weights.fetch(redis_client, "s", pointer)
    redis_client.delete(sk.weights_chunk(1, 0))
    with pytest.raises(weights.WeightError, match="missing"):
        weights.fetch(redis_client, "s", pointer)


def test_watcher_hands_over_each_new_version_with_its_label(redis_client):
    watcher = weights.WeightWatcher(redis_client, "s", poll_seconds=5).start()
    try:
        weights.publish(redis_client, "s", 1, state(1))
        version, sd = wait_until(watcher.take, 10, "version 1")
        assert version == 1 and torch.equal(sd["a"], state(1)["a"])
        weights.publish(redis_client, "s", 2, state(2))  # the notification wakes it well before its 5 s poll
        version, sd = wait_until(watcher.take, 4, "version 2")
        assert version == 2 and torch.equal(sd["a"], state(2)["a"])
    finally:
        watcher.stop()


def test_the_watcher_survives_a_version_it_cannot_load_and_takes_the_next(redis_client):
    """Bytes that pass the size and checksum but are not safetensors (a foreign writer): the watcher reports
    it and keeps following; it used to die silently and leave the node on old weights forever."""
    import msgpack
    import xxhash

    sk = keys.SessionKeys("s")
    watcher = weights.WeightWatcher(redis_client, "s", poll_seconds=0.1).start()
    try:
        garbage = b"these bytes are not a safetensors file"
        redis_client.set(sk.weights_chunk(1, 0), garbage)
        redis_client.set(sk.weights_latest, msgpack.packb({"version": 1, "chunks": 1, "size": len(garbage),
                                                           "xxh3": xxhash.xxh3_64_intdigest(garbage)}))
        wait_until(lambda: watcher.last_error, 10, "the watcher to report the unreadable version")
        weights.publish(redis_client, "s", 2, state(2))
        version, got = wait_until(watcher.take, 10, "the next good version")
        assert version == 2 and torch.equal(got["a"], state(2)["a"])
    finally:
        watcher.stop()


def test_a_watcher_stops_at_once_not_at_its_next_poll(redis_client):
    """Nothing wakes a pubsub read but a message: the watcher waited out its poll on stop(), and every worker's
    stop took a second (a node stopped its workers one after another)."""
    watcher = weights.WeightWatcher(redis_client, "s", poll_seconds=30).start()
    weights.publish(redis_client, "s", 1, state(1))
    wait_until(watcher.take, 10, "version 1")  # the watcher is now waiting for the next notice
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 2 and not watcher._thread.is_alive()
