"""What rank 0 logs: TensorBoard scalars, the policy-lag histogram, episode statistics (with env-specific
stats), the rollouts' episode videos, and a W&B run in offline mode when no API key is set."""

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.shared import episode
from services.shared.episode import Episode
from services.shared.config import validate
from services.rollout.video import VideoWriter
from services.trainer.logs import FLUSH_SECONDS, IterationLog
from tests.conftest import wait_until


def test_iteration_log_writes_tensorboard_and_wandb(redis_client, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    video = VideoWriter(str(tmp_path / "episode.mp4"), fps=10)
    for t in range(12):
        video.write(np.full((128, 128, 3), 20 * t, dtype=np.uint8))
    path = video.close()
    pipe = redis_client.pipeline()
    episode.append(pipe, "sess", [Episode(ret, ret / 2, 10, False, video=video_path or "",
                                          stats={"achievement_collect_wood": 1.0 if video_path else 0.0})
                                  for ret, video_path in ((3.0, path), (5.0, None))])
    pipe.execute()

    cfg = validate({}, ["logger_config.wandb=true", "logger_config.project=mso-test"])
    logs = IterationLog(redis_client, tmp_path / "runs", "sess", cfg)
    logs.write(1, {"policy_loss": 0.25, "explained_var": 0.5}, lags=np.array([0, 1, 1, 2]))
    logs.write(2, {"policy_loss": 0.125}, lags=np.array([0]))  # no new episodes: none logged twice
    pipe = redis_client.pipeline()
    episode.append(pipe, "sess", [Episode(7.0, 3.5, 10, False)])  # no achievements: the rates are not read
    pipe.execute()
    redis_client.config_resetstat()
    logs.write(3, {"policy_loss": 0.0625}, lags=np.array([1]))
    assert "cmdstat_hgetall" not in redis_client.info("commandstats")
    logs.close()

    events = EventAccumulator(str(tmp_path / "runs" / "sess"), size_guidance={"images": 0, "histograms": 0}).Reload()
    scalars = events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("trainer/policy_loss")] == [0.25, 0.125, 0.0625]
    assert [(e.step, e.value) for e in events.Scalars("episode/mean_return")] == [(1, 4.0), (3, 7.0)]
    assert len(events.Scalars("episode/count")) == 2
    assert events.Scalars("episode/achievement_collect_wood")[0].value == 0.5
    # the Crafter score over all episodes so far: one achievement reported, unlocked in 1 of 2 episodes
    assert events.Scalars("achievements/success_rate_collect_wood")[0].value == 50.0
    assert abs(events.Scalars("achievements/score")[0].value - 50.0) < 1e-4
    assert "trainer/explained_var" in scalars
    # one bucket per lag: iteration 1's lags 0, 1, 1, 2
    lags = events.Histograms("trainer/policy_lag_histogram")[0].histogram_value
    assert (lags.min, lags.max, lags.num, lags.sum, lags.sum_squares) == (0, 2, 4, 4, 6)
    assert list(lags.bucket_limit) == [0.5, 1.5, 2.5] and list(lags.bucket) == [1, 2, 1]
    image = events.Images("episode/video_0")[0]
    assert (image.width, image.height) == (128, 128) and image.encoded_image_string[:6] == b"GIF89a"

    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*-sess/run-sess.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"trainer/policy_loss" in data and b"episode/mean_return" in data


def test_a_running_session_s_iterations_reach_the_event_file_within_seconds(redis_client, tmp_path):
    # TensorBoard reads the file while the session runs: each iteration must reach disk without close(), and
    # without the learner waiting for the writer every iteration (it no longer flushes each one itself).
    cfg = validate({}, [])
    logs = IterationLog(redis_client, tmp_path / "runs", "live", cfg)

    def on_disk(n: int) -> bool:
        events = EventAccumulator(str(tmp_path / "runs" / "live")).Reload()
        return "trainer/policy_loss" in events.Tags()["scalars"] and \
            len(events.Scalars("trainer/policy_loss")) == n

    for iteration in (1, 2, 3):
        logs.write(iteration, {"policy_loss": 0.5 / iteration}, lags=np.array([0]))
        wait_until(lambda: on_disk(iteration), 3 * FLUSH_SECONDS + 5, f"iteration {iteration} in the event file")
    logs.close()


def test_an_iteration_s_scalars_reach_tensorboard_as_one_event(redis_client, tmp_path):
    """TensorBoard's writer builds, queues, serialises and checksums every event: one per scalar (~30 an
    iteration) cost cartpole's learner 0.6-1.0 ms an iteration. TensorBoard shows each value of one event as its
    own scalar all the same."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    logs = IterationLog(redis_client, tmp_path / "runs", "one", validate({}, []))
    metrics = {"policy_loss": 0.5, "value_loss": 0.25, "entropy": 0.7, "approx_kl": 0.01}
    logs.write(1, metrics, lags=np.array([0]))
    logs.close()
    (path,) = (tmp_path / "runs" / "one").glob("events.out.tfevents.*")
    with_scalars = [e for e in EventFileLoader(str(path)).Load()
                    if e.step == 1 and any(v.HasField("simple_value") or v.metadata.plugin_data.plugin_name == "scalars"
                                           for v in e.summary.value)]
    assert len(with_scalars) == 1, with_scalars
    assert {v.tag for v in with_scalars[0].summary.value} == {f"trainer/{k}" for k in metrics}
