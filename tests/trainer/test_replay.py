"""The trainer's replay on a real redis-server: staleness at sampling, exact reuse counts (also across a
trainer restart), chunks of consecutive fragments, capacity, and a ledger that balances."""

import time

import numpy as np
from omegaconf import OmegaConf

from services.shared.queue import FragmentConsumer, FragmentProducer, ledger
from services.trainer.replay import Replay
from tests.fragment_factory import make, push_raw, tree

L = 4


def fragment(slot="a", seq=0, version=0, contiguous=True, session="s1"):
    return make(session, L, slot, seq, version, contiguous)


def rb(**kw):
    return OmegaConf.create({"max_chunks": 100, "max_reuse": 1, "max_staleness": 2, "fragments_per_chunk": 1, **kw})


def push(client, fragments):
    producer = FragmentProducer(client, "s1", max_pending=10_000)
    for f in fragments:
        producer.push(f)


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
        assert len(set(ids)) == len(ids) == len(frags) and all(f.session_id == "s1" for f in frags)
        for i in ids:
            uses[i] = uses.get(i, 0) + 1
        replay.used(picked)
    assert sorted(uses.values()) == [3] * 6
    counts = ledger(redis_client, "s1")
    assert counts["consumed"] == 6 and counts["reused"] == 12 and counts["pending"] == 0
    assert balanced(redis_client)
    assert replay.fill(1, 0, lambda: True) is False  # nothing left to read, and asked to stop


def deletions(client) -> int:
    """XDEL calls so far (the retire script's, counted by Redis inside the script too)."""
    return client.info("commandstats").get("cmdstat_xdel", {}).get("calls", 0)


def increments(client) -> int:
    """HINCRBY calls so far (the retire script's ledger count among them)."""
    return client.info("commandstats").get("cmdstat_hincrby", {}).get("calls", 0)


def test_an_iterations_chunks_are_retired_in_one_round_trip_per_outcome(redis_client):
    # cartpole's iteration: 16 chunks of one fragment each; retired one by one they were 16 script calls (and
    # 16 waits on Redis) in the learner's loop, 7 % of its wall time. Chunks at their last use are not counted
    # first (a round trip of 16 HINCRBYs that the retirement's HDEL undid at once).
    push(redis_client, [fragment(slot=f"s{i}", version=1) for i in range(16)] +
         [fragment(slot=f"t{i}", version=0) for i in range(4)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_staleness=1, max_reuse=1))
    assert replay.fill(20, 1, never_stop) and replay.held() == 20
    before = deletions(redis_client)
    replay._drop_stale(2)  # the four of version 0 are now too old: one call, as dropped_stale
    assert deletions(redis_client) - before == 1 and replay.held() == 16
    picked, frags = replay.sample(16, version=2)
    before, counted = deletions(redis_client), increments(redis_client)
    replay.used(picked)
    assert deletions(redis_client) - before == 1 and replay.held() == 0
    assert increments(redis_client) - counted == 1  # the script's count of the 16 as consumed, nothing else
    counts = ledger(redis_client, "s1")
    assert (counts["consumed"], counts["dropped_stale"], counts["pending"]) == (16, 4, 0)
    assert balanced(redis_client)


def test_staleness_is_checked_when_sampled_not_only_when_read(redis_client):
    push(redis_client, [fragment(slot="a", version=5), fragment(slot="b", version=7)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_staleness=2, max_reuse=5))
    assert replay.fill(2, version=7, should_stop=never_stop)  # both fresh enough at version 7
    picked, frags = replay.sample(2, version=8)       # by version 8 the first is 3 versions old
    assert [f.slot for f in frags] == ["b"]
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
    slots_seqs = sorted((f.slot, f.seq) for f in frags)
    assert slots_seqs == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


def test_a_full_replay_pushes_out_its_oldest_chunks(redis_client):
    push(redis_client, [fragment(slot=f"s{i}", version=0) for i in range(5)])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_chunks=3))
    assert replay.fill(3, 0, never_stop) and replay.held() == 3  # s0..s2: one read takes at most the capacity
    assert replay.fill(3, 0, never_stop) and replay.held() == 3  # s3 and s4 arrive, s0 and s1 make room
    _p, frags = replay.sample(3, 0)
    assert sorted(f.slot for f in frags) == ["s2", "s3", "s4"]  # s0 and s1 never trained on
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


def broken(field, value):
    t = tree(fragment(slot=f"bad-{field}"))
    t[field] = value
    return t


BAD = [
    broken("seq", 1.5), broken("seq", -1), broken("seq", "3"), broken("version_first", None),
    broken("contiguous", 1), broken("slot", 7), broken("reward", np.zeros(L + 1, np.float32)),
    broken("reward", np.full(L, np.nan, np.float32)), broken("logp", np.zeros(L, np.float64)),
    broken("first", np.zeros(L, np.int8)), broken("obs", {"x": np.zeros((L + 1, 2), np.float32)}),
    broken("obs", {"x": np.float32(1)}), broken("obs", {"x": "text"}), broken("action", []),
    broken("next_obs", {"x": np.zeros(3, np.float32)}),
    broken("in_state", [np.zeros((1, 4), np.float32)]),  # another model's recurrent state
    {k: v for k, v in tree(fragment(slot="short")).items() if k != "model_version"},
    ["not", "a", "dict"],
]


