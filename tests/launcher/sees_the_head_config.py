"""A config module that fails while loading once it has seen `mso run`'s Ray head running (or after 30 s
without it), saying which: it tells whether the head starts while the config module loads."""

import os
import time

import psutil

deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    if any(p.name() == "gcs_server" for p in psutil.Process(os.getppid()).children(recursive=True)):
        raise RuntimeError("stand-in: the Ray head was starting while this module loaded")
    time.sleep(0.05)
raise RuntimeError("stand-in: no Ray head started in the 30 s this module waited")
