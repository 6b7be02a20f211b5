"""Learning and start-up (measures 6 and 7), as a user meets them: each command started as a fresh process
(a cold interpreter, nothing pre-started), CartPole-v1 to a mean return of 475 over the last 20 episodes,
seeds 1..N, medians reported:
- `mso run cartpole seed=S --until-return=475` through all three services, start-up included; its peak
  memory (PSS of its whole process tree: Redis, the Ray head and workers, both services, env processes);
- Stable-Baselines3's PPO with rl-zoo's hyper-parameters (benchmarks/sb3_cartpole.py), when installed;
- the plain single-process PPO of plain_ppo.py with mso's network and hyper-parameters.
Measure 7: seconds from `mso run` to the first fragment in Redis and to the first trainer update.

    python -m benchmarks.learning [--seeds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks import plain_ppo


def tree_pss(root: psutil.Process) -> int:
    """Bytes of proportional set size of a process and all its descendants (shared pages counted once)."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def mso_run(seed: int) -> dict:
    """`mso run cartpole seed=S --until-return=475` in a fresh process: its summary and peak tree PSS."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "cartpole", f"seed={seed}",
                                 "--until-return=475", "--port=0", "--quiet", f"--summary={summary}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        root, peak, deadline = psutil.Process(proc.pid), 0, time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            peak = max(peak, tree_pss(root))
            time.sleep(1.0)
        if proc.wait(timeout=max(deadline - time.monotonic(), 1)) != 0:
            raise RuntimeError(f"mso run cartpole seed={seed} exited with {proc.returncode}")
        s = json.loads(summary.read_text())
    return {"seconds": s["return_milestones"].get("475.0"),
            "env_steps": s["return_milestone_env_steps"].get("475.0", s["env_steps"]), "pss_bytes": peak,
            "first_fragment": s["startup_seconds"]["first_fragment"],
            "first_update": s["startup_seconds"]["first_update"]}


def sb3_run(seed: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.sb3_cartpole", f"--seed={seed}"], capture_output=True,
                         text=True, timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"seconds": r["seconds_to_target"], "env_steps": r["env_steps"]}


def median(runs: list[dict], key: str) -> float | None:
    """The median over seeds; a run that never reached the target counts as infinitely slow."""
    values = [r[key] if r[key] is not None else float("inf") for r in runs]
    m = statistics.median(values)
    return None if m == float("inf") else m


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    have_sb3 = importlib.util.find_spec("stable_baselines3") is not None
    mso, sb3, plain = [], [], []
    for seed in range(1, args.seeds + 1):  # interleaved, so a busy spell of the machine hits each alike
        mso.append(mso_run(seed))
        if have_sb3:
            sb3.append(sb3_run(seed))
        p = plain_ppo.run(target=475, seed=seed)
        plain.append({"seconds": p["seconds"] if p["reached"] else None, "env_steps": p["env_steps"]})
    results = {"seeds": args.seeds, "mso_seconds_to_475": median(mso, "seconds"),
               "mso_env_steps": statistics.median(r["env_steps"] for r in mso),
               "mso_pss_gib": statistics.median(r["pss_bytes"] for r in mso) / 2 ** 30,
               "plain_seconds_to_475": median(plain, "seconds"),
               "plain_env_steps": statistics.median(r["env_steps"] for r in plain),
               "sb3_seconds_to_475": median(sb3, "seconds") if sb3 else None,
               "sb3_env_steps": statistics.median(r["env_steps"] for r in sb3) if sb3 else None,
               "startup_first_fragment_s": median(mso, "first_fragment"),
               "startup_first_update_s": median(mso, "first_update"),
               "runs": {"mso": mso, "sb3": sb3, "plain": plain}}
    m, p, s = results["mso_seconds_to_475"], results["plain_seconds_to_475"], results["sb3_seconds_to_475"]
    results["ratio"] = m / p if m and p else None
    results["ratio_sb3"] = m / s if m and s else None
    for k, v in results.items():
        if k != "runs":
            print(f"{k:28s} {v if not isinstance(v, float) else round(v, 2)}")
    return results


if __name__ == "__main__":
    main()
