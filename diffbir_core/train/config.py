"""Training configuration: the frozen `TrainConfig`, named presets `TRAIN_PRESETS`, TOML/JSON loading.

Precedence: preset < file (TOML or JSON of field values; may name ``preset``) < ``--field value`` flags;
values are coerced to each field's type with clear errors, unknown keys are refused. No class paths:
the networks are named presets (`SWINIR_CONFIGS`, `STAGE2_CONFIGS`) or official yaml/json config files.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from diffbir_core.degradation import DEGRADATIONS
from diffbir_core.models.ldm import STAGE2_CONFIGS, Stage2Config
from diffbir_core.models.swinir import SWINIR_CONFIGS, SwinIRConfig

__all__ = [
    "TrainConfig",
    "TRAIN_PRESETS",
    "STAGES",
    "load_config",
    "swinir_config_for",
    "stage2_config",
    "read_official",
]

STAGES = ("stage1", "stage2")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Sizes are per process and per micro-step:
    effective batch = batch_size * num_processes * grad_accum."""

    stage: str = "stage1"
    data: str = ""  # HQ images: folder (recursive), text file list, or one image
    val_data: str | None = None  # held-out HQ images for validation (same degradation, fixed seed)
    out_dir: str = "outputs/train"
    # -- data
    crop: int = 512
    degradation: str = "realesrgan_2nd_order"  # a key of diffbir_core.degradation.DEGRADATIONS
    face_aligned: bool = False
    cache_images: bool = False  # keep decoded HQ images in memory (small data sets)
    num_workers: int = 4
    # -- optimisation
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 150_000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" | "cosine" (half-cosine from lr to lr_min over max_steps)
    warmup_steps: int = 0  # linear warm-up to lr over the first warmup_steps optimiser steps
    lr_min: float = 0.0  # cosine end value
    weight_decay: float = 0.0
    grad_clip: float | None = None
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"; GPU only
    seed: int = 231
    # -- bookkeeping
    log_every: int = 50
    ckpt_every: int = 5000
    val_every: int = 1000
    val_images: int = 8
    resume: str | None = None  # a checkpoint folder, or "latest" (newest complete one in out_dir)
    # -- stage 1
    swinir: str = "general_v1"  # a key of diffbir_core.models.swinir.SWINIR_CONFIGS, or an official yaml/json
    swinir_overrides: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"embed_dim": 60, "depths": [4, 4]}
    # -- stage 2
    stage2: str = "sd21_base"  # a key of diffbir_core.models.ldm.STAGE2_CONFIGS, or an official cldm yaml/json
    sd_checkpoint: str | None = None  # SD 2.1-base LDM checkpoint (path or a diffbir_core.weights name)
    cleaner_checkpoint: str | None = None  # stage-1 SwinIR weights (path or weights name), frozen
    cleaner: str = "general_v1"  # SwinIR preset (or official yaml/json) of the cleaner
    cleaner_overrides: Mapping[str, Any] = field(default_factory=dict)
    control_init: str | None = None  # start from an official control-branch checkpoint instead of the UNet
    prediction: str = "eps"  # "eps" | "v"
    diffusion: str = "v2"  # a key of diffbir_core.diffusion.schedule.DIFFUSION_PRESETS (betas, zero-SNR)
    prompt: str = ""  # training caption for every image (v1: empty)
    prompt_dropout: float = 0.0  # probability of replacing the prompt by ""
    noise_aug_timestep: int = 0  # > 0: noise the condition latent with t' ~ U[0, this)

    def __post_init__(self) -> None:
        object.__setattr__(self, "swinir_overrides", dict(self.swinir_overrides or {}))
        object.__setattr__(self, "cleaner_overrides", dict(self.cleaner_overrides or {}))
        bad: list[str] = []
        if self.stage not in STAGES:
            bad.append(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("crop", "batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every", "val_every"):
            if int(getattr(self, name)) <= 0:
                bad.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0 or self.val_images < 0:
            bad.append("num_workers and val_images must be >= 0")
        if not self.lr > 0:
            bad.append(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.lr_min <= self.lr:
            bad.append(f"need warmup_steps >= 0 and 0 <= lr_min <= lr, got {self.warmup_steps}, {self.lr_min}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            bad.append(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.prediction not in ("eps", "v"):
            bad.append(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            bad.append(f"prompt_dropout must be a probability, got {self.prompt_dropout}")
        if self.noise_aug_timestep < 0:
            bad.append("noise_aug_timestep must be >= 0")
        if self.degradation not in DEGRADATIONS:
            bad.append(f"degradation {self.degradation!r} unknown; choose from {sorted(DEGRADATIONS)}")
        if bad:
            raise ValueError("invalid TrainConfig: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


_TINY_SWINIR = {
    "img_size": 4,
    "embed_dim": 16,
    "depths": [1],
    "num_heads": [2],
    "window_size": 4,
    "mlp_ratio": 2.0,
    "drop_path_rate": 0.0,
}

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # paper: batch 96, 150k iterations (stage 1); 8 GPUs -> 12 per GPU
    "paper_stage1": TrainConfig(
        stage="stage1", crop=512, batch_size=12, max_steps=150_000, lr=1e-4, swinir="general_v1", mixed_precision="no"
    ),
    "paper_face_stage1": TrainConfig(
        stage="stage1",
        crop=512,
        batch_size=12,
        max_steps=150_000,
        lr=1e-4,
        swinir="face_v1",
        degradation="codeformer_face",
        face_aligned=True,
    ),
    # paper: SD 2.1-base, 25k iterations, batch 192, Adam lr 1e-4, 8 x A100 -> 24 per GPU
    "paper_stage2": TrainConfig(
        stage="stage2",
        crop=512,
        batch_size=24,
        max_steps=25_000,
        lr=1e-4,
        stage2="sd21_base",
        sd_checkpoint="sd_v2.1",
        cleaner_checkpoint="swinir_general",
        mixed_precision="fp16",
        prediction="eps",
    ),
    # a few seconds on a laptop CPU: 32 px crops, one-block SwinIR
    "tiny_cpu_stage1": TrainConfig(
        stage="stage1",
        crop=32,
        batch_size=2,
        max_steps=10,
        lr=2e-3,
        num_workers=0,
        log_every=1,
        ckpt_every=5,
        val_every=5,
        val_images=2,
        swinir="general_v1",
        swinir_overrides=_TINY_SWINIR,
        seed=0,
    ),
    # the small real CPU run of results/train_stage1 (embed_dim 60, 2 RSTB x 4 layers, 128 px crops)
    "small_cpu_stage1": TrainConfig(
        stage="stage1",
        crop=128,
        batch_size=4,
        max_steps=1400,
        lr=3e-4,
        num_workers=0,
        cache_images=True,
        log_every=10,
        ckpt_every=200,
        val_every=200,
        val_images=4,
        swinir="general_v1",
        swinir_overrides={
            "img_size": 16,
            "embed_dim": 60,
            "depths": [4, 4],
            "num_heads": [6, 6],
            "window_size": 8,
            "mlp_ratio": 2.0,
            "drop_path_rate": 0.0,
        },
        seed=0,
    ),
}


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """A value from TOML/JSON/the command line -> the field's type (clear error otherwise)."""
    hint = _hints()[name]
    text = str(hint)
    optional = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    if optional:
        if "None" in text:
            return None
        raise ValueError(f"{name} cannot be empty/None")
    if "Mapping" in text:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} expects a JSON object such as '{{\"embed_dim\": 60}}', got {value!r}") from e
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} expects a table/object of field values, got {type(value).__name__}")
        return dict(value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int or text.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float or "float" in text:
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot read {value!r} as {text}") from None
    return str(value)


def load_config(
    path: str | os.PathLike | None = None, preset: str | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """preset (default: the dataclass defaults) < file (TOML or JSON of field values; may name ``preset``)
    < overrides. Unknown keys are errors."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        if p.suffix.lower() == ".json":
            values = json.loads(p.read_text())
        elif p.suffix.lower() == ".toml":
            values = tomllib.loads(p.read_text())
        else:
            raise ValueError(f"config file {p}: use a .toml or .json file of TrainConfig field values")
        if not isinstance(values, dict):
            raise ValueError(f"config file {p} must hold a table/object of field values")
        values = dict(values)
    file_preset = values.pop("preset", None)
    preset = preset or file_preset
    base = TrainConfig()
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(TRAIN_PRESETS)}")
        base = TRAIN_PRESETS[preset]
    values.update({k: v for k, v in (overrides or {}).items()})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
    return replace(base, **{k: _coerce(k, v) for k, v in values.items()})


def swinir_config_for(preset: str, overrides: Mapping[str, Any] | None = None):
    """A SwinIR preset (or an official SwinIR yaml/json file) with field overrides (lists become tuples)."""
    if preset in SWINIR_CONFIGS:
        base = SWINIR_CONFIGS[preset]
    elif Path(preset).is_file():
        base = SwinIRConfig.from_official(read_official(Path(preset)))
    else:
        raise ValueError(f"SwinIR {preset!r}: not a preset ({sorted(SWINIR_CONFIGS)}) nor an official config file")
    ov = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (overrides or {}).items()}
    try:
        return replace(base, **ov)
    except TypeError as e:
        raise ValueError(f"bad SwinIR override in {sorted(ov)}: {e}") from e


def read_official(path: Path) -> dict[str, Any]:
    """An official yaml (``target`` + ``params``) or json config file."""
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text())
    return yaml.safe_load(path.read_text())


def stage2_config(spec: str) -> Stage2Config:
    """A stage-2 preset (`STAGE2_CONFIGS`) or an official cldm yaml/json file."""
    if spec in STAGE2_CONFIGS:
        return STAGE2_CONFIGS[spec]
    if Path(spec).is_file():
        return Stage2Config.from_official(read_official(Path(spec)))
    raise ValueError(f"stage2={spec!r}: not a preset ({sorted(STAGE2_CONFIGS)}) nor an official cldm config file")
