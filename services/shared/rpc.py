"""gRPC plumbing every service shares: a server with health, reflection, raised size limits, a graceful
SIGTERM stop and the TLS and token settings of services.shared.auth; client channels with the same limits and
settings; the deadline every client call carries."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.shared import auth
from services.shared.config import ConfigError
from services.shared.session import SessionError, SessionNotFound, valid_id

log = logging.getLogger(__name__)

# Fragments and weights travel through Redis, never gRPC. No request is large (a config name and its
# overrides at most), so a server accepts gRPC's default 4 MiB from anyone; replies (a status with a resolved
# config and many nodes) may be larger, and clients accept them.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
]
# Streams (WatchMetrics, WatchEpisodes, Health/Watch) hold a server thread each for as long as they last:
# at most MAX_STREAMS at once, and the pool has UNARY_THREADS more, so Launch, Stop and GetStatus are always
# served however many watchers connect.
MAX_STREAMS = 8
UNARY_THREADS = 8
# Default deadline of a unary client call, in seconds. Start calls get longer ones: a node's Start may start
# its own Ray instance (Ray waits up to 30 s for its GCS) and then its actors (up to
# 180 s); a shorter deadline gave up on a node that was still starting on a loaded host.
CALL_TIMEOUT = 10.0
START_TIMEOUT = 300.0


class Server:
    """A gRPC server on one port: the service's own API, grpc.health.v1 and server reflection; TLS when
    MSO_TLS_CERT is set, and the token check on mutating calls when MSO_TOKEN is set (see services.shared.auth)."""

    def __init__(self, address: str):
        credentials = auth.server_credentials()
        self.token = auth.token()
        interceptors = ([auth.TokenInterceptor(self.token)] if self.token else []) + [StreamLimit(MAX_STREAMS)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + UNARY_THREADS),
                                options=SERVER_OPTIONS, interceptors=interceptors)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.tls = credentials is not None
        self.port = (self.grpc.add_secure_port(address, credentials) if self.tls
                     else self.grpc.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        self._host = address.rsplit(":", 1)[0]
        self._service_names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """Where others reach this server. Bound to every interface (a container), at this host's address as
        it is now, not 0.0.0.0: a container reconnected to its network comes back with another one."""
        return f"{reachable_host() if self._host in ('0.0.0.0', '[::]') else self._host}:{self.port}"

    def add(self, add_fn, servicer, service_name: str) -> None:
        add_fn(servicer, self.grpc)
        self._service_names.append(service_name)

    def start(self) -> None:
        reflection.enable_server_reflection(self._service_names, self.grpc)
        self.grpc.start()
        for name in self._service_names[1:] + [""]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (%s%s)", ", ".join(self._service_names[2:]), self.address,
                 "TLS" if self.tls else "plaintext", ", token required for changes" if self.token else "")

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait()

    def wait_for_termination(self, on_stop=None) -> None:
        """Block until SIGTERM or SIGINT, then run on_stop (release actors) and stop gracefully."""
        done = threading.Event()

        def handle(signum, _frame):
            log.info("signal %s: stopping", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        while not done.wait(0.5):
            if self._stopped.is_set():
                break
        if on_stop is not None:
            on_stop()
        self.stop()


class StreamLimit(grpc.ServerInterceptor):
    """Refuses a server-streaming call with RESOURCE_EXHAUSTED while `limit` streams are open."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming or handler.request_streaming:
            return handler
        behavior, slots, limit = handler.unary_stream, self._slots, self.limit

        def limited(request, context):
            if not slots.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{limit} streams are open on this server, the most it serves at once; "
                              "close one or try again later")
            try:
                yield from behavior(request, context)
            finally:
                slots.release()

        return grpc.unary_stream_rpc_method_handler(limited, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)


def reachable_host() -> str:
    """This machine's address as others on its network see it (a container's IP in compose)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def channel(address: str) -> grpc.Channel:
    """A client channel to address: TLS when MSO_TLS_CA is set, sending MSO_TOKEN when it is set."""
    tls = auth.client_credentials()
    if tls is None:
        return auth.with_token(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
    credentials, options = tls
    return auth.with_token(grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS + options))


def wait_serving(address: str, timeout: float) -> None:
    """Block until the server at address reports SERVING on grpc.health.v1, or raise TimeoutError."""
    with channel(address) as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"no gRPC server answered at {address} within {timeout:.0f}s") from None
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise TimeoutError(f"{address} is not SERVING: {reply.status}")


def abort_for(context: grpc.ServicerContext, exc: Exception) -> None:
    """Abort the call with the status an error of a node's manager means: an unknown session NOT_FOUND; a call
    in the wrong state, or a session this node cannot run (another trainer holds it, its config differs or
    does not load here) FAILED_PRECONDITION; anything else INTERNAL. The message is the error's."""
    if isinstance(exc, SessionNotFound):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, (SessionError, ConfigError)):
        code = grpc.StatusCode.FAILED_PRECONDITION
    else:
        code = grpc.StatusCode.INTERNAL
    context.abort(code, str(exc))


def require_session_id(context: grpc.ServicerContext, session_id: str) -> None:
    """Abort the call with INVALID_ARGUMENT unless session_id is well formed (never echoing it: it may be
    huge); a well-formed but unknown id is the caller's NOT_FOUND to give."""
    if not valid_id(session_id):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id must be 1-64 lowercase hex characters")
