"""The `mso` command line.

  mso run [CONFIG] [key=value ...]       start everything locally and train (default config: cartpole)
  mso config CONFIG [key=value ...]      print the resolved config as YAML, or the error; start nothing
  mso rollout serve | trainer serve | launcher serve     run one service (REDIS_URL, RAY_ADDRESS)
  mso launch --launcher HOST:PORT CONFIG [key=value ...] / mso status --launcher HOST:PORT
  mso bench [--quick]                    the benchmarks' table of ratios (benchmarks/README.md)

TLS and the shared token: the --tls-* flags set the MSO_TLS_* variables of services.shared.auth; the token is read
only from $MSO_TOKEN (a flag would show it in `ps`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time

import psutil

DEFAULT_CONFIG = "cartpole"
MILESTONES = [195.0, 475.0]  # mean returns whose first-reached times the summary reports (CartPole's bars)
PORTS = {"launcher": 50050, "rollout": 50051, "trainer": 50052}


def _split_config(args) -> tuple[str, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is None or "=" in config:
        overrides = ([config] if config else []) + overrides
        config = DEFAULT_CONFIG
    return config, overrides


def _redis_url(args) -> str:
    url = args.redis_url or os.environ.get("REDIS_URL")
    if not url:
        sys.exit("error: no Redis: pass --redis-url or set REDIS_URL")
    return url


def cmd_config(args) -> int:
    from services.shared.config import ConfigError, load

    name, overrides = _split_config(args)
    try:
        print(load(name, overrides).to_yaml(), end="")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args) -> int:
    """`python -m benchmarks` from the source checkout this mso is installed from (pip install -e .)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(f"error: mso bench runs the benchmarks/ folder of a source checkout, and there is none at {root}: "
              "install mso from its repository with pip install -e .", file=sys.stderr)
        return 2
    extra = (["--quick"] if args.quick else []) + ["--json", os.path.abspath(args.json)]
    return subprocess.call([sys.executable, "-m", "benchmarks", *extra], cwd=root)


def cmd_serve(args) -> int:
    address = f"{args.host}:{args.port}"
    url = _redis_url(args)
    from services.shared.redis_server import connect

    try:
        connect(url, timeout=args.redis_timeout).close()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.service == "launcher":
        return _serve_launcher(address, url)
    if args.service == "rollout":
        from services.rollout.server import serve

        serve(address, url, advertise=os.environ.get("MSO_ADVERTISE_ADDRESS"), metrics_port=args.metrics_port)
    else:
        from services.trainer.server import serve

        serve(address, url, advertise=os.environ.get("MSO_ADVERTISE_ADDRESS"))
    # The service has stopped its actors and its server; leaving Ray here and exiting at once spares the
    # second or two the interpreter's own teardown (gRPC, torch, Ray's atexit hooks) takes on these machines.
    from services.shared import ray_runtime

    ray_runtime.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_launcher(address: str, url: str) -> int:
    import shlex
    import threading

    from services.launcher.launch import Launcher
    from services.launcher.server import start_server
    from services.shared.redis_server import connect

    launcher = Launcher(connect(url))
    server = start_server(launcher, address)
    launcher.adopt()
    autolaunch = os.environ.get("MSO_AUTOLAUNCH", "").strip()
    if autolaunch:  # compose: `MSO_AUTOLAUNCH=cartpole docker compose up` trains with no further call
        overrides = shlex.split(os.environ.get("MSO_AUTOLAUNCH_OVERRIDES", ""))

        def launch():
            try:
                logging.info("MSO_AUTOLAUNCH: session %s running", launcher.launch(autolaunch, overrides))
            except Exception as exc:
                logging.error("MSO_AUTOLAUNCH=%s failed: %s", autolaunch, exc)

        threading.Thread(target=launch, name="autolaunch", daemon=True).start()
    server.wait_for_termination()
    return 0