def test_every_malformed_or_foreign_fragment_is_counted_and_skipped(redis_client):
    """Crafted or foreign fragments (another session, another model's state, wrong shapes or types) never
    reach the learner and never fail the trainer: each is dropped as corrupt and the ledger balances."""
    push(redis_client, [fragment(slot="good1")])
    push_raw(redis_client, "s1", BAD)
    push(redis_client, [fragment(slot="good2")])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(), state_signature=())
    assert replay.fill(2, 0, never_stop)
    picked, frags = replay.sample(2, 0)
    replay.used(picked)
    assert sorted(f.slot for f in frags) == ["good1", "good2"]
    counts = ledger(redis_client, "s1")
    assert counts["dropped_corrupt"] == len(BAD) and counts["consumed"] == 2 and balanced(redis_client)


def test_fragments_whose_layout_differs_from_the_first_are_dropped(redis_client):
    other = fragment(slot="other")
    other.obs = {"x": np.zeros((L, 3), np.float32)}  # another env: 3 features instead of 2
    other.next_obs = {"x": np.zeros(3, np.float32)}
    push(redis_client, [fragment(slot="a"), other, fragment(slot="b")])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb())
    assert replay.fill(2, 0, never_stop)
    counts = ledger(redis_client, "s1")
    assert counts["dropped_corrupt"] == 1 and balanced(redis_client)


def test_a_replay_that_gets_nothing_usable_says_so_then_fails_naming_why(redis_client):
    push(redis_client, [fragment(slot=f"s{i}", version=0) for i in range(3)])
    said = []
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_staleness=1), stall_timeout=3.0,
                    on_wait=lambda seconds, why: said.append(why))
    import pytest

    from services.trainer.replay import Stalled

    with pytest.raises(Stalled, match=r"no usable fragment for \d+s .*3 dropped as stale"):
        replay.fill(1, version=5, should_stop=never_stop)  # every fragment is 5 versions old
    assert said and "3 dropped as stale" in said[-1]
    assert ledger(redis_client, "s1")["dropped_stale"] == 3 and balanced(redis_client)


def test_trainer_memory_stays_flat_however_many_fragments_are_pending(redis_server, tmp_path):
    """1 GiB of VPT-sized fragments (21 MB each, incompressible frames) waits in the stream; a rank's replay
    that takes all of them (its capacity allows) must not hold them all decoded. Peak RSS of a fresh process."""
    import subprocess
    import sys

    script = """
import resource, sys
import numpy as np
from omegaconf import OmegaConf
from services.shared.codec import encode
from services.shared.queue import FragmentConsumer, ledger
from services.shared.redis_server import connect
from services.trainer.replay import Replay
from tests.fragment_factory import make, push_raw, tree
T = 64
rng = np.random.default_rng(0)
f = {"session_id": "big", "slot": "a", "seq": 0, "contiguous": True, "version_first": 0,
     "obs": {"image": rng.integers(0, 255, (T, 256, 256, 5), dtype=np.uint8)}, "action": np.zeros(T, np.int64),
     "reward": np.zeros(T, np.float32), "first": np.zeros(T, bool), "next_done": np.zeros(T, bool),
     "next_truncated": np.zeros(T, bool), "truncation_value": np.zeros(T, np.float32), "logp": np.zeros(T, np.float32),
     "model_version": np.zeros(T, np.int64), "in_state": [], "next_obs": {"image": np.zeros((256, 256, 5), np.uint8)}}
payload = encode(f)
client = connect(sys.argv[1])
n = (1 << 30) // len(payload) + 1
for i in range(n):  # one at a time: a pipeline would hold them all in this process first
    client.xadd("mso:s:big:fragments", {"f": payload})
client.hincrby("mso:s:big:ledger", "produced", n)
del payload, f
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
replay = Replay(FragmentConsumer(client, "big", "r0"), "big", T, OmegaConf.create(
    {"max_chunks": 1000, "max_reuse": 1, "max_staleness": 5, "fragments_per_chunk": 1}))
assert replay.fill(4, 0, lambda: False)
picked, frags = replay.sample(4, 0)
held = replay.held()
print(n, held, len(frags), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    out = subprocess.run([sys.executable, "-c", script, redis_server.url], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    pending, held, sampled, grew_kib = map(int, out.stdout.split())
    print(f"\n{pending} fragments of 21 MB pending: the replay held {held}, peak RSS grew {grew_kib / 1024:.0f} MiB")
    assert held == pending and sampled == 4  # it took every one (capacity allows) and sampled whole fragments
    assert grew_kib < 450 * 1024  # the hot set (256 MiB) and one read (64 MiB), not the 1 GiB pending


def test_time_spent_training_between_fills_is_not_a_stall(redis_client):
    """An iteration may train for longer than the stall timeout (VPT); only waiting counts toward it."""
    import threading

    push(redis_client, [fragment(slot="a")])
    replay = Replay(FragmentConsumer(redis_client, "s1", "r0"), "s1", L, rb(max_reuse=1), stall_timeout=1.0)
    assert replay.fill(1, 0, never_stop)
    replay.used(replay.sample(1, 0)[0])
    time.sleep(1.5)  # the update of this iteration: longer than the stall timeout
    threading.Timer(0.3, push, args=(redis_client, [fragment(slot="b")])).start()  # the next fragment comes soon
    assert replay.fill(1, 0, never_stop)
