"""Restore configuration: one frozen `RestoreParams` shared by the CLI, the demo, the notebooks and eval.

Frozen dataclasses plus a dict of named presets (nanoGPT `GPTConfig` / DiT `DiT_models` style; no YAML, no
class paths). One preset is one object, its stage-1 cleaners included (``cleaners`` per task):

| preset     | cleaner sr / face / denoise         | stage 2               | sampler, steps       | CFG, prompts     |
|------------|-------------------------------------|-----------------------|----------------------|------------------|
| offline    | converted Real-ESRGAN x4plus        | none                  | -                    | -                |
| v1-general | swinir_general / swinir_face / same | SD2.1 + v1_general    | spaced, 50           | 1 (v1: no CFG)   |
| v1-face    | swinir_general / swinir_face / same | SD2.1 + v1_face       | spaced, 50           | 1                |
| v2         | bsrnet / swinir_face / scunet_psnr  | SD2.1 + v2            | spaced, 50           | 4, official neg. |
| v2.1       | swinir_realesrgan / swinir_face / = | SD2.1-zsnr (v) + v2.1 | edm_dpm++_3m_sde, 10 | 6, HEAD pos/neg  |
| custom     | swinir_general (your file)          | your SD2.1 + control  | edm_dpm++_3m_sde, 10 | 6, HEAD pos/neg  |

Mirrors: official defaults of v1 inference.py, v2.0.0 inference.py and HEAD diffbir/inference/*_loop.py.
`RestoreParams.from_flat` maps flat names (CLI flags, demo controls) onto the nested fields, once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from .prompts import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT
from .prompts import V2_NEG_PROMPT as OFFICIAL_NEGATIVE_PROMPT  # v2.0.0 / README ECCV negative prompt

# the official --sampler names (HEAD inference.py:113-121): the ONE list; diffusion.samplers registers exactly these
SAMPLER_NAMES = (
    "spaced",
    "ddim",
    "dpm++_m2",
    "edm_euler",
    "edm_euler_a",
    "edm_heun",
    "edm_dpm_2",
    "edm_dpm_2_a",
    "edm_lms",
    "edm_dpm++_2s_a",
    "edm_dpm++_sde",
    "edm_dpm++_2m",
    "edm_dpm++_2m_sde",
    "edm_dpm++_3m_sde",
)
SAMPLERS = SAMPLER_NAMES
COLOR_FIXES = ("wavelet", "adain", "none")
TASKS = ("sr", "face", "denoise")
FACE_BACKENDS = ("auto", "dlib", "facexlib")
FACE_BACKGROUNDS = ("general", "offline", "bicubic")
FACE_MASKS = ("parsing", "feather")
# names of diffbir_core.cleaners.CLEANERS (kept here so validation needs no model import; a test checks they agree)
CLEANER_NAMES = ("offline", "swinir_general", "swinir_face", "swinir_realesrgan", "bsrnet", "scunet_psnr", "bicubic")


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
    """Face-mode options (`diffbir_core.face`); the output scale is ``RestoreParams.upscale``.

    aligned: True = input is an aligned face crop; False = whole photo; None = decide (`face.looks_aligned`).
    only_center_face: keep only the face nearest the image centre (official ``only_center_face``).
    max_faces: keep at most this many faces (the largest by eye distance); None = all.
    backend: "auto" (facexlib if its weights are there, else dlib, with a notice) | "dlib" | "facexlib".
    background: whole photos' background path: "general" (the preset's sr path) | "offline" | "bicubic".
    mask: paste-back mask, "parsing" (facexlib ParseNet; falls back to "feather" with a notice) | "feather".
    min_eye_distance: faces whose eyes are closer than this (input pixels) are skipped (official 5).
    keep_crops: keep each face's LQ crop and restored crop in the result.
    """

    aligned: bool | None = None
    only_center_face: bool = False
    max_faces: int | None = 20
    backend: Literal["auto", "dlib", "facexlib"] = "auto"
    background: Literal["general", "offline", "bicubic"] = "general"
    mask: Literal["parsing", "feather"] = "parsing"
    min_eye_distance: float = 5.0
    keep_crops: bool = True

    def __post_init__(self) -> None:
        if self.max_faces is not None and (
            not isinstance(self.max_faces, int) or isinstance(self.max_faces, bool) or self.max_faces < 1
        ):
            raise ValueError(f"max_faces must be a positive integer or None (no limit), got {self.max_faces!r}")
        if self.backend not in FACE_BACKENDS:
            raise ValueError(f"face backend must be one of {', '.join(FACE_BACKENDS)}, got {self.backend!r}")
        if self.background not in FACE_BACKGROUNDS:
            raise ValueError(f"face background must be one of {', '.join(FACE_BACKGROUNDS)}, got {self.background!r}")
        if self.mask not in FACE_MASKS:
            raise ValueError(f"face mask must be one of {', '.join(FACE_MASKS)}, got {self.mask!r}")
        if self.aligned not in (True, False, None):
            raise ValueError(f"aligned must be True, False or None (auto), got {self.aligned!r}")
        if not self.min_eye_distance >= 0:
            raise ValueError(f"min_eye_distance must be >= 0, got {self.min_eye_distance!r}")


@dataclass(frozen=True)
class TileOptions:
    """Tiling of the cleaner / VAE / diffusion (``enabled`` None = chosen from the memory budget).

    The one place for the tile defaults: `tiling.auto_tiling` reads them from ``params.tiles``."""

    enabled: bool | None = None
    cleaner_tile: int = 512
    cleaner_overlap: int = 32
    latent_tile: int = 64  # in latent pixels (x8 image pixels); official --cldm_tile_size 512 px
    latent_stride: int = 32  # official --cldm_tile_stride 256 px (HEAD inference.py:159-164)
    # per-stage switches (official --cleaner_tiled / --vae_encoder_tiled / --vae_decoder_tiled / --cldm_tiled,
    # HEAD inference.py:127-164): True tiles that stage (when larger than a tile), False never; None: as `enabled`
    cleaner: bool | None = None
    vae_encoder: bool | None = None
    vae_decoder: bool | None = None
    diffusion: bool | None = None
    vae_encoder_tile: int = 256  # image pixels (official --vae_encoder_tile_size)
    vae_decoder_tile: int = 256  # image pixels (official --vae_decoder_tile_size; latent tile = this / 8)
    max_memory_gb: float | None = None


@dataclass(frozen=True)
class Stage2Weights:
    """Which checkpoints a preset needs (names in `diffbir_core.weights.WEIGHTS`)."""

    sd: str = "sd_v2.1"
    control: str = "v2"
    parameterization: Literal["eps", "v"] = "eps"
    zero_snr: bool = False


@dataclass(frozen=True)
class TaskCleaners:
    """A preset's stage-1 cleaner per task (names in `diffbir_core.cleaners.CLEANERS`)."""

    sr: str = "offline"
    face: str = "offline"
    denoise: str = "offline"

    def for_task(self, task: str) -> str:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
        return getattr(self, task)


