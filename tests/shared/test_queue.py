"""The fragment queue's ledger on a real redis-server: exactly one consumer retires an entry and it is
counted once; the stream's bound holds exactly however many producers race; a live rank's entries are never
taken by another consumer. Every ledger is asserted as an equation at a quiet moment."""

import threading
from dataclasses import replace

from services.shared import keys, queue, session
from services.shared.codec import decode
from services.shared.queue import Backpressure, FragmentConsumer, FragmentProducer, ledger
from tests.conftest import wait_until
from tests.shared.test_codec import make_fragment


def balanced(client, sid="s1"):
    c = ledger(client, sid)
    return c["produced"] == c.get("consumed", 0) + c.get("dropped_stale", 0) + c.get("dropped_corrupt", 0) + \
        c["pending"]


def push(client, n, sid="s1"):
    producer = FragmentProducer(client, sid, max_pending=1000)
    for _ in range(n):
        producer.push(make_fragment(session_id=sid))


def register(client, node_id):
    session.Heartbeat(client, node_id, "trainer", lambda: "127.0.0.1:1", lambda: ("SERVICE_STATE_RUNNING", "s1", "")).beat()


def test_a_consumer_never_takes_the_entries_a_live_rank_holds(redis_client):
    push(redis_client, 8)
    register(redis_client, "live")
    register(redis_client, "newcomer")
    holder = FragmentConsumer(redis_client, "s1", "live-rank0")
    held = holder.read(8)
    assert len(held) == 8
    newcomer = FragmentConsumer(redis_client, "s1", "newcomer-rank0")
    assert newcomer.reclaim({n.node_id for n in session.list_nodes(redis_client)}) == 0
    assert newcomer.read(8, block_ms=None) == []
    holder.retire([i for i, _ in held], "consumed")
    counts = ledger(redis_client, "s1")
    assert counts["consumed"] == 8 and counts["pending"] == 0 and balanced(redis_client)


def test_the_entries_of_a_dead_node_are_taken_over_once(redis_client):
    push(redis_client, 8)
    dead = FragmentConsumer(redis_client, "s1", "gone-rank0")
    assert len(dead.read(5)) == 5  # its node never registered, or its heartbeat expired
    successor = FragmentConsumer(redis_client, "s1", "next-rank0")
    assert successor.reclaim({"next"}) == 5
    got = successor.read(8) + successor.read(8)
    assert len(got) == 8 and len({i for i, _ in got}) == 8
    successor.retire([i for i, _ in got], "consumed")
    dead.retire([i for i, _ in got[:5]], "consumed")  # the old one comes back and retires what it had read
    counts = ledger(redis_client, "s1")
    assert counts["consumed"] == 8 and balanced(redis_client)
    names = [c["name"] for c in redis_client.xinfo_consumers(keys.SessionKeys("s1").fragments, keys.GROUP)]
    assert b"gone-rank0" not in names and "gone-rank0" not in names  # the dead consumer was removed


def test_an_entry_retired_twice_is_counted_once(redis_client):
    push(redis_client, 4)
    consumer = FragmentConsumer(redis_client, "s1", "r-rank0")
    ids = [i for i, _ in consumer.read(4)]
    assert consumer.retire(ids, "consumed") == 4
    assert consumer.retire(ids, "consumed") == 0
    assert consumer.retire(ids[:2], "dropped_stale") == 0
    counts = ledger(redis_client, "s1")
    assert counts["consumed"] == 4 and counts.get("dropped_stale", 0) == 0 and counts["pending"] == 0
    assert balanced(redis_client)


