"""Training both DiffBIR stages (PAPER.md "Training"): ``python -m diffbir_core.train stage1|stage2 --config f.toml``.

Stage 1 (restoration module): a SwinIR cleaner trained with the L2 loss ``||SwinIR(I_LQ) - I_HQ||^2``
(paper eq. 1; mean over pixels, the official code sums) on pairs made by `diffbir_core.data`.
Stage 2 (generation): only the control branch learns; Stable Diffusion (UNet, VAE, text encoder) and the
stage-1 cleaner stay frozen. Per step (as the official ``train_stage2.py``):

    1. z_0 = E(I_HQ) * 0.18215 (VAE posterior sample; images in [-1, 1])
    2. c = prepare_condition(SwinIR(I_LQ), prompt)   (prompt dropped to "" with p = prompt_dropout)
    3. optional noise augmentation of c_img with t' ~ U[0, noise_aug_timestep)
    4. t ~ U[0, T), eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps      (forward process)
    5. loss = || f(z_t, t, c) - target ||^2 with target eps (eps-prediction) or
       v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (v-prediction, v2.1)

The control branch starts as a copy of the UNet encoder + middle block with its 4 new condition input
channels zeroed (`diffbir_core.models.controlnet.ControlNet.from_unet`), or from ``control_init`` (an
official control-branch checkpoint).

Optimiser: AdamW at ``lr``, constant or (``lr_schedule = "cosine"``) linear warm-up + cosine decay to
``lr_min`` (`lr_at`). Runs on `accelerate` (multi-GPU data parallel with ``accelerate launch``, gradient
accumulation, mixed precision on GPU only - on CPU it is switched off, fp16/bf16 there are ~200x slower).
Each process reads its own slice of one deterministic data stream (`diffbir_core.data.EpochSampler`), and
every micro-step reseeds torch from (seed, micro-step, rank): a resumed run repeats exactly what an
uninterrupted run does.

Checkpoints (``<out_dir>/checkpoints/<step:07d>/``): the weights in the OFFICIAL layout as plain state dicts
(``swinir.pth`` loadable by the official SwinIR and `load_swinir`; ``control.pth`` loadable by the official
ControlNet and our control loader) plus ``.safetensors`` copies, and ``train_state.pt`` (optimizer, step,
config) written last - a folder without it is incomplete and never resumed from. Logs: ``log.csv``
(train), ``val.csv`` (validation), TensorBoard when installed, validation images ``val/<step>.png``.

Configuration: the frozen `TrainConfig`, named presets `TRAIN_PRESETS`, a TOML/JSON file of field values
and ``--field value`` flags (preset < file < flags). No class paths.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("diffbir_core.train")

__all__ = ["TrainConfig", "TRAIN_PRESETS", "load_config", "train", "main", "find_checkpoint",
           "swinir_config_for", "psnr", "lr_at"]

STAGES = ("stage1", "stage2")
LR_SCHEDULES = ("constant", "cosine")
CKPT_FORMAT = 1


# ---------------------------------------------------------------------------------------------- config
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
    diffusion: str = "v2"  # a key of diffbir_core.schedule.DIFFUSION_PRESETS (betas, zero-SNR)
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
        from diffbir_core.degradation import DEGRADATIONS

        if self.degradation not in DEGRADATIONS:
            bad.append(f"degradation {self.degradation!r} unknown; choose from {sorted(DEGRADATIONS)}")
        if bad:
            raise ValueError("invalid TrainConfig: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


_TINY_SWINIR = {"img_size": 4, "embed_dim": 16, "depths": [1], "num_heads": [2], "window_size": 4,
                "mlp_ratio": 2.0, "drop_path_rate": 0.0}

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # paper: batch 96, 150k iterations (stage 1); 8 GPUs -> 12 per GPU
    "paper_stage1": TrainConfig(stage="stage1", crop=512, batch_size=12, max_steps=150_000, lr=1e-4,
                                swinir="general_v1", mixed_precision="no"),
    "paper_face_stage1": TrainConfig(stage="stage1", crop=512, batch_size=12, max_steps=150_000, lr=1e-4,
                                     swinir="face_v1", degradation="codeformer_face", face_aligned=True),
    # paper: SD 2.1-base, 25k iterations, batch 192, Adam lr 1e-4, 8 x A100 -> 24 per GPU
    "paper_stage2": TrainConfig(stage="stage2", crop=512, batch_size=24, max_steps=25_000, lr=1e-4,
                                stage2="sd21_base", sd_checkpoint="sd_v2.1", cleaner_checkpoint="swinir_general",
                                mixed_precision="fp16", prediction="eps"),
    # a few seconds on a laptop CPU: 32 px crops, one-block SwinIR
    "tiny_cpu_stage1": TrainConfig(stage="stage1", crop=32, batch_size=2, max_steps=10, lr=2e-3, num_workers=0,
                                   log_every=1, ckpt_every=5, val_every=5, val_images=2, swinir="general_v1",
                                   swinir_overrides=_TINY_SWINIR, seed=0),
    # the small real CPU run of results/train_stage1 (embed_dim 60, 2 RSTB x 4 layers, 128 px crops)
    "small_cpu_stage1": TrainConfig(stage="stage1", crop=128, batch_size=4, max_steps=1400, lr=3e-4,
                                    num_workers=0, cache_images=True, log_every=10, ckpt_every=200,
                                    val_every=200, val_images=4, swinir="general_v1",
                                    swinir_overrides={"img_size": 16, "embed_dim": 60, "depths": [4, 4],
                                                      "num_heads": [6, 6], "window_size": 8, "mlp_ratio": 2.0,
                                                      "drop_path_rate": 0.0},
                                    seed=0),
}


def _hints() -> dict[str, Any]:
    import typing

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


def load_config(path: str | os.PathLike | None = None, preset: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
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
            import tomllib

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
    from diffbir_core.models.swinir import SWINIR_CONFIGS, SwinIRConfig

    if preset in SWINIR_CONFIGS:
        base = SWINIR_CONFIGS[preset]
    elif Path(preset).is_file():
        base = SwinIRConfig.from_official(_read_official(Path(preset)))
    else:
        raise ValueError(f"SwinIR {preset!r}: not a preset ({sorted(SWINIR_CONFIGS)}) nor an official config file")
    ov = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (overrides or {}).items()}
    try:
        return replace(base, **ov)
    except TypeError as e:
        raise ValueError(f"bad SwinIR override in {sorted(ov)}: {e}") from e


def _read_official(path: Path) -> dict[str, Any]:
    """An official yaml (``target`` + ``params``) or json config file."""
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text())
    import yaml

    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------- helpers
def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RGB PSNR in dB of [0, 1] images (B, C, H, W); predictions are clamped to [0, 1]."""
    mse = ((pred.clamp(0, 1) - target) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up ``lr * (step + 1) / warmup_steps``,
    then ``lr`` (constant) or ``lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2`` with p = (step - warmup) /
    (max_steps - warmup) (cosine). A pure function of the step, so a resumed run follows the same curve."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))


def _step_seed(seed: int, micro_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1)[0])


