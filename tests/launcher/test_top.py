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
        rollout = re.search(r"rollout-\w+ +RUNNING +(\d+) +8 ", screen)  # its own env steps/s, 8 live envs
        trainer = re.search(r"trainer-\w+ +RUNNING ", screen)
        assert rollout and int(rollout.group(1)) > 0 and trainer, screen  # each node, its own env steps/s
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
