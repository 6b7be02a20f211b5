"""The `mso` command line: the front door above the three services. It parses arguments and hands each
command to the part that does it.

  mso run [CONFIG] [key=value ...]       start everything locally and train (default config: cartpole)
  mso config CONFIG [key=value ...]      print the resolved config as YAML, or the error; start nothing
  mso rollout serve | trainer serve | launcher serve     run one service (REDIS_URL, RAY_ADDRESS)
  mso launch --launcher HOST:PORT CONFIG [key=value ...] / mso status --launcher HOST:PORT
  mso top --launcher HOST:PORT           a live view of a running session (nodes, steps/s, ledger, faults)
  mso health HOST:PORT                   exit 0 only if the service there is SERVING
  mso bench [--quick] [--json PATH]      the benchmarks' table of ratios (benchmarks/README.md)
  mso tensorboard [LOGDIR] [--port N]    TensorBoard on the runs' logs (default $MSO_LOG_DIR or runs)

TLS: the --tls-* flags set the MSO_TLS_* variables of services.shared.auth; the shared token is read only
from $MSO_TOKEN (a flag would show it in `ps`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from services.shared import startup_gc

DEFAULT_CONFIG = "cartpole"
PORTS = {"launcher": 50050, "rollout": 50051, "trainer": 50052}


def _config_and_overrides(args) -> tuple[str, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is None or "=" in config:
        overrides = ([config] if config else []) + overrides
        config = DEFAULT_CONFIG
    return config, overrides


def cmd_run(args) -> int:
    from services.launcher.run import RunOptions, run

    name, overrides = _config_and_overrides(args)
    return run(name, overrides, RunOptions(host=args.host, port=args.port, summary=args.summary, quiet=args.quiet,
                                           print_interval=args.print_interval, until_return=args.until_return,
                                           until_steps=args.until_steps, curve_interval=args.curve_interval))


def cmd_config(args) -> int:
    from services.shared.config import ConfigError, load

    name, overrides = _config_and_overrides(args)
    try:
        print(load(name, overrides).to_yaml(), end="")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(args) -> int:
    url = args.redis_url or os.environ.get("REDIS_URL")
    if not url:
        print("error: no Redis: pass --redis-url or set REDIS_URL", file=sys.stderr)
        return 2
    from services.shared.redis_server import connect

    try:
        connect(url, timeout=args.redis_timeout).close()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    address, advertise = f"{args.host}:{args.port}", os.environ.get("MSO_ADVERTISE_ADDRESS")
    if args.service == "launcher":
        from services.launcher.server import serve

        serve(address, url)
        return 0
    if args.service == "rollout":
        from services.rollout.server import serve

        serve(address, url, advertise=advertise, metrics_port=args.metrics_port, warm_again=not args.warm_once)
    else:
        from services.trainer.server import serve

        serve(address, url, advertise=advertise, warm_again=not args.warm_once)
    # The service has stopped its actors and its server; leaving Ray here and exiting at once spares the
    # second or two the interpreter's own teardown (gRPC, torch, Ray's atexit hooks) takes on these machines.
    from services.shared import ray_runtime

    ray_runtime.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_tensorboard(args) -> int:
    """TensorBoard on a run's logs (mso run prints the folder of its session), in the foreground until Ctrl-C.
    This process becomes TensorBoard (exec), so a signal sent to its pid alone (`docker stop`, systemd,
    `timeout`, kill) stops TensorBoard: run as a child, it was left serving the port with nobody to stop it."""
    logdir = args.logdir or os.environ.get("MSO_LOG_DIR", "runs")
    if not os.path.isdir(logdir):
        print(f"error: no TensorBoard logs at {os.path.abspath(logdir)}: give the folder mso run printed "
              "(runs/SESSION) or set MSO_LOG_DIR", file=sys.stderr)
        return 2
    print(f"mso: TensorBoard on {os.path.abspath(logdir)} at http://{args.host}:{args.port}/ (Ctrl-C to stop)",
          flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", f"--host={args.host}",
                              f"--port={args.port}"])


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
    import grpc

    from services.shared.protos import launcher_pb2, launcher_pb2_grpc
    from services.shared.rpc import channel

    name, overrides = _config_and_overrides(args)
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
    import grpc
    from google.protobuf.json_format import MessageToJson

    from services.shared.protos import launcher_pb2, launcher_pb2_grpc
    from services.shared.rpc import CALL_TIMEOUT, channel

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


def cmd_top(args) -> int:
    import grpc

    from services.launcher.top import watch

    try:
        return watch(args.launcher, args.session or "", args.interval, args.once)
    except grpc.RpcError as exc:
        print(f"error: launcher {args.launcher}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def cmd_bench(args) -> int:
    """The benchmarks of the source checkout this mso is installed from (pip install -e .); they take their
    own arguments (benchmarks/__main__.py)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(f"error: mso bench runs the benchmarks/ folder of a source checkout, and there is none at {root}: "
              "install mso from its repository with pip install -e .", file=sys.stderr)
        return 2
    if args.arguments[:1] == ["crafter"]:  # the Crafter score at 1M steps (about an hour): its own script
        return subprocess.call([sys.executable, "-m", "benchmarks.crafter_score", *args.arguments[1:]], cwd=root)
    passed, given = [], iter(args.arguments)
    for a in given:  # the JSON path is the caller's, relative to where mso bench was run
        if a == "--json":
            a = f"--json={next(given, 'benchmarks.json')}"
        passed.append(f"--json={os.path.abspath(a[len('--json='):])}" if a.startswith("--json=") else a)
    if not any(a.startswith("--json=") for a in passed):
        passed.append(f"--json={os.path.abspath('benchmarks.json')}")
    return subprocess.call([sys.executable, "-m", "benchmarks", *passed], cwd=root)