def _checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def find_checkpoint(spec: str, out_dir: str | os.PathLike) -> Path:
    """``"latest"`` -> the newest complete checkpoint in ``out_dir``; else a folder holding ``train_state.pt``."""
    if spec == "latest":
        root = _checkpoints_dir(out_dir)
        done = sorted(p for p in root.glob("*") if (p / "train_state.pt").is_file()) if root.is_dir() else []
        if not done:
            raise FileNotFoundError(f"resume='latest' but {root} holds no complete checkpoint (a folder with "
                                    "train_state.pt)")
        return done[-1]
    p = Path(spec)
    if p.is_file() and p.name == "train_state.pt":
        p = p.parent
    if not (p / "train_state.pt").is_file():
        raise FileNotFoundError(f"resume={spec!r}: {p} is not a complete checkpoint folder (no train_state.pt)")
    return p


class _CsvLog:
    """Append-only CSV; on resume, rows after the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, columns: Sequence[str], keep_until: int | None) -> None:
        self.path, self.columns = path, list(columns)
        rows: list[dict[str, str]] = []
        if keep_until is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= keep_until]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in self.columns})

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        log.info("tensorboard is not installed: logging to CSV only")
        return None
    return SummaryWriter(str(out_dir / "tb"))


def _save_grid(path: Path, rows: Sequence[torch.Tensor]) -> None:
    """Save rows of (N, 3, H, W) [0, 1] images as one PNG (each row one tensor, N images across)."""
    from diffbir_core.imageio import save_image

    strips = [torch.cat(list(r.detach().float().clamp(0, 1).cpu()), dim=2) for r in rows]  # 3, H, N*W each
    grid = torch.cat(strips, dim=1)  # 3, rows*H, N*W
    save_image(path, grid.permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------- tasks
class _Stage1:
    """SwinIR cleaner, L2 loss (paper eq. 1)."""

    weights_name = "swinir"

    def __init__(self, cfg: TrainConfig) -> None:
        from diffbir_core.models.swinir import SwinIR

        self.cfg = cfg
        self.swinir_cfg = swinir_config_for(cfg.swinir, cfg.swinir_overrides)
        if cfg.crop % self.swinir_cfg.pad_multiple:
            raise ValueError(f"crop {cfg.crop} must be a multiple of {self.swinir_cfg.pad_multiple} (SwinIR "
                             "window_size x unshuffle_scale) so the output has the input's size")
        torch.manual_seed(cfg.seed)
        self.model = SwinIR(self.swinir_cfg)

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], device) -> torch.Tensor:
        lq, hq = batch["lq"].to(device), batch["hq"].to(device)
        pred = model(lq)  # B, 3, H, W
        return F.mse_loss(pred.float(), hq)

    def state_dict_official(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_official(self, path: Path) -> None:
        from diffbir_core.models.swinir import load_swinir

        loaded = load_swinir(path, self.swinir_cfg, what="stage-1 checkpoint")
        self.model.load_state_dict(loaded.state_dict(), strict=True)

    @torch.no_grad()
    def validate(self, batch: dict[str, Any], device) -> tuple[dict[str, float], list[torch.Tensor]]:
        self.model.eval()
        lq, hq = batch["lq"].to(device), batch["hq"].to(device)
        pred = self.model(lq).clamp(0, 1)
        self.model.train()
        metrics = {"val_loss": F.mse_loss(pred, hq).item(), "psnr_lq": psnr(lq, hq).mean().item(),
                   "psnr_pred": psnr(pred, hq).mean().item()}
        metrics["psnr_gain"] = metrics["psnr_pred"] - metrics["psnr_lq"]
        return metrics, [lq, pred, hq]


class _Stage2:
    """Control branch of a frozen SD 2.1 (eps- or v-prediction loss); cleaner and SD frozen."""

    weights_name = "control"

    def __init__(self, cfg: TrainConfig) -> None:
        from diffbir_core.models import ldm
        from diffbir_core.models.swinir import SwinIR, load_swinir
        from diffbir_core.schedule import DIFFUSION_PRESETS, make_training_schedule

        self.cfg = cfg
        self.stage2_cfg = _stage2_config(cfg.stage2)
        torch.manual_seed(cfg.seed)
        # 1. frozen SD (UNet, VAE, text) + control branch (from the UNet: copied weights, zero new inputs)
        if not cfg.sd_checkpoint:
            warnings.warn("stage 2 without sd_checkpoint: Stable Diffusion is RANDOM (tests only)")
        self.model = ldm.build_control_ldm(
            self.stage2_cfg, sd=_resolve_weights(cfg.sd_checkpoint) if cfg.sd_checkpoint else None,
            control=_resolve_weights(cfg.control_init) if cfg.control_init else None)
        for name in ("unet", "vae", "text"):
            getattr(self.model, name).requires_grad_(False).eval()
        self.model.controlnet.requires_grad_(True).train()
        # 2. frozen stage-1 cleaner
        cleaner_cfg = swinir_config_for(cfg.cleaner, cfg.cleaner_overrides)
        if cfg.cleaner_checkpoint:
            self.cleaner = load_swinir(_resolve_weights(cfg.cleaner_checkpoint), cleaner_cfg, what="stage-1 cleaner")
        else:
            warnings.warn("stage 2 without cleaner_checkpoint: the cleaner is a RANDOM SwinIR (tests only)")
            self.cleaner = SwinIR(cleaner_cfg)
        self.cleaner.requires_grad_(False).eval()
        self.cleaner_pad = cleaner_cfg.pad_multiple
        # 3. training schedule (betas; zero-SNR for v2.1) with the chosen target
        if cfg.diffusion not in DIFFUSION_PRESETS:
            raise ValueError(f"unknown diffusion preset {cfg.diffusion!r}; choose from {sorted(DIFFUSION_PRESETS)}")
        self.schedule = make_training_schedule(replace(DIFFUSION_PRESETS[cfg.diffusion],
                                                       parameterization=cfg.prediction))

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.model.controlnet.parameters())

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "cleaner": self.cleaner}

    @torch.no_grad()
    def _condition(self, batch: dict[str, Any], device, gen: torch.Generator):
        """Steps 1-3: z_0 of the HQ image, the condition of the cleaned LQ image (+ prompt dropout, noise aug)."""
        from diffbir_core.imageio import crop_to, pad_to_multiple

        lq, hq = batch["lq"].to(device), batch["hq"].to(device)
        model = self.model
        z0 = model.vae_encode(hq * 2 - 1, sample=True, generator=gen)  # B, 4, H/8, W/8 (x latent scale)
        x, hw = pad_to_multiple(lq, self.cleaner_pad)
        clean = crop_to(self.cleaner(x), hw).clamp(0, 1)  # B, 3, H, W
        drop = torch.rand(len(lq), generator=gen) < self.cfg.prompt_dropout
        prompts = ["" if d else self.cfg.prompt for d in drop.tolist()]
        cond = model.prepare_condition(clean, prompts)  # c_txt B, 77, D; c_img B, 4, H/8, W/8
        if self.cfg.noise_aug_timestep > 0:
            t_aug = torch.randint(0, self.cfg.noise_aug_timestep, (len(lq),), generator=gen).to(device)
            n = torch.randn(cond["c_img"].shape, generator=gen).to(device)
            cond = {**cond, "c_img": self.schedule.q_sample(cond["c_img"], t_aug, n)}
        return z0, cond, clean

    def _target(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction == "eps":
            return eps
        a = self.schedule.sqrt_alphas_cumprod.to(z0.device)[t].view(-1, 1, 1, 1)
        s = self.schedule.sqrt_one_minus_alphas_cumprod.to(z0.device)[t].view(-1, 1, 1, 1)
        return a * eps - s * z0  # v = sqrt(abar) eps - sqrt(1 - abar) z0

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], device, gen: torch.Generator | None = None,
             t: torch.Tensor | None = None) -> torch.Tensor:
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        z0, cond, _ = self._condition(batch, device, gen)
        if t is None:  # 4. t ~ U[0, T), eps ~ N(0, I), z_t from the forward process
            t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],), generator=gen)
        t = t.to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z_t = self.schedule.q_sample(z0, t, eps)
        out = model(z_t, t, cond)  # B, 4, h, w
        return F.mse_loss(out.float(), self._target(z0, eps, t))  # 5.

    def state_dict_official(self) -> dict[str, torch.Tensor]:
        from diffbir_core.models.ldm import export_control_official

        return {k: v.detach().cpu().contiguous() for k, v in export_control_official(self.model.controlnet).items()}

    def load_official(self, path: Path) -> None:
        from diffbir_core.models.ldm import load_control

        loaded = load_control(path, self.stage2_cfg)  # strict, official layout
        self.model.controlnet.load_state_dict(loaded.state_dict(), strict=True)

    @torch.no_grad()
    def validate(self, batch: dict[str, Any], device) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Loss at fixed timesteps and noise, and a one-step z0 prediction at t = T/2 (eq. 5), decoded."""
        self.model.controlnet.eval()
        T = self.schedule.num_timesteps
        losses = [self.loss(self.model, batch, device, torch.Generator().manual_seed(self.cfg.seed),
                            torch.full((len(batch["lq"]),), int(f * (T - 1)), dtype=torch.long)).item()
                  for f in (0.1, 0.5, 0.9)]
        gen = torch.Generator().manual_seed(self.cfg.seed)
        z0, cond, clean = self._condition(batch, device, gen)
        t = torch.full((z0.shape[0],), T // 2, dtype=torch.long, device=device)
        z_t = self.schedule.q_sample(z0, t, torch.randn(z0.shape, generator=gen).to(device))
        out = self.model(z_t, t, cond)
        a = self.schedule.sqrt_alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
        s = self.schedule.sqrt_one_minus_alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
        z0_hat = (z_t - s * out) / a if self.cfg.prediction == "eps" else a * z_t - s * out
        x0_hat = ((self.model.vae_decode(z0_hat) + 1) / 2).clamp(0, 1)
        self.model.controlnet.train()
        hq = batch["hq"].to(device)
        metrics = {"val_loss": float(np.mean(losses)), "val_loss_t10": losses[0], "val_loss_t50": losses[1],
                   "val_loss_t90": losses[2], "psnr_x0_t50": psnr(x0_hat, hq).mean().item()}
        return metrics, [batch["lq"].to(device), clean, x0_hat, hq]


def _resolve_weights(spec: str) -> Path:
    """A path, or a name of `diffbir_core.weights.WEIGHTS`."""
    p = Path(spec)
    if p.exists():
        return p
    from diffbir_core.weights import WEIGHTS, resolve

    if spec in WEIGHTS:
        return Path(resolve(spec))
    raise FileNotFoundError(f"{spec!r} is neither a file nor a known weights name ({sorted(WEIGHTS)})")


def _stage2_config(spec: str):
    from diffbir_core.models.ldm import STAGE2_CONFIGS, Stage2Config

    if spec in STAGE2_CONFIGS:
        return STAGE2_CONFIGS[spec]
    if Path(spec).is_file():
        return Stage2Config.from_official(_read_official(Path(spec)))
    raise ValueError(f"stage2={spec!r}: not a preset ({sorted(STAGE2_CONFIGS)}) nor an official cldm config file")


# ---------------------------------------------------------------------------------------------- loop
def _save_checkpoint(task, opt, accelerator, cfg: TrainConfig, step: int) -> Path:
    from diffbir_core.weights import save_safetensors

    ckpt = _checkpoints_dir(cfg.out_dir) / f"{step:07d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    sd = task.state_dict_official()
    torch.save(sd, ckpt / f"{task.weights_name}.pth")  # official plain state dict
    save_safetensors(sd, ckpt / f"{task.weights_name}.safetensors")
    state = {"format": CKPT_FORMAT, "stage": cfg.stage, "step": step, "optimizer": opt.state_dict(),
             "config": json.dumps(cfg.to_dict())}
    if getattr(accelerator, "scaler", None) is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    tmp = ckpt / "train_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / "train_state.pt")  # written last: marks the checkpoint complete
    return ckpt


def _load_checkpoint(task, opt, accelerator, cfg: TrainConfig, ckpt: Path) -> int:
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    if state.get("format") != CKPT_FORMAT or state.get("stage") != cfg.stage:
        raise ValueError(f"{ckpt}: checkpoint is format {state.get('format')} / {state.get('stage')}, expected "
                         f"format {CKPT_FORMAT} / {cfg.stage}")
    task.load_official(ckpt / f"{task.weights_name}.pth")
    opt.load_state_dict(state["optimizer"])
    if "scaler" in state and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked after every step (all processes stop together)."""

    def __init__(self) -> None:
        import signal
        import threading

        self.flag = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.flag = True

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        f = torch.tensor([1.0 if self.flag else 0.0], device=accelerator.device)
        return bool(accelerator.gather(f).max().item() > 0)

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run. Returns a summary: final ``step``, ``last_loss``, ``losses`` (step,
    loss) of this run, the last ``checkpoint`` folder, ``out_dir`` and the trained ``model`` (unwrapped)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from diffbir_core.data import EpochSampler, PairedDegradationDataset, collate_pairs

    if not cfg.data:
        raise ValueError("TrainConfig.data is empty: give a folder or file list of HQ training images")
    mp = cfg.mixed_precision
    if mp != "no" and not torch.cuda.is_available():
        warnings.warn(f"mixed_precision={mp!r} needs a GPU; training on CPU in fp32")
        mp = "no"
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out_dir = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # 1. model and optimiser
    task = _Stage1(cfg) if cfg.stage == "stage1" else _Stage2(cfg)
    for m in task.modules().values():
        m.to(device)
    opt = torch.optim.AdamW(task.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume, out_dir)
        start = _load_checkpoint(task, opt, accelerator, cfg, ckpt)
        accelerator.print(f"resumed from {ckpt} at step {start}")
    train_model, opt = accelerator.prepare(task.modules()["model"], opt)
    if cfg.stage == "stage1":
        task.model = accelerator.unwrap_model(train_model)

    # 2. data: one deterministic stream, this process's slice, resumed where the checkpoint stopped
    ds = PairedDegradationDataset(cfg.data, crop=cfg.crop, cfg=cfg.degradation, seed=cfg.seed,
                                  face_aligned=cfg.face_aligned, cache_images=cfg.cache_images)
    sampler = EpochSampler(len(ds), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                           start_micro_step=start * cfg.grad_accum)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate_pairs, pin_memory=torch.cuda.is_available(),
                        persistent_workers=cfg.num_workers > 0)
    val_batch = None
    if cfg.val_data and cfg.val_images > 0:
        vds = PairedDegradationDataset(cfg.val_data, crop=cfg.crop, cfg=cfg.degradation, seed=cfg.seed + 1,
                                       face_aligned=cfg.face_aligned, flip=False)
        val_batch = collate_pairs([vds[(i, 0)] for i in range(min(cfg.val_images, len(vds)))])

    # 3. logs
    tlog = vlog = tb = None
    if accelerator.is_main_process:
        keep = start if cfg.resume else None
        tlog = _CsvLog(out_dir / "log.csv", ["step", "loss", "lr", "samples_per_s", "elapsed_s"], keep)
        vcols = ["step", "val_loss", "psnr_lq", "psnr_pred", "psnr_gain"] if cfg.stage == "stage1" else \
            ["step", "val_loss", "val_loss_t10", "val_loss_t50", "val_loss_t90", "psnr_x0_t50"]
        vlog = _CsvLog(out_dir / "val.csv", vcols, keep)
        tb = _tensorboard(out_dir)

    # 4. loop: grad_accum micro-steps per optimiser step (numbered steps below follow the module docstring)
    step, micro = start, start * cfg.grad_accum
    t0, window_loss, window_n, last_loss = time.time(), 0.0, 0, float("nan")
    history: list[tuple[int, float]] = []
    last_ckpt: Path | None = None
    it = iter(loader)
    stop = _StopFlag()  # SIGTERM / SIGINT (e.g. `timeout`, a cluster pre-emption): checkpoint, then return
    try:
        while step < cfg.max_steps:
            step_loss = 0.0
            for g in opt.param_groups:  # schedule: a function of the optimiser step only
                g["lr"] = lr_at(cfg, step)
            for _ in range(cfg.grad_accum):
                batch = next(it)
                seed = _step_seed(cfg.seed, micro, rank)
                torch.manual_seed(seed)  # dropout / drop-path / diffusion noise: a function of the step
                gen = torch.Generator().manual_seed(seed)
                with accelerator.accumulate(train_model):
                    with accelerator.autocast():
                        loss = task.loss(train_model, batch, device) if cfg.stage == "stage1" else \
                            task.loss(train_model, batch, device, gen)
                    accelerator.backward(loss)
                    if cfg.grad_clip and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(task.trainable(), cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step_loss += loss.detach().float() / cfg.grad_accum
                micro += 1
            step += 1
            last_loss = accelerator.gather(step_loss.reshape(1)).mean().item()
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}; lower lr or enable grad_clip")
            history.append((step, last_loss))
            window_loss, window_n = window_loss + last_loss, window_n + 1
            if accelerator.is_main_process and (step % cfg.log_every == 0 or step == cfg.max_steps):
                el = time.time() - t0
                row = {"step": step, "loss": window_loss / window_n, "lr": opt.param_groups[0]["lr"],
                       "samples_per_s": (step - start) * cfg.batch_size * world * cfg.grad_accum / max(el, 1e-9),
                       "elapsed_s": el}
                tlog.write(row)
                if tb:
                    tb.add_scalar("train/loss", row["loss"], step)
                window_loss, window_n = 0.0, 0
            if val_batch is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
                if accelerator.is_main_process:
                    metrics, rows = task.validate(val_batch, device)
                    vlog.write({"step": step, **metrics})
                    _save_grid(out_dir / "val" / f"{step:07d}.png", rows)
                    if tb:
                        for k, v in metrics.items():
                            tb.add_scalar(f"val/{k}", v, step)
                    accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                accelerator.wait_for_everyone()
            stopping = stop.requested(accelerator)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    last_ckpt = _save_checkpoint(task, opt, accelerator, cfg, step)
                accelerator.wait_for_everyone()
            if stopping:
                accelerator.print(f"stop requested by signal: checkpoint at step {step} written, exiting")
                break
    finally:
        stop.restore()
    if tb:
        tb.close()
    return {"step": step, "last_loss": last_loss, "losses": history, "checkpoint": last_ckpt,
            "out_dir": out_dir, "model": task.model}


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffbir_core.train",
                                description="Train DiffBIR stage 1 (SwinIR cleaner) or stage 2 (control branch).")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", help="TOML or JSON file of TrainConfig field values (may set 'preset')")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="start from a named preset")
    for f in fields(TrainConfig):
        if f.name == "stage":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="VALUE",
                       help=f"(TrainConfig.{f.name}; JSON object for mappings, 'none' for empty)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name != "stage" and getattr(args, f.name) is not None}
    overrides["stage"] = args.stage
    try:
        cfg = load_config(args.config, args.preset, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = train(cfg)
    print(f"done: step {summary['step']}, last loss {summary['last_loss']:.6g}, checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
