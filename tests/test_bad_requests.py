"""Malformed gRPC requests get the right status code with a message, and every service stays up:
a table of cases, then a property-based run over request fields."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.shared.rpc import channel
from services.shared.protos import launcher_pb2, launcher_pb2_grpc, rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc

C = grpc.StatusCode
R, T, L = rollout_pb2, trainer_pb2, launcher_pb2
CASES = [
    ("rollout", "Start", R.RolloutStartRequest(session_id=""), C.INVALID_ARGUMENT, "empty"),
    ("rollout", "Start", R.RolloutStartRequest(session_id="   "), C.INVALID_ARGUMENT, "empty"),
    ("rollout", "Start", R.RolloutStartRequest(session_id="abc123"), C.NOT_FOUND, "abc123"),
    ("rollout", "Start", R.RolloutStartRequest(session_id="nope"), C.INVALID_ARGUMENT, "hex"),
    ("rollout", "Start", R.RolloutStartRequest(session_id="a" * 100_000), C.INVALID_ARGUMENT, "hex"),
    ("rollout", "Start", R.RolloutStartRequest(session_id="\x00\xff☃"), C.INVALID_ARGUMENT, "hex"),
    ("rollout", "Scale", R.ScaleRequest(num_workers=0), C.INVALID_ARGUMENT, "at least 1"),
    ("rollout", "Scale", R.ScaleRequest(num_workers=-7), C.INVALID_ARGUMENT, "at least 1"),
    ("rollout", "Scale", R.ScaleRequest(num_workers=3), C.FAILED_PRECONDITION, "Start first"),
    ("rollout", "WatchEpisodes", R.WatchEpisodesRequest(session_id="abc123"), C.NOT_FOUND, "abc123"),
    ("rollout", "WatchEpisodes", R.WatchEpisodesRequest(session_id="nope"), C.INVALID_ARGUMENT, "hex"),
    ("trainer", "Start", T.TrainerStartRequest(session_id=""), C.INVALID_ARGUMENT, "empty"),
    ("trainer", "Start", T.TrainerStartRequest(session_id="abc123"), C.NOT_FOUND, "abc123"),
    ("trainer", "Start", T.TrainerStartRequest(session_id="y" * 100_000), C.INVALID_ARGUMENT, "hex"),
    ("trainer", "WatchMetrics", T.WatchMetricsRequest(session_id="abc123"), C.NOT_FOUND, "abc123"),
    ("trainer", "WatchMetrics", T.WatchMetricsRequest(session_id="NOPE"), C.INVALID_ARGUMENT, "hex"),
    ("launcher", "Launch", L.LaunchRequest(config=""), C.INVALID_ARGUMENT, "empty"),
    ("launcher", "Launch", L.LaunchRequest(config="   "), C.INVALID_ARGUMENT, "empty"),
    ("launcher", "Launch", L.LaunchRequest(config="no_such_config"), C.INVALID_ARGUMENT, "not a built-in"),
    ("launcher", "Launch", L.LaunchRequest(config="os"), C.INVALID_ARGUMENT, "MSO_CONFIG_MODULES"),
    ("launcher", "Launch", L.LaunchRequest(config="/etc/passwd"), C.INVALID_ARGUMENT, "outside"),
    ("launcher", "Launch", L.LaunchRequest(config="../../etc/x.py"), C.INVALID_ARGUMENT, "outside"),
    ("launcher", "Launch", L.LaunchRequest(config="c" * 10_000), C.INVALID_ARGUMENT, "256"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["no_equals"]), C.INVALID_ARGUMENT,
     "KEY=VALUE"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["train_config.learning_rat=1"]), C.INVALID_ARGUMENT,
     "did you mean train_config.learning_rate"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["train_config.learning_rate=fast"]),
     C.INVALID_ARGUMENT, "learning_rate"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["train_config=3"]), C.INVALID_ARGUMENT,
     "train_config"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["rollout_config.fragment_length=-1"]),
     C.INVALID_ARGUMENT, "at least 1"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["a=1"] * 1000), C.INVALID_ARGUMENT,
     "at most"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=[
        "rollout_config.worker_config.video_output_dir=${oc.env:REDIS_URL}"]), C.INVALID_ARGUMENT, "interpolations"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["trainer_name=ImpalaTrainer"]),
     C.INVALID_ARGUMENT, "only PPOTrainer"),
    ("launcher", "Launch", L.LaunchRequest(config="cartpole", overrides=["x=" + "a" * (5 << 20)]),
     C.RESOURCE_EXHAUSTED, "larger than max"),
    ("launcher", "GetSession", L.GetSessionRequest(session_id="abc123"), C.NOT_FOUND, "abc123"),
    ("launcher", "GetSession", L.GetSessionRequest(session_id="n" * 5000), C.INVALID_ARGUMENT, "hex"),
    ("launcher", "StopSession", L.StopSessionRequest(session_id="abc123"), C.NOT_FOUND, "abc123"),
]
STUBS = {"rollout": rollout_pb2_grpc.RolloutServiceStub, "trainer": trainer_pb2_grpc.TrainerServiceStub,
         "launcher": launcher_pb2_grpc.LauncherServiceStub}
SERVICE_NAMES = {"rollout": "mso.v1.RolloutService", "trainer": "mso.v1.TrainerService",
                 "launcher": "mso.v1.LauncherService"}


def call(stack, service, method, request):
    with channel(stack[service]) as ch:
        result = getattr(STUBS[service](ch), method)(request, timeout=30)
        if method.startswith("Watch"):
            next(iter(result))


def assert_serving(stack):
    for service, name in SERVICE_NAMES.items():
        with channel(stack[service]) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.mark.parametrize("service, method, request_, code, message", CASES,
                         ids=[f"{c[0]}.{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_malformed_request_gets_a_clear_status(stack, service, method, request_, code, message):
    with pytest.raises(grpc.RpcError) as err:
        call(stack, service, method, request_)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()


def test_services_are_still_serving_after_the_table(stack):
    assert_serving(stack)


def test_a_config_module_that_kills_its_process_while_loading_fails_the_launch_not_the_launcher(stack):
    """The launcher resolves a Launch's config in a child interpreter (config.LaunchLoad) unless its online_dict
    is a literal it can read; it used to import the module into its own process, which this module ended."""
    with pytest.raises(grpc.RpcError) as err:
        call(stack, "launcher", "Launch", L.LaunchRequest(config="exits_while_loading_config"))
    assert err.value.code() == C.INVALID_ARGUMENT, err.value.details()
    assert "exits_while_loading_config: loading it exited with code 3" in err.value.details()
    assert_serving(stack)


ALLOWED = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.text(max_size=40), overrides=st.lists(st.text(max_size=30), max_size=4),
       session_id=st.text(max_size=40), workers=st.integers(min_value=-2**31, max_value=0))
def test_random_request_fields_never_crash_a_service(stack, config, overrides, session_id, workers):
    requests = [("launcher", "Launch", L.LaunchRequest(config=config, overrides=overrides)),
                ("launcher", "GetSession", L.GetSessionRequest(session_id=session_id or "x")),
                ("rollout", "Start", R.RolloutStartRequest(session_id=session_id)),
                ("rollout", "Scale", R.ScaleRequest(num_workers=workers)),
                ("trainer", "Start", T.TrainerStartRequest(session_id=session_id))]
    for service, method, request in requests:
        try:
            call(stack, service, method, request)
        except grpc.RpcError as exc:
            assert exc.code() in ALLOWED, (service, method, request, exc.code(), exc.details())
            assert exc.details()
        else:
            # Random text naming a real config (say "cartpole") would launch a session: assert it did not.
            assert not (service == "launcher" and method == "Launch"), f"random config {config!r} launched"
