"""Training checkpoints: ``<out_dir>/checkpoints/<step:07d>/``, complete only once ``train_state.pt`` exists.

The weights are written in the OFFICIAL layout as plain state dicts (``swinir.pth`` loadable by the official
SwinIR and `load_swinir`; ``control.pth`` by the official ControlNet and our control loader) plus
``.safetensors`` copies; ``train_state.pt`` (format, stage, step, optimizer, config, AMP scaler) is written
last; every file goes through `diffbir_core.atomic` (complete or absent), so a folder without
``train_state.pt`` is incomplete and never resumed from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from diffbir_core.atomic import atomic_path
from diffbir_core.weights import save_safetensors

from .config import TrainConfig

__all__ = ["CKPT_FORMAT", "checkpoints_dir", "find_checkpoint", "save_checkpoint", "load_checkpoint"]

CKPT_FORMAT = 1


def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def find_checkpoint(spec: str, out_dir: str | os.PathLike) -> Path:
    """``"latest"`` -> the newest complete checkpoint in ``out_dir``; else a folder holding ``train_state.pt``."""
    if spec == "latest":
        root = checkpoints_dir(out_dir)
        done = sorted(p for p in root.glob("*") if (p / "train_state.pt").is_file()) if root.is_dir() else []
        if not done:
            raise FileNotFoundError(
                f"resume='latest' but {root} holds no complete checkpoint (a folder with train_state.pt)"
            )
        return done[-1]
    p = Path(spec)
    if p.is_file() and p.name == "train_state.pt":
        p = p.parent
    if not (p / "train_state.pt").is_file():
        raise FileNotFoundError(f"resume={spec!r}: {p} is not a complete checkpoint folder (no train_state.pt)")
    return p


def save_checkpoint(task, opt, accelerator, cfg: TrainConfig, step: int) -> Path:
    ckpt = checkpoints_dir(cfg.out_dir) / f"{step:07d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    sd = task.state_dict_official()
    with atomic_path(ckpt / f"{task.weights_name}.pth") as tmp:
        torch.save(sd, tmp)  # official plain state dict
    save_safetensors(sd, ckpt / f"{task.weights_name}.safetensors")
    state = {
        "format": CKPT_FORMAT,
        "stage": cfg.stage,
        "step": step,
        "optimizer": opt.state_dict(),
        "config": json.dumps(cfg.to_dict()),
    }
    if getattr(accelerator, "scaler", None) is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    with atomic_path(ckpt / "train_state.pt") as tmp:
        torch.save(state, tmp)  # written last: marks the checkpoint complete
    return ckpt


def load_checkpoint(task, opt, accelerator, cfg: TrainConfig, ckpt: Path) -> int:
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    if state.get("format") != CKPT_FORMAT or state.get("stage") != cfg.stage:
        raise ValueError(
            f"{ckpt}: checkpoint is format {state.get('format')} / {state.get('stage')}, expected "
            f"format {CKPT_FORMAT} / {cfg.stage}"
        )
    task.load_official(ckpt / f"{task.weights_name}.pth")
    opt.load_state_dict(state["optimizer"])
    if "scaler" in state and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])
