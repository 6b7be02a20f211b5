"""`mso top`: the live view of a running session, in a real terminal (tmux), the way a user watches it."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from services.shared.ports import free_port
from tests.conftest import wait_until

TMUX = shutil.which("tmux")


def pane(name: str) -> str:
    out = subprocess.run([TMUX, "capture-pane", "-p", "-t", name], capture_output=True, text=True, timeout=10)
    return out.stdout if out.returncode == 0 else ""


@pytest.mark.skipif(TMUX is None, reason="needs tmux (.ci/run installs it as root: apt-get install tmux)")
def test_mso_top_shows_a_running_session_live_in_a_terminal_and_ctrl_c_leaves_it():
    port = free_port()
    run = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "cartpole", "train_config.num_iterations=100000",
                            f"--port={port}", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    name = f"mso-top-{port}"
    try:
        for line in run.stderr:
            if "running (" in line:
                break
        else:
            pytest.fail("mso run never reached running")
        subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "180", "-y", "40",
                        # a terminal's own size, not a COLUMNS the test runner may have exported
                        f"env -u COLUMNS -u LINES {sys.executable} -m services.cli top --launcher 127.0.0.1:{port} "
                        "--interval 1"],
                       check=True, timeout=10, cwd=os.getcwd())

        def ledger_line():
            m = re.search(r"ledger: produced (\d+) = consumed (\d+) \+", pane(name))
            return m and int(m.group(1))

        first = wait_until(ledger_line, 60, "mso top to show the ledger")
        screen = pane(name)
        assert "RUNNING" in screen and "cartpole" in screen and "no faults" in screen
        assert re.search(r"trainer-\w+ +RUNNING ", screen), screen
        # Each node with its own env steps/s and 8 live envs. Waited for, not read off the first screen: a rollout
        # node's rate is its steps over its last window of a second or more, and 0 is true of a window it spent
        # waiting for the learner to drain a full queue (a CI run's first screen said 0 at iteration 5, the queue
        # just drained, the learner slowed by the load to 112 env steps/s).
        wait_until(lambda: (m := re.search(r"rollout-\w+ +RUNNING +(\d+) +8 ", pane(name))) and int(m.group(1)) > 0,
                   30, "mso top to show the rollout node's own env steps/s")
        wait_until(lambda: (ledger_line() or 0) > first, 30, "the view to refresh with new numbers")
        subprocess.run([TMUX, "send-keys", "-t", name, "C-c"], check=True, timeout=10)
        wait_until(lambda: subprocess.run([TMUX, "has-session", "-t", name], capture_output=True).returncode != 0,
                   10, "mso top to exit on Ctrl-C (its pane closes)")
    finally:
        subprocess.run([TMUX, "kill-session", "-t", name], capture_output=True)
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)


@pytest.mark.skipif(TMUX is None, reason="needs tmux (.ci/run installs it as root: apt-get install tmux)")
def test_mso_run_on_a_terminal_shows_a_progress_bar_with_eta_and_ends_with_its_summary(tmp_path):
    name = f"mso-run-{free_port()}"
    command = (f"env -u COLUMNS -u LINES MSO_LOG_DIR={tmp_path / 'runs'} {sys.executable} -m services.cli run cartpole "
               "train_config.num_iterations=100000 --port=0; sleep 60")  # the pane stays to be read
    subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "200", "-y", "40", command], check=True, timeout=10,
                   cwd=os.getcwd())
    try:
        bar = wait_until(lambda: re.search(r"(\d+)% +\d+:\d\d:\d\d +ETA (\S+) +iter (\d+)/100000", pane(name)), 120,
                         "the progress bar with its ETA")
        wait_until(lambda: (m := re.search(r"ETA (\S+) +iter (\d+)/100000", pane(name))) and
                   int(m.group(2)) > int(bar.group(3)) and m.group(1) != "-", 60, "the bar to move and show an ETA")
        subprocess.run([TMUX, "send-keys", "-t", name, "C-c"], check=True, timeout=10)
        screen = wait_until(lambda: "mso: interrupted after" in (p := pane(name)) and p, 60, "the closing summary")
        assert f"TensorBoard logs in {tmp_path / 'runs'}/" in screen
    finally:
        subprocess.run([TMUX, "kill-session", "-t", name], capture_output=True)
