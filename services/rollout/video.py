"""Episode videos: frames are encoded to mp4 (h264) one at a time as the episode runs, never held in RAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def frame_of(obs, env) -> np.ndarray | None:
    """An RGB uint8 (H, W, 3) frame for obs: obs["image"] or obs itself when it is one, else env.render()."""
    for candidate in (obs.get("image") if isinstance(obs, dict) else None, obs):
        if isinstance(candidate, np.ndarray) and candidate.dtype == np.uint8 and candidate.ndim == 3 \
                and candidate.shape[-1] == 3:
            return candidate
    if getattr(env, "render_mode", None) == "rgb_array":
        frame = env.render()
        if isinstance(frame, np.ndarray) and frame.ndim == 3:
            return frame.astype(np.uint8)
    return None


class VideoWriter:
    """An mp4 file at path, opened on the first frame (which fixes the size)."""

    def __init__(self, path: str, fps: int):
        self.path, self.fps = path, fps
        self.frames = 0
        self._container = self._stream = None

    def write(self, frame: np.ndarray) -> None:
        import av

        if self._container is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(self.path, mode="w")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            # yuv420p needs even sizes; odd frames are padded by one pixel.
            self._stream.height, self._stream.width = frame.shape[0] + frame.shape[0] % 2, frame.shape[1] + frame.shape[1] % 2
            self._stream.pix_fmt = "yuv420p"
        if frame.shape[0] % 2 or frame.shape[1] % 2:
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)))
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> str | None:
        if self._container is None:
            return None
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return self.path