@dataclass(frozen=True)
class RestoreParams:
    """Every knob of a restore call. Build from a preset: ``RestoreParams.from_preset("v2", steps=20)``."""

    preset: str = "offline"
    task: Literal["sr", "face", "denoise"] = "sr"
    upscale: float = 4.0
    cleaner: str | None = None  # None: the preset's cleaner for the task (``cleaners``)
    cleaners: TaskCleaners = field(default_factory=TaskCleaners)
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
    # official sampler knobs (HEAD inference.py:205-240 defaults); each sampler reads its own (diffusion.registry)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 300.0
    s_noise: float = 1.0
    eta: float = 1.0
    order: int = 1
    sde_noise: Literal["torch", "brownian"] = "torch"  # brownian: official torchsde tree for the SDE samplers
    cleaner_path: str | None = None  # explicit cleaner weight file (HEAD --version custom; architecture of `cleaner`)
    guidance: GuidanceParams = field(default_factory=GuidanceParams)
    color_fix: Literal["wavelet", "adain", "none"] = "wavelet"
    seed: int | None = 231  # None: a random seed (reported with the result)
    device: str = "cpu"
    tiles: TileOptions = field(default_factory=TileOptions)
    face: FaceOptions = field(default_factory=FaceOptions)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> RestoreParams:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        p = PRESETS[name]
        return p.replace(**overrides) if overrides else p

    def replace(self, **kw) -> RestoreParams:
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
        return self.cleaners.for_task(self.task)

    # ------------------------------------------------------------------ flat names (CLI flags, demo controls)
    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RestoreParams:
        """A validated `RestoreParams` from flat names (`FLAT_NAMES`: ``cfg_scale``, ``guidance_scale``,
        ``max_faces``, ``tile_size``, ...) on top of ``values["preset"]`` (default "offline").

        None means "the preset's value"; ``seed`` < 0 means a random seed. Unknown names and values of the
        wrong type raise ValueError naming the flat name; then `validate` checks the ranges."""
        unknown = sorted(set(values) - set(FLAT_NAMES) - {"preset"})
        if unknown:
            raise ValueError(f"unknown parameter name(s) {', '.join(unknown)}; known: {', '.join(FLAT_NAMES)}")
        kw: dict[str, Any] = {}
        for name, (path, kind) in FLAT_NAMES.items():
            v = values.get(name)
            if v is None:
                continue
            v = _coerce(name, v, kind)
            if name == "seed" and v < 0:
                v = None
            kw[path] = v
        preset = values.get("preset") or "offline"
        return cls.from_preset(str(preset), **kw).validate()

    # --------------------------------------------------------------- validation
    def validate(self) -> RestoreParams:
        """Return a checked copy: raise ValueError on impossible values, warn (and fix) soft ones."""
        _check_numbers(self)
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
        if self.sde_noise not in ("torch", "brownian"):
            raise ValueError(f"sde_noise must be 'torch' or 'brownian', got {self.sde_noise!r}")
        if self.s_noise < 0 or self.eta < 0 or self.s_churn < 0:
            raise ValueError(f"s_noise, eta and s_churn must be >= 0, got {self.s_noise}, {self.eta}, {self.s_churn}")
        if self.s_tmin > self.s_tmax:
            raise ValueError(f"s_tmin ({self.s_tmin}) must be <= s_tmax ({self.s_tmax})")
        if not (_is_int(self.order) and 1 <= self.order <= 4):
            raise ValueError(f"order (edm_lms) must be an integer in [1, 4], got {self.order!r}")
        g = self.guidance
        if g.scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {g.scale}")
        if g.repeat < 1:
            raise ValueError(f"guidance repeat must be >= 1, got {g.repeat}")
        if g.space not in ("latent", "rgb") or g.loss not in ("mse", "wmse") or g.rule not in ("v1", "v2"):
            raise ValueError(f"invalid guidance settings {g}: space latent|rgb, loss mse|wmse, rule v1|v2")
        out = self
        if not (0.0 <= self.strength <= 2.0):
            clipped = min(max(self.strength, 0.0), 2.0)
            warnings.warn(f"control strength {self.strength} is outside [0, 2]; using {clipped}", stacklevel=2)
            out = replace(out, strength=clipped)
        if self.steps == 1 and self.sampler == "spaced" and self.stage2 is not None:
            warnings.warn("the official spaced sampler cannot run 1 step; using 2 steps", stacklevel=2)
            out = replace(out, steps=2)
        if self.stage2 is None and (g.enabled or self.cfg_scale not in (0.0, 1.0)):
            warnings.warn(
                f"preset {self.preset!r} has no diffusion stage: guidance/CFG settings are ignored", stacklevel=2
            )
        return out


