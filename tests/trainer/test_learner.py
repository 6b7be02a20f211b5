"""The learner outside the services: use_amp on a CPU runs the forward passes in bfloat16 where the CPU computes
it natively (float32 with a warning elsewhere) and keeps PPO's first ratio exactly 1; an update
on real fragments moves the parameters and reports finite metrics; a Stop takes effect at the next
iteration even with a backlog, its TensorBoard file holding every iteration it trained; a value warm-up does
not make every fragment stale; a restarted trainer of a resumed session goes on from the session's newest
weights; a trainer with nothing usable says so, then fails."""

import logging
import math
import threading
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.shared import keys, trainer_status, weights
from services.shared.config import load
from services.shared.queue import FragmentProducer, ledger
from services.shared.redis_server import connect
from services.trainer import checkpoints
from services.trainer.lease import Lease
from services.trainer.learner import Learner
from services.trainer.replay import Stalled
from services.trainer.spec import LearnerSpec
from services.shared.session import Joined
from tests.conftest import wait_until
from tests.trainer import ddp_rank


def make_spec(redis_server, tmp_path, sid, *overrides):
    loaded = load("cartpole", [f"rollout_config.fragment_length={ddp_rank.L}", "train_config.context_length=4",
                               "train_config.epochs_per_iteration=2", "rollout_config.max_pending_fragments=10000",
                               "train_config.batch_size_per_gpu=8", "rollout_config.replay_buffer_config.max_chunks=8",
                               *overrides])
    return LearnerSpec(Joined.of(sid, loaded), redis_server.url, "t", str(tmp_path))


def produce(client, sid, iterations, version=0):
    """Fragments for `iterations` cartpole iterations (8 each), chosen by model `version`."""
    producer = FragmentProducer(client, sid, max_pending=10_000)
    for _ in range(iterations):
        for f in ddp_rank.fragments(8, sid):
            f.version_first, f.model_version = version, np.full(ddp_rank.L, version, np.int64)
            producer.push(f)


def run_in_thread(learner):
    outcome = {}

    def target():
        try:
            outcome["result"] = learner.run()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_use_amp_on_a_cpu_runs_the_forward_passes_in_bfloat16_where_the_cpu_computes_it(redis_server, tmp_path,
                                                                                       caplog):
    # These machines' CPUs compute bfloat16 natively (AVX512-BF16); on one that does not, the trainer says so
    # and runs in float32. Either way the heads, parameters and optimizer stay float32.
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    spec = make_spec(redis_server, tmp_path, "amp1", "train_config.use_amp=true", "train_config.epochs_per_iteration=1",
                     "train_config.batches_per_iteration=1")
    with caplog.at_level(logging.WARNING, logger="services.trainer.learner"):
        learner = Learner(spec)
    body, heads = [], []
    learner.policy.pi_body[0].register_forward_hook(lambda m, i, out: body.append(out.dtype))
    learner.policy.pi_head.register_forward_hook(lambda m, i, out: heads.append(out.dtype))
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    metrics = learner.update(ddp_rank.fragments(8, "amp1"), warmup=False)
    if native:
        assert learner.amp == torch.bfloat16 and "use_amp" not in caplog.text
        assert set(body) == {torch.bfloat16}  # the re-evaluation and the epoch alike
    else:
        assert learner.amp is None and "runs in full precision" in caplog.text
        assert set(body) == {torch.float32}
    assert set(heads) == {torch.float32} and len(body) == len(heads) > 1
    # pi_old is computed in the precision the epoch computes pi in: before the one optimizer step (one epoch of
    # one minibatch) pi / pi_old is exactly 1 on every step, so the KL the guard measures is 0. A float32
    # re-evaluation under a bfloat16 epoch moves it.
    assert metrics["approx_kl"] == 0
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())
    assert all(p.dtype == torch.float32 for p in learner.policy.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in learner.optimizer.state.values())


def test_a_stop_takes_effect_at_the_next_iteration_with_a_backlog(redis_server, tmp_path):
    client = connect(redis_server.url)
    spec = make_spec(redis_server, tmp_path, "stop1", "train_config.num_iterations=1000",
                     "rollout_config.replay_buffer_config.max_staleness=1000")
    produce(client, "stop1", iterations=40)  # the stream is never dry: a Stop must not wait for it to be
    learner = Learner(spec)
    thread, outcome = run_in_thread(learner)
    wait_until(lambda: trainer_status.read(client, "stop1").iteration >= 2, 60, "two iterations")
    trainer_status.request_stop(client, "stop1")
    asked_at = trainer_status.read(client, "stop1").iteration
    thread.join(60)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert outcome["result"]["stopped"] and outcome["result"]["iterations"] <= asked_at + 1
    # every iteration it trained is in TensorBoard's file once run() has returned (the logs are closed)
    events = EventAccumulator(str(tmp_path / "stop1")).Reload()
    assert len(events.Scalars("trainer/policy_loss")) == outcome["result"]["iterations"]
    counts = ledger(client, "stop1")
    assert counts["produced"] == counts["consumed"] + counts.get("dropped_stale", 0) + counts["pending"]


def test_a_value_warm_up_does_not_make_every_fragment_stale(redis_server, tmp_path):
    # Rollouts act with version 0 until a version is published; the version moves only when one is, so the
    # learner's own warm-up cannot outrun them (with max_staleness 1, two versions of warm-up would).
    client = connect(redis_server.url)
    spec = make_spec(redis_server, tmp_path, "warm1", "train_config.num_iterations=4", "train_config.vf_warmup=2",
                     "rollout_config.replay_buffer_config.max_staleness=1")
    produce(client, "warm1", iterations=4, version=0)
    learner = Learner(spec)
    thread, outcome = run_in_thread(learner)
    thread.join(60)
    assert not thread.is_alive(), "the learner stalled: every fragment went stale during the warm-up"
    assert outcome.get("result") == {"iterations": 4, "stopped": False}, outcome
    assert learner.version == 2 and weights.latest_pointer(client, "warm1")["version"] == 2
    assert ledger(client, "warm1").get("dropped_stale", 0) == 0


