"""Who may talk to a service: gRPC TLS credentials (server certificate, optional client certificates) and
the shared bearer token that guards the mutating calls. Everything is read from environment variables,
so one setting reaches a service, the clients inside it and the processes it starts; the CLI's flags
only set these variables. Unset, the services speak plaintext and take every call, as before.

  server   MSO_TLS_CERT, MSO_TLS_KEY     serve TLS with this certificate chain and key (PEM files)
           MSO_TLS_CLIENT_CA             also require client certificates signed by this CA (mTLS)
  client   MSO_TLS_CA                    connect with TLS, trusting servers signed by this CA
           MSO_TLS_CLIENT_CERT, _KEY     present this client certificate (for a server with mTLS)
           MSO_TLS_SERVER_NAME           expect this name in server certificates instead of the host
                                         dialled (one certificate for nodes with changing addresses)
  both     MSO_TOKEN                     servers refuse mutating calls without it; clients send it
"""

from __future__ import annotations

import hmac
import os

import grpc

TOKEN_ENV = "MSO_TOKEN"
SERVER_TLS_ENV = ("MSO_TLS_CERT", "MSO_TLS_KEY", "MSO_TLS_CLIENT_CA")
CLIENT_TLS_ENV = ("MSO_TLS_CA", "MSO_TLS_CLIENT_CERT", "MSO_TLS_CLIENT_KEY", "MSO_TLS_SERVER_NAME")

# Calls that only read are open to anyone who can reach the port, so health checks, grpcurl `list` and
# dashboards need no secret; every other call, including any added later, needs the token.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
OPEN_METHOD_PREFIXES = ("Get", "List", "Watch")


class SecurityConfigError(ValueError):
    """A TLS or token setting that cannot be used (a missing file, a key without its certificate)."""


def _read(var: str) -> bytes | None:
    path = os.environ.get(var, "").strip()
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SecurityConfigError(f"{var}={path}: cannot read it: {exc.strerror}") from None


def _pair(cert_var: str, key_var: str) -> tuple[bytes, bytes] | None:
    cert, key = _read(cert_var), _read(key_var)
    if (cert is None) != (key is None):
        missing, given = (key_var, cert_var) if key is None else (cert_var, key_var)
        raise SecurityConfigError(f"{given} is set but {missing} is not: a certificate needs its key")
    return None if cert is None else (cert, key)


def server_credentials() -> grpc.ServerCredentials | None:
    """TLS credentials for a server from MSO_TLS_CERT/KEY (and MSO_TLS_CLIENT_CA), or None: plaintext."""
    pair = _pair("MSO_TLS_CERT", "MSO_TLS_KEY")
    client_ca = _read("MSO_TLS_CLIENT_CA")
    if pair is None:
        if client_ca is not None:
            raise SecurityConfigError("MSO_TLS_CLIENT_CA is set but MSO_TLS_CERT/MSO_TLS_KEY are not: "
                                      "client certificates are checked only on a TLS server")
        return None
    cert, key = pair
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def client_credentials() -> tuple[grpc.ChannelCredentials, list] | None:
    """TLS credentials and channel options for a client from MSO_TLS_CA and the client certificate, or
    None: plaintext."""
    ca = _read("MSO_TLS_CA")
    pair = _pair("MSO_TLS_CLIENT_CERT", "MSO_TLS_CLIENT_KEY")
    if ca is None:
        if pair is not None:
            raise SecurityConfigError("MSO_TLS_CLIENT_CERT is set but MSO_TLS_CA is not: set the CA that "
                                      "signed the servers' certificates to connect with TLS")
        return None
    key, cert = (pair[1], pair[0]) if pair else (None, None)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    name = os.environ.get("MSO_TLS_SERVER_NAME", "").strip()
    return creds, [("grpc.ssl_target_name_override", name)] if name else []


def token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def is_open(method: str) -> bool:
    """Whether a full method name ("/pkg.Service/Method") may be called without the token."""
    service, _, name = method.lstrip("/").partition("/")
    return service in OPEN_SERVICES or name.startswith(OPEN_METHOD_PREFIXES)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call that is not open with UNAUTHENTICATED unless it carries
    `authorization: Bearer <token>`."""

    def __init__(self, expected: str):
        self._expected = expected.encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        scheme, _, given = sent.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._expected):
            return handler
        message = (f"{handler_call_details.method} needs the shared token: send metadata "
                   f"'authorization: Bearer <token>' (the mso CLI sends ${TOKEN_ENV})") if not sent else \
            f"{handler_call_details.method}: the bearer token is wrong (it does not match this server's {TOKEN_ENV})"
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def refuse(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a client channel."""

    def __init__(self, value: str):
        self._metadata = ("authorization", f"Bearer {value}")

    def _with_token(self, details):
        return details._replace(metadata=list(details.metadata or ()) + [self._metadata])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


def with_token(channel: grpc.Channel) -> grpc.Channel:
    """channel, sending MSO_TOKEN with every call when it is set."""
    value = token()
    return grpc.intercept_channel(channel, _TokenMetadata(value)) if value else channel


# The command line's TLS flags: each sets the variable above, for this process and the processes it starts.
SERVER_TLS_FLAGS = {"--tls-cert": "MSO_TLS_CERT", "--tls-key": "MSO_TLS_KEY", "--tls-client-ca": "MSO_TLS_CLIENT_CA"}
CLIENT_TLS_FLAGS = {"--tls-ca": "MSO_TLS_CA", "--tls-client-cert": "MSO_TLS_CLIENT_CERT",
                    "--tls-client-key": "MSO_TLS_CLIENT_KEY", "--tls-server-name": "MSO_TLS_SERVER_NAME"}
TLS_HELP = {"--tls-cert": "serve TLS with this PEM certificate (chain)", "--tls-key": "the PEM key of --tls-cert",
            "--tls-client-ca": "require client certificates signed by this CA (mTLS)",
            "--tls-ca": "connect with TLS, trusting servers signed by this CA",
            "--tls-client-cert": "client certificate to present (mTLS)", "--tls-client-key": "its PEM key",
            "--tls-server-name": "name expected in server certificates instead of the dialled host"}


def add_tls_arguments(parser, server: bool, client: bool) -> None:
    """The --tls-* flags of a command that serves (server) and/or calls (client) gRPC."""
    flags = (SERVER_TLS_FLAGS if server else {}) | (CLIENT_TLS_FLAGS if client else {})
    for flag, var in flags.items():
        parser.add_argument(flag, dest=var, default=None, metavar="NAME" if flag == "--tls-server-name" else "PATH",
                            help=f"{TLS_HELP[flag]} (${var})")


def apply_tls_arguments(args) -> None:
    """Flags win over the environment, and reach child processes through it. SecurityConfigError (naming the
    variable) when a setting cannot be used, checked before anything starts."""
    for var in (*SERVER_TLS_FLAGS.values(), *CLIENT_TLS_FLAGS.values()):
        if getattr(args, var, None):
            os.environ[var] = getattr(args, var)
    if hasattr(args, "MSO_TLS_CERT"):
        server_credentials()
    if hasattr(args, "MSO_TLS_CA"):
        client_credentials()
