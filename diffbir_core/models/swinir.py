"""Stage 1 of DiffBIR: the SwinIR restoration module ("cleaner"), ``I_reg = SwinIR(I_LQ)``.

Paper (arXiv 2308.15070) section 3.1 "Stage 1": a SwinIR trained with the L2 loss
``||I_reg - I_HQ||^2`` removes noise and artefacts before the diffusion stage. DiffBIR's SwinIR is a
1x cleaner: PixelUnshuffle(8) -> 3x3 conv -> residual Swin Transformer blocks (RSTB) at 1/8 resolution
-> shallow + deep features -> three rounds of (nearest x2 -> conv -> LeakyReLU) -> RGB.

This mirrors, number for number, the official ``SwinIR`` of XPixelGroup/DiffBIR (v2.0.0
``model/swinir.py``, HEAD ``diffbir/model/swinir.py``; itself from DifFace / SwinIR by Liang et al.):

* state-dict keys are exactly the official ones, including the persistent buffers
  ``...attn.relative_position_index`` and, for shifted blocks, ``...attn_mask``;
* forward = reflect-pad bottom/right to a multiple of ``window_size`` (image space), mean shift,
  PixelUnshuffle(sf), RSTBs with (shifted) window attention, nearest+conv tail, and the official final
  crop ``[:H*sf, :W*sf]`` - which with ``unshuffle=True`` never removes the padding. Callers that want a
  clean same-size output pad to a multiple of ``window_size * unshuffle_scale`` (64) and crop themselves.
* the stored ``attn_mask`` is used only when the token grid equals ``img_size // patch_size``; for any
  other grid the same mask is recomputed for the actual size (as the official code does).

Only the configuration DiffBIR uses for its tail is implemented (``upsampler="nearest+conv"``); other
official upsamplers are rejected with a clear error. DropPath / dropout act only in train mode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffbir_core.weights import WeightsError, load_into, load_state_dict

log = logging.getLogger(__name__)

__all__ = ["SwinIRConfig", "SWINIR_CONFIGS", "SWINIR_WEIGHT_NAMES", "SwinIR", "load_swinir", "map_official_swinir_keys"]

# Official per-channel RGB mean subtracted before the network (``rgb_mean`` in the official class).
_RGB_MEAN = (0.4488, 0.4371, 0.4040)


# ----------------------------------------------------------------------------------------------
# Configuration


# The official constructor's defaults, used by `SwinIRConfig.from_official` for keys a params dict
# leaves out (so a partial official yaml means what it means to the official code).
_OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    img_size=64,
    patch_size=1,
    in_chans=3,
    embed_dim=96,
    depths=(6, 6, 6, 6),
    num_heads=(6, 6, 6, 6),
    window_size=7,
    mlp_ratio=4.0,
    qkv_bias=True,
    qk_scale=None,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.1,
    ape=False,
    patch_norm=True,
    use_checkpoint=False,
    sf=4,
    img_range=1.0,
    upsampler="",
    resi_connection="1conv",
    unshuffle=False,
    unshuffle_scale=None,
)
# Official constructor arguments that only configure Lightning training (v1): accepted, not used.
_TRAINING_ONLY_KEYS = frozenset({"hq_key", "lq_key", "learning_rate", "weight_decay"})


@dataclass(frozen=True)
class SwinIRConfig:
    """Architecture of one SwinIR, with the official constructor's field names.

    ``img_size`` is the size of the TOKEN grid the model was built for (``img_size // patch_size``
    tokens per side): with ``unshuffle_scale=8`` and ``img_size=64`` that is a 512x512 image.
    """

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    sf: int
    img_range: float
    upsampler: str
    resi_connection: str
    unshuffle: bool
    unshuffle_scale: int | None
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # official default; only active in train mode
    ape: bool = False
    patch_norm: bool = True
    use_checkpoint: bool = False  # gradient checkpointing of Swin blocks (train mode only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        bad: list[str] = []
        if not self.depths or len(self.depths) != len(self.num_heads):
            bad.append(f"depths {self.depths} and num_heads {self.num_heads} must be non-empty and of equal length")
        for h in self.num_heads:
            if h <= 0 or self.embed_dim % h:
                bad.append(f"embed_dim {self.embed_dim} must be divisible by every num_heads entry (got {h})")
        if self.upsampler != "nearest+conv":
            bad.append(
                f"upsampler {self.upsampler!r} is not implemented: only 'nearest+conv' (the DiffBIR "
                "stage-1 configuration) is"
            )
        if self.sf not in (2, 4, 8):
            bad.append(f"sf must be 2, 4 or 8 for upsampler 'nearest+conv' (got {self.sf})")
        if self.resi_connection not in ("1conv", "3conv"):
            bad.append(f"resi_connection must be '1conv' or '3conv' (got {self.resi_connection!r})")
        if self.unshuffle and self.unshuffle_scale != self.sf:
            # official: PixelUnshuffle(sf) but conv_first input channels in_chans * unshuffle_scale**2
            bad.append(
                f"unshuffle=True needs unshuffle_scale == sf (got {self.unshuffle_scale} vs {self.sf}); "
                "the official model cannot run otherwise"
            )
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "window_size"):
            if int(getattr(self, name)) <= 0:
                bad.append(f"{name} must be positive (got {getattr(self, name)})")
        if bad:
            raise ValueError("invalid SwinIRConfig: " + "; ".join(bad))

    @property
    def token_grid(self) -> int:
        """Side of the token grid the stored ``attn_mask`` buffers are built for."""
        return self.img_size // self.patch_size

    @property
    def pad_multiple(self) -> int:
        """Image sides must be a multiple of this for the window partition (64 for DiffBIR)."""
        return self.window_size * (self.unshuffle_scale if self.unshuffle else 1)

    @classmethod
    def from_official(cls, params: Mapping[str, Any]) -> SwinIRConfig:
        """Build from an official config: the ``params`` dict of ``configs/inference/swinir.yaml`` (or the
        whole ``{"target": ..., "params": {...}}`` mapping). Keys the dict leaves out take the official
        constructor's defaults; training-only keys (hq_key, lq_key, learning_rate, weight_decay) are
        accepted and ignored; any other unknown key is an error."""
        if "params" in params and isinstance(params["params"], Mapping):
            target = str(params.get("target", ""))
            if target and not target.endswith("SwinIR"):
                raise ValueError(f"config target {target!r} is not a SwinIR (expected '...SwinIR')")
            params = params["params"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in params if k not in known and k not in _TRAINING_ONLY_KEYS)
        if unknown:
            raise ValueError(
                f"unknown SwinIR config key(s) {unknown}; known: {sorted(known)} "
                f"(plus training-only {sorted(_TRAINING_ONLY_KEYS)}). Is this a SwinIR config?"
            )
        merged = {**_OFFICIAL_DEFAULTS, **{k: v for k, v in params.items() if k in known}}
        return cls(**merged)

    def to_official(self) -> dict[str, Any]:
        """The official ``params`` dict (lists instead of tuples)."""
        d = asdict(self)
        d["depths"], d["num_heads"] = list(self.depths), list(self.num_heads)
        return d


def _diffbir_swinir() -> SwinIRConfig:
    # XPixelGroup/DiffBIR configs/inference/swinir.yaml (identical at v2.0.0 and HEAD/v2.1)
    return SwinIRConfig(
        img_size=64,
        patch_size=1,
        in_chans=3,
        embed_dim=180,
        depths=(6,) * 8,
        num_heads=(6,) * 8,
        window_size=8,
        mlp_ratio=2.0,
        sf=8,
        img_range=1.0,
        upsampler="nearest+conv",
        resi_connection="1conv",
        unshuffle=True,
        unshuffle_scale=8,
    )


# All official DiffBIR SwinIR checkpoints share ONE architecture: v1/v2 load general_swinir_v1.ckpt and
# face_swinir_v1.ckpt, and v2.1 (HEAD, bsr_loop.py / bid_loop.py) loads realesrgan_s4_swinir_100k.pth,
# all into the model built from the same configs/inference/swinir.yaml.
SWINIR_CONFIGS: dict[str, SwinIRConfig] = {
    "general_v1": _diffbir_swinir(),
    "face_v1": _diffbir_swinir(),
    "realesrgan_s4": _diffbir_swinir(),
}
# Preset -> entry of `diffbir_core.weights.WEIGHTS` holding its official checkpoint.
SWINIR_WEIGHT_NAMES: dict[str, str] = {
    "general_v1": "swinir_general",
    "face_v1": "swinir_face",
    "realesrgan_s4": "swinir_realesrgan",
}


# ----------------------------------------------------------------------------------------------
# Building blocks (attribute names = official state-dict names)


class _DropPath(nn.Module):
    """Stochastic depth per sample (train mode only); identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws, ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def _window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def _relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) int64: for tokens i=(yi,xi), j=(yj,xj) of a window,
    ``(yi - yj + ws - 1) * (2ws - 1) + (xi - xj + ws - 1)`` - the row of the bias table."""
    yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    y, x = yy.flatten(), xx.flatten()  # ws*ws each, row-major
    dy = y[:, None] - y[None, :] + ws - 1
    dx = x[:, None] - x[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


def _shift_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask for shifted windows: 0 between tokens of the same roll region,
    -100 between tokens from different regions (regions: [0, -ws), [-ws, -shift), [-shift, end) per axis)."""
    labels = torch.zeros((1, h, w, 1))
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for hs in cuts:
        for wsl in cuts:
            labels[:, hs, wsl, :] = cnt
            cnt += 1
    lw = _window_partition(labels, ws).view(-1, ws * ws)  # nW, N
    diff = lw.unsqueeze(1) - lw.unsqueeze(2)  # nW, N, N
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class _WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias (W-MSA / SW-MSA)."""

    def __init__(
        self,
        dim: int,
        ws: int,
        num_heads: int,
        qkv_bias: bool,
        qk_scale: float | None,
        attn_drop: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.ws, self.num_heads = ws, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(ws))  # persistent (official)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape  # bw = B * nW windows, n = ws*ws tokens
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # bw, nH, n, d
        attn = (q * self.scale) @ k.transpose(-2, -1)  # bw, nH, n, n
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)  # + (1, nH, n, n)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))


class _SwinBlock(nn.Module):
    """Pre-LN Swin block: x += WMSA(LN(x)) (cyclically shifted for odd blocks); x += MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        ws: int,
        shift: int,
        cfg: SwinIRConfig,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        if min(input_resolution) <= ws:  # official: no partition/shift when the grid fits one window
            shift, ws = 0, min(input_resolution)
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, ws, num_heads, cfg.qkv_bias, cfg.qk_scale, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path = _DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        mask = _shift_window_mask(*input_resolution, ws, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask)  # persistent when not None (official)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, s = self.ws, self.shift
        if h % ws or w % ws:
            raise ValueError(
                f"SwinIR token grid {h}x{w} is not a multiple of the window size {ws}; pad the image to a "
                f"multiple of window_size x unshuffle_scale (64 for DiffBIR) before calling the model"
            )
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        xw = _window_partition(x, ws).view(-1, ws * ws, c)  # B*nW, N, C
        if s == 0:
            mask = None  # official passes a mask of zeros here for other grids: adding 0 changes nothing
        elif (h, w) == tuple(self.input_resolution):
            mask = self.attn_mask
        else:
            mask = _shift_window_mask(h, w, ws, s).to(device=x.device)
        if mask is not None:
            mask = mask.to(dtype=x.dtype)
        xw = self.attn(xw, mask).view(-1, ws, ws, c)
        x = _window_reverse(xw, ws, h, w)  # B, H, W, C
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + self.drop_path(x.view(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _BasicLayer(nn.Module):
    """``depth`` Swin blocks; odd blocks are shifted by window_size // 2."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        cfg: SwinIRConfig,
        drop_path: list[float],
    ) -> None:
        super().__init__()
        self.use_checkpoint = cfg.use_checkpoint
        self.blocks = nn.ModuleList(
            [
                _SwinBlock(
                    dim,
                    input_resolution,
                    num_heads,
                    cfg.window_size,
                    0 if i % 2 == 0 else cfg.window_size // 2,
                    cfg,
                    drop_path[i],
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, x_size, use_reentrant=False)
            else:
                x = blk(x, x_size)
        return x


def _resi_conv(dim: int, kind: str) -> nn.Module:
    """The conv block before a residual connection ('1conv' or the parameter-saving '3conv')."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


def _tokens_to_map(x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) as the official PatchUnEmbed (a transposed view, no copy)."""
    b, _, c = x.shape
    return x.transpose(1, 2).view(b, c, x_size[0], x_size[1])


class _RSTB(nn.Module):
    """Residual Swin Transformer Block: x + tokens(conv(map(SwinBlocks(x))))."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        cfg: SwinIRConfig,
        drop_path: list[float],
    ) -> None:
        super().__init__()
        self.residual_group = _BasicLayer(dim, input_resolution, depth, num_heads, cfg, drop_path)
        self.conv = _resi_conv(dim, cfg.resi_connection)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        y = self.conv(_tokens_to_map(self.residual_group(x, x_size), x_size))  # B, C, H, W
        return y.flatten(2).transpose(1, 2) + x  # B, H*W, C


class _PatchEmbed(nn.Module):
    """Feature map -> tokens (B, H*W, C), then the optional patch LayerNorm (key ``patch_embed.norm``)."""

    def __init__(self, dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


# ----------------------------------------------------------------------------------------------
# The model


class SwinIR(nn.Module):
    """DiffBIR's stage-1 SwinIR (official layout and forward; see the module docstring).

    Input: (B, in_chans, H, W) in [0, 1]. Output: same convention, not clamped. With ``unshuffle=True``
    the output has the size of the input padded (reflect, bottom/right) to a multiple of ``window_size``,
    and H, W must be multiples of ``pad_multiple`` (64) for the window partition.
    """

    def __init__(self, cfg: SwinIRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        num_feat = 64
        in_ch = cfg.in_chans * cfg.unshuffle_scale**2 if cfg.unshuffle else cfg.in_chans
        mean = torch.tensor(_RGB_MEAN).view(1, 3, 1, 1) if cfg.in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # a plain attribute in the official class

        # 1. shallow features
        if cfg.unshuffle:
            self.conv_first = nn.Sequential(nn.PixelUnshuffle(cfg.sf), nn.Conv2d(in_ch, c, 3, 1, 1))
        else:
            self.conv_first = nn.Conv2d(in_ch, c, 3, 1, 1)
        # 2. deep features
        res = (cfg.token_grid, cfg.token_grid)
        self.patch_embed = _PatchEmbed(c, cfg.patch_norm)
        if cfg.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, res[0] * res[1], c))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            start = sum(cfg.depths[:i])
            self.layers.append(_RSTB(c, res, depth, heads, cfg, dpr[start : start + depth]))
        self.norm = nn.LayerNorm(c)
        self.conv_after_body = _resi_conv(c, cfg.resi_connection)
        # 3. reconstruction: nearest+conv
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(c, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        if cfg.sf in (4, 8):
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        if cfg.sf == 8:
            self.conv_up3 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, cfg.in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) shallow features -> (B, C, h, w) deep features (RSTBs + final LayerNorm)."""
        x_size = (x.shape[2], x.shape[3])
        x = self.patch_embed(x)  # B, h*w, C
        if self.cfg.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size)
        return _tokens_to_map(self.norm(x), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_chans:
            raise ValueError(f"SwinIR expects (B, {cfg.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[2:]
        # 1. reflect-pad bottom/right to a multiple of window_size (image space, as the official check)
        ph = (cfg.window_size - h % cfg.window_size) % cfg.window_size
        pw = (cfg.window_size - w % cfg.window_size) % cfg.window_size
        x = F.pad(x, (0, pw, 0, ph), "reflect")
        # 2. mean shift
        mean = self.mean.type_as(x)
        x = (x - mean) * cfg.img_range
        # 3. shallow + deep features
        x = self.conv_first(x)  # B, C, H/sf, W/sf (unshuffle)
        x = self.conv_after_body(self.forward_features(x)) + x
        # 4. nearest+conv tail
        x = self.conv_before_upsample(x)  # B, 64, h, w
        x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")))
        if cfg.sf in (4, 8):
            x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")))
        if cfg.sf == 8:
            x = self.lrelu(self.conv_up3(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))  # B, in_chans, ..
        x = x / cfg.img_range + mean
        # 5. official crop: a no-op with unshuffle (output already has the padded input size)
        return x[:, :, : h * cfg.sf, : w * cfg.sf]


# ----------------------------------------------------------------------------------------------
# Loading official checkpoints

# v1's SwinIR was a Lightning module that also owned `lpips_metric = LPIPS(net="alex")` (validation
# only); v1-era state dicts may carry those tensors. They are not part of the restoration network.
_V1_TRAINING_PREFIXES = ("lpips_metric.",)
# v1 full ControlLDM checkpoints (general_full_v1.ckpt / face_full_v1.ckpt) hold the SwinIR under this.
_V1_FULL_PREFIX = "preprocess_model."


def map_official_swinir_keys(sd: Mapping[str, torch.Tensor], *, what: str = "SwinIR") -> dict[str, torch.Tensor]:
    """Key map from any official DiffBIR SwinIR state dict to our (= the official class's) keys.

    1. a v1 full ControlLDM checkpoint: keep only ``preprocess_model.*``, prefix removed;
    2. a leading ``module.`` on every key (DataParallel) is removed (files read by
       `weights.load_state_dict` already are; this covers state dicts passed in directly);
    3. v1 training-only ``lpips_metric.*`` tensors are dropped.
    Every step that changes something is logged.
    """
    out = dict(sd)
    if any(k.startswith(_V1_FULL_PREFIX) for k in out):
        n_other = sum(not k.startswith(_V1_FULL_PREFIX) for k in out)
        out = {k[len(_V1_FULL_PREFIX) :]: v for k, v in out.items() if k.startswith(_V1_FULL_PREFIX)}
        log.info(
            "%s: v1 full checkpoint - took %d '%s*' tensors, ignored %d others (UNet/VAE/control)",
            what,
            len(out),
            _V1_FULL_PREFIX,
            n_other,
        )
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
        log.info("%s: stripped 'module.' from every key", what)
    dropped = [k for k in out if k.startswith(_V1_TRAINING_PREFIXES)]
    if dropped:
        for k in dropped:
            del out[k]
        log.info("%s: dropped %d v1 training-only tensors (%s)", what, len(dropped), ", ".join(_V1_TRAINING_PREFIXES))
    return out


def _fill_constructor_buffers(model: SwinIR, sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``relative_position_index`` and ``attn_mask`` are deterministic functions of the config that the
    official constructor computes and saves (persistent buffers). A file without them (saved with
    non-persistent buffers, e.g. by other SwinIR ports) gets the values our constructor computed - the
    same the official constructor would - and a warning. Present ones are loaded as they are (the official
    code uses the file's values); a differing value is reported, since it changes the output."""
    own = model.state_dict()
    buffer_keys = [k for k in own if k.endswith((".relative_position_index", ".attn_mask"))]
    missing = [k for k in buffer_keys if k not in sd]
    if missing:
        log.warning(
            "%s: file lacks %d constructor buffers (e.g. %s); using the values computed from the "
            "config (identical to the official constructor's)",
            what,
            len(missing),
            missing[:3],
        )
        sd = {**sd, **{k: own[k] for k in missing}}
    differing = [
        k
        for k in buffer_keys
        if k not in missing
        and tuple(sd[k].shape) == tuple(own[k].shape)
        and not torch.equal(sd[k].to(own[k].dtype), own[k])
    ]
    if differing:
        log.warning(
            "%s: %d stored buffers differ from the values the config implies (e.g. %s); using the "
            "file's values as the official code does",
            what,
            len(differing),
            differing[:3],
        )
    return sd


def load_swinir(
    source: str | os.PathLike | Mapping[str, torch.Tensor], cfg: SwinIRConfig | None = None, *, what: str = "SwinIR"
) -> SwinIR:
    """Build a `SwinIR` (default config: ``SWINIR_CONFIGS["general_v1"]``) and load an official checkpoint
    strictly: ``source`` is a file (read by `weights.load_state_dict`) or a state dict. The key map is
    `map_official_swinir_keys`; missing constructor buffers are filled (see `_fill_constructor_buffers`);
    every other missing / unexpected / mis-shaped tensor raises `WeightsError`. Returns the model in eval mode.
    """
    cfg = cfg or SWINIR_CONFIGS["general_v1"]
    if isinstance(source, Mapping):
        sd = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
        origin = "state dict"
    else:
        sd = load_state_dict(source)
        origin = str(source)
    if not sd:
        raise WeightsError(
            f"{what}: {origin} holds no tensors (pass a checkpoint path or a flat {{key: tensor}} state dict)"
        )
    sd = map_official_swinir_keys(sd, what=what)
    model = SwinIR(cfg)
    sd = _fill_constructor_buffers(model, sd, what)
    load_into(model, sd, what=f"{what} ({origin})", strict=True)  # logs its LoadReport
    return model.eval()
