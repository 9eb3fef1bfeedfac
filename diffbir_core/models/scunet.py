"""SCUNet (Swin-Conv-UNet, Zhang et al. 2022): DiffBIR v2's blind-denoising (BID) cleaner.

DiffBIR v2 ``configs/inference/scunet.yaml`` builds ``SCUNet(in_nc=3, config=[4,4,4,4,4,4,4], dim=64)``
and loads ``scunet_color_real_psnr.pth`` strictly. The network is a 1x restorer: a 3-level UNet whose
stages are ConvTransBlocks (a conv residual branch beside a (shifted-)window attention branch, window 8,
head dim 32); three stride-2 downsamplings and window 8 make it need H, W divisible by 64 (the official
forward replicate-pads to 64 and crops).

Why spandrel here (and not for RRDBNet): spandrel's ``SCUNet`` class is the authors' code
(cszn/SCUNet ``network_scunet.py``) with the same parameter names as the official checkpoint, so we build
it with the official config and load the file through our strict `weights.load_into` (full missing /
unexpected / shape report) - no key conversion involved. We never use spandrel's auto-detecting loader,
so what is built is always what `SCUNetConfig` says; a file of another shape fails loudly. spandrel is
imported only when a model is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..weights import WeightsError, load_into, load_state_dict

__all__ = ["SCUNetConfig", "SCUNET_CONFIGS", "build_scunet", "load_scunet", "SCUNET_MULTIPLE"]

SCUNET_MULTIPLE = 64  # 3 stride-2 downsamplings x window 8


@dataclass(frozen=True)
class SCUNetConfig:
    """Official constructor arguments of ``SCUNet`` (cszn/SCUNet, DiffBIR ``diffbir/model/scunet.py``)."""

    in_nc: int = 3
    config: tuple[int, ...] = (4, 4, 4, 4, 4, 4, 4)  # blocks per stage: down1..3, body, up3..1
    dim: int = 64
    input_resolution: int = 256  # only decides whether a stage is too small for shifted windows

    @classmethod
    def from_official(cls, params: Mapping[str, object]) -> SCUNetConfig:
        """From the ``params`` of an official yaml (e.g. DiffBIR ``configs/inference/scunet.yaml``)."""
        known = {"in_nc", "config", "dim", "input_resolution", "drop_path_rate"}
        extra = set(params) - known
        if extra:
            raise ValueError(f"unknown SCUNet parameters {sorted(extra)}; known: {sorted(known)}")
        kw = {k: v for k, v in params.items() if k != "drop_path_rate"}  # training-only
        if "config" in kw:
            kw["config"] = tuple(kw["config"])  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]


SCUNET_CONFIGS: dict[str, SCUNetConfig] = {
    "color_real_psnr": SCUNetConfig(),  # scunet_color_real_psnr.pth (DiffBIR v2 BID cleaner)
}


def build_scunet(cfg: SCUNetConfig = SCUNetConfig()) -> nn.Module:
    """An SCUNet with the given config (random weights; spandrel's copy of the official class)."""
    if len(cfg.config) != 7:
        raise ValueError(f"SCUNet config needs 7 stage depths, got {cfg.config}")
    from spandrel.architectures.SCUNet import SCUNet

    return SCUNet(
        in_nc=cfg.in_nc, config=list(cfg.config), dim=cfg.dim, drop_path_rate=0.0, input_resolution=cfg.input_resolution
    )


def load_scunet(
    source: str | Mapping[str, torch.Tensor], cfg: SCUNetConfig = SCUNetConfig(), *, what: str = "SCUNet"
) -> nn.Module:
    """Build an SCUNet and load an official checkpoint (path or state dict) strictly; eval mode, no grads."""
    sd = load_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    if "m_head.0.weight" not in sd or "m_tail.0.weight" not in sd:
        raise WeightsError(
            f"{what}: not an SCUNet checkpoint (no m_head.0.weight / m_tail.0.weight); "
            f"the file has {len(sd)} tensors, e.g. {', '.join(list(sd)[:5])}"
        )
    depths = tuple(
        1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"^{s}\.(\d+)\.", k))), default=-1)
        for s in ("m_down1", "m_down2", "m_down3", "m_body", "m_up3", "m_up2", "m_up1")
    )
    found = (sd["m_head.0.weight"].shape[0], tuple(d - 1 if i != 3 else d for i, d in enumerate(depths)))
    if found != (cfg.dim, cfg.config):
        raise WeightsError(
            f"{what}: the checkpoint is an SCUNet with dim {found[0]} and stage depths {found[1]}, "
            f"but dim {cfg.dim} / {cfg.config} was expected - is this the right file?"
        )
    net = build_scunet(cfg)
    load_into(net, sd, what=what)
    return net.eval().requires_grad_(False)