# flat name -> (nested field path for `RestoreParams.replace`, type); the CLI flags are these names with dashes
FLAT_NAMES: Mapping[str, tuple[str, type]] = MappingProxyType(
    {
        "task": ("task", str),
        "upscale": ("upscale", float),
        "cleaner": ("cleaner", str),
        "steps": ("steps", int),
        "sampler": ("sampler", str),
        "cfg_scale": ("cfg_scale", float),
        "rescale_cfg": ("rescale_cfg", bool),
        "pos_prompt": ("pos_prompt", str),
        "neg_prompt": ("neg_prompt", str),
        "strength": ("strength", float),
        "better_start": ("better_start", bool),
        "color_fix": ("color_fix", str),
        "seed": ("seed", int),
        "device": ("device", str),
        "guidance_scale": ("guidance__scale", float),
        "guidance_space": ("guidance__space", str),
        "guidance_loss": ("guidance__loss", str),
        "guidance_repeat": ("guidance__repeat", int),
        "guidance_start": ("guidance__t_start", int),
        "guidance_stop": ("guidance__t_stop", int),
        "guidance_rule": ("guidance__rule", str),
        "aligned": ("face__aligned", bool),
        "only_center_face": ("face__only_center_face", bool),
        "max_faces": ("face__max_faces", int),
        "face_backend": ("face__backend", str),
        "background": ("face__background", str),
        "face_mask": ("face__mask", str),
        "tiled": ("tiles__enabled", bool),
        "tile_size": ("tiles__cleaner_tile", int),
        "tile_overlap": ("tiles__cleaner_overlap", int),
        "latent_tile": ("tiles__latent_tile", int),
        "latent_stride": ("tiles__latent_stride", int),
        "max_memory": ("tiles__max_memory_gb", float),
        "start_point": ("start_point", str),
        "noise_aug": ("noise_aug", int),
        "edm_sigma_max": ("edm_sigma_max", str),
        "pre_resize": ("pre_resize", str),
        "s_churn": ("s_churn", float),
        "s_tmin": ("s_tmin", float),
        "s_tmax": ("s_tmax", float),
        "s_noise": ("s_noise", float),
        "eta": ("eta", float),
        "order": ("order", int),
        "sde_noise": ("sde_noise", str),
        "cleaner_path": ("cleaner_path", str),
        "cleaner_tiled": ("tiles__cleaner", bool),
        "vae_encoder_tiled": ("tiles__vae_encoder", bool),
        "vae_decoder_tiled": ("tiles__vae_decoder", bool),
        "cldm_tiled": ("tiles__diffusion", bool),
        "vae_encoder_tile_size": ("tiles__vae_encoder_tile", int),
        "vae_decoder_tile_size": ("tiles__vae_decoder_tile", int),
        "sd_ckpt": ("stage2__sd", str),
        "control_ckpt": ("stage2__control", str),
    }
)


