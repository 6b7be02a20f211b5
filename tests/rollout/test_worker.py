"""The rollout loop with real env subprocesses and a real redis-server: alignment, faults, weights,
backpressure. (The Ray actor around it is covered in test_service.py.)"""

import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from services.shared import keys, session, weights
from services.shared import episode
from services.shared.codec import decode
from services.shared.config import load
from services.shared.session import Joined
from services.shared.queue import FragmentConsumer
from services.rollout.worker import PROBE_EVERY, WAIT_PAYS, RolloutLoop
from services.trainer.learner import Learner
from services.trainer.spec import LearnerSpec
from tests.conftest import wait_until
from tests.rollout import scenario_config as scenario

CONFIG = str(Path(__file__).with_name("scenario_config.py"))


class Running:
    def __init__(self, client, url, overrides=()):
        loaded = load(CONFIG, list(overrides))
        self.sid = session.create(client, loaded)
        self.client = client
        self.loop = RolloutLoop(0, Joined.of(self.sid, loaded), url, "node1")
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.consumer = FragmentConsumer(client, self.sid, "test")
        self.by_slot = defaultdict(list)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.loop.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert not self.loop.stats["last_error"], self.loop.stats["last_error"]

    def fragments(self, per_slot: int, slots: int, timeout: float = 60):
        return self.read_until(lambda by_slot: len(by_slot) >= slots and
                               all(len(v) >= per_slot for v in by_slot.values()),
                               f"{per_slot} fragments from each of {slots} slots", timeout)

    def read_until(self, done, what: str, timeout: float = 60):
        """Read the stream, oldest first, into by_slot until done(by_slot)."""
        def enough():
            for _id, f in self.consumer.read(100, block_ms=100):
                self.by_slot[f["slot"]].append(f)
            return done(self.by_slot)
        wait_until(enough, timeout, what)
        return self.by_slot


@pytest.mark.parametrize("envs, per_process", [(2, 1), (3, 2), (3, 0)])
def test_fragments_follow_the_l_plus_one_rule_across_episodes_and_fragments(redis_server, redis_client, envs,
                                                                             per_process):
    overrides = [f"rollout_config.worker_config.num_envs={envs}", f"rollout_config.worker_config.batch_size={envs}",
                 f"rollout_config.worker_config.envs_per_process={per_process}"]
    with Running(redis_client, redis_server.url, overrides) as run:
        by_slot = run.fragments(per_slot=6, slots=envs)
    for slot, frags in by_slot.items():
        frags.sort(key=lambda f: f["seq"])
        assert [f["seq"] for f in frags] == list(range(len(frags)))
        for f, nxt in zip(frags, frags[1:] + [None]):
            g, k = f["obs"]["g"][:, 0], f["obs"]["k"][:, 0]
            np.testing.assert_array_equal(np.diff(g), 1)                 # one continuous stream
            np.testing.assert_array_equal(f["reward"], g)                # r_t belongs to the action on o_t
            np.testing.assert_array_equal(f["first"], k == 0)            # o_t starts an episode
            np.testing.assert_array_equal(f["next_done"], k == scenario.EPISODE_LENGTH - 1)
            assert not f["next_truncated"].any()
            assert f["next_obs"]["g"][0] == g[-1] + 1                    # o_L, the bootstrap observation
            assert f["in_state"][0][0, 0] == k[0]                         # recurrent state before o_0
            assert f["contiguous"] and f["session_id"] == run.sid and slot.startswith("node1-w0-e")
            if nxt is not None:
                assert nxt["obs"]["g"][0, 0] == f["next_obs"]["g"][0]      # fragments tile the stream


