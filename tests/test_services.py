"""Every service as a real process on loopback (one Ray, one redis-server for the module): health, reflection,
the real grpcurl binary, Start/Stop/GetStatus on all three, and clear status codes for bad requests."""

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.shared.rpc import channel
from services.shared.protos import launcher_pb2, launcher_pb2_grpc, rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import grpcurl, wait_until

SHORT_RUN = ["train_config.num_iterations=3", "rollout_config.worker_config.num_envs=2",
             "rollout_config.worker_config.batch_size=2", "train_config.batch_size_per_gpu=2"]


@pytest.mark.parametrize("service, name", [("launcher", "mso.v1.LauncherService"),
                                           ("rollout", "mso.v1.RolloutService"),
                                           ("trainer", "mso.v1.TrainerService")])
def test_service_serves_health_and_reflection(stack, service, name):
    with channel(stack[service]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = grpcurl(stack[service], "list").stdout.split()
    assert name in listed and "grpc.health.v1.Health" in listed


@pytest.mark.parametrize("service, method", [("rollout", "mso.v1.RolloutService/GetStatus"),
                                             ("trainer", "mso.v1.TrainerService/GetStatus"),
                                             ("launcher", "mso.v1.LauncherService/ListNodes")])
def test_grpcurl_calls_each_service(stack, service, method):
    reply = json.loads(grpcurl("-d", "{}", stack[service], method).stdout or "{}")
    if service == "launcher":
        assert {n["kind"] for n in reply["nodes"]} == {"rollout", "trainer"}
    else:
        assert reply["node_id"].startswith(service)


def test_grpcurl_shows_a_bad_launch_as_invalid_argument(stack):
    out = grpcurl("-d", '{"config": "cartpole", "overrides": ["train_config.learning_rat=1"]}', stack["launcher"],
                  "mso.v1.LauncherService/Launch", check=False)
    assert "InvalidArgument" in out.stderr and "did you mean train_config.learning_rate" in out.stderr


def test_launch_through_grpcurl_runs_a_session_to_the_end(stack):
    request = json.dumps({"config": "cartpole", "overrides": SHORT_RUN})
    session = json.loads(grpcurl("-d", request, stack["launcher"], "mso.v1.LauncherService/Launch").stdout)
    # three short iterations can be over, and the session stopping its rollouts, before Launch has answered
    assert session["phase"] in ("SESSION_PHASE_RUNNING", "SESSION_PHASE_STOPPING", "SESSION_PHASE_FINISHED")
    sid = session["session_id"]
    # Launching the same config again while it runs returns the same session.
    again = launcher_pb2.LaunchRequest(config="cartpole", overrides=SHORT_RUN)
    with channel(stack["launcher"]) as ch:
        stub = launcher_pb2_grpc.LauncherServiceStub(ch)
        if stub.GetSession(launcher_pb2.GetSessionRequest(), timeout=10).phase == launcher_pb2.SESSION_PHASE_RUNNING:
            assert stub.Launch(again, timeout=60).session_id == sid

        def finished():
            s = stub.GetSession(launcher_pb2.GetSessionRequest(session_id=sid), timeout=10)
            return s if s.phase == launcher_pb2.SESSION_PHASE_FINISHED else None

        s = wait_until(finished, 120, "the session to finish", interval=0.5)
    assert s.progress.iteration == 3 and s.progress.model_version == 3
    assert s.progress.env_steps > 0
    with channel(stack["trainer"]) as ch:
        st = trainer_pb2_grpc.TrainerServiceStub(ch).GetStatus(trainer_pb2.TrainerStatusRequest(), timeout=10)
    assert st.iteration == 3 and st.fragments_consumed >= 3 * 2
    with channel(stack["rollout"]) as ch:
        st = rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10)
    assert st.state == 1 and st.workers == 0  # stopped by the launcher once training finished: IDLE