def _coerce(name: str, v: Any, kind: type) -> Any:
    """Check (and for integral floats convert) one flat value; bools are never numbers here."""
    if kind is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")
        return v
    if kind is str:
        if not isinstance(v, str):
            raise ValueError(f"{name} must be a string, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ValueError(f"{name} must be a number, got {v!r}")
    if kind is int:
        if float(v) != int(v):
            raise ValueError(f"{name} must be a whole number, got {v!r}")
        return int(v)
    return float(v)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_finite(obj, prefix: str = "") -> None:
    """Every float field, recursively through nested dataclasses, must be finite (no NaN / inf)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            _check_finite(v, f"{prefix}{f.name}.")
        elif isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(float(v)):
            raise ValueError(f"{prefix}{f.name} must be a finite number, got {v}")


def _check_numbers(p: RestoreParams) -> None:
    """The numeric checks of `RestoreParams.validate` that need no model: finiteness, tiles, memory, faces,
    seed and the cleaner name (all before any model loads)."""
    _check_finite(p)
    t = p.tiles
    if not (_is_int(t.cleaner_tile) and t.cleaner_tile >= 16):
        raise ValueError(f"cleaner tile size must be an integer >= 16 pixels, got {t.cleaner_tile!r}")
    if not (_is_int(t.cleaner_overlap) and 0 <= t.cleaner_overlap < t.cleaner_tile):
        raise ValueError(f"cleaner overlap must be an integer in [0, tile={t.cleaner_tile}), got {t.cleaner_overlap!r}")
    if not (_is_int(t.latent_tile) and t.latent_tile >= 8):
        raise ValueError(f"latent tile size must be an integer >= 8 latent pixels, got {t.latent_tile!r}")
    if not (_is_int(t.latent_stride) and 1 <= t.latent_stride <= t.latent_tile):
        raise ValueError(
            f"latent stride must be an integer in [1, latent tile={t.latent_tile}], got {t.latent_stride!r}"
        )
    if t.max_memory_gb is not None and not t.max_memory_gb > 0:
        raise ValueError(f"max memory must be > 0 GB, got {t.max_memory_gb}")
    if p.face.max_faces is not None and not (_is_int(p.face.max_faces) and p.face.max_faces >= 1):
        raise ValueError(f"max_faces must be an integer >= 1, got {p.face.max_faces!r}")
    if p.seed is not None and not (_is_int(p.seed) and 0 <= p.seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63) (or None for a random seed), got {p.seed!r}")
    if p.cleaner is not None and p.cleaner not in CLEANER_NAMES:
        raise ValueError(f"unknown cleaner {p.cleaner!r}; choose one of: {', '.join(CLEANER_NAMES)}")


def _p(**kw) -> RestoreParams:
    return RestoreParams(**kw)


PRESETS: dict[str, RestoreParams] = {
    "offline": _p(preset="offline", stage2=None, cleaners=TaskCleaners("offline", "offline", "offline")),
    "v1-general": _p(
        preset="v1-general",
        stage2=Stage2Weights("sd_v2.1", "v1_general"),
        steps=50,
        cleaners=TaskCleaners("swinir_general", "swinir_face", "swinir_general"),
        sampler="spaced",
        cfg_scale=1.0,
        guidance=GuidanceParams(space="latent", repeat=5, rule="v1"),
    ),
    "v1-face": _p(
        preset="v1-face",
        task="face",
        upscale=1.0,
        stage2=Stage2Weights("sd_v2.1", "v1_face"),
        cleaners=TaskCleaners("swinir_general", "swinir_face", "swinir_general"),
        steps=50,
        sampler="spaced",
        cfg_scale=1.0,
        guidance=GuidanceParams(space="latent", repeat=5, rule="v1"),
    ),
    "v2": _p(
        preset="v2",
        stage2=Stage2Weights("sd_v2.1", "v2"),
        steps=50,
        sampler="spaced",
        cfg_scale=4.0,
        cleaners=TaskCleaners("bsrnet", "swinir_face", "scunet_psnr"),
        neg_prompt=OFFICIAL_NEGATIVE_PROMPT,
        guidance=GuidanceParams(space="rgb", loss="wmse", rule="v2"),
    ),
    "v2.1": _p(
        preset="v2.1",
        stage2=Stage2Weights("sd_v2.1_zsnr", "v2.1", parameterization="v", zero_snr=True),
        cleaners=TaskCleaners("swinir_realesrgan", "swinir_face", "swinir_realesrgan"),
        steps=10,
        sampler="edm_dpm++_3m_sde",
        cfg_scale=6.0,
        pos_prompt=DEFAULT_POS_PROMPT,
        neg_prompt=DEFAULT_NEG_PROMPT,
        guidance=GuidanceParams(space="rgb", loss="wmse", rule="v2"),
    ),
    # HEAD --version custom (custom_loop.py): your own SD 2.1 / control / SwinIR files (paths in sd / control /
    # cleaner_path; eps-prediction as the official train config), HEAD inference.py's glue
    "custom": _p(
        preset="custom",
        stage2=Stage2Weights("sd_v2.1", "v2"),
        steps=10,
        sampler="edm_dpm++_3m_sde",
        cfg_scale=6.0,
        pos_prompt=DEFAULT_POS_PROMPT,
        neg_prompt=DEFAULT_NEG_PROMPT,
        cleaners=TaskCleaners("swinir_general", "swinir_general", "swinir_general"),
    ),
}
