"""RRDBNet (ESRGAN's Residual-in-Residual Dense Block network): DiffBIR v2's BSR cleaner and Real-ESRGAN.

Mirrors BSRGAN's ``RRDBNet`` (DiffBIR ``diffbir/model/bsrnet.py``, used with nf 64, nb 23, gc 32,
sf 4 for ``BSRNet.pth``) and Real-ESRGAN/BasicSR's ``RRDBNet`` (``RealESRGAN_x4plus``): the same
network under three key layouts. Our module uses the BasicSR names; `to_basicsr_layout` maps the
other two onto them:

    BasicSR / Real-ESRGAN      BSRGAN / KAIR (BSRNet.pth)      original ESRGAN ("model.N")
    conv_first                 conv_first                      model.0
    body.i.rdbk.convj          RRDB_trunk.i.RDBk.convj         model.1.sub.i.RDBk.convj.0
    conv_body                  trunk_conv                      model.1.sub.<nb>
    conv_up1 / conv_up2        upconv1 / upconv2               model.3 / model.6
    conv_hr / conv_last        HRconv / conv_last              model.<3s+2> / model.<3s+4>

Forward (no paper equation; ESRGAN, Wang et al. 2018): f0 = conv_first(x); f = f0 + conv_body(RRDBs(f0));
``log2(scale)`` times (nearest x2 -> conv -> LeakyReLU 0.2); out = conv_last(lrelu(conv_hr(f))).
Each RDB: 5 densely connected 3x3 convs, output ``0.2 * conv5 + x``; each RRDB: 3 RDBs, ``0.2 * y + x``.

Why our own module and not spandrel's ESRGAN (which we use as an independent check in the tests):
spandrel converts every layout into its own ``model.N.sub...`` names and silently drops keys it does
not recognise, so an extra or misnamed tensor in a file would go unreported, and its detection assumes
the growth channels (gc = 32) instead of reading them; the ncnn converter
(`diffbir_core.models.ncnn`) also produces the BasicSR layout directly. With our module every file
goes through one explicit key map, `detect_rrdbnet_config` (which names what the file *is* when it is
not what was asked for) and the strict `weights.load_into`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import WeightsError, load_into, load_state_dict

__all__ = ["RRDBNetConfig", "RRDBNET_CONFIGS", "RRDBNet", "to_basicsr_layout", "detect_rrdbnet_config", "load_rrdbnet"]


@dataclass(frozen=True)
class RRDBNetConfig:
    """RRDBNet hyper-parameters (BSRGAN names: in_nc, out_nc, nf, nb, gc, sf)."""

    in_nc: int = 3
    out_nc: int = 3
    nf: int = 64  # feature channels
    nb: int = 23  # number of RRDB blocks
    gc: int = 32  # growth channels inside a dense block
    sf: int = 4  # scale factor: 2 or 4 (one nearest-x2 + conv stage per factor 2)

    def __post_init__(self) -> None:
        if self.sf not in (2, 4):
            raise ValueError(f"RRDBNet scale factor must be 2 or 4, got {self.sf}")


RRDBNET_CONFIGS: dict[str, RRDBNetConfig] = {
    "bsrnet": RRDBNetConfig(nf=64, nb=23, gc=32, sf=4),  # BSRGAN's BSRNet.pth (DiffBIR v2 BSR cleaner)
    "realesrgan_x4plus": RRDBNetConfig(nf=64, nb=23, gc=32, sf=4),  # RealESRGAN_x4plus / the ncnn copy
}


class _DenseBlock(nn.Module):
    """Residual dense block: 5 convs, each seeing the block input and all earlier outputs."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))  # N x gc x H x W each
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1 = _DenseBlock(nf, gc)
        self.rdb2 = _DenseBlock(nf, gc)
        self.rdb3 = _DenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN generator with BasicSR parameter names. Input N x in_nc x H x W in [0, 1]; output x sf."""

    def __init__(self, cfg: RRDBNetConfig = RRDBNetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.sf
        self.conv_first = nn.Conv2d(cfg.in_nc, cfg.nf, 3, 1, 1)
        self.body = nn.Sequential(*[_RRDB(cfg.nf, cfg.gc) for _ in range(cfg.nb)])
        self.conv_body = nn.Conv2d(cfg.nf, cfg.nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(cfg.nf, cfg.nf, 3, 1, 1)
        if cfg.sf == 4:
            self.conv_up2 = nn.Conv2d(cfg.nf, cfg.nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(cfg.nf, cfg.nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(cfg.nf, cfg.out_nc, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)  # N x nf x H x W
        feat = feat + self.conv_body(self.body(feat))
        ups = [self.conv_up1] + ([self.conv_up2] if self.cfg.sf == 4 else [])
        for conv in ups:  # each: N x nf x 2h x 2w
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))  # N x out_nc x sf*H x sf*W


# ----------------------------------------------------------------------------------------------
# Key layouts


_BSRGAN_MAP = [  # (regex on the BSRGAN/KAIR key, BasicSR replacement)
    (r"^RRDB_trunk\.(\d+)\.RDB(\d)\.(conv\d)\.", r"body.\1.rdb\2.\3."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv(\d)\.", r"conv_up\1."),
    (r"^HRconv\.", "conv_hr."),
]


def _old_esrgan_map(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Key map for the original ESRGAN ``model.N`` layout (sequential indices depend on the scale)."""
    top = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^model\.(\d+)\.", k))})
    if not top or top[0] != 0 or 1 not in top:
        raise WeightsError("old-ESRGAN layout expected model.0 (conv_first) and model.1 (trunk)")
    nb = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^model\.1\.sub\.(\d+)\.RDB", k)))
    ups = [i for i in top if i >= 3 and i % 3 == 0]  # model.3, model.6: the upsampling convs
    last_up = max(ups) if ups else 0
    names = {0: "conv_first", last_up + 2: "conv_hr", last_up + 4: "conv_last"}
    names.update({u: f"conv_up{j + 1}" for j, u in enumerate(ups)})
    out: dict[str, str] = {}
    for k in sd:
        if m := re.match(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.(conv\d)\.0\.(weight|bias)$", k):
            out[k] = f"body.{m.group(1)}.rdb{m.group(2)}.{m.group(3)}.{m.group(4)}"
        elif m := re.match(rf"^model\.1\.sub\.{nb}\.(weight|bias)$", k):
            out[k] = f"conv_body.{m.group(1)}"
        elif (m := re.match(r"^model\.(\d+)\.(weight|bias)$", k)) and int(m.group(1)) in names:
            out[k] = f"{names[int(m.group(1))]}.{m.group(2)}"
        else:
            out[k] = k  # left as is: load_into reports it as unexpected
    return out


def to_basicsr_layout(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename an RRDBNet state dict into the BasicSR layout. Returns (state dict, layout name).

    Layouts: "basicsr" (Real-ESRGAN), "bsrgan" (BSRNet.pth / KAIR), "esrgan" (original ``model.N``).
    Keys that fit no rule are kept unchanged so that strict loading lists them as unexpected.
    """
    if "conv_first.weight" in sd and any(k.startswith("body.") for k in sd):
        return dict(sd), "basicsr"
    if "conv_first.weight" in sd and any(k.startswith("RRDB_trunk.") for k in sd):
        out = {}
        for k, v in sd.items():
            new = k
            for pat, rep in _BSRGAN_MAP:
                new = re.sub(pat, rep, new)
            out[new] = v
        return out, "bsrgan"
    if "model.0.weight" in sd and any(k.startswith("model.1.sub.") for k in sd):
        return {new: sd[k] for k, new in _old_esrgan_map(sd).items()}, "esrgan"
    sample = ", ".join(list(sd)[:6])
    raise WeightsError(
        "not an RRDBNet (ESRGAN/BSRNet/Real-ESRGAN) checkpoint: expected keys like conv_first.weight + "
        f"body.0.rdb1.conv1.weight (Real-ESRGAN), RRDB_trunk.0.RDB1.conv1.weight (BSRNet) or "
        f"model.1.sub.0.RDB1.conv1.0.weight (ESRGAN); the file has {len(sd)} tensors, e.g. {sample}"
    )


def detect_rrdbnet_config(sd: Mapping[str, torch.Tensor]) -> RRDBNetConfig:
    """Read in_nc / out_nc / nf / nb / gc / sf off a BasicSR-layout state dict's shapes."""
    try:
        w_first, w_last = sd["conv_first.weight"], sd["conv_last.weight"]
        nb = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^body\.(\d+)\.", k)))
        gc = sd["body.0.rdb1.conv1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise WeightsError(f"RRDBNet state dict lacks a core tensor ({e}); is this an RRDBNet file?") from e
    sf = 4 if "conv_up2.weight" in sd else 2
    return RRDBNetConfig(in_nc=w_first.shape[1], out_nc=w_last.shape[0], nf=w_first.shape[0], nb=nb, gc=gc, sf=sf)


def load_rrdbnet(
    source: str | Mapping[str, torch.Tensor], cfg: RRDBNetConfig | None = None, *, what: str = "RRDBNet"
) -> RRDBNet:
    """Build an RRDBNet and load a checkpoint (path or state dict, any of the three layouts) strictly.

    With ``cfg`` given, a file of another shape (e.g. the 6-block anime model, an x2 model) raises
    `WeightsError` naming what the file is; with ``cfg=None`` the configuration is read off the file.
    Returns the module in eval mode with gradients off.
    """
    raw = load_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    sd, layout = to_basicsr_layout(raw)
    found = detect_rrdbnet_config(sd)
    if cfg is not None and found != cfg:
        raise WeightsError(
            f"{what}: the checkpoint ({layout} layout) is an RRDBNet with {found}, "
            f"but {cfg} was expected - is this the right file?"
        )
    net = RRDBNet(cfg or found)
    load_into(net, sd, what=f"{what} ({layout} layout)")
    return net.eval().requires_grad_(False)
