"""Checkpoints: everything a resumed run needs to continue where it stopped.

Layout: {save_path}/{session_id}/{iteration:08d}/ with
    model.safetensors   the policy's state dict (value normaliser statistics included)
    optimizer.pt        the optimizer's state dict (torch.save; loaded with weights_only=True)
    state.json          iteration, model_version, rho, session_id, time, the ledger, and the config module's
                        name, source and SHA-256 (as text: a checkpoint never holds code to execute)
Each is written into a temporary folder that is renamed into place, so a crash never leaves a half
checkpoint. Thinning keeps every checkpoint whose iteration is a multiple of keep_interval, and the latest
(the reference's sign error, §4.9, kept the wrong ones).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read; the message names the path."""


def save(folder: Path, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{iteration:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{iteration:08d}-", dir=folder))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "iteration": iteration, "time": time.time()}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def thin(folder: Path, keep_interval: int) -> list[Path]:
    """Delete checkpoints other than the latest and multiples of keep_interval; returns what was deleted."""
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    doomed = [p for p in found[:-1] if not (keep_interval and int(p.name) % keep_interval == 0)]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def latest(save_path: Path) -> Path:
    """The newest complete checkpoint anywhere under save_path (any session)."""
    found = [p.parent for p in save_path.glob("*/*/state.json")]
    if not found:
        raise CheckpointError(f"resume=latest: no checkpoint under {save_path}")
    return max(found, key=lambda p: json.loads((p / "state.json").read_text())["time"])


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model (and optimizer when given) from path; returns its state.json."""
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no state.json)")
    model.load_state_dict(load_file(path / "model.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
