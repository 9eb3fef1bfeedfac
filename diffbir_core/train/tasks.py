"""The two training tasks (paper arXiv 2308.15070, "Training"): what is built, what learns, the loss, validation.

Stage 1: a SwinIR cleaner with the L2 loss ``||SwinIR(I_LQ) - I_HQ||^2`` (paper eq. 1; mean over pixels,
the official code sums). Stage 2: only the control branch learns, SD (UNet, VAE, text) and the stage-1
cleaner stay frozen; per step (as the official ``train_stage2.py``):
    1. z_0 = E(I_HQ) * 0.18215 (VAE posterior sample; images in [-1, 1])
    2. c = prepare_condition(SwinIR(I_LQ), prompt)   (prompt dropped to "" with p = prompt_dropout)
    3. optional noise augmentation of c_img with t' ~ U[0, noise_aug_timestep)
    4. t ~ U[0, T), eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps      (forward process)
    5. loss = || f(z_t, t, c) - target ||^2, target eps or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (v2.1)
The control branch starts as a copy of the UNet encoder + middle block with its 4 new condition input
channels zeroed (`ControlNet.from_unet`), or from ``control_init``. Weights go out in the official layout.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffbir_core.diffusion.schedule import DIFFUSION_PRESETS, make_training_schedule
from diffbir_core.imageio import crop_to, pad_to_multiple
from diffbir_core.models import ldm
from diffbir_core.models.ldm import export_control_official, load_control
from diffbir_core.models.swinir import SwinIR, load_swinir
from diffbir_core.weights import WEIGHTS, resolve

from .config import TrainConfig, stage2_config, swinir_config_for

__all__ = ["Stage1Task", "Stage2Task", "make_task", "batch_psnr", "resolve_weights"]


def batch_psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RGB PSNR in dB of [0, 1] images (B, C, H, W); predictions are clamped to [0, 1]."""
    mse = ((pred.clamp(0, 1) - target) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


class Stage1Task:
    """SwinIR cleaner, L2 loss (paper eq. 1)."""

    weights_name = "swinir"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.swinir_cfg = swinir_config_for(cfg.swinir, cfg.swinir_overrides)
        if cfg.crop % self.swinir_cfg.pad_multiple:
            raise ValueError(
                f"crop {cfg.crop} must be a multiple of {self.swinir_cfg.pad_multiple} (SwinIR "
                "window_size x unshuffle_scale) so the output has the input's size"
            )
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
        loaded = load_swinir(path, self.swinir_cfg, what="stage-1 checkpoint")
        self.model.load_state_dict(loaded.state_dict(), strict=True)

    @torch.no_grad()
    def validate(self, batch: dict[str, Any], device) -> tuple[dict[str, float], list[torch.Tensor]]:
        self.model.eval()
        lq, hq = batch["lq"].to(device), batch["hq"].to(device)
        pred = self.model(lq).clamp(0, 1)
        self.model.train()
        metrics = {
            "val_loss": F.mse_loss(pred, hq).item(),
            "psnr_lq": batch_psnr(lq, hq).mean().item(),
            "psnr_pred": batch_psnr(pred, hq).mean().item(),
        }
        metrics["psnr_gain"] = metrics["psnr_pred"] - metrics["psnr_lq"]
        return metrics, [lq, pred, hq]


class Stage2Task:
    """Control branch of a frozen SD 2.1 (eps- or v-prediction loss); cleaner and SD frozen."""

    weights_name = "control"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.stage2_cfg = stage2_config(cfg.stage2)
        torch.manual_seed(cfg.seed)
        # 1. frozen SD (UNet, VAE, text) + control branch (from the UNet: copied weights, zero new inputs)
        if not cfg.sd_checkpoint:
            warnings.warn("stage 2 without sd_checkpoint: Stable Diffusion is RANDOM (tests only)", stacklevel=2)
        self.model = ldm.build_control_ldm(
            self.stage2_cfg,
            sd=resolve_weights(cfg.sd_checkpoint) if cfg.sd_checkpoint else None,
            control=resolve_weights(cfg.control_init) if cfg.control_init else None,
        )
        for name in ("unet", "vae", "text"):
            getattr(self.model, name).requires_grad_(False).eval()
        self.model.controlnet.requires_grad_(True).train()
        # 2. frozen stage-1 cleaner
        cleaner_cfg = swinir_config_for(cfg.cleaner, cfg.cleaner_overrides)
        if cfg.cleaner_checkpoint:
            self.cleaner = load_swinir(resolve_weights(cfg.cleaner_checkpoint), cleaner_cfg, what="stage-1 cleaner")
        else:
            warnings.warn(
                "stage 2 without cleaner_checkpoint: the cleaner is a RANDOM SwinIR (tests only)", stacklevel=2
            )
            self.cleaner = SwinIR(cleaner_cfg)
        self.cleaner.requires_grad_(False).eval()
        self.cleaner_pad = cleaner_cfg.pad_multiple
        # 3. training schedule (betas; zero-SNR for v2.1) with the chosen target
        if cfg.diffusion not in DIFFUSION_PRESETS:
            raise ValueError(f"unknown diffusion preset {cfg.diffusion!r}; choose from {sorted(DIFFUSION_PRESETS)}")
        self.schedule = make_training_schedule(
            replace(DIFFUSION_PRESETS[cfg.diffusion], parameterization=cfg.prediction)
        )

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.model.controlnet.parameters())

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "cleaner": self.cleaner}

    @torch.no_grad()
    def _condition(self, batch: dict[str, Any], device, gen: torch.Generator):
        """Steps 1-3: z_0 of the HQ image, the condition of the cleaned LQ image (+ prompt dropout, noise aug)."""
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

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        device,
        gen: torch.Generator | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
        return {k: v.detach().cpu().contiguous() for k, v in export_control_official(self.model.controlnet).items()}

    def load_official(self, path: Path) -> None:
        loaded = load_control(path, self.stage2_cfg)  # strict, official layout
        self.model.controlnet.load_state_dict(loaded.state_dict(), strict=True)

    @torch.no_grad()
    def validate(self, batch: dict[str, Any], device) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Loss at fixed timesteps and noise, and a one-step z0 prediction at t = T/2 (eq. 5), decoded."""
        self.model.controlnet.eval()
        T = self.schedule.num_timesteps
        losses = [
            self.loss(
                self.model,
                batch,
                device,
                torch.Generator().manual_seed(self.cfg.seed),
                torch.full((len(batch["lq"]),), int(f * (T - 1)), dtype=torch.long),
            ).item()
            for f in (0.1, 0.5, 0.9)
        ]
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
        metrics = {
            "val_loss": float(np.mean(losses)),
            "val_loss_t10": losses[0],
            "val_loss_t50": losses[1],
            "val_loss_t90": losses[2],
            "psnr_x0_t50": batch_psnr(x0_hat, hq).mean().item(),
        }
        return metrics, [batch["lq"].to(device), clean, x0_hat, hq]


def resolve_weights(spec: str) -> Path:
    """A path, or a name of `diffbir_core.weights.WEIGHTS`."""
    p = Path(spec)
    if p.exists():
        return p
    if spec in WEIGHTS:
        return Path(resolve(spec))
    raise FileNotFoundError(f"{spec!r} is neither a file nor a known weights name ({sorted(WEIGHTS)})")


def make_task(cfg: TrainConfig) -> Stage1Task | Stage2Task:
    """The task of ``cfg.stage``."""
    return Stage1Task(cfg) if cfg.stage == "stage1" else Stage2Task(cfg)
