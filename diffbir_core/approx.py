"""Opt-in APPROXIMATE speed modes for stage 2 (never default; they change the numbers).

* `quantize_linear_int8(module)`: int8 dynamic quantisation of every ``nn.Linear`` (weights int8 per channel,
  activations quantised per call): torchao ``Int8DynamicActivationInt8WeightConfig`` when torchao is installed
  (0.18 works with torch 2.14 on CPU), else ``torch.ao.quantization.quantize_dynamic``. Convolutions stay fp32.
* `DeepCacheModel(ldm, interval=N)`: training-free feature reuse (DeepCache, Ma et al. 2023, arXiv 2312.00858)
  for `models.ldm.ControlLDM`: every N-th call per condition is a full step (control branch + UNet) that caches
  the input of the UNet's last up block and the raw control residuals; the calls in between run only the
  shallow path - ``conv_in``, the first down block's res/transformer layers (no downsampler), the last up block
  fed with the cached deep feature, the output head - with the cached control residuals of the shallow skips.
  A drop-in ``model(x, t, cond) -> eps`` for `CFGDenoiser` (a callable wrapper, no patching of the models).
The layer walk follows diffusers ``UNet2DConditionModel.forward`` (time embedding, skip bookkeeping, up blocks);
not a mirror of official DiffBIR code (the official code has no such modes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["quantize_linear_int8", "DeepCacheModel"]


def quantize_linear_int8(module: nn.Module, backend: str = "auto") -> str:
    """Quantise the ``nn.Linear`` layers of ``module`` IN PLACE to int8 dynamic. ``backend``: "auto" (torchao if
    importable, else torch.ao), "torchao" or "torch.ao". Returns a notice naming the backend and layer count."""
    n = sum(isinstance(m, nn.Linear) for m in module.modules())
    if backend not in ("auto", "torchao", "torch.ao"):
        raise ValueError(f"backend must be 'auto', 'torchao' or 'torch.ao', got {backend!r}")
    if backend in ("auto", "torchao"):
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError:
            if backend == "torchao":
                raise ImportError("torchao is not installed: pip install torchao (or use backend='torch.ao')") from None
        else:
            quantize_(module, Int8DynamicActivationInt8WeightConfig())
            return f"approx: int8 dynamic quantisation of {n} linear layers (torchao)"
    torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return f"approx: int8 dynamic quantisation of {n} linear layers (torch.ao quantize_dynamic)"


def _cross_attn_kwargs(block: nn.Module, c_txt: Tensor) -> dict[str, Any]:
    return {"encoder_hidden_states": c_txt} if getattr(block, "has_cross_attention", False) else {}


class DeepCacheModel:
    """``model(x, t, cond) -> eps`` reusing deep UNet features and control residuals between full steps.

    ``interval``: a full step every ``interval`` calls (per distinct condition, so batched and two-pass CFG
    both work); 1 = always full (exact). ``control_scales`` as in `ControlLDM.forward`. ``stats`` counts
    full / cached calls. Call `reset()` before a new image.
    """

    def __init__(self, ldm: nn.Module, interval: int = 3, control_scales: float | Sequence[float] = 1.0) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.ldm, self.interval, self.control_scales = ldm, int(interval), control_scales
        self.unet = ldm.unet
        if len(self.unet.down_blocks) < 2 or self.unet.config.get("class_embed_type") is not None:
            raise ValueError("DeepCacheModel needs a plain SD UNet2DConditionModel (>= 2 levels, no class embedding)")
        self.n_shallow = len(self.unet.down_blocks[0].resnets) + 1  # conv_in + level-0 res blocks
        self._cache: dict[tuple, dict[str, Any]] = {}
        self.stats = {"full": 0, "cached": 0}

    def reset(self) -> None:
        self._cache.clear()
        self.stats = {"full": 0, "cached": 0}

    def _key(self, x: Tensor, cond: Mapping[str, Tensor]) -> tuple:
        return (tuple(x.shape), cond["c_txt"].data_ptr(), cond["c_img"].data_ptr())

    def __call__(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        from .models.ldm import scale_residuals

        key = self._key(x, cond)
        entry = self._cache.setdefault(key, {"calls": 0})
        full = entry["calls"] % self.interval == 0 or "deep" not in entry
        entry["calls"] += 1
        if full:
            self.stats["full"] += 1
            control = self.ldm.control(x, t, cond)  # raw residuals, 13 for SD
            grabbed: dict[str, Tensor] = {}

            def grab(_module, _args, kwargs):
                grabbed["deep"] = kwargs["hidden_states"]

            handle = self.unet.up_blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                eps = self.ldm.unet_forward(x, t, cond["c_txt"], scale_residuals(control, self.control_scales))
            finally:
                handle.remove()
            entry["deep"], entry["control"] = grabbed["deep"], [r for r in control[: self.n_shallow]]
            return eps
        self.stats["cached"] += 1
        return self._shallow(x, t, cond["c_txt"], entry)

    def _shallow(self, x: Tensor, t: Tensor, c_txt: Tensor, entry: dict[str, Any]) -> Tensor:
        from .models.ldm import _timesteps, scale_residuals

        u = self.unet
        t = _timesteps(t, x)
        # 1. time embedding (diffusers UNet2DConditionModel.forward, step 1)
        emb = u.time_embedding(u.get_time_embed(sample=x, timestep=t).to(x.dtype))
        # 2. conv_in + the first down block's res / transformer layers: the shallow skips [B,C0,h,w] x 3
        h = u.conv_in(x)
        skips = [h]
        block = u.down_blocks[0]
        attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attns):
            h = resnet(h, emb)
            if attn is not None:
                h = attn(h, encoder_hidden_states=c_txt, return_dict=False)[0]
            skips.append(h)
        # 3. + the cached control residuals of those skips (scaled like the full step)
        res = scale_residuals(entry["control"], self._scales_for(len(skips)))
        skips = [s + r for s, r in zip(skips, res)]
        # 4. the last up block on the cached deep feature, then the output head
        up = u.up_blocks[-1]
        h = up(
            hidden_states=entry["deep"], temb=emb, res_hidden_states_tuple=tuple(skips), **_cross_attn_kwargs(up, c_txt)
        )
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    def _scales_for(self, n: int) -> float | list[float]:
        if isinstance(self.control_scales, (int, float)):
            return float(self.control_scales)
        return list(self.control_scales)[:n]