def test_a_restarted_trainer_of_a_resumed_session_goes_on_from_its_newest_weights(redis_server, tmp_path):
    client = connect(redis_server.url)
    torch.manual_seed(0)
    old = load("cartpole").policy_generator()
    ckpt = checkpoints.save(tmp_path / "ck", 3, old, torch.optim.AdamW(old.parameters()), {"model_version": 3, "rho": 0})
    newest = load("cartpole").policy_generator()
    weights.publish(client, "resumed1", 10, newest.state_dict())  # the session's first trainer got this far
    trainer_status.report(client, "resumed1", iteration=10)
    learner = Learner(make_spec(redis_server, tmp_path, "resumed1", f"train_config.resume={ckpt}"))
    assert learner.version == 10 and learner.start_iteration == 10
    assert weights.latest_pointer(client, "resumed1")["version"] == 10  # no lower version published
    assert all(torch.equal(v, newest.state_dict()[k]) for k, v in learner.policy.state_dict().items())


def test_a_trainer_with_nothing_usable_says_so_then_fails_naming_why(redis_server, tmp_path):
    client = connect(redis_server.url)
    learner = Learner(make_spec(redis_server, tmp_path, "stall1", "train_config.stall_timeout=4"))
    thread, outcome = run_in_thread(learner)
    said = wait_until(lambda: trainer_status.read(client, "stall1").waiting, 30, "the waiting notice")
    assert "no usable fragment for" in said
    thread.join(30)
    assert isinstance(outcome.get("error"), Stalled) and "no usable fragment for" in str(outcome["error"])


def test_a_learner_stops_when_another_trainer_node_holds_the_lease(redis_server, tmp_path):
    client = connect(redis_server.url)
    produce(client, "lease1", iterations=2)
    Lease(client, "lease1", "someone-else").take()
    learner = Learner(make_spec(redis_server, tmp_path, "lease1"))
    with pytest.raises(RuntimeError, match="trainer node someone-else took over session lease1"):
        learner.run()
    assert weights.latest_pointer(client, "lease1")["version"] == 0  # it published nothing after version 0


def test_the_new_version_is_announced_before_the_fragments_it_was_trained_on_leave_the_stream(redis_server,
                                                                                               tmp_path):
    """A rollout blocked on a full stream wakes when the trainer retires what it trained on; were the new
    version announced only after, the woken rollout stepped a burst on the version just replaced, which is
    stale an iteration later (mso run cartpole dropped 13-14 % of its fragments as stale, against 4-7 %).
    Both announcements are Redis messages, heard here on one subscription in the order they were sent."""
    client = connect(redis_server.url)
    spec = make_spec(redis_server, tmp_path, "order1", "train_config.num_iterations=1")
    produce(client, "order1", iterations=1)
    sk = keys.SessionKeys("order1")
    heard = client.pubsub(ignore_subscribe_messages=True)
    heard.subscribe(sk.weights_channel, sk.room_channel)
    learner = Learner(spec)
    thread, outcome = run_in_thread(learner)
    thread.join(60)
    assert not thread.is_alive() and outcome.get("result") == {"iterations": 1, "stopped": False}, outcome
    channels, deadline = [], time.monotonic() + 2  # all was sent: what is still on its way arrives within this
    while time.monotonic() < deadline:
        if (m := heard.get_message(timeout=0.1)) is not None:  # None too for a subscription's confirmation
            channels.append((m["channel"].decode(), m["data"].decode()))
    heard.close()
    # Version 0 is published when the learner starts; version 1 after its one update.
    assert channels[:2] == [(sk.weights_channel, "0"), (sk.weights_channel, "1")], channels
    assert {c for c, _ in channels[2:]} == {sk.room_channel}, channels
    assert ledger(client, "order1")["consumed"] == 8


def commands(client) -> dict[str, int]:
    """Calls of each command the Redis server has run so far."""
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def test_an_iteration_asks_redis_only_what_it_cannot_know(redis_server, tmp_path):
    """cartpole's learner runs ~40 iterations a second, and each Redis round trip waits on a redis-server that
    shares the machine's two cores. An iteration reads its requests (stop, checkpoint) in one HMGET and the
    lease's holder in one GET; it does not read back the weights pointer it wrote itself, nor look up use
    counts for entries delivered for the first time, nor ask for a stop again before a read that does not
    wait. Counted as the difference between runs of 4 and 8 iterations, so start and end cancel out."""
    client = connect(redis_server.url)
    per_run = {}
    for n in (4, 8):
        sid = f"trips{n}"
        spec = make_spec(redis_server, tmp_path, sid, f"train_config.num_iterations={n}",
                         "rollout_config.replay_buffer_config.max_staleness=1000")
        produce(client, sid, iterations=n)
        learner = Learner(spec)
        before = commands(client)
        assert learner.run() == {"iterations": n, "stopped": False}
        after = commands(client)
        per_run[n] = {k: after[k] - before.get(k, 0) for k in after}
    per_iteration = {k: (per_run[8].get(k, 0) - per_run[4].get(k, 0)) / 4 for k in per_run[8]}
    assert (per_iteration.get("hmget", 0), per_iteration.get("hget", 0), per_iteration.get("get", 0)) == (1, 0, 1), \
        per_iteration
