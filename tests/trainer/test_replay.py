"""The trainer's replay on a real redis-server: staleness at sampling, exact reuse counts (also across a
trainer restart), chunks of consecutive fragments, capacity, and a ledger that balances."""

import time

import numpy as np
from omegaconf import OmegaConf

from mso.queue import FragmentConsumer, FragmentProducer, ledger
from mso.trainer.replay import Replay

L = 4


def fragment(slot="a", seq=0, version=0, contiguous=True, session="s1"):
    z = np.zeros(L, dtype=np.float32)
    return {"session_id": session, "slot": slot, "seq": seq, "contiguous": contiguous, "version_first": version,
            "obs": {"x": np.full((L, 2), seq, dtype=np.float32)}, "action": np.zeros(L, dtype=np.int64),
            "reward": z, "first": np.zeros(L, bool), "next_done": np.zeros(L, bool),
            "next_truncated": np.zeros(L, bool), "truncation_value": z, "logp": z,
            "model_version": np.full(L, version, dtype=np.int64), "in_state": [], "next_obs": {"x": z[:2]}}


def rb(**kw):
    return OmegaConf.create({"max_chunks": 100, "max_reuse": 1, "max_staleness": 2, "fragments_per_chunk": 1, **kw})


def push(client, fragments):
    producer = FragmentProducer(client, "s1", max_pending=10_000)
    for f in fragments:
        producer.push(f, env_steps=L)


def balanced(client):
    c = ledger(client, "s1")
    return c["produced"] == c.get("consumed", 0) + c.get("dropped_stale", 0) + c.get("dropped_corrupt", 0) + \
        c["pending"]


def never_stop():
    return False


def test_each_fragment_is_used_exactly_max_reuse_times(redis_client):
    push(redis_client, [fragment(slot=f"s{i}") for i in range(6)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_reuse=3))
    assert replay.fill(2, 0, never_stop) and replay.held() == 6  # what the stream holds is taken at once
    uses: dict[bytes, int] = {}
    while replay.held():
        picked, frags = replay.sample(2, version=0)
        ids = [i for c in picked for i in c.ids]
        assert len(set(ids)) == len(ids) == len(frags) and all(f["session_id"] == "s1" for f in frags)
        for i in ids:
            uses[i] = uses.get(i, 0) + 1
        replay.used(picked)
    assert sorted(uses.values()) == [3] * 6
    counts = ledger(redis_client, "s1")
    assert counts["consumed"] == 6 and counts["reused"] == 12 and counts["pending"] == 0
    assert balanced(redis_client)
    assert replay.fill(1, 0, lambda: True) is False  # nothing left to read, and asked to stop


def test_staleness_is_checked_when_sampled_not_only_when_read(redis_client):
    push(redis_client, [fragment(slot="a", version=5), fragment(slot="b", version=7)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_staleness=2, max_reuse=5))
    assert replay.fill(2, version=7, should_stop=never_stop)  # both fresh enough at version 7
    picked, frags = replay.sample(2, version=8)       # by version 8 the first is 3 versions old
    assert [f["slot"] for f in frags] == ["b"]
    replay.used(picked)
    counts = ledger(redis_client, "s1")
    assert counts["dropped_stale"] == 1 and balanced(redis_client)


def test_a_restarted_trainer_keeps_the_use_counts_of_the_one_that_died(redis_client):
    push(redis_client, [fragment(slot="a"), fragment(slot="b")])
    dead = Replay(FragmentConsumer(redis_client, "s1", "old"), "s1", L, rb(max_reuse=2))
    assert dead.fill(2, 0, never_stop)
    picked, _f = dead.sample(2, 0)
    dead.used(picked)  # one use each; then the process dies without retiring them
    consumer = FragmentConsumer(redis_client, "s1", "new")
    assert consumer.reclaim(live_nodes={"new"}) == 2
    successor = Replay(consumer, "s1", L, rb(max_reuse=2))
    assert successor.fill(2, 0, never_stop)
    picked, _f = successor.sample(2, 0)
    successor.used(picked)  # the second and last use
    assert successor.held() == 0
    counts = ledger(redis_client, "s1")
    assert counts["consumed"] == 2 and counts["pending"] == 0 and counts["reused"] == 2


def test_chunks_hold_consecutive_fragments_of_one_slot(redis_client):
    push(redis_client, [fragment("a", 0), fragment("b", 0), fragment("a", 1), fragment("b", 1),
                        fragment("a", 2), fragment("a", 3, contiguous=False)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(fragments_per_chunk=2))
    assert replay.fill(4, 0, never_stop)
    # a0+a1 and b0+b1 are chunks; a2 is cut short by the discontinuity before a3, which waits for a partner
    assert sorted([len(c.ids) for c in replay.chunks]) == [1, 2, 2]
    picked, frags = replay.sample(5, 0)
    slots_seqs = sorted((f["slot"], f["seq"]) for f in frags)
    assert slots_seqs == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


def test_a_full_replay_pushes_out_its_oldest_chunks(redis_client):
    push(redis_client, [fragment(slot=f"s{i}", version=0) for i in range(5)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_chunks=3))
    assert replay.fill(3, 0, never_stop) and replay.held() == 3  # s0..s2: one read takes at most the capacity
    assert replay.fill(3, 0, never_stop) and replay.held() == 3  # s3 and s4 arrive, s0 and s1 make room
    _p, frags = replay.sample(3, 0)
    assert sorted(f["slot"] for f in frags) == ["s2", "s3", "s4"]  # s0 and s1 never trained on
    counts = ledger(redis_client, "s1")
    assert counts["dropped_stale"] == 2 and balanced(redis_client)


def test_corrupt_and_foreign_entries_are_counted_not_trained_on(redis_client):
    push(redis_client, [fragment(), fragment(session="other"), fragment(slot="b")])
    redis_client.xadd("mso:s:s1:fragments", {b"f": b"garbage"})
    redis_client.hincrby("mso:s:s1:ledger", "produced", 1)
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb())
    assert replay.fill(2, 0, never_stop)
    picked, frags = replay.sample(2, 0)
    replay.used(picked)
    assert len(frags) == 2 and ledger(redis_client, "s1")["dropped_corrupt"] == 2 and balanced(redis_client)


def test_partial_chunks_that_wait_while_nothing_arrives_are_closed_not_waited_for(redis_client):
    # Two slots with two of three fragments each: a blocked producer would never complete them.
    push(redis_client, [fragment("a", 0), fragment("b", 0), fragment("a", 1), fragment("b", 1)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(fragments_per_chunk=3))
    deadline = time.monotonic() + 10
    assert replay.fill(4, 0, lambda: time.monotonic() > deadline)
    assert sorted(len(c.ids) for c in replay.chunks) == [2, 2]
