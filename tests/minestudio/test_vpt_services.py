"""A tiny random VPTPolicy from minestudio trains through the real rollout and trainer services (real Redis,
Ray and gRPC, one stack for the module) on MinecraftStandIn, the stand-in for MinecraftSim."""

from pathlib import Path

import av
import numpy as np

from services.shared import episode, keys, session
from services.shared.codec import decode
from services.shared.config import load
from services.shared.queue import FragmentConsumer
from services.shared.rpc import channel
from services.shared.protos import common_pb2, rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import wait_until
from tests.minestudio.standin_config import TINY_VPT

CONFIG = str(Path(__file__).with_name("standin_config.py"))
MAXLEN = TINY_VPT["attention_memory_size"] - TINY_VPT["timesteps"]  # frames of past the VPT state holds
HIDSIZE = TINY_VPT["hidsize"]


def fragments(client, sid, n):
    entries = client.xrange(keys.SessionKeys(sid).fragments, count=n)
    return [decode(fields[b"f"]) for _id, fields in entries] if len(entries) >= n else None


def test_tiny_vpt_trains_through_rollout_and_trainer_services(stack, tmp_path):
    client = stack["redis"]
    sid = session.create(client, load(CONFIG, [f"rollout_config.worker_config.video_output_dir={tmp_path}"]))
    with channel(stack["rollout"]) as rch, channel(stack["trainer"]) as tch:
        rollout = rollout_pb2_grpc.RolloutServiceStub(rch)
        trainer = trainer_pb2_grpc.TrainerServiceStub(tch)
        try:
            rollout.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=120)
            # Read fragments before a trainer consumes them: two per env slot.
            got = wait_until(lambda: fragments(client, sid, 4), 180, "4 fragments from the VPT rollout")
            for f in got:
                assert f["obs"]["image"].shape == (8, 128, 128, 3) and f["obs"]["image"].dtype == np.uint8
                assert {k: (v.shape, v.dtype) for k, v in f["action"].items()} == \
                    {"buttons": ((8, 1), np.int64), "camera": ((8, 1), np.int64)}
                assert [(s.dtype, s.shape) for s in f["in_state"]] == [
                    (np.bool_, (1, 1, MAXLEN)), (np.float32, (1, MAXLEN, HIDSIZE)), (np.float32, (1, MAXLEN, HIDSIZE))]
                assert np.isfinite(f["logp"]).all() and (f["logp"] <= 0).all()
            # A slot's second fragment starts mid-episode: its in-state holds the 8 frames seen so far.
            later = [f for f in got if f["seq"] == 1]
            assert later and all(int(f["in_state"][0].sum()) == 8 for f in later)
            assert all(not f["in_state"][0].any() for f in got if f["seq"] == 0)
            # Episodes (12 steps) start inside fragments (8 steps): the case `first` must reset in training.
            assert any(f["first"][1:].any() for f in got)

            trainer.Start(trainer_pb2.TrainerStartRequest(session_id=sid), timeout=120)
            st = wait_until(lambda: (s := trainer.GetStatus(trainer_pb2.TrainerStatusRequest(), timeout=10))
                            .state == common_pb2.SERVICE_STATE_FINISHED and s, 300, "3 training iterations")
            assert st.iteration == 3 and st.model_version == 3 and not st.last_error
            assert set(st.losses) >= {"policy_loss", "value_loss", "entropy", "kl_divergence"}
            assert all(np.isfinite(v) for v in st.losses.values())
            assert st.losses["entropy"] > 0 and st.fragments_consumed >= 3 * 2

            rst = wait_until(lambda: (s := rollout.GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10))
                             .model_version >= 1 and s, 60, "the rollout node to load a trained version")
            assert rst.env_restarts == 0 and not rst.last_error  # every action reached the env in VPT's format
            # The trainer has finished: drain the stream as it would, so backpressure does not stop the rollout
            # before the recorded episode ends.
            drain = FragmentConsumer(client, sid, "test-drain")

            def video_records():
                drain.retire([i for i, _f in drain.read(64, block_ms=None)], "consumed")
                return [e for _i, e in episode.after(client, sid, "") if e.video]
            records = wait_until(video_records, 60, "an episode video")
            with av.open(records[0].video) as container:
                frames = list(container.decode(video=0))
            assert frames and (frames[0].height, frames[0].width) == (128, 128)
        finally:
            rollout.Stop(rollout_pb2.RolloutStopRequest(), timeout=90)
            trainer.Stop(trainer_pb2.TrainerStopRequest(), timeout=90)
            session.update(client, sid, phase="SESSION_PHASE_STOPPED")