@pytest.mark.parametrize("fault", ["crash:7", "die:7", "hang:7", "malformed:7"])
def test_a_faulty_env_is_restarted_and_the_others_keep_stepping(redis_server, redis_client, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("MSO_TEST_FAULT", fault)
    monkeypatch.setenv("MSO_TEST_FAULT_DIR", str(tmp_path))
    overrides = ["rollout_config.worker_config.num_envs=3", "rollout_config.worker_config.env_timeout=1.5"]
    with Running(redis_client, redis_server.url, overrides) as run:
        # A crash rebuilds the env inside the same process, which stays the faulty one, so it recurs; a dead
        # or hung process is replaced by a new one that is healthy.
        restarts = 2 if fault.startswith("crash") else 1
        wait_until(lambda: run.loop.stats["env_restarts"] >= restarts, 60, f"{restarts} restarts of the faulty env")
        by_slot = run.fragments(per_slot=8, slots=3)
        assert run.loop.stats["env_timeouts"] == (1 if fault.startswith("hang") else 0)
        assert run.loop.stats["malformed_obs"] == (1 if fault.startswith("malformed") else 0)
    assert (tmp_path / "claimed").exists()
    for frags in by_slot.values():
        for f in frags:
            # No fragment mixes two env instances: a new instance restarts g at 0.
            np.testing.assert_array_equal(np.diff(f["obs"]["g"][:, 0]), 1)
    faulty = [frags for frags in by_slot.values() if any(not f["contiguous"] for f in frags)]
    assert len(faulty) == 1  # exactly the faulty slot saw a break; the fragment after it says so


def test_weights_published_mid_run_label_exactly_the_actions_they_chose(redis_server, redis_client):
    with Running(redis_client, redis_server.url) as run:
        run.fragments(per_slot=2, slots=2)
        for version in (1, 2, 3):
            policy = scenario.VersionPolicy()
            with torch.no_grad():
                policy.version.fill_(version)
            weights.publish(redis_client, run.sid, version, policy.state_dict())
            wait_until(lambda: run.loop.stats["model_version"] == version, 20, f"version {version} in use")
        # The stream is read oldest first, and the envs stepped on meanwhile (the stream has room for 10000
        # fragments): read until each slot's fragments of version 3 arrive, however many older ones come first.
        run.read_until(lambda by_slot: len(by_slot) == 2 and all(any(3 in f["model_version"] for f in frags)
                                                                 for frags in by_slot.values()),
                       "fragments stepped on version 3 from both slots")
    seen = set()
    for frags in run.by_slot.values():
        for f in frags:
            np.testing.assert_array_equal(f["action"], f["model_version"] % scenario.N_ACTIONS)
            assert f["version_first"] == f["model_version"][0]
            seen.update(f["model_version"].tolist())
    assert {0, 3} <= seen


def test_a_worker_that_waited_for_room_acts_on_with_the_weights_published_meanwhile(redis_server, redis_client,
                                                                                   monkeypatch):
    """A trainer publishes a version, then retires the fragments it trained on, which makes room in the stream.
    The action on step 0 of a slot's next fragment is chosen after the worker's wait for that room, so with the
    new weights: chosen before it (with the fragment that step completes), it made the next fragment a version
    older than its other steps, stale a version sooner (cartpole's learner dropped 24 % of its fragments so,
    with 24 fragments of room). Two envs in one process step in lockstep; 20 ms steps let the sender's word
    that the stream is full arrive before the next fragments are cut."""
    monkeypatch.setenv("MSO_TEST_STEP_MS", "20,20")
    with Running(redis_client, redis_server.url, ["rollout_config.worker_config.envs_per_process=2",
                                                  "rollout_config.max_pending_fragments=2",
                                                  "rollout_config.to_send_queue_size=0",
                                                  "train_config.batch_size_per_gpu=1"]) as run:
        stream = keys.SessionKeys(run.sid).fragments
        wait_until(lambda: redis_client.xlen(stream) == 2 and run.loop.held == 2 and run.loop.stream_full, 60,
                   "the worker to wait for room with two fragments at its sender")
        policy = scenario.VersionPolicy()
        with torch.no_grad():
            policy.version.fill_(1)
        weights.publish(redis_client, run.sid, 1, policy.state_dict())
        wait_until(lambda: run.loop.watcher.version == 1, 20, "the worker's watcher to fetch version 1")

        def made_room():  # the trainer's part: retire what it read, until each slot's version 1 fragment came
            got = run.consumer.read(10, block_ms=100)
            for _id, f in got:
                run.by_slot[f["slot"]].append(f)
            run.consumer.retire([i for i, _ in got], "consumed")
            return len(run.by_slot) == 2 and all(any(1 in f["model_version"] for f in frags)
                                                 for frags in run.by_slot.values())
        wait_until(made_room, 60, "fragments stepped on version 1 from both slots")
    for slot, frags in run.by_slot.items():
        frags.sort(key=lambda f: f["seq"])
        versions = [f["model_version"].tolist() for f in frags]
        assert versions[:2] == [[0] * 4, [0] * 4], versions  # cut before the weights came
        assert versions[2] == [1] * 4, (slot, versions)       # its step 0 chosen after the wait, on version 1
        assert frags[2]["version_first"] == 1


def test_a_weight_load_failure_keeps_the_old_weights_and_is_reported(redis_server, redis_client):
    with Running(redis_client, redis_server.url) as run:
        run.fragments(per_slot=1, slots=2)
        weights.publish(redis_client, run.sid, 5, {"something_else": torch.zeros(3)})
        wait_until(lambda: "cannot load version 5" in run.loop.stats["last_error"], 20, "the load error")
        assert run.loop.stats["model_version"] == 0
        run.loop.stats["last_error"] = ""  # reported; the run goes on
        before = run.loop.stats["env_steps"]
        wait_until(lambda: run.loop.stats["env_steps"] > before + 50, 20, "stepping to continue")


def test_envs_whose_answers_come_apart_are_not_held_waiting_for_a_fuller_batch(redis_server, redis_client,
                                                                              monkeypatch):
    """Four single-env processes whose steps take 30-70 ms (Minecraft's uneven ticks): their answers come ~12 ms
    apart, so waiting 1 ms for a fuller batch seldom caught another and delayed every action (8 such envs ran at
    0.93 of their own speed, 0.96 without the wait). The loop sees its waits catch nothing and stops waiting,
    but for a probe one batch in PROBE_EVERY."""
    monkeypatch.setenv("MSO_TEST_STEP_MS", "30,70")
    overrides = ["rollout_config.worker_config.num_envs=4", "rollout_config.worker_config.batch_size=4",
                 "rollout_config.worker_config.envs_per_process=1"]
    with Running(redis_client, redis_server.url, overrides) as run:
        run.fragments(per_slot=12, slots=4)  # 4 x 12 fragments of 4 steps: ~190 answers, most in batches of one
        loop = run.loop
        assert loop.wait_caught < WAIT_PAYS, f"waits caught {loop.wait_caught:.2f} observations on average"
        decided, waited = loop.wait_chances, loop.waits_taken
    # Waits until they are seen not to pay (the average falls from 1 below 0.5 within ~10), then probes only.
    assert waited <= 12 + decided // PROBE_EVERY, f"{waited} waits in {decided} batches"


def test_a_full_stream_blocks_the_workers_and_memory_stays_flat(redis_server, redis_client):
    """The stream holds max_pending_fragments per trainer rank: 6 for each of two ranks."""
    bound = 12
    with Running(redis_client, redis_server.url, ["rollout_config.max_pending_fragments=6",
                                                  "train_config.num_workers=2", "train_config.batch_size_per_gpu=2",
                                                  "rollout_config.to_send_queue_size=2"]) as run:
        stream = f"mso:s:{run.sid}:fragments"
        wait_until(lambda: redis_client.xlen(stream) == bound, 60, "the stream to fill")

        def stalled():
            before = run.loop.stats["env_steps"]
            time.sleep(0.5)  # a measurement window, not a synchronisation
            return run.loop.stats["env_steps"] == before
        wait_until(stalled, 30, "the workers to block")
        rss = psutil.Process(os.getpid()).memory_info().rss
        for _ in range(4):
            assert redis_client.xlen(stream) <= bound
            time.sleep(0.5)
        assert psutil.Process(os.getpid()).memory_info().rss - rss < 20 * 2 ** 20
        # Once the consumer catches up, production resumes.
        got = run.consumer.read(bound)
        run.consumer.retire([i for i, _ in got], "consumed")
        wait_until(lambda: run.loop.stats["fragments_pushed"] > bound, 30, "production to resume")


def test_episode_records_never_wait_for_the_sender(redis_server, redis_client):
    """Only fragments wait for room (to_send_queue_size); an episode record is queued at once. Here the
    stream holds one fragment, so the sender blocks on the second fragment of each slot's first cut (at
    step L), and the envs end an episode every 5 steps. The stepping must go on to a slot's next cut (step
    2L); when records counted against the fragments' room it stalled at the second record after step L. Both
    envs in one process, so that they step in lockstep: in two, a batch may take one env's answer alone (when
    waiting for the other does not pay) and one slot can run a fragment ahead of the other."""
    length = 50
    with Running(redis_client, redis_server.url, [f"rollout_config.fragment_length={length}",
                                                  "rollout_config.worker_config.envs_per_process=2",
                                                  "rollout_config.max_pending_fragments=1",
                                                  "rollout_config.to_send_queue_size=1",
                                                  "train_config.batch_size_per_gpu=1",
                                                  "train_config.batches_per_iteration=1"]) as run:
        stream = f"mso:s:{run.sid}:fragments"
        wait_until(lambda: redis_client.xlen(stream) == 1, 60, "the stream to fill")

        def stalled():
            # Held back by backpressure (more fragments with the sender than to_send_queue_size, and the stream
            # full), not merely slow: a busy host can leave the loop without a step for half a second anywhere.
            before = run.loop.stats["env_steps"]
            time.sleep(0.5)  # a measurement window, not a synchronisation
            loop = run.loop
            return loop.stats["env_steps"] == before and loop.stream_full and loop.held > 1
        wait_until(stalled, 30, "the stepping to stall")
        # Stalled waiting for room for a slot's second fragment: it has cut it (seq 2). Stalled by a record,
        # no slot would have got past its first.
        assert max(slot.cutter.seq for slot in run.loop.slots) == 2, run.loop.stats
        got = run.consumer.read(10)  # unblocked, it goes on
        run.consumer.retire([i for i, _ in got], "consumed")
        wait_until(lambda: run.loop.stats["fragments_pushed"] >= 2, 30, "production to resume")


def test_an_error_writing_episode_records_reaches_the_worker_while_no_fragment_is_with_the_sender(
        redis_server, redis_client):
    """The worker reads its sender's acks after a batch only while the sender holds fragments, and otherwise
    every RECORDS_EVERY: an error writing episode records still reaches it. Fragments of 100 000 steps, so
    that none is cut while the envs end an episode every few steps, and an episode stream that is not a
    stream, so that every record's XADD fails."""
    run = Running(redis_client, redis_server.url, ["rollout_config.fragment_length=100000"])
    redis_client.set(keys.SessionKeys(run.sid).episodes, "not a stream")
    run.thread.start()
    try:
        wait_until(lambda: "cannot write episode statistics" in run.loop.stats["last_error"], 30,
                   "the records' error to reach the worker")
        assert run.loop.stats["episodes"] > 0 and run.loop.held == 0 and run.loop.stats["fragments_pushed"] == 0
    finally:
        run.loop.stop_event.set()
        run.thread.join(30)
    assert not run.thread.is_alive()


def test_the_fragments_a_batch_cuts_reach_redis_in_one_script_call(redis_server, redis_client):
    """Envs stepped together finish their fragments in the same step: the worker queues them together and
    the sender appends them in one call of the push script (one by one, with the stepping thread waiting on
    each, the round trips were a quarter of a CartPole worker's time: benchmarks/README, measure 2). Even
    with to_send_queue_size 1: a batch's fragments go to the sender together. Redis itself counts the calls."""
    envs = 4
    redis_client.config_resetstat()
    with Running(redis_client, redis_server.url, [f"rollout_config.worker_config.num_envs={envs}",
                                                  f"rollout_config.worker_config.batch_size={envs}",
                                                  "rollout_config.worker_config.envs_per_process=0",
                                                  "rollout_config.to_send_queue_size=1"]) as run:
        wait_until(lambda: run.loop.stats["fragments_pushed"] >= 10 * envs, 60, "ten fragments from each env")
    pushed = run.loop.stats["fragments_pushed"]
    assert int(redis_client.hget(f"mso:s:{run.sid}:ledger", "produced")) == pushed
    stats = redis_client.info("commandstats")
    scripts = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) - stats.get(f"cmdstat_{c}", {}).get("failed_calls", 0)
                  for c in ("eval", "evalsha"))
    assert pushed % envs == 0 and scripts <= pushed // envs, (scripts, pushed)