def test_the_stream_bound_is_exact_with_racing_producers(redis_client):
    bound, producers = 4, 8
    fragment = make_fragment()
    start = threading.Barrier(producers)
    outcomes = []

    def produce():
        producer = FragmentProducer(redis_client, "s1", max_pending=bound)
        start.wait()
        try:
            outcomes.append(producer.push(fragment, timeout=1.0) > 0)
        except Backpressure:
            outcomes.append(False)

    threads = [threading.Thread(target=produce) for _ in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = ledger(redis_client, "s1")
    assert sum(outcomes) == bound and counts["pending"] == bound and counts["produced"] == bound
    assert counts["env_steps"] == 8 * bound and balanced(redis_client)


def test_a_producer_asked_to_stop_while_the_stream_is_full_produces_nothing(redis_client):
    producer = FragmentProducer(redis_client, "s1", max_pending=1)
    assert producer.push(make_fragment()) > 0
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert producer.push(make_fragment(), should_stop=stop.is_set) == 0
    counts = ledger(redis_client, "s1")
    assert counts["produced"] == 1 and counts["pending"] == 1 and balanced(redis_client)


def test_several_fragments_go_in_order_as_far_as_the_stream_has_room(redis_client):
    """push_many appends in order up to the bound in one call, then waits for room for the rest; asked to
    stop while waiting, it leaves the rest unproduced and the ledger exact."""
    producer = FragmentProducer(redis_client, "s1", max_pending=3, node_id="n")
    frags = [replace(make_fragment(), seq=i) for i in range(5)]
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    sizes = producer.push_many(frags, should_stop=stop.is_set)
    assert [s > 0 for s in sizes] == [True, True, True, False, False]
    assert [decode(f[b"f"])["seq"] for _i, f in redis_client.xrange("mso:s:s1:fragments")] == [0, 1, 2]
    counts = ledger(redis_client, "s1")
    assert counts["produced"] == 3 and counts["env_steps"] == 3 * len(frags[0].reward) and balanced(redis_client)
    assert queue.produced_by_node(redis_client, "s1") == {"n": 3}


def test_a_push_that_fills_the_stream_says_it_is_full(redis_client):
    """each_round's `full` is true once the stream has no room left, not only once it refused a fragment: a
    worker told so waits before it acts on the fragments it cuts next (services/rollout/worker.py)."""
    producer = FragmentProducer(redis_client, "s1", max_pending=3)
    rounds = []
    producer.push_many([make_fragment()], each_round=lambda sizes, full: rounds.append((len(sizes), full)))
    producer.push_many([make_fragment(), make_fragment()], each_round=lambda sizes, full: rounds.append(
        (len(sizes), full)))
    assert rounds == [(1, False), (2, True)]


def test_each_rollout_nodes_fragments_are_counted_and_add_up(redis_client):
    for node, n in (("rollout-a", 3), ("rollout-b", 2)):
        producer = FragmentProducer(redis_client, "s1", max_pending=100, node_id=node)
        for _ in range(n):
            producer.push(make_fragment())
    by_node = queue.produced_by_node(redis_client, "s1")
    assert by_node == {"rollout-a": 3, "rollout-b": 2}
    assert sum(by_node.values()) == ledger(redis_client, "s1")["produced"] == 5


def test_a_producer_waiting_for_room_is_woken_by_the_retirement_not_by_its_poll(redis_client, monkeypatch):
    """A full stream empties when a trainer retires what it trained on; the producer waiting for room hears of
    it at once (the retire script publishes on the session's room channel) instead of on its next look,
    which came up to 50 ms late while a CartPole learner's whole update takes 30. Here its looks are an hour
    apart: only the notification can wake it in time."""
    monkeypatch.setattr(queue, "ROOM_POLL", (3600.0, 3600.0))
    producer = FragmentProducer(redis_client, "s1", max_pending=1)
    assert producer.push(make_fragment()) > 0
    consumer = FragmentConsumer(redis_client, "s1", "node-rank0")
    (entry_id, _), = consumer.read(1, block_ms=None)
    pushed = []
    waiting = threading.Thread(target=lambda: pushed.append(producer.push(make_fragment())), daemon=True)
    waiting.start()
    wait_until(lambda: redis_client.pubsub_numsub(keys.SessionKeys("s1").room_channel)[0][1] == 1, 10,
               "the producer to listen for room")
    assert consumer.retire([entry_id], "consumed") == 1
    waiting.join(10)
    assert not waiting.is_alive() and pushed[0] > 0, "the retirement did not wake the producer"
    counts = ledger(redis_client, "s1")
    assert counts["produced"] == 2 and counts["consumed"] == 1 and counts["pending"] == 1 and balanced(redis_client)
