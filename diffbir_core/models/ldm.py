"""Stage 2 of DiffBIR: the frozen Stable Diffusion 2.1-base plus the trainable control branch (``ControlLDM``).

paper arXiv 2308.15070, "Stage 2": the stage-1 output ``I_reg`` is encoded by the SD VAE (posterior mode x 0.18215) into
``c = E(I_reg)``; the control branch (`diffbir_core.models.controlnet.ControlNet`) reads ``concat(z_t, c)``
and emits 13 residuals that are added - times the control strength - to the UNet decoder's skip features
and middle output; the UNet predicts eps (eq. 5 uses it for ``z0_hat``); prompts enter through the
OpenCLIP text tower (`diffbir_core.models.text`).

Built on diffusers: ``UNet2DConditionModel`` (SD 2.1-base: linear transformer projections, head dim 64,
cos-first sinusoidal time embedding = ``flip_sin_to_cos=True, freq_shift=0``, GroupNorm eps 1e-5 in
ResBlocks and 1e-6 in transformers, 3x3 stride-2 pad-1 downsampling) and ``AutoencoderKL`` (GroupNorm
eps 1e-6, right/bottom-pad-then-conv downsampling, single-head mid attention scaled by C^-1/2). Residuals
go in through ``down_block_additional_residuals`` / ``mid_block_additional_residual``, which diffusers adds
exactly where the official ``ControlledUnetModel`` does: to each skip tensor before it is concatenated,
and to the middle-block output.

Mirrors the official v2.0.0 ``model/cldm.py`` (``ControlLDM``: vae_encode / vae_decode /
prepare_condition / forward) and its loaders (``load_pretrained_sd``, ``load_controlnet_from_ckpt``,
``load_controlnet_from_unet``); checkpoint key maps live in `diffbir_core.models.convert`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..weights import (
    WEIGHTS,
    LoadReport,
    WeightsError,
    default_cache_dir,
    load_into,
    load_safetensors_into,
    load_state_dict,
    resolve,
    save_safetensors,
)
from .controlnet import ControlNet
from .convert import (
    CONTROL_PREFIX_V1_FULL,
    SD_PREFIXES,
    export_control_official,
    keymap_for,
    pull_official,
    text_from_transformers,
    vae_from_legacy_diffusers,
)
from .text import TEXT_LAYERS, OpenCLIPTextEncoder

log = logging.getLogger(__name__)

__all__ = [
    "UNetConfig",
    "VAEConfig",
    "TextConfig",
    "Stage2Config",
    "STAGE2_CONFIGS",
    "ControlLDM",
    "build_unet",
    "build_vae",
    "build_text",
    "build_controlnet",
    "build_empty",
    "build_control_ldm",
    "load_sd_ldm",
    "load_sd_diffusers",
    "load_control",
    "load_full_v1",
    "save_control_ldm_safetensors",
    "load_control_ldm_safetensors",
    "export_control_official",
    "load_pretrained_control_ldm",
    "SD_UNUSED_PREFIXES",
    "SD_UNUSED_KEYS",
]


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class UNetConfig:
    """The SD UNet (and, with ``hint_channels`` extra inputs, the control branch): official field names."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors (1, 2, 4, ...) with attention
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear: bool = True  # use_linear_in_transformer

    def __post_init__(self) -> None:
        for c in self.block_out_channels:
            if c % self.num_head_channels:
                raise ValueError(f"channels {c} not divisible by num_head_channels {self.num_head_channels}")

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.channel_mult)) if 2**i in self.attention_resolutions)

    @property
    def attention_heads(self) -> tuple[int, ...]:
        return tuple(c // self.num_head_channels for c in self.block_out_channels)

    @property
    def num_residuals(self) -> int:
        """Control residuals: one per skip feature (conv_in, every res block, every downsample) + middle."""
        n = len(self.channel_mult)
        return 1 + n * self.num_res_blocks + (n - 1) + 1


@dataclass(frozen=True)
class VAEConfig:
    """LDM ``AutoencoderKL`` ddconfig (``attn_resolutions=[]``, ``double_z=True``)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3

    def __post_init__(self) -> None:
        if self.embed_dim != self.z_channels:
            raise ValueError(
                f"VAE embed_dim ({self.embed_dim}) != z_channels ({self.z_channels}) is not supported "
                "(diffusers' AutoencoderKL uses one latent width for both)"
            )


@dataclass(frozen=True)
class TextConfig:
    """OpenCLIP text tower (``clip_cfg.text_cfg`` + ``layer``)."""

    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    layer: str = "penultimate"

    def __post_init__(self) -> None:
        if self.layer not in TEXT_LAYERS:
            raise ValueError(f"text layer must be one of {sorted(TEXT_LAYERS)}, got {self.layer!r}")


@dataclass(frozen=True)
class Stage2Config:
    """Everything needed to build ``ControlLDM``; presets in `STAGE2_CONFIGS`."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    hint_channels: int = 4
    latent_scale_factor: float = 0.18215

    # official keys that carry no structural information for us (checkpointing, sizes of unused inputs)
    _IGNORED_UNET = frozenset(
        {"use_checkpoint", "image_size", "use_fp16", "legacy", "use_spatial_transformer", "hint_channels", "dropout"}
    )

    @classmethod
    def from_official(cls, cldm_params: Mapping[str, Any]) -> Stage2Config:
        """From the official ``ControlLDM`` yaml ``params`` (``configs/inference/cldm.yaml``; the whole
        ``{"target":..., "params":...}`` mapping is accepted too). Unsupported options raise ValueError."""
        p = cldm_params
        if "params" in p and isinstance(p["params"], Mapping):
            target = str(p.get("target", ""))
            if target and not target.endswith("ControlLDM"):
                raise ValueError(f"config target {target!r} is not a ControlLDM")
            p = p["params"]
        for k in ("unet_cfg", "vae_cfg", "clip_cfg", "controlnet_cfg"):
            if k not in p:
                raise ValueError(f"ControlLDM config lacks {k!r}; got keys {sorted(p)}")
        unet = cls._unet_from_official(p["unet_cfg"], "unet_cfg")
        control = cls._unet_from_official(p["controlnet_cfg"], "controlnet_cfg")
        if control != unet:
            raise ValueError(
                f"controlnet_cfg describes a different network than unet_cfg ({control} vs {unet}); "
                "the control branch must be a copy of the UNet encoder"
            )
        dd = dict(p["vae_cfg"].get("ddconfig", {}))
        if list(dd.get("attn_resolutions", [])) != [] or not dd.get("double_z", True):
            raise ValueError("only the SD VAE layout (attn_resolutions=[], double_z=True) is supported")
        vae = VAEConfig(
            ch=int(dd["ch"]),
            ch_mult=tuple(int(m) for m in dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            z_channels=int(dd["z_channels"]),
            embed_dim=int(p["vae_cfg"]["embed_dim"]),
            in_channels=int(dd.get("in_channels", 3)),
            out_ch=int(dd.get("out_ch", 3)),
        )
        tc = p["clip_cfg"]["text_cfg"]
        text = TextConfig(
            width=int(tc["width"]),
            heads=int(tc["heads"]),
            layers=int(tc["layers"]),
            context_length=int(tc.get("context_length", 77)),
            vocab_size=int(tc.get("vocab_size", 49408)),
            layer=str(p["clip_cfg"].get("layer", "last")),
        )
        return cls(
            unet=unet,
            vae=vae,
            text=text,
            hint_channels=int(p["controlnet_cfg"].get("hint_channels", 4)),
            latent_scale_factor=float(p["latent_scale_factor"]),
        )

    @classmethod
    def _unet_from_official(cls, u: Mapping[str, Any], where: str) -> UNetConfig:
        known = {
            "in_channels",
            "out_channels",
            "model_channels",
            "channel_mult",
            "num_res_blocks",
            "attention_resolutions",
            "num_head_channels",
            "transformer_depth",
            "context_dim",
            "use_linear_in_transformer",
        }
        unknown = sorted(k for k in u if k not in known and k not in cls._IGNORED_UNET)
        if unknown:
            raise ValueError(f"{where}: unsupported option(s) {unknown}")
        if not u.get("use_spatial_transformer", False) or u.get("num_head_channels", -1) == -1:
            raise ValueError(f"{where}: only use_spatial_transformer=True with num_head_channels set is supported")
        if u.get("dropout", 0) or u.get("use_fp16", False):
            raise ValueError(f"{where}: dropout / use_fp16 are not supported")
        if isinstance(u["num_res_blocks"], (list, tuple)):
            raise ValueError(f"{where}: per-level num_res_blocks is not supported")
        return UNetConfig(
            in_channels=int(u["in_channels"]),
            out_channels=int(u.get("out_channels", u["in_channels"])),
            model_channels=int(u["model_channels"]),
            channel_mult=tuple(int(m) for m in u["channel_mult"]),
            num_res_blocks=int(u["num_res_blocks"]),
            attention_resolutions=tuple(int(r) for r in u["attention_resolutions"]),
            num_head_channels=int(u["num_head_channels"]),
            transformer_depth=int(u.get("transformer_depth", 1)),
            context_dim=int(u["context_dim"]),
            use_linear=bool(u.get("use_linear_in_transformer", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage2Config:
        def tup(sub, data):
            return sub(
                **{
                    f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
                    for f in fields(sub)
                    if f.name in data
                }
            )

        return cls(
            unet=tup(UNetConfig, d["unet"]),
            vae=tup(VAEConfig, d["vae"]),
            text=tup(TextConfig, d["text"]),
            hint_channels=int(d["hint_channels"]),
            latent_scale_factor=float(d["latent_scale_factor"]),
        )


STAGE2_CONFIGS: dict[str, Stage2Config] = {
    # SD 2.1-base + IRControlNet: official v2.0.0 (and v2.1) configs/inference/cldm.yaml
    "sd21_base": Stage2Config(),
}


# ---------------------------------------------------------------------------------------------------
# Builders (random init; loaders below fill them)


def unet_diffusers_config(u: UNetConfig) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs equivalent to the official openaimodel ``UNetModel``."""
    n = len(u.channel_mult)
    attn = set(u.attention_levels)
    return dict(
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        flip_sin_to_cos=True,
        freq_shift=0,  # emb = [cos(t f), sin(t f)], f_i = exp(-ln(1e4) i / half)
        down_block_types=tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if (n - 1 - j) in attn else "UpBlock2D" for j in range(n)),
        block_out_channels=u.block_out_channels,
        layers_per_block=u.num_res_blocks,
        downsample_padding=1,
        mid_block_scale_factor=1.0,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=u.context_dim,
        transformer_layers_per_block=u.transformer_depth,
        attention_head_dim=u.attention_heads,  # diffusers' (mis)name for the number of heads per level
        use_linear_projection=u.use_linear,
        upcast_attention=False,
        resnet_time_scale_shift="default",
    )


def build_unet(cfg: Stage2Config):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_diffusers_config(cfg.unet))


def build_controlnet(cfg: Stage2Config) -> ControlNet:
    u = cfg.unet
    kw = unet_diffusers_config(u)
    return ControlNet(
        in_channels=u.in_channels,
        hint_channels=cfg.hint_channels,
        block_out_channels=u.block_out_channels,
        down_block_types=kw["down_block_types"],
        layers_per_block=u.num_res_blocks,
        attention_heads=u.attention_heads,
        cross_attention_dim=u.context_dim,
        transformer_layers_per_block=u.transformer_depth,
        use_linear_projection=u.use_linear,
    )


def build_vae(cfg: Stage2Config):
    from diffusers import AutoencoderKL

    v = cfg.vae
    n = len(v.ch_mult)
    return AutoencoderKL(
        in_channels=v.in_channels,
        out_channels=v.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.ch * m for m in v.ch_mult),
        layers_per_block=v.num_res_blocks,
        act_fn="silu",
        latent_channels=v.z_channels,
        norm_num_groups=32,
        scaling_factor=cfg.latent_scale_factor,
    )


def build_text(cfg: Stage2Config) -> OpenCLIPTextEncoder:
    t = cfg.text
    return OpenCLIPTextEncoder(
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        layer=t.layer,
    )


def build_empty(build, cfg: Stage2Config) -> nn.Module:
    """``build(cfg)`` with allocated but UNINITIALISED tensors, for a strict load that overwrites every one
    (skips seconds to a minute of random init at full size). Refuses modules with non-persistent buffers,
    which a load would leave uninitialised."""
    with torch.device("meta"):
        module = build(cfg)
    module = module.to_empty(device="cpu")
    persistent = set(module.state_dict())
    transient = [n for n, _ in module.named_buffers() if n not in persistent]
    if transient:
        raise RuntimeError(f"{type(module).__name__} has non-persistent buffers {transient}; build it normally")
    return module


# ---------------------------------------------------------------------------------------------------
# The model


def scale_residuals(residuals: Sequence[torch.Tensor], control_scales: float | Sequence[float]) -> list[torch.Tensor]:
    """``residual_i * control_scales[i]`` (a single float applies to all: the control strength)."""
    if isinstance(control_scales, (int, float)):
        return [r * float(control_scales) for r in residuals]
    scales = list(control_scales)
    if len(scales) != len(residuals):
        raise ValueError(
            f"control_scales has {len(scales)} entries but the control branch emits {len(residuals)} residuals"
        )
    return [r * float(s) for r, s in zip(residuals, scales)]


class ControlLDM(nn.Module):
    """SD 2.1 UNet + control branch + VAE + text encoder (official ``ControlLDM``).

    ``forward(x_t, t, cond)`` -> eps; ``t`` holds ORIGINAL timesteps (int64 ``[B]``); ``cond`` is the dict
    of `prepare_condition` (``c_txt`` ``[B,77,D]``, ``c_img`` ``[B,4,h,w]``).
    """

    def __init__(
        self,
        unet: nn.Module,
        controlnet: ControlNet,
        vae: nn.Module,
        text: OpenCLIPTextEncoder,
        scale_factor: float = 0.18215,
        cfg: Stage2Config | None = None,
    ):
        super().__init__()
        self.unet, self.controlnet, self.vae, self.text = unet, controlnet, vae, text
        self.scale_factor = float(scale_factor)
        self.cfg = cfg

    # -- text -----------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``c_txt`` ``[B, 77, width]`` (penultimate layer + ln_final). Too long: ValueError."""
        return self.text.encode(list(prompts))

    # -- VAE ------------------------------------------------------------------------------------
    def vae_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1,1] ``[B,3,H,W]`` -> (mean, logvar clamped to [-30, 20]), each ``[B,4,H/8,W/8]``."""
        moments = self.vae.quant_conv(self.vae.encoder(x))  # [B, 2*z, h, w]
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def vae_encode(
        self,
        x: torch.Tensor,
        sample: bool = False,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``mean * s`` (``sample=False``) or ``(mean + std * eps) * s`` with ``eps = noise`` if given,
        else ``torch.randn`` (``generator``); ``s`` = latent scale factor 0.18215."""
        mean, logvar = self.vae_posterior(x)
        if not sample:
            return mean * self.scale_factor
        std = torch.exp(0.5 * logvar)
        if noise is None:
            noise = torch.randn(
                mean.shape,
                generator=generator,
                dtype=mean.dtype,
                device=generator.device if generator is not None else mean.device,
            ).to(mean.device)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
        return (mean + std * noise) * self.scale_factor

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B,4,h,w]`` -> image ``[B,3,8h,8w]`` in the [-1,1] convention (not clamped)."""
        return self.vae.decoder(self.vae.post_quant_conv(z / self.scale_factor))

    def prepare_condition(self, clean: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Stage-1 output ``clean`` in [0,1] (not clamped) + prompts -> ``{"c_txt", "c_img"}``."""
        return dict(c_txt=self.encode_text(prompts), c_img=self.vae_encode(clean * 2 - 1, sample=False))

    # -- denoiser -------------------------------------------------------------------------------
    def control(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Raw control residuals (before control_scales), input block 0 first, middle last."""
        return self.controlnet(x, cond["c_img"], _timesteps(t, x), cond["c_txt"])

    def unet_forward(
        self, x: torch.Tensor, t: torch.Tensor, c_txt: torch.Tensor, residuals: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The UNet alone (``residuals=None``, official ``control=None``) or with already scaled residuals:
        ``residuals[:-1]`` are added to the skips (in emission order), ``residuals[-1]`` to the middle."""
        t = _timesteps(t, x)
        if residuals is None:
            return self.unet(x, t, encoder_hidden_states=c_txt, return_dict=False)[0]
        residuals = list(residuals)
        return self.unet(
            x,
            t,
            encoder_hidden_states=c_txt,
            down_block_additional_residuals=tuple(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        control_scales: float | Sequence[float] = 1.0,
        control: Sequence[torch.Tensor] | None | str = "auto",
    ) -> torch.Tensor:
        """eps = UNet(x, t, c_txt) with ``control_scales``-scaled control residuals.

        ``control="auto"`` computes them with the control branch; ``control=None`` runs the UNet alone;
        a list of raw residuals (from `control`) is scaled and used as given.
        """
        if isinstance(control, str):
            if control != "auto":
                raise ValueError(f"control must be 'auto', None or a list of residuals, got {control!r}")
            control = self.control(x, t, cond)
        if control is None:
            return self.unet_forward(x, t, cond["c_txt"])
        return self.unet_forward(x, t, cond["c_txt"], scale_residuals(control, control_scales))


def _timesteps(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor([int(t)], dtype=torch.long)
    t = t.to(x.device)
    if t.ndim == 0:
        t = t[None]
    if t.shape[0] == 1 and x.shape[0] > 1:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps must have shape [B]={x.shape[0]}, got {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------------------------------
# Loading official checkpoints

# keys an LDM-layout SD checkpoint may hold that stage 2 does not use (reported, never silently dropped)
SD_UNUSED_PREFIXES = (
    "model_ema.",  # EMA copy of the UNet (the official loader reads model.diffusion_model.*)
    "cond_stage_model.model.visual.",  # OpenCLIP image tower
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.attn_mask",
    "first_stage_model.loss.",  # VAE training losses (LPIPS / discriminator)
)
# LatentDiffusion's registered diffusion-schedule buffers (the schedule is rebuilt by the sampler)
SD_UNUSED_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        "scale_factor",
    }
)
# v1 full checkpoints: the stage-1 SwinIR rides along (load it with the stage-1 loader)
V1_UNUSED_PREFIXES = ("preprocess_model.",)


def _as_state_dict(path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A path (read with `weights.load_state_dict`) or an in-memory dict, unwrapped like the official code."""
    if isinstance(path_or_sd, Mapping):
        sd = path_or_sd
        if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        return dict(sd)
    return load_state_dict(path_or_sd)


def _unused_text_blocks(cfg: Stage2Config) -> tuple[str, ...]:
    run = cfg.text.layers - TEXT_LAYERS[cfg.text.layer]
    return tuple(f"{SD_PREFIXES['text']}transformer.resblocks.{i}." for i in range(run, cfg.text.layers))


def _check_unused(
    unused: set[str], allowed_prefixes: tuple[str, ...], what: str, allowed_keys=frozenset()
) -> list[str]:
    ok = sorted(k for k in unused if k in allowed_keys or k.startswith(allowed_prefixes))
    bad = sorted(set(unused) - set(ok))
    if bad:
        raise WeightsError(
            f"{what}: {len(bad)} key(s) in the file belong to nothing this model loads: "
            + ", ".join(bad[:12])
            + (" ..." if len(bad) > 12 else "")
            + f"\n  (allowed unused: prefixes {list(allowed_prefixes)} and the schedule buffers). "
            "Is this the right checkpoint for this config?"
        )
    return ok


def _freeze(*modules: nn.Module) -> None:
    for m in modules:
        m.eval()
        m.requires_grad_(False)


def _load_sd_parts(sd: Mapping[str, torch.Tensor], cfg: Stage2Config, what: str):
    unet, vae, text = (build_empty(b, cfg) for b in (build_unet, build_vae, build_text))
    used: set[str] = set()
    reports = []
    for name, module in (("unet", unet), ("vae", vae), ("text", text)):
        mapped, u = pull_official(module, sd, keymap_for(module, SD_PREFIXES[name]), what=f"{what} -> {name}")
        reports.append(load_into(module, mapped, what=f"{what} -> {name}", strict=True))
        used |= u
    _freeze(unet, vae, text)
    return (unet, vae, text), used, reports


def load_sd_ldm(
    path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor], cfg: Stage2Config, *, return_reports: bool = False
):
    """UNet, VAE, text encoder from an LDM-layout SD checkpoint (``v2-1_512-ema-pruned.ckpt``).

    Every module key is pulled from its official name (missing ones raise `WeightsError`). File keys not
    used must match `SD_UNUSED_PREFIXES` / `SD_UNUSED_KEYS` / the text blocks after the chosen layer; they
    are reported (``LoadReport.unexpected``, logged); any other unused key raises.
    Returns ``(unet, vae, text)`` (frozen, eval), plus the list of LoadReports if ``return_reports``.
    """
    sd = _as_state_dict(path_or_sd)
    what = f"SD checkpoint {path_or_sd}" if not isinstance(path_or_sd, Mapping) else "SD checkpoint"
    parts, used, reports = _load_sd_parts(sd, cfg, what)
    allowed = _check_unused(set(sd) - used, SD_UNUSED_PREFIXES + _unused_text_blocks(cfg), what, SD_UNUSED_KEYS)
    rep = LoadReport(f"{what}: keys not used by stage 2", loaded=len(used), unexpected=allowed)
    log.info("%s", rep)
    reports.append(rep)
    return (*parts, reports) if return_reports else parts


def load_control(
    path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor], cfg: Stage2Config, *, prefix: str = ""
) -> ControlNet:
    """A control branch from an official control file (``v1_general.pth``, ``v1_face.pth``, ``v2.pth``,
    ``DiffBIR_v2.1.pt``: ``time_embed.*``, ``input_blocks.*``, ``zero_convs.*``, ``middle_block(_out).*``).
    Strict like the official ``load_state_dict(strict=True)``: a missing or extra key raises."""
    sd = _as_state_dict(path_or_sd)
    what = f"control branch {path_or_sd}" if not isinstance(path_or_sd, Mapping) else "control branch"
    net = build_empty(build_controlnet, cfg)
    mapped, _ = pull_official(net, sd, keymap_for(net, prefix), what=what, strict_prefix=True)
    load_into(net, mapped, what=what, strict=True)
    return net.eval()


def load_full_v1(path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor], cfg: Stage2Config) -> ControlLDM:
    """A DiffBIR v1 full checkpoint (``general_full_v1.ckpt`` / ``face_full_v1.ckpt``): the SD keys plus the
    control branch under ``control_model.``, v1's condition encoder ``cond_encoder.{encoder,quant_conv}.*``
    (a frozen copy of the VAE encoder - checked to equal it, since we encode ``c`` with the VAE) and the
    stage-1 SwinIR under ``preprocess_model.`` (reported as unused; load it with the stage-1 loader)."""
    sd = _as_state_dict(path_or_sd)
    what = f"v1 full checkpoint {path_or_sd}" if not isinstance(path_or_sd, Mapping) else "v1 full checkpoint"
    (unet, vae, text), used, _ = _load_sd_parts(sd, cfg, what)
    control_sd = {k: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX_V1_FULL)}
    if not control_sd:
        raise WeightsError(f"{what}: no '{CONTROL_PREFIX_V1_FULL}*' keys - not a v1 full ControlLDM checkpoint")
    controlnet = load_control(control_sd, cfg, prefix=CONTROL_PREFIX_V1_FULL)
    used |= set(control_sd)
    # v1 encodes the condition with cond_encoder (encoder + quant_conv copied from the VAE, then frozen)
    differs = []
    for k, v in sd.items():
        if k.startswith("cond_encoder."):
            ref_key = "first_stage_model." + k[len("cond_encoder.") :]
            if ref_key not in sd or sd[ref_key].shape != v.shape or not torch.equal(sd[ref_key], v):
                differs.append(k)
            used.add(k)
    if differs:
        raise WeightsError(
            f"{what}: v1 condition encoder differs from the VAE encoder in {len(differs)} tensors "
            f"(e.g. {differs[:3]}); this model encodes the condition with the VAE encoder, so it "
            "cannot reproduce this checkpoint"
        )
    allowed = _check_unused(
        set(sd) - used, SD_UNUSED_PREFIXES + V1_UNUSED_PREFIXES + _unused_text_blocks(cfg), what, SD_UNUSED_KEYS
    )
    log.info("%s", LoadReport(f"{what}: keys not used by stage 2", loaded=len(used), unexpected=allowed))
    model = ControlLDM(unet, controlnet, vae, text, cfg.latent_scale_factor, cfg)
    return model.eval()


def _find_file(folder: Path, sub: str, names: Sequence[str]) -> Path:
    for n in names:
        p = folder / sub / n
        if p.is_file():
            return p
    raise WeightsError(
        f"diffusers folder {folder}: none of {[f'{sub}/{n}' for n in names]} exists "
        "(expected a local diffusers-format Stable Diffusion 2.1-base folder with unet/, vae/, "
        "text_encoder/ holding safetensors files)"
    )


def _check_folder_config(path: Path, expect: Mapping[str, Any], what: str) -> None:
    cfg_file = path.parent / "config.json"
    if not cfg_file.is_file():
        return
    got = json.loads(cfg_file.read_text())
    bad = []
    for k, v in expect.items():
        if k in got:
            g = got[k]
            g = tuple(g) if isinstance(g, list) else g
            if g != v:
                bad.append(f"{k}: folder {g!r} vs config {v!r}")
    if bad:
        raise WeightsError(f"{what}: {cfg_file} does not match the Stage2Config: " + "; ".join(bad))


def load_sd_diffusers(folder: str | os.PathLike, cfg: Stage2Config, *, return_reports: bool = False):
    """UNet, VAE, text encoder from a LOCAL diffusers-format folder (``unet/``, ``vae/``, ``text_encoder/``
    with safetensors). The text encoder is transformers' ``CLIPTextModel`` layout (SD 2.1 ships the 23
    layers the penultimate output needs); extra layers are reported as unused."""
    from safetensors.torch import load_file

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise WeightsError(f"diffusers folder {root} does not exist")
    reports = []
    unet, vae, text = (build_empty(b, cfg) for b in (build_unet, build_vae, build_text))

    p = _find_file(root, "unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"))
    kw = unet_diffusers_config(cfg.unet)
    _check_folder_config(
        p,
        {
            k: kw[k]
            for k in (
                "block_out_channels",
                "layers_per_block",
                "cross_attention_dim",
                "attention_head_dim",
                "in_channels",
                "out_channels",
            )
        },
        "unet",
    )
    reports.append(load_into(unet, load_file(str(p)), what=f"{p}", strict=True))

    p = _find_file(root, "vae", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"))
    _check_folder_config(
        p,
        {
            "block_out_channels": tuple(cfg.vae.ch * m for m in cfg.vae.ch_mult),
            "latent_channels": cfg.vae.z_channels,
            "layers_per_block": cfg.vae.num_res_blocks,
        },
        "vae",
    )
    reports.append(load_into(vae, vae_from_legacy_diffusers(load_file(str(p))), what=f"{p}", strict=True))

    p = _find_file(root, "text_encoder", ("model.safetensors", "model.fp16.safetensors"))
    _check_folder_config(
        p,
        {
            "hidden_size": cfg.text.width,
            "num_attention_heads": cfg.text.heads,
            "hidden_act": "gelu",
            "vocab_size": cfg.text.vocab_size,
        },
        "text_encoder",
    )
    tsd = load_file(str(p))
    mapped, used = text_from_transformers(tsd, text.blocks_run)
    unused = set(tsd) - used

    def unused_ok(k: str) -> bool:  # position_ids buffer, layers after the one we read
        k = k.removeprefix("text_model.")
        return k == "embeddings.position_ids" or (
            k.startswith("encoder.layers.") and int(k.split(".")[2]) >= text.blocks_run
        )

    ok = sorted(k for k in unused if unused_ok(k))
    if set(unused) - set(ok):
        raise WeightsError(f"{p}: unexpected keys {sorted(set(unused) - set(ok))[:12]}")
    reports.append(load_into(text, mapped, what=f"{p}", strict=True))
    reports.append(LoadReport(f"{p}: keys not used", loaded=len(used), unexpected=ok))
    log.info("%s", reports[-1])
    _freeze(unet, vae, text)
    return (unet, vae, text, reports) if return_reports else (unet, vae, text)


def build_control_ldm(
    cfg: Stage2Config,
    sd: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    control: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
) -> ControlLDM:
    """``ControlLDM`` for ``cfg``.

    ``sd``: an LDM checkpoint (path or state dict) or a diffusers folder; None = random SD weights (tests).
    ``control``: an official control-branch file (path or state dict); None = the paper's init from the
    UNet (`ControlNet.from_unet`: copied weights, zero new input channels, zero convs).
    """
    if sd is None:
        unet, vae, text = build_unet(cfg), build_vae(cfg), build_text(cfg)
        _freeze(unet, vae, text)
    elif not isinstance(sd, Mapping) and Path(sd).is_dir():
        unet, vae, text = load_sd_diffusers(sd, cfg)
    else:
        unet, vae, text = load_sd_ldm(sd, cfg)
    controlnet = ControlNet.from_unet(unet, cfg.hint_channels) if control is None else load_control(control, cfg)
    return ControlLDM(unet, controlnet.eval(), vae, text, cfg.latent_scale_factor, cfg).eval()


# ---------------------------------------------------------------------------------------------------
# Our own format

_FORMAT = "diffbir_core.ControlLDM/1"
_PARTS = ("unet", "controlnet", "vae", "text")


def save_control_ldm_safetensors(model: ControlLDM, path: str | os.PathLike) -> Path:
    """All four parts in one safetensors file (keys ``unet.*``, ``controlnet.*``, ``vae.*``, ``text.*``),
    with the Stage2Config as JSON metadata."""
    if model.cfg is None:
        raise ValueError("model has no Stage2Config (build it with build_control_ldm / the loaders)")
    sd = {f"{name}.{k}": v for name in _PARTS for k, v in getattr(model, name).state_dict().items()}
    meta = {"format": _FORMAT, "config": json.dumps(model.cfg.to_dict())}
    return save_safetensors(sd, path, metadata=meta)


def load_control_ldm_safetensors(path: str | os.PathLike, cfg: Stage2Config | None = None) -> ControlLDM:
    """Inverse of `save_control_ldm_safetensors`. ``cfg`` defaults to the one stored in the file; a given
    ``cfg`` that differs from the stored one raises `WeightsError`."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p} does not exist")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise WeightsError(
            f"{p} is not a {_FORMAT} file (metadata format={meta.get('format')!r}); "
            "official checkpoints load with load_sd_ldm / load_control / load_full_v1"
        )
    stored = Stage2Config.from_dict(json.loads(meta["config"]))
    if cfg is not None and cfg != stored:
        raise WeightsError(f"{p} was saved for a different Stage2Config:\n  file: {stored}\n  given: {cfg}")
    cfg = stored
    model = ControlLDM(
        *(build_empty(b, cfg) for b in (build_unet, build_controlnet, build_vae, build_text)),
        cfg.latent_scale_factor,
        cfg,
    )
    with safe_open(str(p), framework="pt") as f:
        extra = sorted(k for k in f.keys() if not k.startswith(tuple(f"{n}." for n in _PARTS)))
    if extra:
        raise WeightsError(f"{p}: unexpected keys {extra[:12]}")
    for name in _PARTS:  # strict per part, a 256 MiB mapping at a time: peak memory = the model + one chunk
        load_safetensors_into(getattr(model, name), p, prefix=f"{name}.", what=f"{p} -> {name}")
    _freeze(model.unet, model.vae, model.text)
    return model.eval()


CACHE_ENV = "DIFFBIR_CONVERSION_CACHE"  # "0" turns the converted-checkpoint cache off


def conversion_cache_path(
    sd_path: Path, control_path: Path, cfg: Stage2Config, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where the converted ControlLDM of (``sd_path``, ``control_path``, ``cfg``) is cached: one safetensors file
    (`save_control_ldm_safetensors`) named by the two files' stems and a hash of their resolved paths, sizes,
    mtimes and the config, so a changed file or config never reuses a stale conversion."""
    import hashlib

    def stamp(f: Path) -> list:
        st = f.stat()
        return [str(f.resolve()), st.st_size, st.st_mtime_ns]

    key = json.dumps([_FORMAT, stamp(sd_path), stamp(control_path), cfg.to_dict()], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f"{sd_path.stem}+{control_path.stem}-{digest}.safetensors"
    return Path(cache_dir or default_cache_dir()) / "stage2" / name


def load_pretrained_control_ldm(
    sd: str,
    control: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    cache: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ControlLDM:
    """The full-size ControlLDM from official files: ``sd`` / ``control`` are names in ``weights.WEIGHTS``
    (or paths; ``sd`` may be a diffusers folder). Both files are resolved before anything loads, so a
    missing one fails fast with the message from `weights.resolve`.

    The first load converts the official layouts (key maps, checks) and caches the result as one safetensors file
    (`conversion_cache_path`, under ``$DIFFBIR_CACHE``); later loads read that file (no pickle, part by part).
    ``cache=False`` or ``$DIFFBIR_CONVERSION_CACHE=0`` skips the cache; a diffusers folder is never cached."""

    def find(name: str) -> Path:
        if name in WEIGHTS:
            return resolve(name, weights_dir=weights_dir)
        p = Path(name).expanduser()
        if p.exists():
            return p
        return resolve(name, weights_dir=weights_dir)  # raises the "unknown weight name" error

    sd_path, control_path = find(sd), find(control)
    cfg = STAGE2_CONFIGS["sd21_base"]
    if cache is None:
        cache = os.environ.get(CACHE_ENV, "1").lower() not in ("0", "false", "no", "off")
    cached = conversion_cache_path(sd_path, control_path, cfg, cache_dir) if cache and sd_path.is_file() else None
    if cached is not None and cached.is_file():
        try:
            log.info("stage 2: reading the converted checkpoint %s", cached)
            return load_control_ldm_safetensors(cached, cfg).to(device).eval()
        except (WeightsError, OSError, ValueError) as e:  # damaged cache: convert again (and overwrite it)
            log.warning("converted checkpoint %s is unusable (%s); converting the official files again", cached, e)
    model = build_control_ldm(cfg, sd=sd_path, control=control_path)
    if cached is not None:
        try:
            for old in cached.parent.glob(f"{sd_path.stem}+{control_path.stem}-*.safetensors"):
                old.unlink()  # conversions of older versions of the same two files
            save_control_ldm_safetensors(model, cached)
            log.info("stage 2: cached the converted checkpoint as %s", cached)
        except OSError as e:  # a full or read-only cache only costs the conversion next time
            log.warning("could not cache the converted checkpoint in %s: %s", cached, e)
    return model.to(device).eval()
