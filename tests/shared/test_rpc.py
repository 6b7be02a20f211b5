"""The gRPC plumbing every service shares: streams cannot take every server thread, so the calls that
change things stay serviceable however many watchers connect (token or not); a service can start processes
(Ray's) while it serves calls."""

import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher.launch import Launcher
from services.launcher.server import start_server
from services.shared.rpc import MAX_STREAMS
from services.shared.protos import launcher_pb2, launcher_pb2_grpc


def test_watchers_cannot_starve_the_other_calls(redis_client):
    server = start_server(Launcher(redis_client), "127.0.0.1:0")
    ch = grpc.insecure_channel(server.address)
    try:
        streams = [health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60)
                   for _ in range(2 * MAX_STREAMS)]
        outcomes = []
        for stream in streams:
            try:
                next(stream)
                outcomes.append("open")
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
                assert "streams are open on this server" in exc.details()
        assert outcomes.count("open") == MAX_STREAMS
        assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == MAX_STREAMS
        # Every thread a stream may take is taken: a unary call is still answered at once.
        launcher_pb2_grpc.LauncherServiceStub(ch).ListNodes(launcher_pb2.ListNodesRequest(), timeout=2)
        for stream in streams:
            stream.cancel()
    finally:
        ch.close()
        server.stop(grace=0)


def test_a_service_can_start_processes_while_it_serves_calls():
    """A service starts Ray's GCS and raylet (Popen with a preexec_fn: a fork) while its gRPC server answers
    GetStatus, health checks and Starts. With gRPC's fork handlers on, a child now and then died before exec:
    Ray then waited out its whole GCS-port wait for a GCS that did not exist, and the node's Start failed ("Timed out waiting for
    file .../gcs_server_port_..."). A fresh interpreter, as `mso rollout serve` is; every child must exec."""
    forks = 300
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("fork_while_serving.py")), str(forks)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    codes = [int(c) for c in out.stdout.split()]
    assert len(codes) == forks
    died = [c for c in codes if c != 0]
    assert died == [], f"{len(died)} of {forks} children died before exec, of signals {sorted(set(died))}"