def test_a_sender_killed_with_sigkill_is_replaced_and_the_stream_stays_exact(redis_server, redis_client):
    """The sender is a process of its own (it must not share the worker's GIL); one that dies is replaced, the
    worker goes on, and what reached the stream is whole: every produced fragment is there once, in order."""
    with Running(redis_client, redis_server.url) as run:
        wait_until(lambda: run.loop.stats["fragments_pushed"] >= 4, 60, "fragments from the first sender")
        first = run.loop.sender.process
        assert first.pid != os.getpid() and psutil.Process(first.pid).ppid() == os.getpid()
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: run.loop.sender.process is not first, 30, "a new sender")
        assert first.poll() == -signal.SIGKILL  # reaped, not left a zombie
        assert f"sender process {first.pid} is gone" in run.loop.stats["last_error"]
        run.loop.stats["last_error"] = ""  # reported; the run goes on
        pushed = run.loop.stats["fragments_pushed"]
        wait_until(lambda: run.loop.stats["fragments_pushed"] >= pushed + 4, 60, "fragments from the new sender")
        second = run.loop.sender.process
    assert second.poll() == 0  # the worker's stop ended it
    stream = f"mso:s:{run.sid}:fragments"
    assert int(redis_client.hget(f"mso:s:{run.sid}:ledger", "produced")) == redis_client.xlen(stream)
    seqs = defaultdict(list)
    for _id, fields in redis_client.xrange(stream):
        f = decode(fields[b"f"])
        seqs[f["slot"]].append(f["seq"])
    assert len(seqs) == 2 and all(s == sorted(set(s)) for s in seqs.values()), dict(seqs)


