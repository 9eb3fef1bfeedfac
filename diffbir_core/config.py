"""Restore configuration: one frozen `RestoreParams` shared by the CLI, the demo, the notebooks and eval.

Presets mirror the official DiffBIR defaults for each version (nanoGPT `GPTConfig` / DiT `DiT_models`
style: a frozen dataclass plus a dict of named entries; no YAML, no class-path strings):

| preset      | cleaner (sr / face / denoise)                | stage 2                  | sampler, steps | CFG, prompts                 |
|-------------|----------------------------------------------|--------------------------|----------------|------------------------------|
| offline     | converted Real-ESRGAN x4plus (no download)   | none                     | -              | -                            |
| v1-general  | swinir_general                               | SD2.1 + v1_general       | spaced, 50     | 1 (none; v1 had no CFG)      |
| v1-face     | swinir_face                                  | SD2.1 + v1_face          | spaced, 50     | 1                            |
| v2          | bsrnet / swinir_face / scunet_psnr           | SD2.1 + v2               | spaced, 50     | 4, official negative prompt  |
| v2.1        | swinir_realesrgan / swinir_face / same       | SD2.1-zsnr (v) + v2.1    | edm_dpm++_3m_sde, 10 | 6, HEAD default pos/neg  |

`RestoreParams.validate()` turns bad values into clear `ValueError`s (or warnings that say what was
changed) before any model is touched.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

from .prompts import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT
from .prompts import V2_NEG_PROMPT as OFFICIAL_NEGATIVE_PROMPT  # v2.0.0 / README ECCV negative prompt

SAMPLERS = ("spaced", "ddim", "edm_dpm++_2m", "edm_dpm++_3m_sde")  # official --sampler names
COLOR_FIXES = ("wavelet", "adain", "none")
TASKS = ("sr", "face", "denoise")


@dataclass(frozen=True)
class GuidanceParams:
    """Latent image guidance (paper section 3.3, eq. 5-6). ``scale == 0`` disables it."""

    scale: float = 0.0
    t_start: int = 1001  # applied while t_stop < t+1 < t_start (official convention)
    t_stop: int = -1
    space: Literal["latent", "rgb"] = "latent"
    loss: Literal["mse", "wmse"] = "mse"
    repeat: int = 1
    rule: Literal["v1", "v2"] = "v2"

    @property
    def enabled(self) -> bool:
        return self.scale > 0


@dataclass(frozen=True)
class FaceOptions:
    """Face-mode options (see diffbir_core.face)."""

    aligned: bool | None = None  # None: decide from the input (square with a face on the template -> aligned)
    only_center_face: bool = False
    max_faces: int = 20
    backend: Literal["auto", "dlib", "facexlib"] = "auto"
    background: Literal["general", "offline", "bicubic"] = "general"
    mask: Literal["parsing", "feather"] = "parsing"  # parsing needs facexlib's ParseNet weights


@dataclass(frozen=True)
class TileOptions:
    """Tiling of the cleaner / VAE / diffusion (None = chosen from the memory budget)."""

    enabled: bool | None = None
    cleaner_tile: int = 512
    cleaner_overlap: int = 32
    latent_tile: int = 64  # in latent pixels (x8 image pixels); official --cldm_tile_size 512 px
    latent_stride: int = 32  # official --cldm_tile_stride 256 px (HEAD inference.py:159-164)
    diffusion: bool | None = None  # True: tile the diffusion only (HEAD --cldm_tiled); None: as `enabled`
    max_memory_gb: float | None = None


@dataclass(frozen=True)
class Stage2Weights:
    """Which checkpoints a preset needs (names in `diffbir_core.weights.WEIGHTS`)."""

    sd: str = "sd_v2.1"
    control: str = "v2"
    parameterization: Literal["eps", "v"] = "eps"
    zero_snr: bool = False


@dataclass(frozen=True)
class RestoreParams:
    """Every knob of a restore call. Build from a preset: ``RestoreParams.from_preset("v2", steps=20)``."""

    preset: str = "offline"
    task: Literal["sr", "face", "denoise"] = "sr"
    upscale: float = 4.0
    cleaner: str | None = None  # None: the preset's cleaner for the task
    stage2: Stage2Weights | None = None  # None: stage 1 only
    steps: int = 50
    sampler: str = "spaced"
    cfg_scale: float = 1.0
    rescale_cfg: bool = False
    pos_prompt: str = ""
    neg_prompt: str = ""
    strength: float = 1.0
    better_start: bool = False
    start_point: Literal["noise", "cond"] = "noise"  # HEAD --start_point_type: cond = q_sample(c_img, T-1, eps)
    noise_aug: int = 0  # HEAD --noise_aug: c_img = q_sample(c_img, noise_aug, eps) (0 = off)
    edm_sigma_max: Literal["clamp", "official"] = "clamp"  # EDM abar_{T-1}: max(abar, 1e-8), or HEAD's 1e-8 overwrite
    pre_resize: Literal["pil", "torch"] = "pil"  # x1 cleaners: HEAD loops PIL-bicubic the uint8 LQ by upscale first
    guidance: GuidanceParams = field(default_factory=GuidanceParams)
    color_fix: Literal["wavelet", "adain", "none"] = "wavelet"
    seed: int | None = 231  # None: a random seed (reported with the result)
    device: str = "cpu"
    tiles: TileOptions = field(default_factory=TileOptions)
    face: FaceOptions = field(default_factory=FaceOptions)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RestoreParams":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        p = PRESETS[name]
        return p.replace(**overrides) if overrides else p

    def replace(self, **kw) -> "RestoreParams":
        """`dataclasses.replace` that also accepts nested fields as ``guidance__scale=...``."""
        nested: dict[str, dict] = {}
        flat = {}
        for k, v in kw.items():
            if "__" in k:
                outer, inner = k.split("__", 1)
                nested.setdefault(outer, {})[inner] = v
            else:
                flat[k] = v
        for outer, inner in nested.items():
            flat[outer] = dataclasses.replace(flat.get(outer, getattr(self, outer)), **inner)
        return dataclasses.replace(self, **flat)

    @property
    def uses_diffusion(self) -> bool:
        return self.stage2 is not None

    def cleaner_for_task(self) -> str:
        if self.cleaner:
            return self.cleaner
        return _PRESET_CLEANERS[self.preset][self.task]

    # --------------------------------------------------------------- validation
    def validate(self) -> "RestoreParams":
        """Return a checked copy: raise ValueError on impossible values, warn (and fix) soft ones."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if not (0 < self.upscale <= 16):
            raise ValueError(f"upscale must be in (0, 16], got {self.upscale}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color_fix {self.color_fix!r}; choose one of: {', '.join(COLOR_FIXES)}")
        if self.start_point not in ("noise", "cond"):
            raise ValueError(f"start_point must be 'noise' or 'cond', got {self.start_point!r}")
        if self.start_point == "cond" and self.better_start:
            raise ValueError("better_start and start_point='cond' are two different start points: choose one")
        if not (0 <= int(self.noise_aug) < 1000):
            raise ValueError(f"noise_aug must be a timestep in [0, 999], got {self.noise_aug}")
        if self.edm_sigma_max not in ("clamp", "official"):
            raise ValueError(f"edm_sigma_max must be 'clamp' or 'official', got {self.edm_sigma_max!r}")
        if self.pre_resize not in ("pil", "torch"):
            raise ValueError(f"pre_resize must be 'pil' or 'torch', got {self.pre_resize!r}")
        g = self.guidance
        if g.scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {g.scale}")
        if g.repeat < 1:
            raise ValueError(f"guidance repeat must be >= 1, got {g.repeat}")
        if g.space not in ("latent", "rgb") or g.loss not in ("mse", "wmse") or g.rule not in ("v1", "v2"):
            raise ValueError(f"invalid guidance settings {g}: space latent|rgb, loss mse|wmse, rule v1|v2")
        if self.stage2 is not None:
            from .models.text import count_tokens

            for what, prompt in (("positive", self.pos_prompt), ("negative", self.neg_prompt)):
                if prompt and count_tokens(prompt) > 77:  # truncated like the official tokenizer
                    warnings.warn(f"the {what} prompt has {count_tokens(prompt)} tokens; the text encoder takes "
                                  "at most 77 (including start/end tokens): the rest is cut off", stacklevel=2)
        out = self
        if not (0.0 <= self.strength <= 2.0):
            clipped = min(max(self.strength, 0.0), 2.0)
            warnings.warn(f"control strength {self.strength} is outside [0, 2]; using {clipped}", stacklevel=2)
            out = replace(out, strength=clipped)
        if self.steps == 1 and self.sampler == "spaced" and self.stage2 is not None:
            warnings.warn("the official spaced sampler cannot run 1 step; using 2 steps", stacklevel=2)
            out = replace(out, steps=2)
        if self.stage2 is None and (g.enabled or self.cfg_scale not in (0.0, 1.0)):
            warnings.warn(f"preset {self.preset!r} has no diffusion stage: guidance/CFG settings are ignored",
                          stacklevel=2)
        return out


