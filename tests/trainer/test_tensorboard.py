"""The TensorBoard page a user opens (`mso tensorboard`, started as they start it), read by a real headless
browser (Debian's chromium): the return, the losses, the policy lag and the episode GIFs are on it; and a SIGTERM to
its pid stops all of it."""

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import psutil
import pytest

from services.rollout.video import VideoWriter
from services.shared import episode
from services.shared.config import validate
from services.shared.episode import Episode
from services.shared.ports import free_port
from services.trainer.logs import IterationLog
from tests.conftest import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def answers(url: str) -> bool:
    """Whether TensorBoard serves its page at url."""
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def page(url: str) -> tuple[str, str]:
    """The page's DOM after its scripts ran (headless chromium; --no-sandbox: CI runs as root; a tall window,
    since the dashboard draws only the cards in view), and its visible text with tag names rejoined (a card
    title shows "episode/mean_return" as a group and a name in two elements)."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--window-size=1600,12000", "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    body = re.sub(r"<style.*?</style>", " ", out.stdout[out.stdout.find("<body"):], flags=re.S)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)).replace(" /", "/")
    return out.stdout, text


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs Debian's as root: apt-get install "
                                             "chromium)")
def test_the_tensorboard_page_shows_return_losses_policy_lag_and_episode_gifs(redis_client, tmp_path):
    video = VideoWriter(str(tmp_path / "episode.mp4"), fps=10)
    for t in range(12):
        video.write(np.full((64, 64, 3), 20 * t, dtype=np.uint8))
    pipe = redis_client.pipeline()
    episode.append(pipe, "sess", [Episode(3.0, 1.5, 10, False, video=video.close()), Episode(5.0, 2.5, 12, False)])
    pipe.execute()
    logs = IterationLog(redis_client, tmp_path / "runs", "sess", validate({}, []))
    for i in range(1, 4):
        logs.write(i, {"policy_loss": 0.5 / i, "value_loss": 1.0 / i, "policy_lag": 0.5 * i}, lags=np.array([0, i]))
    logs.close()

    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "services.cli", "tensorboard", str(tmp_path / "runs"),
                              f"--port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        url = f"http://localhost:{port}"
        wait_until(lambda: answers(url), 90, "TensorBoard to answer", interval=0.5)
        tags = ("episode/mean_return", "trainer/policy_loss", "trainer/value_loss", "trainer/policy_lag",
                "episode/video_0")

        def loaded():  # TensorBoard reads the event files in the background after it answers
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/timeseries/tags", timeout=10) as reply:
                    served = reply.read().decode()
            except OSError:
                return False
            return all(tag in served for tag in tags)

        wait_until(loaded, 90, "TensorBoard to serve the run's tags", interval=0.5)
        shown = []

        def on_page():  # a page drawn before its data arrived has no cards: load it again
            shown[:] = [*page(f"{url}/#timeseries")]
            return all(tag in shown[1] for tag in tags)

        try:
            wait_until(on_page, 240, "the cards on the page", interval=1)
        except pytest.fail.Exception:
            missing = [tag for tag in tags if tag not in shown[1]]
            raise AssertionError(f"{missing} not on the page: {shown[1][:2000]}") from None
        dom = shown[0]
        # the GIF itself: the image card's source, fetched as the browser fetched it, is an animated GIF
        sources = re.findall(r'<img[^>]+alt="Image at step \d+"[^>]+src="([^"]+)"', dom)
        assert sources, re.findall(r"<img[^>]*>", dom)
        assert urllib.request.urlopen(f"{url}/{html.unescape(sources[0])}", timeout=10).read()[:6] == b"GIF89a"
    finally:
        board.send_signal(signal.SIGINT)
        try:
            board.wait(10)
        except subprocess.TimeoutExpired:
            board.kill()


def test_mso_tensorboard_stops_whole_on_a_sigterm_to_its_pid(redis_client, tmp_path):
    # docker stop, systemd and timeout signal the pid they started, not its group: TensorBoard ran as a child of
    # `mso tensorboard`, which died at the SIGTERM and left it serving the port (every CI run left one behind)
    logs = IterationLog(redis_client, tmp_path / "runs", "sess", validate({}, []))
    logs.write(1, {"policy_loss": 0.5}, lags=np.array([0]))
    logs.close()
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "services.cli", "tensorboard", str(tmp_path / "runs"),
                              f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    group = board.pid  # its own session: every process it starts stays in this group

    def in_group() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == group and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return found

    url = f"http://localhost:{port}"
    try:
        wait_until(lambda: answers(url), 90, "TensorBoard to answer", interval=0.5)
        board.send_signal(signal.SIGTERM)
        board.wait(30)
        wait_until(lambda: not in_group(), 30, "every process of mso tensorboard to end", interval=0.2)
        assert not answers(url)
    finally:
        for proc in in_group():
            proc.kill()
