"""Run every benchmark and print one table of ratios measured in the same run (and write JSON).

    python -m benchmarks [--json benchmarks.json] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time

from benchmarks import (crafter_score, data_plane, learner, learning, minecraft_rollout, rollout_throughput, vpt_scale,
                        weight_broadcast)


def duration(value: float | None) -> str:
    """A duration for the table; a goal the run did not reach within its iterations says so."""
    return "not reached" if value is None else f"{value:.1f} s"


def vpt(quick: bool) -> tuple[list, list]:
    """Rows 4b and 3b (a real VPT from minestudio), or why they are skipped: (rows, [(measure, why)])."""
    name = "4b/3b VPT-2x weights and fragment bytes"
    if quick:
        return [], [(name, "--quick")]
    if importlib.util.find_spec("minestudio") is None:
        return [], [(name, "minestudio is not installed (make minecraft, or pip install -e '.[minecraft]')")]
    vs = vpt_scale.main([])
    return [("4b VPT-2x model weights (248.5 M), publish+load", f"{vs['mso_s']:.2f} s",
             f"{vs['raw_s']:.2f} s raw SET+GET", vs["ratio"], "<= 1.5"),
            ("3b VPT fragment bytes/step raw -> encoded", f"{vs['noise_raw_per_step']:.0f} -> "
             f"{vs['flat_encoded_per_step']:.0f}..{vs['noise_encoded_per_step']:.0f}", "", None, "")], []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks.json")
    parser.add_argument("--quick", action="store_true", help="shorter windows, 5 M-parameter weights only")
    args = parser.parse_args()
    seconds = "5" if args.quick else "15"
    started = time.time()
    rows = []  # (measure, value, baseline, ratio, goal)
    for policy, mc in minecraft_rollout.main(["--seconds", seconds]).items():
        rows.append((f"1 Minecraft-shaped rollout, 8 envs @20 FPS, {policy}", f"{mc['env_fps']:.1f} FPS",
                     f"{mc['ideal_fps']:.0f} FPS", mc["efficiency"], ">= 0.90"))
    rt = rollout_throughput.main(["--seconds", seconds])
    for w in (1, 2):
        rows.append((f"2 CartPole via rollout service, {w} worker(s)", f"{rt[f'service_{w}_worker_steps_per_s']:.0f}/s",
                     f"{rt[f'raw_{w}_process_steps_per_s']:.0f}/s raw vec-env in {w} process(es), before+after",
                     rt[f"ratio_{w}_worker"], ">= 0.30"))
    dp = data_plane.main([])
    rows.append(("3 data plane, encode->Redis->decode", f"{dp['mso_mib_per_s']:.0f} MiB/s",
                 f"{dp['raw_mib_per_s']:.0f} MiB/s raw", dp["ratio"], ">= 0.80"))
    for wb in weight_broadcast.main(["--sizes", "5e6" if args.quick else "5e6,248.5e6"]):
        rows.append((f"4 weights {wb['params_m']:.1f} M params, publish+load", f"{wb['mso_s']:.2f} s",
                     f"{wb['raw_s']:.2f} s raw SET+GET", wb["ratio"], "<= 1.5"))
    vpt_rows, skipped = vpt(args.quick)
    rows += vpt_rows
    for lr in learner.main(["--repeats", "3" if args.quick else "5"]):
        rows.append((f"5 learner PPO update, {lr['config']}", f"{lr['mso_samples_per_s']:.0f}/s",
                     f"{lr['plain_samples_per_s']:.0f}/s plain torch loop", lr["ratio"], ">= 0.90"))
    ln = learning.main(["--seeds", "1" if args.quick else "3"])
    rows.append((f"6 CartPole to return 475, median of {ln['seeds']} seeds", duration(ln["mso_seconds_to_475"]),
                 f"{duration(ln['plain_seconds_to_475'])} plain PPO", ln["ratio"], "lower is better"))
    if ln["sb3_seconds_to_475"] is not None:
        rows.append(("6b ... against Stable-Baselines3 PPO (rl-zoo)", duration(ln["mso_seconds_to_475"]),
                     f"{duration(ln['sb3_seconds_to_475'])} SB3", ln["ratio_sb3"], "<= 1.0"))
    else:
        skipped.append(("6b CartPole against Stable-Baselines3", "stable-baselines3 is not installed "
                                                                 "(pip install -e '.[bench]')"))
    rows.append(("6c env steps to 475: mso / SB3 / plain", f"{ln['mso_env_steps'] / 1000:.0f} k",
                 f"{(ln['sb3_env_steps'] or 0) / 1000:.0f} k / {ln['plain_env_steps'] / 1000:.0f} k", None,
                 "mso <= 50 k"))
    rows.append(("6d memory of mso run cartpole (PSS, whole tree)", f"{ln['mso_pss_gib']:.2f} GiB",
                 "RLlib 1.4 GB (DESIGN.md)", None, "<= 1.4 GB"))
    rows.append(("7 start-up: first fragment / first update", f"{duration(ln['startup_first_fragment_s'])} / "
                 f"{duration(ln['startup_first_update_s'])}", "", None, "<= 4 s / 5 s"))
    cs = crafter_score.throughput(8_000 if args.quick else 30_000, seconds=float(seconds))
    rows.append(("8 Crafter env steps/s while training", f"{cs['mso_env_steps_per_s']:.0f}/s",
                 f"{cs['raw_env_steps_per_s']:.0f}/s raw, 1 process/core", cs["ratio"], ">= 0.60"))
    print(f"\n{'measure':46s} {'mso':>16s} {'baseline (same run)':>26s} {'ratio':>7s}  goal")
    for name, value, base, ratio, goal in rows:
        print(f"{name:46s} {value:>16s} {base:>26s} {'' if ratio is None else f'{ratio:7.2f}':>7s}  {goal}")
    for name, why in skipped:
        print(f"skipped: {name}: {why}")
    with open(args.json, "w") as f:
        json.dump({"machine": platform.platform(), "seconds": time.time() - started,
                   "rows": [dict(zip(("measure", "value", "baseline", "ratio", "goal"), r)) for r in rows],
                   "skipped": [{"measure": n, "why": w} for n, w in skipped]}, f, indent=2)
    print(f"\nwritten to {args.json} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