def test_videos_are_recorded_when_a_version_divisible_by_the_interval_arrives(redis_server, redis_client, tmp_path):
    import av
    overrides = ["train_config.record_video_interval=2", f"rollout_config.worker_config.video_output_dir={tmp_path}"]
    with Running(redis_client, redis_server.url, overrides) as run:
        run.fragments(per_slot=1, slots=2)
        for version in (1, 2):
            weights.publish(redis_client, run.sid, version, scenario.VersionPolicy().state_dict())

        def recorded():
            return next((e for _id, e in episode.after(redis_client, run.sid, "") if e.video), None)
        e = wait_until(recorded, 30, "a recorded episode")
    assert e.version == 2 and e.length == scenario.EPISODE_LENGTH
    assert Path(e.video).parent == tmp_path / run.sid
    with av.open(e.video) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == scenario.EPISODE_LENGTH and (frames[0].height, frames[0].width) == (6, 8)
    assert run.loop.stats["videos"] == 1
    assert e.discounted_return < e.episode_return


def test_rollouts_survive_a_redis_restart_with_aof(tmp_path):
    from services.shared.redis_server import RedisServer, connect

    redis = RedisServer(appendonly=True, data_dir=str(tmp_path))
    try:
        client = connect(redis.url)
        with Running(client, redis.url) as run:
            run.fragments(per_slot=2, slots=2)
            redis.stop()  # SIGTERM: Redis writes its AOF and exits
            redis = RedisServer(port=redis.port, appendonly=True, data_dir=str(tmp_path))
            assert client.hget(f"mso:s:{run.sid}:record", "config_name")  # the session survived
            pushed = run.loop.stats["fragments_pushed"]
            wait_until(lambda: run.loop.stats["fragments_pushed"] > pushed + 4, 60,
                       "fragments to flow again after the restart")
            assert run.thread.is_alive()
            run.loop.stats["last_error"] = ""  # a push may have failed during the outage; it was reported
    finally:
        redis.stop()