def build_parser() -> argparse.ArgumentParser:
    from services.shared.auth import add_tls_arguments

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
    p.add_argument("--until-steps", type=int, default=None,
                   help="stop (as finished) once the rollouts have taken this many env steps")
    p.add_argument("--curve-interval", type=float, default=10.0,
                   help="seconds between the points of the --summary's curve")
    add_tls_arguments(p, server=True, client=True)
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
        if service != "launcher":
            s.add_argument("--warm-once", action="store_true",
                           help="start actors ahead of a session only when joining Ray, not again after each "
                                "session (mso run's services, which serve one session)")
        add_tls_arguments(s, server=True, client=service == "launcher")
        s.set_defaults(fn=cmd_serve, service=service)

    p = sub.add_parser("bench", help="run the benchmarks (benchmarks/ of the source checkout): one table of ratios",
                       description="Arguments go to `python -m benchmarks`: --quick (shorter windows, ~1.5 min), "
                                   "--json PATH (the table as JSON too). `mso bench crafter [--steps N]` trains "
                                   "Crafter for N env steps (default 1M, about an hour) and scores it "
                                   "(benchmarks/crafter_score.py).")
    p.set_defaults(fn=cmd_bench, arguments=[])

    p = sub.add_parser("tensorboard", help="TensorBoard on the runs' logs")
    p.add_argument("logdir", nargs="?", help="a run's log folder (mso run prints it) or the folder of all runs "
                                             "(default: $MSO_LOG_DIR or runs)")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=6006)
    p.set_defaults(fn=cmd_tensorboard)

    p = sub.add_parser("health", help="exit 0 only if a service answers SERVING on grpc.health.v1")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0)
    add_tls_arguments(p, server=False, client=True)
    p.set_defaults(fn=cmd_health)

    p = sub.add_parser("launch", help="launch a session through a running LauncherService")
    config_args(p)
    p.add_argument("--launcher", default=f"127.0.0.1:{PORTS['launcher']}")
    p.add_argument("--timeout", type=float, default=600.0)
    add_tls_arguments(p, server=False, client=True)
    p.set_defaults(fn=cmd_launch)

    p = sub.add_parser("status", help="show a session through a running LauncherService")
    p.add_argument("--launcher", default=f"127.0.0.1:{PORTS['launcher']}")
    p.add_argument("--session", default="")
    add_tls_arguments(p, server=False, client=True)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("top", help="a live view of a running session: progress, ledger, faults, every node")
    p.add_argument("--launcher", default=f"127.0.0.1:{PORTS['launcher']}")
    p.add_argument("--session", default="")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print the view once and exit")
    add_tls_arguments(p, server=False, client=True)
    p.set_defaults(fn=cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    startup_gc.defer()
    logging.basicConfig(level=os.environ.get("MSO_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":  # the benchmarks take their own arguments
        args.arguments = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from services.shared.auth import SecurityConfigError, apply_tls_arguments

    try:  # a bad TLS setting is reported before anything starts
        apply_tls_arguments(args)
    except SecurityConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
