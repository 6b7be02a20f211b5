"""Learning and start-up: wall seconds for `mso run cartpole` (through all three services, from the
command to the result, start-up included) to reach a mean return of 475, against the plain single-process
PPO in plain_ppo.py with the same network and hyper-parameters, run right after it. Also the seconds from
`mso run` to the first fragment in Redis and to the first trainer update.

    python -m benchmarks.learning
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import plain_ppo


def main(argv=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        subprocess.run([sys.executable, "-m", "services.cli", "run", "cartpole", "--until-return=475",
                        "--port=0", "--quiet", f"--summary={summary}"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s = json.loads(summary.read_text())
    plain = plain_ppo.run(target=475)
    to_475 = s["return_milestones"].get("475.0")
    results = {"mso_seconds_to_475": to_475, "mso_env_steps": s["env_steps"],
               "plain_seconds_to_475": plain["seconds"], "plain_env_steps": plain["env_steps"],
               "ratio": to_475 / plain["seconds"] if to_475 and plain["reached"] else None,
               "mso_seconds_to_195": s["return_milestones"].get("195.0"),
               "startup_first_fragment_s": s["startup_seconds"]["first_fragment"],
               "startup_first_update_s": s["startup_seconds"]["first_update"]}
    for k, v in results.items():
        print(f"{k:28s} {v if v is None else round(v, 2)}")
    return results


if __name__ == "__main__":
    main()
