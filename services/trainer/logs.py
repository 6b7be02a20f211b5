"""What rank 0 logs each iteration: TensorBoard always (scalars, the policy-lag histogram, episode statistics
from the session's episode stream, the Crafter score and success rates over every episode so far when the env
reports achievements, and the episode videos rollouts recorded), Weights & Biases when
logger_config.wandb is set (offline, into the log folder, unless WANDB_API_KEY is set).

Videos: an episode record carries the path of its mp4 on the rollout node. The trainer shows it when it can
read that path (same machine, or a volume both mount, as deploy/docker-compose.yml does).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary

from services.shared import achievements, episode

log = logging.getLogger(__name__)

VIDEO_FRAMES = 200  # at most this many frames of a video go into TensorBoard (as an animated GIF)
QUEUED_EVENTS = 1000  # events waiting for TensorBoard's writer thread before a write blocks
FLUSH_SECONDS = 1     # how late TensorBoard's files may be on disk


def gif_of(path: str, max_frames: int = VIDEO_FRAMES) -> tuple[bytes, int, int]:
    """The first max_frames frames of an mp4 as animated-GIF bytes, with height and width."""
    import av

    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = int(stream.average_rate or 20)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path} holds no frames")
    h, w = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="gif") as out:
        gif = out.add_stream("gif", rate=fps)
        gif.height, gif.width, gif.pix_fmt = h, w, "rgb8"
        for f in frames:
            for packet in gif.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in gif.encode():
            out.mux(packet)
    return buffer.getvalue(), h, w


def start_wandb(cfg, session_id: str, log_dir: Path):
    """A W&B run for the session, or None (with a warning) when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        log.warning("logger_config.wandb=true but wandb is not installed (pip install wandb); logging to "
                    "TensorBoard only")
        return None
    from dataclasses import asdict

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    log_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.logger_config.project, name=cfg.logger_config.name, id=session_id,
                      resume="allow", dir=str(log_dir), mode=mode, config=asdict(cfg))


class IterationLog:
    """Writes one iteration's metrics and the episodes finished since the previous call."""

    def __init__(self, client, log_dir: Path, session_id: str, cfg):
        from torch.utils.tensorboard import SummaryWriter

        self.client, self.session_id = client, session_id
        # Events go to disk from TensorBoard's writer thread (a local file as each comes, a remote one within
        # FLUSH_SECONDS). Flushing every iteration, and a queue of 10 events (torch's default) that an
        # iteration's ~30 scalars overflow, made cartpole's learner wait for that thread every iteration.
        self.writer = SummaryWriter(str(log_dir / session_id), max_queue=QUEUED_EVENTS, flush_secs=FLUSH_SECONDS)
        self.wandb = start_wandb(cfg, session_id, log_dir) if cfg.logger_config.wandb else None
        self.last_episode = ""
        self.videos_logged = 0

    def write(self, iteration: int, metrics: dict, lags: np.ndarray) -> None:
        scalars = {f"trainer/{k}": float(v) for k, v in metrics.items()}
        if lags.size:
            # One bucket per lag (they are whole versions): add_histogram's exponential buckets (~300 up to a lag
            # of 2, nearly all empty) took 0.25-0.55 ms an iteration of cartpole's learner, this 30 us.
            values, counts = np.unique(lags, return_counts=True)
            self.writer.add_histogram_raw("trainer/policy_lag_histogram", float(values[0]), float(values[-1]),
                                          int(lags.size), float(lags.sum()), float((lags.astype(np.float64) ** 2).sum()),
                                          (values + 0.5).tolist(), counts.tolist(), iteration)
        scalars.update(self._episodes(iteration))
        # One event holds them all: the writer builds, queues, serialises and checksums each event, and one
        # add_scalar a value (~30 an iteration) cost cartpole's learner 0.6-1.0 ms an iteration, against 35 us.
        self.writer._get_file_writer().add_summary(
            Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]), iteration)
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def _episodes(self, iteration: int) -> dict[str, float]:
        entries = episode.after(self.client, self.session_id, self.last_episode)
        if not entries:
            return {}
        self.last_episode = entries[-1][0]
        episodes = [e for _i, e in entries]
        out = {"episode/mean_return": float(np.mean([e.episode_return for e in episodes])),
               "episode/mean_discounted_return": float(np.mean([e.discounted_return for e in episodes])),
               "episode/mean_length": float(np.mean([e.length for e in episodes])),
               "episode/count": float(len(episodes))}
        stats: dict[str, list[float]] = {}
        for e in episodes:
            for k, v in e.stats.items():
                stats.setdefault(k, []).append(v)
        out.update({f"episode/{k}": float(np.mean(v)) for k, v in stats.items()})
        # The rates change only with an episode that reports achievements (achievements.count): read them then.
        reported = any(achievements.unlocked(e.stats) for e in episodes)
        scored, rates = achievements.success_rates(self.client, self.session_id) if reported else (0, {})
        if scored:  # over every episode of the session so far, as the Crafter paper scores them
            out["achievements/score"] = achievements.score(rates)
            out.update({f"achievements/success_rate_{k}": v for k, v in rates.items()})
        for e in episodes:
            if e.video and os.path.isfile(e.video):
                self._video(e.video, iteration)
        return out

    def _video(self, path: str, iteration: int) -> None:
        try:
            gif, h, w = gif_of(path)
        except Exception as exc:  # a video still being written, or unreadable: not worth a failed iteration
            log.warning("cannot show video %s: %s", path, exc)
            return
        tag = f"episode/video_{self.videos_logged % 4}"
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), iteration)
        self.videos_logged += 1
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Video(path, format="mp4")}, step=iteration)

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
