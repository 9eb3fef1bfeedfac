"""Key maps between the official DiffBIR / LDM checkpoint layouts and our diffusers-based modules.

Official layouts (DiffBIR v1/v2/v2.1, see the fixture README "loading"):

* SD checkpoint (``v2-1_512-ema-pruned.ckpt``, ``sd2.1-base-zsnr-laionaes5.ckpt``, v1 ``*_full_v1.ckpt``):
  ``model.diffusion_model.*`` (openaimodel UNet), ``first_stage_model.*`` (LDM AutoencoderKL),
  ``cond_stage_model.model.*`` (OpenCLIP).
* Control branch (``v1_general.pth``, ``v1_face.pth``, ``v2.pth``, ``DiffBIR_v2.1.pt``): ``time_embed.*``,
  ``input_blocks.*``, ``zero_convs.*``, ``middle_block.*``, ``middle_block_out.*``; inside the v1 full
  checkpoints the same keys sit under ``control_model.``.

Every map is built structurally from the model's own configuration (levels, blocks per level, which
levels have attention) as a table ``our module prefix -> (official prefix, kind)``; ``kind`` names a
leaf-rename table (e.g. a UNet ResBlock's ``in_layers.0`` is diffusers' ``norm1``). Converting PULLS each
of our keys from its official name (like the official ``load_pretrained_sd``), so a missing official key
is an error and every official key that was not pulled is known and reported. The same map exports back
to the official layout (`to_official`). The only value transform: the LDM VAE's mid-block attention uses
1x1 convs for q/k/v/proj_out, diffusers uses Linear layers (``[C,C,1,1] <-> [C,C]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "KeyMap",
    "num_skip_features",
    "unet_key_map",
    "control_key_map",
    "vae_key_map",
    "text_key_map",
    "keymap_for",
    "pull_official",
    "to_official",
    "export_control_official",
    "text_from_transformers",
    "vae_from_legacy_diffusers",
    "SD_PREFIXES",
    "CONTROL_PREFIX_V1_FULL",
]

# where each part lives inside an LDM-layout checkpoint
SD_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model.model."}
CONTROL_PREFIX_V1_FULL = "control_model."

# leaf renames per kind: our leaf-module path -> official leaf-module path
_LEAF = {
    "same": {},
    # openaimodel ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
    # out_layers = [GroupNorm, SiLU, Dropout, conv], skip_connection = 1x1 conv when channels change
    "res": {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    },
    # LDM VAE ResnetBlock
    "vae_res": {"conv_shortcut": "nin_shortcut"},
    # LDM VAE AttnBlock (1x1 convs) vs diffusers Attention (Linear)
    "vae_attn": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
}
_CONV1X1 = "conv1x1"  # value transform tag: official [C,C,1,1] <-> ours [C,C]


@dataclass
class KeyMap:
    """``our module prefix -> (official prefix, kind)``; `official` resolves one of our full keys to its
    official name (used both to pull weights in and to export them back)."""

    table: dict[str, tuple[str, str]] = field(default_factory=dict)
    official_prefix: str = ""  # prepended to every official key (e.g. "model.diffusion_model.")

    def add(self, ours: str, official: str, kind: str = "same") -> None:
        if ours in self.table:
            raise ValueError(f"duplicate key-map entry for {ours}")
        self.table[ours] = (official, kind)

    def official(self, key: str) -> tuple[str, str | None]:
        """Our full key -> (official full key, value transform or None). KeyError if unmapped."""
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in self.table:
                off, kind = self.table[head]
                if cut == len(parts):  # a bare parameter mapped as a whole
                    return f"{self.official_prefix}{off}", None
                leaf = ".".join(parts[cut:])
                transform = None
                for ours_leaf, off_leaf in sorted(_LEAF[kind].items(), key=lambda kv: -len(kv[0])):
                    if leaf.startswith(ours_leaf + "."):
                        leaf = off_leaf + leaf[len(ours_leaf) :]
                        if kind == "vae_attn" and ours_leaf != "group_norm" and leaf.endswith(".weight"):
                            transform = _CONV1X1
                        break
                return f"{self.official_prefix}{off}.{leaf}", transform
        raise KeyError(f"no official name known for {key!r}")


def _encoder_entries(km: KeyMap, n_levels: int, nrb: int, attn: set[int]) -> None:
    """conv_in, time embedding, down blocks, middle block: shared by the UNet and the control branch."""
    km.add("conv_in", "input_blocks.0.0")
    km.add("time_embedding.linear_1", "time_embed.0")
    km.add("time_embedding.linear_2", "time_embed.2")
    idx = 1
    for lvl in range(n_levels):
        for j in range(nrb):
            km.add(f"down_blocks.{lvl}.resnets.{j}", f"input_blocks.{idx}.0", "res")
            if lvl in attn:
                km.add(f"down_blocks.{lvl}.attentions.{j}", f"input_blocks.{idx}.1")
            idx += 1
        if lvl != n_levels - 1:
            km.add(f"down_blocks.{lvl}.downsamplers.0.conv", f"input_blocks.{idx}.0.op")
            idx += 1
    km.add("mid_block.resnets.0", "middle_block.0", "res")
    km.add("mid_block.attentions.0", "middle_block.1")
    km.add("mid_block.resnets.1", "middle_block.2", "res")


def num_skip_features(n_levels: int, layers_per_block: int) -> int:
    """How many encoder features the UNet keeps as skips (= control residuals without the middle one)."""
    return 1 + n_levels * layers_per_block + (n_levels - 1)


def unet_key_map(n_levels: int, layers_per_block: int, attn_levels: Iterable[int], prefix: str = "") -> KeyMap:
    """diffusers ``UNet2DConditionModel`` keys <-> openaimodel ``UNetModel`` keys."""
    n, nrb, attn = n_levels, layers_per_block, set(attn_levels)
    km = KeyMap(official_prefix=prefix)
    _encoder_entries(km, n, nrb, attn)
    idx = 0
    for up in range(n):  # up block `up` works at level n-1-up
        lvl = n - 1 - up
        for j in range(nrb + 1):
            km.add(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{idx}.0", "res")
            if lvl in attn:
                km.add(f"up_blocks.{up}.attentions.{j}", f"output_blocks.{idx}.1")
            if j == nrb and up != n - 1:  # the level's last output block ends with the Upsample
                km.add(f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if lvl in attn else 1}.conv")
            idx += 1
    km.add("conv_norm_out", "out.0")
    km.add("conv_out", "out.2")
    return km


def control_key_map(n_levels: int, layers_per_block: int, attn_levels: Iterable[int], prefix: str = "") -> KeyMap:
    """Our `ControlNet` keys <-> official ``ControlNet`` keys (``zero_convs.i.0``, ``middle_block_out.0``)."""
    n, nrb, attn = n_levels, layers_per_block, set(attn_levels)
    km = KeyMap(official_prefix=prefix)
    _encoder_entries(km, n, nrb, attn)
    for i in range(num_skip_features(n, nrb)):
        km.add(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0")
    km.add("controlnet_mid_block", "middle_block_out.0")
    return km


def vae_key_map(n_levels: int, layers_per_block: int, prefix: str = "") -> KeyMap:
    """diffusers ``AutoencoderKL`` keys <-> LDM ``AutoencoderKL`` keys (``attn_resolutions=[]``)."""
    km = KeyMap(official_prefix=prefix)
    for part in ("encoder", "decoder"):
        km.add(f"{part}.conv_in", f"{part}.conv_in")
        km.add(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "vae_res")
        km.add(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "vae_attn")
        km.add(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "vae_res")
        km.add(f"{part}.conv_norm_out", f"{part}.norm_out")
        km.add(f"{part}.conv_out", f"{part}.conv_out")
    for lvl in range(n_levels):
        for j in range(layers_per_block):
            km.add(f"encoder.down_blocks.{lvl}.resnets.{j}", f"encoder.down.{lvl}.block.{j}", "vae_res")
        km.add(f"encoder.down_blocks.{lvl}.downsamplers.0.conv", f"encoder.down.{lvl}.downsample.conv")
        up = n_levels - 1 - lvl  # the LDM decoder indexes levels bottom-up, diffusers top-down
        for j in range(layers_per_block + 1):
            km.add(f"decoder.up_blocks.{up}.resnets.{j}", f"decoder.up.{lvl}.block.{j}", "vae_res")
        km.add(f"decoder.up_blocks.{up}.upsamplers.0.conv", f"decoder.up.{lvl}.upsample.conv")
    km.add("quant_conv", "quant_conv")
    km.add("post_quant_conv", "post_quant_conv")
    return km


def text_key_map(prefix: str = "") -> KeyMap:
    """Our `OpenCLIPTextEncoder` keys are the open_clip keys: identity (plus the checkpoint prefix)."""
    km = KeyMap(official_prefix=prefix)
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        km.add(name, name)
    return km


def _unet_structure(config) -> tuple[int, int, list[int]]:
    n = len(config.block_out_channels)
    attn = [i for i, t in enumerate(config.down_block_types) if "CrossAttn" in t]
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"per-level layers_per_block {lpb} is not supported")
    return n, lpb, attn


def keymap_for(module: nn.Module, prefix: str = "") -> KeyMap:
    """The key map for one of our stage-2 modules (UNet, ControlNet, AutoencoderKL, text encoder)."""
    from .controlnet import ControlNet
    from .text import OpenCLIPTextEncoder

    if isinstance(module, ControlNet):
        c = module.config
        attn = [i for i, t in enumerate(c["down_block_types"]) if "CrossAttn" in t]
        return control_key_map(len(c["block_out_channels"]), c["layers_per_block"], attn, prefix)
    if isinstance(module, OpenCLIPTextEncoder):
        return text_key_map(prefix)
    name = type(module).__name__
    if name == "UNet2DConditionModel":
        return unet_key_map(*_unet_structure(module.config), prefix=prefix)
    if name == "AutoencoderKL":
        return vae_key_map(len(module.config.block_out_channels), module.config.layers_per_block, prefix=prefix)
    raise TypeError(f"no official key map for {name}")


def pull_official(
    module: nn.Module, sd: Mapping[str, torch.Tensor], keymap: KeyMap, *, what: str, strict_prefix: bool = False
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Collect ``module``'s state dict from official-layout ``sd``.

    Returns (state dict in our key names, the official keys used). Raises `WeightsError` listing every
    official key that is missing and every value whose shape cannot fit; with ``strict_prefix`` also
    every key under the map's official prefix that the module does not use.
    """
    from ..weights import WeightsError

    own = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, bad = [], []
    for key, ref in own.items():
        okey, transform = keymap.official(key)
        if okey not in sd:
            missing.append(okey)
            continue
        v = sd[okey]
        if transform == _CONV1X1:
            if v.ndim == 4 and tuple(v.shape[2:]) == (1, 1):
                v = v[:, :, 0, 0]
            elif tuple(v.shape) != tuple(ref.shape):
                bad.append(f"{okey}: file {tuple(v.shape)}, expected 1x1 conv for {tuple(ref.shape)}")
                continue
        out[key] = v
        used.add(okey)
    extra = sorted(k for k in sd if k.startswith(keymap.official_prefix) and k not in used) if strict_prefix else []
    if missing or bad or extra:
        parts = [f"{what}: checkpoint does not fit the model."]
        if missing:
            parts.append(
                f"  missing keys ({len(missing)}): " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else "")
            )
        if extra:
            parts.append(
                f"  unexpected keys ({len(extra)}): " + ", ".join(extra[:12]) + (" ..." if len(extra) > 12 else "")
            )
        if bad:
            parts.append(f"  shape mismatches ({len(bad)}): " + "; ".join(bad[:10]))
        parts.append("  (is this the right file for this model/config?)")
        raise WeightsError("\n".join(parts))
    return out, used


