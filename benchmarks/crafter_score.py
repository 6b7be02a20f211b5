"""Crafter score at a budget of env steps (default 1M, the scoreboard's), trained through the real services:
`mso run crafter --until-steps N` started as a fresh process, the way a user starts it. The score is the
Crafter paper's over every training episode (services/shared/achievements.py), read from the run's summary.

    python -m benchmarks.crafter_score [--steps 1000000] [--out benchmarks/results/crafter] [overrides...]
    python -m benchmarks.crafter_score --throughput [--steps 30000]
    mso bench crafter [--steps N]

--throughput (measure 8 of `python -m benchmarks`): env steps/s of that run while it trains, against raw
Crafter stepping by one process per core (random actions, resets included) in the same run.

Writes OUT.json (score, the 22 success rates, mean return, wall time, env steps/s, the curve) and OUT.png
(score and mean return against env steps with the published scores at 1M steps as lines, and the success
rates as bars; needs matplotlib, the [bench] extra).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Crafter score (%) at 1M env steps, from the papers (shared/DESIGN.md §5).
PUBLISHED = {"random": 1.6, "PPO (SB3, Hafner 2021)": 4.6, "DreamerV3": 14.5, "PPO + ResNet (Moon 2023)": 15.6,
             "Curious Replay": 19.4, "human": 50.5}


def train(steps: int, overrides: list[str], log=sys.stderr, curve_interval: float = 10.0) -> dict:
    """Run `mso run crafter --until-steps steps` in a fresh interpreter; its summary, with the wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "services.cli", "run", "crafter", *overrides, f"--until-steps={steps}",
                        "--port=0", "--print-interval=30", f"--summary={summary}", f"--curve-interval={curve_interval}"],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
        s = json.loads(summary.read_text())
    s["command_seconds"] = time.monotonic() - started
    return s


def _raw_stepping(seed: int, seconds: float) -> float:
    from configs.crafter import CrafterEnv
    import numpy as np

    env, rng = CrafterEnv(), np.random.default_rng(seed)
    env.reset(seed=seed)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _obs, _r, terminated, truncated, _info = env.step(rng.integers(17))
        steps += 1
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def raw_steps_per_second(processes: int, seconds: float) -> float:
    """Crafter env steps/s of `processes` processes stepping at once, each its own env (the physical limit)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return sum(pool.map(_raw_stepping, range(processes), [seconds] * processes))


def training_rate(curve: list[dict]) -> float:
    """Env steps/s between the first curve point after the first update and the last one."""
    training = [p for p in curve if p["iteration"] > 0]
    if len(training) < 2:
        return float("nan")
    first, last = training[0], training[-1]
    return (last["env_steps"] - first["env_steps"]) / (last["seconds"] - first["seconds"])


def throughput(steps: int, seconds: float = 15.0) -> dict:
    """Measure 8: Crafter env steps/s through the services while training, against raw stepping."""
    import os

    s = train(steps, [], log=subprocess.DEVNULL, curve_interval=5)
    mso = training_rate(s["curve"])
    raw = raw_steps_per_second(os.cpu_count() or 1, seconds)
    ledger = s["ledger"]
    result = {"mso_env_steps_per_s": mso, "raw_env_steps_per_s": raw, "ratio": mso / raw,
              "env_steps": s["env_steps"], "consumed_fragments": ledger.get("consumed", 0),
              "dropped_stale_fragments": ledger.get("dropped_stale", 0)}
    print(f"crafter: {mso:.0f} env steps/s while training, raw {raw:.0f}/s with {os.cpu_count()} processes: "
          f"ratio {result['ratio']:.2f} (goal >= 0.6); fragments consumed {result['consumed_fragments']}, "
          f"dropped stale {result['dropped_stale_fragments']}")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [p for p in result["curve"] if p["env_steps"] > 0]
    steps = [p["env_steps"] for p in curve]
    fig, (ax_score, ax_return, ax_bars) = plt.subplots(1, 3, figsize=(18, 5))
    ax_score.plot(steps, [p["score"] for p in curve], label="mso PPO", color="black", linewidth=2)
    for (name, value), color in zip(PUBLISHED.items(), plt.cm.tab10.colors):
        if value < 30:
            ax_score.axhline(value, linestyle="--", color=color, label=f"{name} {value}%")
    ax_score.set(xlabel="env steps", ylabel="Crafter score (%) over all episodes so far", title="Crafter score")
    ax_score.legend(fontsize=8)
    ax_return.plot(steps, [p["mean_return"] for p in curve], color="black")
    ax_return.set(xlabel="env steps", ylabel="mean return, last 20 episodes", title="Episode return")
    rates = result["success_rates"]
    ax_bars.bar(range(len(rates)), list(rates.values()))
    ax_bars.set_xticks(range(len(rates)), list(rates), rotation=80, fontsize=7)
    ax_bars.set(ylabel="success rate (%)", yscale="log", ylim=(0.01, 100),
                title=f"{result['env_steps']} steps: score {result['score']:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--out", default="benchmarks/results/crafter", help="OUT.json and OUT.png")
    parser.add_argument("--throughput", action="store_true", help="measure 8 only: env steps/s against raw")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for mso run")
    args = parser.parse_args(argv)
    if args.throughput:
        return throughput(args.steps if args.steps != 1_000_000 else 30_000)
    s = train(args.steps, args.overrides)
    if s.get("phase") != "SESSION_PHASE_FINISHED":
        raise SystemExit(f"the run did not finish: {s.get('phase')} {s.get('error') or ''}")
    curve = s["curve"]
    rate = training_rate(curve)
    result = {"score": s["score"], "success_rates": s["success_rates"], "episodes": s["scored_episodes"],
              "env_steps": s["env_steps"], "iterations": s["iterations"], "mean_return": s["mean_return"],
              "best_mean_return": s["best_mean_return"], "wall_seconds": s["command_seconds"],
              "env_steps_per_second_training": rate, "ledger": s["ledger"], "overrides": args.overrides,
              "published": PUBLISHED, "curve": curve}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("no matplotlib (pip install -e '.[bench]'): no PNG", file=sys.stderr)
    print(f"Crafter score {result['score']:.2f}% at {result['env_steps']} env steps over {result['episodes']} "
          f"episodes; mean return {result['mean_return']:.2f}; {result['wall_seconds'] / 60:.1f} min, "
          f"{rate:.0f} env steps/s while training")
    for name, value in result["success_rates"].items():
        print(f"  {name:24s} {value:6.2f}%")
    if math.isnan(result["score"]):
        raise SystemExit("no episode reported achievements")
    return result


if __name__ == "__main__":
    main()