def _p(**kw) -> RestoreParams:
    return RestoreParams(**kw)


PRESETS: dict[str, RestoreParams] = {
    "offline": _p(preset="offline", stage2=None),
    "v1-general": _p(preset="v1-general", stage2=Stage2Weights("sd_v2.1", "v1_general"), steps=50,
                     sampler="spaced", cfg_scale=1.0,
                     guidance=GuidanceParams(space="latent", repeat=5, rule="v1")),
    "v1-face": _p(preset="v1-face", task="face", upscale=1.0, stage2=Stage2Weights("sd_v2.1", "v1_face"),
                  steps=50, sampler="spaced", cfg_scale=1.0,
                  guidance=GuidanceParams(space="latent", repeat=5, rule="v1")),
    "v2": _p(preset="v2", stage2=Stage2Weights("sd_v2.1", "v2"), steps=50, sampler="spaced", cfg_scale=4.0,
             neg_prompt=OFFICIAL_NEGATIVE_PROMPT, guidance=GuidanceParams(space="rgb", loss="wmse", rule="v2")),
    "v2.1": _p(preset="v2.1", stage2=Stage2Weights("sd_v2.1_zsnr", "v2.1", parameterization="v", zero_snr=True),
               steps=10, sampler="edm_dpm++_3m_sde", cfg_scale=6.0, pos_prompt=DEFAULT_POS_PROMPT,
               neg_prompt=DEFAULT_NEG_PROMPT,
               guidance=GuidanceParams(space="rgb", loss="wmse", rule="v2")),
}

_PRESET_CLEANERS: dict[str, dict[str, str]] = {
    "offline": {"sr": "offline", "face": "offline", "denoise": "offline"},
    "v1-general": {"sr": "swinir_general", "face": "swinir_face", "denoise": "swinir_general"},
    "v1-face": {"sr": "swinir_general", "face": "swinir_face", "denoise": "swinir_general"},
    "v2": {"sr": "bsrnet", "face": "swinir_face", "denoise": "scunet_psnr"},
    "v2.1": {"sr": "swinir_realesrgan", "face": "swinir_face", "denoise": "swinir_realesrgan"},
}
