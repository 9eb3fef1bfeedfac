"""Classifier-free guidance as a denoiser wrapper: ``CFGDenoiser(model, cond, uncond, s)(x, t)``.

out = out_u + s (out_c - out_u) (Ho & Salimans 2022); the samplers only see ``denoiser(x, t)``.

Mirrors
    * v2.0.0 utils/sampler.py:212-229 ``predict_noise`` (scale 1 or no uncond evaluates only the conditional
      branch), HEAD diffbir/sampler/spaced_sampler.py:150-158 and edm_sampler.py:125-134 (the same mix);
    * ``rescale=True``: HEAD diffbir/sampler/sampler.py:31-38 ``Sampler.get_cfg_scale``:
      s(t) = 1 + s (1 - cos(pi ((1000 - t) / 1000)^5)) / 2 (exactly 1 at t = 999, so only the
      conditional branch runs there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

Tensor = torch.Tensor

__all__ = ["CFGDenoiser", "rescaled_cfg_scale"]


def rescaled_cfg_scale(cfg_scale: float, t: int, num_timesteps: int = 1000) -> float:
    """HEAD ``Sampler.get_cfg_scale`` with rescale_cfg: 1 + s (1 - cos(pi ((T - t) / T)^5)) / 2 for s > 1."""
    if cfg_scale <= 1:
        return cfg_scale
    return 1 + cfg_scale * ((1 - math.cos(math.pi * ((num_timesteps - t) / num_timesteps) ** 5.0)) / 2)


class CFGDenoiser:
    """denoiser(x, t) = out_u + s (out_c - out_u) around ``model(x, t, cond) -> eps or v``.

    Only the conditional branch is evaluated when the scale in use is exactly 1 or ``uncond`` is None.
    ``batched=True`` runs both branches in ONE forward with cond/uncond concatenated along the batch
    (values of the two dicts are concatenated key by key; same numbers up to float rounding).
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor, Any], Tensor],
        cond: Any,
        uncond: Any = None,
        scale: float = 1.0,
        *,
        rescale: bool = False,
        batched: bool = False,
        num_timesteps: int = 1000,
    ) -> None:
        self.model, self.cond, self.uncond = model, cond, uncond
        self.scale, self.rescale, self.batched = float(scale), rescale, batched
        self.num_timesteps = num_timesteps
        if batched and uncond is not None and not (isinstance(cond, Mapping) and isinstance(uncond, Mapping)):
            raise ValueError("batched CFG needs cond and uncond as dicts of tensors")
        if batched and uncond is not None and set(cond) != set(uncond):
            raise ValueError(f"cond keys {sorted(cond)} != uncond keys {sorted(uncond)}")

    def scale_at(self, t: int) -> float:
        return rescaled_cfg_scale(self.scale, t, self.num_timesteps) if self.rescale else self.scale

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.scale_at(int(t[0]))
        if self.uncond is None or s == 1.0:
            return self.model(x, t, self.cond)
        if self.batched:
            both = {k: torch.cat([self.cond[k], self.uncond[k]]) for k in self.cond}
            out_c, out_u = self.model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        else:
            out_c = self.model(x, t, self.cond)
            out_u = self.model(x, t, self.uncond)
        return out_u + s * (out_c - out_u)
