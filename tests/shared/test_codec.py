"""The fragment wire format: identical arrays after a trip through real Redis; corrupt entries rejected."""

import msgpack
import numpy as np
import pytest

from services.shared import keys
from services.shared.codec import MAGIC, CodecError, decode, encode
from services.shared.queue import FragmentConsumer, FragmentProducer, ledger
from services.rollout.fragments import FragmentCutter, Step, cut
from tests.fragment_factory import tree


def make_fragment(length=8, session_id="s1"):
    cutter = FragmentCutter(session_id, "slot-0", length)
    rng = np.random.default_rng(0)
    fragment = None
    for t in range(length + 1):
        if cutter.add(Step(obs={"image": rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)}, state=None,
                           action={"buttons": np.array([t]), "camera": np.array([t % 3])}, logp=-0.5 * t,
                           last_reward=float(t), last_terminated=t == 3, last_truncated=False, version=7)):
            fragment = cut([cutter]).split()[0]
        if cutter.starts_fragment():
            cutter.buffer[-1].state = [rng.standard_normal((1, 3)).astype(np.float32)]
    return fragment


def assert_same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_roundtrip_keeps_every_array_identical():
    fragment = make_fragment()
    assert_same(tree(fragment), decode(fragment.encode()))


def test_fragment_through_redis_decodes_identically_on_the_trainer_side(redis_client):
    fragment = make_fragment()
    FragmentProducer(redis_client, "s1", max_pending=10).push(fragment)
    (entry_id, got), = FragmentConsumer(redis_client, "s1", "rank0").read(10)
    assert_same(tree(fragment), got)
    assert ledger(redis_client, "s1")["produced"] == 1


@pytest.mark.parametrize("mangle, reason", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:-3] + bytes([b[-3] ^ 0xFF]) + b[-2:], "corrupt array block|checksum"),
    (lambda b: b[:-1], "overruns|truncated|corrupt"),
    (lambda b: b + b"x", "belong to no array"),
    (lambda b: b[:8] + b"\xc1" * 20 + b[28:], "unreadable header|truncated"),
    (lambda b: 12345, "not bytes"),
])
def test_corrupt_payload_is_rejected_with_a_reason(mangle, reason):
    with pytest.raises(CodecError, match=reason):
        decode(mangle(make_fragment().encode()))


def test_object_arrays_never_travel():
    with pytest.raises(CodecError, match="dtype"):
        encode({"x": np.array([object()], dtype=object)})
    header = msgpack.packb({"tree": {"__nd__": 0}, "arrays": [["|O", [1], 8, False]], "xxh3": 0})
    import struct
    with pytest.raises(CodecError, match="not allowed"):
        decode(MAGIC + struct.pack("<I", len(header)) + header + b"\0" * 8)


def test_frames_that_compress_are_compressed_and_noise_is_not():
    rng = np.random.default_rng(0)
    flat = np.zeros((16, 128, 128, 3), dtype=np.uint8)  # a game frame is mostly flat colour
    flat[:, 40:60, 40:60] = 200
    noise = rng.integers(0, 255, flat.shape, dtype=np.uint8)
    small, big = len(encode({"x": flat})), len(encode({"x": noise}))
    assert small < flat.nbytes / 10 and big >= noise.nbytes  # compressed, and stored raw (not inflated by lz4)
    assert_same({"x": flat, "y": noise}, decode(encode({"x": flat, "y": noise})))


def test_corrupt_queue_entry_is_counted_and_skipped_not_fatal(redis_client):
    producer = FragmentProducer(redis_client, "s1", max_pending=10)
    consumer = FragmentConsumer(redis_client, "s1", "rank0")
    stream = keys.SessionKeys("s1").fragments
    redis_client.xadd(stream, {b"f": b"garbage"})
    redis_client.xadd(stream, {b"other": b"field"})
    producer.push(make_fragment())
    got = consumer.read(10)
    assert len(got) == 1 and got[0][1]["seq"] == 0
    counts = ledger(redis_client, "s1")
    assert counts["dropped_corrupt"] == 2
    assert counts["pending"] == 1  # the good one waits for its retirement; the corrupt ones are gone


