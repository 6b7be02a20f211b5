"""Run as a fresh interpreter, the way a service starts: a gRPC server of ours under calls while the main
thread starts processes as Ray does (subprocess.Popen with a preexec_fn, which forks). Prints the exit code
of every child: a child that died between fork and exec shows as a negative code (its signal)."""

import subprocess
import sys
import threading

import services  # noqa: F401  (first, as in `mso ...` and `python -m services.cli`)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.shared.rpc import Server, channel


def block_sigint():  # Ray's preexec_fn does this, and sets its parent-death signal
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


server = Server("127.0.0.1:0")
server.start()
done = threading.Event()


def call_health():
    with channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not done.is_set():
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)


callers = [threading.Thread(target=call_health) for _ in range(2)]
for t in callers:
    t.start()
codes = [subprocess.Popen(["/bin/true"], preexec_fn=block_sigint).wait() for _ in range(int(sys.argv[1]))]
done.set()
for t in callers:
    t.join()
print(" ".join(map(str, codes)))