def _format(p) -> str:
    ret = "   n/a" if math.isnan(p.mean_return) else f"{p.mean_return:6.1f}"
    return (f"iter {p.iteration}/{p.num_iterations}  env steps {p.env_steps}  {p.env_steps_per_second:7.0f} steps/s  "
            f"return {ret}  version {p.model_version}  lag {p.policy_lag:.2f}  queue {p.queue_depth}"
            + (f"  restarts {p.restarts}" if p.restarts else ""))


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, systemd, docker stop) or SIGHUP (a closed terminal): `mso run` stops
    everything exactly as on Ctrl-C, and exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminated(signum, _frame):
    raise Terminated(signum)


def cmd_run(args) -> int:
    from services.shared.config import ConfigError, allow_locally, load
    from services.launcher.embedded import Embedded
    from services.launcher.launch import Launcher, LaunchError
    from services.launcher.server import start_server
    from services.shared.redis_server import connect, redact
    from services.shared.protos import launcher_pb2

    name, overrides = _split_config(args)
    if os.environ.get("MSO_TLS_CERT") and not os.environ.get("MSO_TLS_CA"):
        print("error: mso run calls the services it serves: with --tls-cert/MSO_TLS_CERT give --tls-ca/MSO_TLS_CA "
              "(the CA that signed the certificate) too", file=sys.stderr)
        return 2
    started_at = psutil.Process().create_time()  # start-up is counted from the command, imports included
    try:
        cfg = load(name, overrides).cfg
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    allow_locally(name)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminated)
    needed = (cfg.rollout_config.num_rollout_workers * cfg.rollout_config.num_cpus_per_worker
              + cfg.train_config.num_workers + 1)
    embedded = Embedded(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), quiet=args.quiet)
    started = time.monotonic()
    server = None
    summary = {"config": name, "overrides": overrides}
    code = 1
    try:
        embedded.start()
        client = connect(embedded.redis_url)
        launcher = Launcher(client)
        server = start_server(launcher, f"{args.host}:{args.port}")
        print(f"mso: launcher on {server.address}, Redis {redact(embedded.redis_url)}", file=sys.stderr)
        sid = launcher.launch(name, overrides)
        summary["session_id"] = sid
        print(f"mso: session {sid} running ({time.monotonic() - started:.1f}s after start)", file=sys.stderr)
        from services.shared import session

        P = launcher_pb2.SessionPhase
        ENDED = {P.Name(p) for p in (P.SESSION_PHASE_FINISHED, P.SESSION_PHASE_FAILED, P.SESSION_PHASE_STOPPED)}
        last_print, best = 0.0, -math.inf
        milestones: dict[str, float] = {}  # mean return -> seconds after `mso run` started
        live = _live(args)
        while True:
            if embedded.supervise():
                session.update(client, sid, restarts=sum(embedded.restarts.values()))
            phase = session.read(client, sid)["phase"]
            p = launcher.progress(sid)
            if not math.isnan(p.mean_return):
                best = max(best, p.mean_return)
                for level in MILESTONES + ([args.until_return] if args.until_return else []):
                    if p.mean_return >= level:
                        milestones.setdefault(str(level), time.time() - started_at)
            if args.until_return and best >= args.until_return and phase == P.Name(P.SESSION_PHASE_RUNNING):
                launcher.stop(sid)
                session.update(client, sid, phase=P.Name(P.SESSION_PHASE_FINISHED))
                continue
            if live is not None:
                live.update(_format(p))
            elif time.monotonic() - last_print >= args.print_interval:
                print(f"mso: {_format(p)}", flush=True)
                last_print = time.monotonic()
            if phase in ENDED:  # not STOPPING: a StopSession still in flight gets its answer
                break
            time.sleep(0.5)
        if live is not None:
            live.stop()
        record = session.read(client, sid)
        summary.update(startup_seconds=_startup(client, sid, started_at), return_milestones=milestones,
                       service_restarts=dict(embedded.restarts))
        summary.update(phase=record["phase"], error=record["error"], mean_return=p.mean_return,
                       best_mean_return=best, env_steps=p.env_steps, iterations=p.iteration,
                       model_version=p.model_version, rollout_model_version=p.rollout_model_version, ledger=p.ledger, wall_seconds=time.monotonic() - started)
        print(f"mso: {record['phase']}: {_format(p)}" + (f"  error: {record['error']}" if record["error"] else ""))
        code = 0 if record["phase"] == P.Name(P.SESSION_PHASE_FINISHED) else 1
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"\nmso: {signal.Signals(signum).name}: stopping", file=sys.stderr)
        summary["phase"] = "INTERRUPTED"
        code = 128 + signum
    except (LaunchError, ConfigError, RuntimeError, ConnectionError) as exc:
        print(f"mso: error: {exc}", file=sys.stderr)
        summary.update(phase="FAILED", error=str(exc))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abandon the stop half way
        if server is not None:
            server.stop(grace=0.5 if summary.get("phase") == "INTERRUPTED" else 2.0)
        embedded.stop(grace=4.0 if summary.get("phase") == "INTERRUPTED" else 10.0)
        if args.summary:
            with open(args.summary, "w") as f:
                json.dump(summary, f, indent=2, default=float)
    return code


