"""When this process started, on the wall clock: where `mso run` counts its start-up and its milestones from
(imports included), and benchmarks/sb3_cartpole.py its peer's. psutil's create_time() is the process's start
in clock ticks since boot plus the boot time, which Linux gives in whole seconds (/proc/stat's btime): it is
early by the boot's fraction of a second, a constant that was 0.72 s on one of these machines and showed in
every start-up measured from it."""

from __future__ import annotations

import os
import time


def wall_time() -> float:
    """time.time() at this process's start, to a clock tick (10 ms): its age on the boot clock, which counts
    from the same instant as the kernel's start time, taken from now."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:  # not Linux
        import psutil

        return psutil.Process().create_time()
    # Field 22 (starttime); the command name in field 2 may hold spaces and parentheses, so count after its ')'.
    ticks = int(stat.rsplit(b")", 1)[1].split()[19])
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