def test_rollout_start_status_stop_directly(stack):
    from services.shared import session
    from services.shared.config import load

    sid = session.create(stack["redis"], load("cartpole", SHORT_RUN))
    with channel(stack["rollout"]) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        st = stub.Start(rollout_pb2.RolloutStartRequest(session_id=sid), timeout=120)
        assert st.state == 3 and st.workers == 1
        with pytest.raises(grpc.RpcError) as err:
            stub.Start(rollout_pb2.RolloutStartRequest(session_id="abcdef"), timeout=10)
        assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
        st = wait_until(lambda: (s := stub.GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10))
                        .fragments_pushed > 0 and s, 60, "fragments from the rollout node")
        assert st.live_envs == 2 and st.env_steps >= 32
        st = stub.Stop(rollout_pb2.RolloutStopRequest(), timeout=90)
        assert st.state == 1
    session.update(stack["redis"], sid, phase="SESSION_PHASE_STOPPED")  # so later launches are not refused


def test_save_checkpoint_through_grpcurl_while_training(stack, tmp_path):
    from pathlib import Path

    request = json.dumps({"config": "cartpole", "overrides": SHORT_RUN[1:] + [
        "train_config.num_iterations=100000", f"train_config.save_path={tmp_path}"]})
    session = json.loads(grpcurl("-d", request, stack["launcher"], "mso.v1.LauncherService/Launch").stdout)
    try:
        reply = json.loads(grpcurl("-d", "{}", stack["trainer"], "mso.v1.TrainerService/SaveCheckpoint").stdout)
        path = Path(reply["path"])
        assert path.parent.parent == tmp_path and path.parent.name == session["session_id"]
        assert json.loads((path / "state.json").read_text())["model_version"] >= 1
    finally:
        grpcurl("-d", "{}", stack["launcher"], "mso.v1.LauncherService/StopSession")


def test_the_embedded_redis_refuses_clients_without_its_password(stack):
    from services.shared.redis_server import connect

    port = stack["redis"].connection_pool.connection_kwargs["port"]
    with pytest.raises(ConnectionError, match="requires a password"):
        connect(f"redis://127.0.0.1:{port}/0", timeout=2)


def test_a_session_whose_rollouts_all_stop_shows_the_fault_then_fails_saying_why(stack):
    """Every rollout node gone: GetSession is not a silent RUNNING; it shows the trainer waiting among its
    faults, then fails the session after train_config.stall_timeout, naming the cause."""
    request = json.dumps({"config": "cartpole", "overrides": SHORT_RUN[1:] + [
        "train_config.num_iterations=100000", "train_config.stall_timeout=10"]})
    sid = json.loads(grpcurl("-d", request, stack["launcher"], "mso.v1.LauncherService/Launch").stdout)["session_id"]
    with channel(stack["rollout"]) as ch:
        rollout_pb2_grpc.RolloutServiceStub(ch).Stop(rollout_pb2.RolloutStopRequest(), timeout=90)
    with channel(stack["launcher"]) as ch:
        stub = launcher_pb2_grpc.LauncherServiceStub(ch)

        def get():
            return stub.GetSession(launcher_pb2.GetSessionRequest(session_id=sid), timeout=10)

        s = wait_until(lambda: (s := get()).phase == launcher_pb2.SESSION_PHASE_RUNNING and
                       any("no usable fragment for" in f for f in s.faults) and s, 30,
                       "GetSession to show the trainer waiting")
        assert any(f.startswith("trainer node") for f in s.faults), list(s.faults)
        s = wait_until(lambda: (s := get()).phase == launcher_pb2.SESSION_PHASE_FAILED and s, 60, "the session to fail")
    assert "no usable fragment for" in s.error and "stall_timeout" in s.error
    ledger = s.progress.ledger  # quiet: no producer, no trainer
    assert ledger.produced == ledger.consumed + ledger.dropped_stale + ledger.dropped_corrupt + ledger.pending