def test_producer_blocks_while_stream_is_full(redis_client):
    from services.shared.queue import Backpressure

    producer = FragmentProducer(redis_client, "s1", max_pending=2)
    for _ in range(2):
        producer.push(make_fragment())
    with pytest.raises(Backpressure):
        producer.push(make_fragment(), timeout=0.2)
    consumer = FragmentConsumer(redis_client, "s1", "rank0")
    consumer.retire([entry_id for entry_id, _ in consumer.read(1)], "consumed")
    assert producer.push(make_fragment(), timeout=1.0)  # room again once the trainer retired one
    assert ledger(redis_client, "s1")["produced"] == 3


def test_a_new_consumer_reclaims_what_a_dead_one_read_but_never_retired(redis_client):
    producer = FragmentProducer(redis_client, "s1", max_pending=10)
    for _ in range(3):
        producer.push(make_fragment())
    dead = FragmentConsumer(redis_client, "s1", "old-rank0")
    assert len(dead.read(2)) == 2  # read, then the process died before retiring them
    successor = FragmentConsumer(redis_client, "s1", "new-rank0")
    assert successor.reclaim(live_nodes={"new"}) == 2  # "old" is not in the registry: dead
    got = successor.read(10) + successor.read(10)
    assert len(got) == 3  # the two reclaimed, then the one nobody had read
    successor.retire([i for i, _ in got], "consumed")
    counts = ledger(redis_client, "s1")
    assert counts["consumed"] == 3 and counts["pending"] == 0


def hostile(specs, tree, body=b""):
    """An entry built by hand, as a foreign or hostile writer of the stream would."""
    import struct

    import xxhash

    header = msgpack.packb({"tree": tree, "arrays": specs, "xxh3": xxhash.xxh3_64_intdigest(body)})
    return MAGIC + struct.pack("<I", len(header)) + header + body


def deep(levels):
    tree = {"__nd__": 0}
    for _ in range(levels):
        tree = [tree]
    return tree


@pytest.mark.parametrize("payload, reason", [
    (hostile([["<f4", [2**32, 2**32], 0, False]], {"__nd__": 0}), "exceed|expected"),  # wraps to 0 in int64
    (hostile([["<f4", [2**62, 4], 0, False]], {"__nd__": 0}), "exceed"),
    (hostile([["<f4", [1.5], 6, False]], {"__nd__": 0}, b"\0" * 6), "bad array shape"),
    (hostile([["<f4", [-2, -2], 16, False]], {"__nd__": 0}, b"\0" * 16), "bad array shape"),
    (hostile([["<f4", [True], 4, False]], {"__nd__": 0}, b"\0" * 4), "bad array shape"),
    (hostile([["<f4", [1], 4, "yes"]], {"__nd__": 0}, b"\0" * 4), "stored size|bad array spec"),
    (hostile([["<f4", [1], 4]], {"__nd__": 0}, b"\0" * 4), "bad array spec"),
    (hostile([["<f4", [1], 4, False]], deep(1000), b"\0" * 4), "deeper|unreadable header"),
    (hostile([["<f4", [1], 4, False]], deep(40), b"\0" * 4), "deeper"),
    (hostile([["<f4", [1], 4, False]], {"__nd__": True}, b"\0" * 4), "out of range"),
])
def test_hostile_headers_are_rejected_before_anything_is_allocated(payload, reason):
    with pytest.raises(CodecError, match=reason):
        decode(payload)


def test_a_decompression_bomb_is_refused_without_inflating_it():
    """An entry of 276 KB whose lz4 block inflates to 64 MiB claims a 16-byte array: decode must stop at the
    size the header implies, never allocate the rest. Measured as the peak RSS of a fresh interpreter."""
    import lz4.frame
    import subprocess
    import sys

    bomb = lz4.frame.compress(b"\0" * (64 << 20))
    payload = hostile([["|u1", [16], len(bomb), True]], {"__nd__": 0}, bomb)
    script = (
        "import resource, sys\n"
        "from services.shared.codec import CodecError, decode\n"
        "payload = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    decode(payload)\nexcept CodecError as exc:\n    print(exc, file=sys.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True, timeout=60)
    grew_kib = int(out.stdout.decode().strip())
    assert b"does not decompress to exactly 16 bytes" in out.stderr, out.stderr
    assert grew_kib < 16 * 1024, f"decoding the bomb grew the process by {grew_kib} KiB"
