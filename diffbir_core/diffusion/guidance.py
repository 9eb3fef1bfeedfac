"""Latent image guidance (restoration guidance), paper section 3.3, eqs. 5-6, as a callable on z0_hat.

D = sum_b mean_{C,H,W}( w (pred - target)^2 ) (eq. 6; w = 1 for MSE), g = -scale_int dD/dpred; the correction
is g (space "latent": pred = z0_hat, target = E(I_reg)) or the decoder VJP at z0_hat with g (space "rgb").
Samplers call ``guidance(pred_x0, t=t, x0_coef=c, noise=noise_fn) -> GuidanceOutput`` and build their update
from ``update_pred_x0`` plus ``state_shift`` (see `LatentImageGuidance` for every sampler's x0_coef).

Mirrors
    * rule "v2": v2.0.0 utils/cond_fn.py (MSEGuidance, WeightedMSEGuidance) via SpacedSampler.apply_cond_fn:
      scale x3000, z0_hat += delta / coef per repeat; latent space re-encodes the target with a new posterior
      sample per repeat (one draw each, before the step's draw).
    * rule "v1": v1 model/spaced_sampler.py: no x3000, no 1/coef; each repeat adds delta to z0_hat and
      0.5 delta to the already computed update. Window: runs iff t_stop < t + 1 < t_start.
    Deviation: latent-space WMSE (crashes officially, 3- vs 4-channel) pools the RGB weight map to the latent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
NoiseFn = Callable[[tuple, Tensor], Tensor]
# encode(x_rgb_m11, eps) -> latent already multiplied by the latent scale factor (0.18215);
# eps is the posterior-sample noise (None -> posterior mode). decode(z) -> rgb in [-1, 1], differentiable.
EncodeFn = Callable[[Tensor, Tensor | None], Tensor]
DecodeFn = Callable[[Tensor], Tensor]

GUIDANCE_SCALE_FACTOR = 3000.0  # v2.0.0 ``Guidance.__init__``: self.scale = scale * 3000
_GRAY = (0.2989, 0.5870, 0.1140)


@dataclass(frozen=True)
class RepeatRecord:
    """One guidance repeat: the z0_hat it started from, the latent delta (before 1/coef), the loss."""

    pred_x0_in: Tensor
    delta: Tensor
    loss: float
    target_latent: Tensor | None = None


@dataclass(frozen=True)
class GuidanceOutput:
    pred_x0: Tensor  # guided z0_hat after all repeats (== input when not applied)
    update_pred_x0: Tensor  # z0_hat the sampler update must use (v2: guided, v1: unguided input)
    state_shift: Tensor | None  # added to the sampler update (v1: 0.5 * sum delta), else None
    applied: bool
    repeats: tuple[RepeatRecord, ...] = ()

    @property
    def loss(self) -> float | None:
        """Mean loss over repeats (the official progress-bar value), None if not applied."""
        return sum(r.loss for r in self.repeats) / len(self.repeats) if self.repeats else None


def not_applied(pred_x0: Tensor) -> GuidanceOutput:
    return GuidanceOutput(pred_x0=pred_x0, update_pred_x0=pred_x0, state_shift=None, applied=False)


def wmse_weight_map(img01: Tensor, block_size: int = 2) -> Tensor:
    """Region-adaptive weights of v2.0.0 ``WeightedMSEGuidance._get_weight`` ([B,3,H,W] in [0,1] -> [B,1,H,W]).

    gray = 0.2989 R + 0.5870 G + 0.1140 B; replicate-pad 1; Sobel cross-correlation Gx, Gy;
    mag = sqrt(gx^2 + gy^2); sum mag over non-overlapping 2x2 blocks; w = 1 - tanh(block sum) per block.
    """
    if img01.ndim != 4 or img01.shape[1] != 3:
        raise ValueError(f"weight map needs an RGB batch [B,3,H,W], got {tuple(img01.shape)}")
    n, _, h, w = img01.shape
    if h % block_size or w % block_size:
        raise ValueError(f"weighted MSE needs H and W divisible by {block_size}, got {h}x{w}; pad the image first")
    k = torch.tensor(_GRAY, dtype=img01.dtype, device=img01.device).view(1, 3, 1, 1)
    gray = torch.sum(img01 * k, dim=1, keepdim=True)  # [B,1,H,W]
    gx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    gy = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    sobel = torch.tensor([[gx], [gy]], dtype=img01.dtype, device=img01.device)  # [2,1,3,3]
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), sobel)  # [B,2,H,W]
    mag = grad.pow(2).sum(dim=1, keepdim=True).sqrt()  # [B,1,H,W]
    b = block_size
    blocks = mag.view(n, 1, h // b, b, w // b, b).permute(0, 1, 2, 4, 3, 5).contiguous()
    block_sum = blocks.sum(dim=(-2, -1)).tanh()  # [B,1,H/b,W/b]
    return 1 - block_sum.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)


class LatentImageGuidance:
    """Restoration guidance as a callable on z0_hat (see the module docstring).

    Other samplers than spaced DDPM: every sampler here is written in terms of z0_hat (k-diffusion's
    "denoised"); guidance replaces it inside the step (= eps' = (z_t - sqrt(abar) z0_hat') / sqrt(1 - abar),
    classifier-guidance style). ``x0_coef`` is the coefficient of z0_hat in that step's update: spaced DDPM
    posterior coef1[i] (the official v2.0.0 rescale); DDIM sqrt(abar_prev) - sqrt(1 - abar_prev - sigma^2)
    sqrt(abar) / sqrt(1 - abar) (eps re-derived from the guided z0_hat); EDM / DPM-Solver++ (x = z / alpha)
    the first-order coefficient 1 - (sigma_next / sigma)^(1 + eta) (1 at the last step), multistep history
    from the guided values. So a rule-v2 update still moves the state by ~sum delta.

    Weighted MSE in latent space (deliberate deviation): the official ``WeightedMSEGuidance`` crashes there
    ("The size of tensor a (4) must match the size of tensor b (3)"); here the RGB weight map is
    average-pooled to the latent resolution (one latent pixel per 8x8 patch) and shared by the 4 channels.

    Args:
        target_rgb_m11: stage-1 output I_reg in [-1, 1], RGB, [B,3,H,W] (official: clean * 2 - 1).
        scale: the user-facing gradient scale s (official default 0; x3000 internally for rule "v2").
        t_start, t_stop: guidance runs at original timestep t iff t_stop < t + 1 < t_start.
        space: "latent" (needs ``encode``) or "rgb" (needs a differentiable ``decode``).
        repeat: gradient steps per sampler step.
        weighted: region-adaptive weighted MSE (v2.0.0 ``WeightedMSEGuidance``) instead of MSE.
        rule: "v2" (v2.0.0 update) or "v1" (v1 update), see the module docstring.
        sample_target: latent space only; True (official) encodes the target with a fresh posterior sample
            at every repeat (one draw from the sampler's noise source each); False uses the posterior mode
            once (deterministic, no draws).
    """

    def __init__(
        self,
        target_rgb_m11: Tensor,
        scale: float,
        *,
        t_start: int = 1001,
        t_stop: int = -1,
        space: Literal["latent", "rgb"] = "latent",
        repeat: int = 1,
        weighted: bool = False,
        rule: Literal["v2", "v1"] = "v2",
        encode: EncodeFn | None = None,
        decode: DecodeFn | None = None,
        sample_target: bool = True,
    ) -> None:
        if target_rgb_m11.ndim != 4 or target_rgb_m11.shape[1] != 3:
            raise ValueError(f"target must be an RGB batch [B,3,H,W] in [-1,1], got {tuple(target_rgb_m11.shape)}")
        if space not in ("latent", "rgb"):
            raise ValueError(f"space must be 'latent' or 'rgb', got {space!r}")
        if rule not in ("v1", "v2"):
            raise ValueError(f"rule must be 'v1' or 'v2', got {rule!r}")
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        if space == "latent" and encode is None:
            raise ValueError("space='latent' needs encode=callable(x_m11, eps) -> scaled latent")
        if space == "rgb" and decode is None:
            raise ValueError("space='rgb' needs decode=callable(z) -> rgb in [-1,1] (differentiable)")
        self.target = target_rgb_m11.detach()
        self.scale = float(scale)
        self.scale_internal = self.scale * GUIDANCE_SCALE_FACTOR if rule == "v2" else self.scale
        self.t_start, self.t_stop = int(t_start), int(t_stop)
        self.space, self.repeat, self.weighted, self.rule = space, repeat, weighted, rule
        self.encode, self.decode, self.sample_target = encode, decode, sample_target
        self._weight_rgb = wmse_weight_map((self.target + 1) / 2) if weighted else None  # [B,1,H,W]
        self._target_mode: Tensor | None = None

    def is_active(self, t: int) -> bool:
        t_now = int(t) + 1
        return self.t_stop < t_now < self.t_start

    def _weight(self, like: Tensor) -> Tensor | None:
        if self._weight_rgb is None:
            return None
        w = self._weight_rgb.to(device=like.device, dtype=like.dtype)
        if w.shape[-2:] != like.shape[-2:]:  # latent space: pool to [B,1,h,w]
            w = F.adaptive_avg_pool2d(w, like.shape[-2:])
        return w

    def _loss_grad(self, pred: Tensor, target: Tensor, w: Tensor | None) -> tuple[Tensor, float]:
        """g = -scale_int * d/dpred sum_b mean_{CHW}( w (pred - target)^2 ), and the loss value."""
        with torch.enable_grad():
            p = pred.detach().clone().requires_grad_(True)
            sq = (p - target.detach()).pow(2)
            if w is not None:
                sq = sq * w
            loss = sq.mean((1, 2, 3)).sum()
            g = -torch.autograd.grad(loss, p)[0] * self.scale_internal
        return g, loss.item()

    def _latent_target(self, like: Tensor, noise: NoiseFn | None) -> Tensor:
        target = self.target.to(device=like.device, dtype=like.dtype)
        if not self.sample_target:
            if self._target_mode is None:
                self._target_mode = self.encode(target, None).detach()
            return self._target_mode
        if noise is None:
            raise ValueError("latent guidance with sample_target=True needs the sampler's noise source")
        eps = noise(tuple(like.shape), like)  # [B,4,h,w] posterior sample noise
        return self.encode(target, eps).detach()

    def __call__(
        self, pred_x0: Tensor, *, t: int, x0_coef: Tensor | float, noise: NoiseFn | None = None
    ) -> GuidanceOutput:
        if not self.is_active(t):  # note: scale 0 still runs (and draws noise), as the official code
            return not_applied(pred_x0)
        x0 = pred_x0.detach()
        if self.rule == "v2":
            coef = torch.as_tensor(x0_coef, dtype=x0.dtype, device=x0.device)
            rescale = 1 / coef  # official grad_rescale (float32)
        shift = torch.zeros_like(x0) if self.rule == "v1" else None
        records = []
        for _ in range(self.repeat):
            target_latent = None
            if self.space == "latent":
                target_latent = self._latent_target(x0, noise)
                delta, loss = self._loss_grad(x0, target_latent, self._weight(x0))
            else:
                with torch.enable_grad():
                    z = x0.detach().clone().requires_grad_(True)
                    img = self.decode(z)  # [B,3,H,W] in [-1,1]
                    target = self.target.to(device=img.device, dtype=img.dtype)
                    if img.shape != target.shape:
                        raise ValueError(f"decoded shape {tuple(img.shape)} != target shape {tuple(target.shape)}")
                    g, loss = self._loss_grad(img, target, self._weight(img))
                    delta = torch.autograd.grad(img, z, grad_outputs=g)[0]  # VJP of the decoder
            records.append(RepeatRecord(pred_x0_in=x0, delta=delta, loss=loss, target_latent=target_latent))
            if self.rule == "v2":
                x0 = x0 + delta * rescale
            else:
                x0 = x0 + delta
                shift = shift + 0.5 * delta
        if self.rule == "v2":
            return GuidanceOutput(pred_x0=x0, update_pred_x0=x0, state_shift=None, applied=True, repeats=tuple(records))
        return GuidanceOutput(
            pred_x0=x0, update_pred_x0=pred_x0, state_shift=shift, applied=True, repeats=tuple(records)
        )
