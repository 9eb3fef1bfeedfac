"""Runtime speed options: attention kernel, memory format, precision, torch.compile, CPU offload, and the opt-in
APPROXIMATE modes (int8, DeepCache; `approx`).

``SpeedOptions`` change speed, not results (beyond float rounding); ``apply_speed_options`` applies them to a
``ControlLDM`` in place: diffusers attention processors (SDPA ``AttnProcessor2_0`` or the explicit
``AttnProcessor``), channels_last, fp16 / bf16 (GPU only), ``torch.compile``, and accelerate's CPU offload
(``cpu_offload`` / ``cpu_offload_with_hook``). ``autocast_for`` is the autocast context factory the VAE runner
and the model call use.

Mirrors: HEAD diffbir/model/config.py:23-60 (attention mode sdp / xformers / vanilla), HEAD inference.py:283 and
diffbir/inference/loop.py:159-180 (--precision fp32/fp16/bf16 as torch.autocast); offload and compile have no
official counterpart (accelerate's big-modeling hooks, torch.compile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import cpu_offload, cpu_offload_with_hook
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
)
from torch import nn

from .allocator import tune_malloc
from .approx import quantize_linear_int8

__all__ = [
    "SpeedOptions",
    "apply_process_options",
    "apply_speed_options",
    "autocast_for",
    "auto_device",
    "offload",
    "set_attention",
]


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SpeedOptions:
    """Runtime options that change speed, not results (beyond float rounding).

    attention: "sdpa" (``F.scaled_dot_product_attention``: fused, O(N) memory) or "math" (explicit softmax(QK^T)V,
        the plain baseline). channels_last: None = device default (CUDA: the UNet, control branch and VAE; CPU:
        none - on the 2-core AVX2 test machine it measured SLOWER: VAE decode 512 99 s vs 54 s, UNet+control CFG
        forward 88 s vs 82 s, torch 2.14). dtype: half precision is GPU-only (on CPU it is ~200x slower).
    compile: ``torch.compile`` the UNet and control branch (in place). offload (CUDA only): "model" keeps each
        part on the CPU until it runs; "sequential" streams layer by layer (accelerate ``cpu_offload``).
    batched_cfg: cond and uncond in one forward. tile_batch: latent tiles per forward when tiled.
    keep_freed_memory: glibc keeps freed activations for reuse (`allocator.tune_malloc`); None = on for CPU
        (bit-identical; offline x4 cleaner 1.70x, VAE decode 1.2x faster, results/bench/official). Stage 2 hands
        the kept memory back between its stages and runs with glibc's defaults when the planner tiled it
        (memory first: `allocator.defaults_while`).

    APPROXIMATE (opt-in, never default; they change the output and were measured on random weights only,
    results/bench/official/approx_*.json):
    int8: int8 dynamic quantisation of the UNet's and control branch's linear layers (`approx.quantize_linear_int8`;
        CPU only). deepcache: DeepCache feature reuse with a full step every ``deepcache`` model calls
        (`approx.DeepCacheModel`; 0 or 1 = off; not with tiled diffusion).
    """

    attention: Literal["sdpa", "math"] = "sdpa"
    channels_last: bool | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: bool = False
    offload: Literal["none", "model", "sequential"] = "none"
    batched_cfg: bool = True
    tile_batch: int = 1
    keep_freed_memory: bool | None = None
    int8: bool = False
    deepcache: int = 0

    @property
    def approximate(self) -> bool:
        """True when an approximate (output-changing) mode is on."""
        return self.int8 or self.deepcache > 1

    def validate(self, device: str | torch.device) -> SpeedOptions:
        dev = torch.device(device)
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"attention must be 'sdpa' or 'math', got {self.attention!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.dtype != "float32" and dev.type != "cuda":
            raise ValueError(
                f"dtype {self.dtype} is GPU-only: on CPU half-precision convolutions are ~200x slower "
                "than float32; use float32 (the default)"
            )
        if self.offload not in ("none", "model", "sequential"):
            raise ValueError(f"offload must be 'none', 'model' or 'sequential', got {self.offload!r}")
        if self.offload != "none" and dev.type != "cuda":
            raise ValueError("offload moves weights between CPU and GPU memory; it needs a CUDA device")
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {self.tile_batch}")
        if self.deepcache < 0:
            raise ValueError(
                f"deepcache must be >= 0 (0 or 1 = off, N = a full step every N calls), got {self.deepcache}"
            )
        if self.int8 and dev.type != "cpu":
            raise ValueError("int8 (approximate) is CPU-only: torch's dynamic quantisation runs on the CPU")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def channels_last_parts(self, device: str | torch.device) -> tuple[str, ...]:
        if self.channels_last is False:
            return ()
        if self.channels_last is True or torch.device(device).type == "cuda":
            return ("unet", "controlnet", "vae")
        return ()


def set_attention(module: nn.Module, kind: Literal["sdpa", "math"]) -> int:
    """Set every diffusers ``Attention`` under ``module`` to SDPA (``AttnProcessor2_0``) or the explicit
    softmax(QK^T)V processor (``AttnProcessor``). Returns how many were set."""
    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())
            n += 1
    return n


def autocast_for(device: str | torch.device, dtype: torch.dtype) -> Callable[[], Any]:
    """A context factory: autocast to ``dtype`` on ``device`` (disabled for float32)."""
    dev = torch.device(device)

    def ctx():
        return torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)

    return ctx


def apply_speed_options(ldm, opts: SpeedOptions, device: str | torch.device) -> list[str]:
    """Apply ``opts`` to a `ControlLDM` in place (attention processors, memory format, dtype, compile, offload).
    Returns notices describing what was done."""
    opts.validate(device)
    dev = torch.device(device)
    notes = []
    n = sum(set_attention(getattr(ldm, part), opts.attention) for part in ("unet", "controlnet", "vae"))
    notes.append(f"attention: {opts.attention} ({n} layers)")
    for part in opts.channels_last_parts(dev):
        getattr(ldm, part).to(memory_format=torch.channels_last)
    notes.append(f"channels_last: {', '.join(opts.channels_last_parts(dev)) or 'none'}")
    if opts.dtype != "float32":
        for part in ("unet", "controlnet", "vae"):
            getattr(ldm, part).to(opts.torch_dtype)
        notes.append(f"dtype: {opts.dtype} (UNet, control branch, VAE; text encoder float32)")
    if opts.compile:
        for part in ("unet", "controlnet"):
            getattr(ldm, part).compile()
        notes.append("torch.compile: UNet and control branch (first steps are slow while compiling)")
    if opts.offload != "none":
        notes.append(offload(ldm, dev, opts.offload))
    if opts.int8:
        for part in ("unet", "controlnet"):
            notes.append(f"APPROXIMATE {part}: " + quantize_linear_int8(getattr(ldm, part)))
    if opts.deepcache > 1:
        notes.append(f"APPROXIMATE: DeepCache, a full step every {opts.deepcache} model calls")
    return notes


def offload(ldm, device: torch.device, kind: Literal["model", "sequential"]) -> str:
    """CPU offload of the ControlLDM parts through accelerate: "model" moves a whole part to ``device`` while it
    runs (and the previous one back), "sequential" streams each layer's weights (smallest memory, slowest)."""
    parts = [ldm.text, ldm.vae, ldm.controlnet, ldm.unet]
    ldm.to("cpu")
    if kind == "sequential":
        for p in parts:
            cpu_offload(p, execution_device=device)
        return "offload: sequential (layer by layer)"
    hook = None
    for p in parts:
        _, hook = cpu_offload_with_hook(p, execution_device=device, prev_module_hook=hook)
    return "offload: model (one part on the GPU at a time)"


def apply_process_options(opts: SpeedOptions, device: str | torch.device) -> list[str]:
    """Process-wide options (once per pipeline, before any model runs): the glibc allocator tuning on CPU."""
    on = opts.keep_freed_memory if opts.keep_freed_memory is not None else torch.device(device).type == "cpu"
    return [tune_malloc(True)] if on else []


def auto_device(name: str | torch.device = "auto") -> str:
    """``"auto"`` -> the best device here (cuda, then mps, then cpu); any other name is returned unchanged."""
    if str(name).strip().lower() != "auto":
        return str(name)
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"