@pytest.mark.parametrize("fault, broken_slots", [("crash:7", 1), ("die:7", 2)])
def test_with_two_envs_per_process_a_crash_breaks_one_slot_and_a_dead_process_both(
        redis_server, redis_client, tmp_path, monkeypatch, fault, broken_slots):
    monkeypatch.setenv("MSO_TEST_FAULT", fault)
    monkeypatch.setenv("MSO_TEST_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("MSO_TEST_FAULT_ENVS", "1")
    overrides = ["rollout_config.worker_config.num_envs=4", "rollout_config.worker_config.batch_size=4",
                 "rollout_config.worker_config.envs_per_process=2"]
    with Running(redis_client, redis_server.url, overrides) as run:
        wait_until(lambda: run.loop.stats["env_restarts"] >= 1, 60, "the faulty env's restart")
        by_slot = run.fragments(per_slot=8, slots=4)
    for frags in by_slot.values():
        for f in frags:
            np.testing.assert_array_equal(np.diff(f["obs"]["g"][:, 0]), 1)
    broken = [slot for slot, frags in by_slot.items() if any(not f["contiguous"] for f in frags)]
    # A crash is caught and its env rebuilt inside the process (its process-mate steps on); a dead process
    # takes both of its envs' partial fragments with it.
    assert len(broken) == broken_slots


def test_envs_in_the_worker_thread_rebuild_a_crashing_env_and_step_the_others(redis_server, redis_client, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("MSO_TEST_FAULT", "crash:7")
    monkeypatch.setenv("MSO_TEST_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("MSO_TEST_FAULT_ENVS", "1")
    overrides = ["rollout_config.worker_config.num_envs=3", "rollout_config.worker_config.batch_size=3",
                 "rollout_config.worker_config.envs_per_process=0"]
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Running(redis_client, redis_server.url, overrides) as run:
        wait_until(lambda: run.loop.stats["env_restarts"] >= 1, 60, "the crashing env's rebuild")
        by_slot = run.fragments(per_slot=8, slots=3)
        assert run.loop.stats["live_envs"] == 3
        # (Not by create_time: psutil derives it from the boot time in whole seconds, so it can be off by one.)
        new = [p.cmdline() for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert len(new) == 1 and new[0][-2] == "services.rollout.sender", new  # its sender; no env process
    broken = [slot for slot, frags in by_slot.items() if any(not f["contiguous"] for f in frags)]
    assert len(broken) == 1
    for frags in by_slot.values():
        for f in frags:
            np.testing.assert_array_equal(np.diff(f["obs"]["g"][:, 0]), 1)


def test_a_worker_acts_with_the_weights_the_learner_starts_from(redis_server, redis_client, tmp_path):
    """Version 0 is the one version no worker loads from Redis: each builds it from the config and the seed, so it
    must build the learner's, the value head zeroed by train_config.zero_initial_vf included (only the learner
    zeroed it before: a truncation bootstrapped by version 0 took its value from a random head)."""
    loaded = load("cartpole", ["seed=5"])
    assert loaded.cfg.train_config.zero_initial_vf
    sid = session.create(redis_client, loaded)
    loop = RolloutLoop(0, Joined.of(sid, loaded), redis_server.url, "node1")
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: loop.stats["env_steps"] > 0, 60, "the worker stepping")
        acting = {k: v.clone() for k, v in loop.policy.state_dict().items()}
    finally:
        loop.stop_event.set()
        thread.join(30)
    learner = Learner(LearnerSpec(Joined.of(sid, loaded), redis_server.url, "t", str(tmp_path)))
    learner.logs.close()
    starting = learner.policy.state_dict()
    assert acting.keys() == starting.keys()
    assert [k for k in acting if not torch.equal(acting[k], starting[k])] == []
    assert all(not starting[k].any() for k in starting if k.startswith("value_head.linear."))