def _startup(client, sid: str, started_at: float) -> dict:
    """Seconds from `mso run` to the first fragment in Redis and to the first trainer update."""
    from services.shared import keys

    sk = keys.SessionKeys(sid)
    first_fragment = client.hget(sk.ledger, "first_fragment_at")
    first_update = client.hget(sk.trainer, "first_update_at")
    return {"first_fragment": float(first_fragment) - started_at if first_fragment else None,
            "first_update": float(first_update) - started_at if first_update else None}


def _live(args):
    if args.quiet or not sys.stdout.isatty():
        return None
    from rich.live import Live
    from rich.text import Text

    class Line:
        def __init__(self):
            self.live = Live(Text(""), refresh_per_second=4, transient=False)
            self.live.start()

        def update(self, text: str) -> None:
            self.live.update(Text(text))

        def stop(self) -> None:
            self.live.stop()

    return Line()


def cmd_health(args) -> int:
    """Exit 0 only when the server at address answers SERVING on grpc.health.v1 (compose healthchecks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.shared.rpc import channel

    with channel(args.address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                         timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_launch(args) -> int:
    from services.shared.rpc import channel
    from services.shared.protos import launcher_pb2, launcher_pb2_grpc

    import grpc

    name, overrides = _split_config(args)
    with channel(args.launcher) as ch:
        try:
            s = launcher_pb2_grpc.LauncherServiceStub(ch).Launch(
                launcher_pb2.LaunchRequest(config=name, overrides=overrides), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"session {s.session_id}: {launcher_pb2.SessionPhase.Name(s.phase)}")
    return 0


def cmd_status(args) -> int:
    from google.protobuf.json_format import MessageToJson

    import grpc
    from services.shared.rpc import CALL_TIMEOUT, channel
    from services.shared.protos import launcher_pb2, launcher_pb2_grpc

    with channel(args.launcher) as ch:
        try:
            s = launcher_pb2_grpc.LauncherServiceStub(ch).GetSession(
                launcher_pb2.GetSessionRequest(session_id=args.session or ""), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    s.ClearField("config_yaml")
    print(MessageToJson(s, preserving_proto_field_name=True))
    return 0


# flag -> the services.shared.auth environment variable it sets, for this process and the processes it starts
SERVER_TLS_FLAGS = {"--tls-cert": "MSO_TLS_CERT", "--tls-key": "MSO_TLS_KEY", "--tls-client-ca": "MSO_TLS_CLIENT_CA"}
CLIENT_TLS_FLAGS = {"--tls-ca": "MSO_TLS_CA", "--tls-client-cert": "MSO_TLS_CLIENT_CERT",
                    "--tls-client-key": "MSO_TLS_CLIENT_KEY", "--tls-server-name": "MSO_TLS_SERVER_NAME"}
TLS_HELP = {"--tls-cert": "serve TLS with this PEM certificate (chain)", "--tls-key": "the PEM key of --tls-cert",
            "--tls-client-ca": "require client certificates signed by this CA (mTLS)",
            "--tls-ca": "connect with TLS, trusting servers signed by this CA",
            "--tls-client-cert": "client certificate to present (mTLS)", "--tls-client-key": "its PEM key",
            "--tls-server-name": "name expected in server certificates instead of the dialled host"}


def _tls_args(p, flags: dict) -> None:
    for flag, var in flags.items():
        p.add_argument(flag, dest=var, default=None, metavar="PATH" if flag != "--tls-server-name" else "NAME",
                       help=f"{TLS_HELP[flag]} (${var})")


def _apply_tls_args(args) -> None:
    """Flags win over the environment, and reach child processes through it."""
    for var in (*SERVER_TLS_FLAGS.values(), *CLIENT_TLS_FLAGS.values()):
        if getattr(args, var, None):
            os.environ[var] = getattr(args, var)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mso", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p):
        p.add_argument("config", nargs="?", help=f"built-in name, dotted module or .py path (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", help="OmegaConf dot-list overrides, e.g. train_config.learning_rate=1e-4")

    p = sub.add_parser("run", help="start everything locally and train")
    config_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=PORTS["launcher"], help="LauncherService port (0: any free port)")
    p.add_argument("--summary", help="write a JSON summary of the run here")
    p.add_argument("--quiet", action="store_true", help="no live line, no service logs")
    p.add_argument("--print-interval", type=float, default=2.0, help="seconds between progress lines (no tty)")
    p.add_argument("--until-return", type=float, default=None,
                   help="stop (as finished) once the mean return of the last 20 episodes reaches this")
    _tls_args(p, SERVER_TLS_FLAGS | CLIENT_TLS_FLAGS)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("config", help="print the resolved config, or the error")
    config_args(p)
    p.set_defaults(fn=cmd_config)

    for service in ("rollout", "trainer", "launcher"):
        p = sub.add_parser(service, help=f"the {service} service")
        s = p.add_subparsers(dest="action", required=True).add_parser("serve", help=f"run the {service} service")
        s.add_argument("--host", default=os.environ.get("MSO_HOST", "127.0.0.1"),
                       help="interface to bind (default loopback; MSO_HOST=0.0.0.0 in the container image)")
        s.add_argument("--port", type=int, default=int(os.environ.get("MSO_PORT", PORTS[service])))
        s.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
        s.add_argument("--redis-timeout", type=float, default=30.0,
                       help="seconds to wait for Redis at start before exiting with an error")
        if service == "rollout":
            s.add_argument("--metrics-port", type=int, default=int(os.environ.get("MSO_METRICS_PORT", 0)),
                           help="serve Prometheus metrics on this port (0: off)")
        _tls_args(s, SERVER_TLS_FLAGS | (CLIENT_TLS_FLAGS if service == "launcher" else {}))
        s.set_defaults(fn=cmd_serve, service=service)

    p = sub.add_parser("bench", help="run the benchmarks (benchmarks/ of the source checkout): one table of ratios")
    p.add_argument("--quick", action="store_true", help="shorter windows, no 1 GB weights (~1.5 min)")
    p.add_argument("--json", default="benchmarks.json", help="write the table here too")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("health", help="exit 0 only if a service answers SERVING on grpc.health.v1")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0)
    _tls_args(p, CLIENT_TLS_FLAGS)
    p.set_defaults(fn=cmd_health)

    p = sub.add_parser("launch", help="launch a session through a running LauncherService")
    config_args(p)
    p.add_argument("--launcher", default=f"127.0.0.1:{PORTS['launcher']}")
    p.add_argument("--timeout", type=float, default=600.0)
    _tls_args(p, CLIENT_TLS_FLAGS)
    p.set_defaults(fn=cmd_launch)

    p = sub.add_parser("status", help="show a session through a running LauncherService")
    p.add_argument("--launcher", default=f"127.0.0.1:{PORTS['launcher']}")
    p.add_argument("--session", default="")
    _tls_args(p, CLIENT_TLS_FLAGS)
    p.set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MSO_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    _apply_tls_args(args)
    from services.shared.auth import SecurityConfigError, client_credentials, server_credentials

    try:  # a bad TLS setting is reported before anything starts
        if hasattr(args, "MSO_TLS_CERT"):
            server_credentials()
        if hasattr(args, "MSO_TLS_CA"):
            client_credentials()
    except SecurityConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