def to_official(module: nn.Module, keymap: KeyMap) -> dict[str, torch.Tensor]:
    """``module``'s state dict under the official key names (detached tensors on the module's device,
    official shapes)."""
    out = {}
    for key, v in module.state_dict().items():
        okey, transform = keymap.official(key)
        if transform == _CONV1X1:
            v = v[:, :, None, None]  # [C,C] -> [C,C,1,1]
        if okey in out:
            raise RuntimeError(f"two keys map to {okey}")
        out[okey] = v.detach()
    return out


def export_control_official(controlnet: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our `ControlNet` -> a state dict in the OFFICIAL control-branch layout (``v2.pth`` style:
    ``time_embed.*``, ``input_blocks.*``, ``zero_convs.*``, ``middle_block.*``, ``middle_block_out.*``)."""
    return to_official(controlnet, keymap_for(controlnet, prefix))


# ---------------------------------------------------------------------------------------------------
# diffusers-format folders


def text_from_transformers(sd: Mapping[str, torch.Tensor], blocks: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """transformers ``CLIPTextModel`` keys (diffusers ``text_encoder/``) -> our open_clip names.

    Keys carry the ``text_model.`` prefix in files saved by transformers 4.x (the SD 2.1 release) and none
    in files saved by transformers 5; both are accepted. q/k/v projections are packed into
    ``in_proj_weight``/``in_proj_bias`` (q, k, v order, as ``nn.MultiheadAttention``). Only ``blocks``
    layers are taken. Returns (state dict, keys used).
    """
    p = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(k: str) -> torch.Tensor:
        used.add(p + k)
        return sd[p + k]

    missing = [
        p + k
        for k in (
            "embeddings.token_embedding.weight",
            "embeddings.position_embedding.weight",
            "final_layer_norm.weight",
        )
        if p + k not in sd
    ]
    if missing:
        from ..weights import WeightsError

        raise WeightsError(f"text encoder (transformers CLIPTextModel layout): missing keys {missing}")
    out["token_embedding.weight"] = take("embeddings.token_embedding.weight")
    out["positional_embedding"] = take("embeddings.position_embedding.weight")
    out["ln_final.weight"] = take("final_layer_norm.weight")
    out["ln_final.bias"] = take("final_layer_norm.bias")
    for i in range(blocks):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        try:
            for wb in ("weight", "bias"):
                out[dst + f"attn.in_proj_{wb}"] = torch.cat(
                    [take(src + f"self_attn.{q}_proj.{wb}") for q in ("q", "k", "v")], dim=0
                )
                out[dst + f"attn.out_proj.{wb}"] = take(src + f"self_attn.out_proj.{wb}")
                out[dst + f"ln_1.{wb}"] = take(src + f"layer_norm1.{wb}")
                out[dst + f"ln_2.{wb}"] = take(src + f"layer_norm2.{wb}")
                out[dst + f"mlp.c_fc.{wb}"] = take(src + f"mlp.fc1.{wb}")
                out[dst + f"mlp.c_proj.{wb}"] = take(src + f"mlp.fc2.{wb}")
        except KeyError as e:
            from ..weights import WeightsError

            raise WeightsError(
                f"text encoder (transformers CLIPTextModel layout): missing key {e.args[0]} "
                f"(the model needs {blocks} layers)"
            ) from None
    return out, used


_LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_from_legacy_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old diffusers VAE attention keys (``mid_block.attentions.0.query`` ...) to the current ones."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 5 and parts[1] == "mid_block" and parts[2] == "attentions" and parts[4] in _LEGACY_VAE_ATTN:
            k = ".".join(parts[:4] + [_LEGACY_VAE_ATTN[parts[4]]] + parts[5:])
        out[k] = v
    return out
