"""METHOD of `diffbir_eval.run`: how a name becomes ``restore(img) -> img`` (HxWx3 float in [0, 1]).

``bicubic``; a stage-1 cleaner of `diffbir_core.cleaners` (``offline``, ``swinir_face``, ...); a restore
preset of `diffbir_core.config.PRESETS` (``v2``, ``v2.1``, ... through `diffbir_core.pipeline`); or
``outputs:DIR`` (score another method's results, matched by name). ``cleaner:NAME`` / ``preset:NAME`` pick
one where a name is both. Models load in `resolve_method`; unknown names list the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffbir_core import api
from diffbir_core.cleaners import CLEANERS, load_cleaner
from diffbir_core.config import PRESETS, RestoreParams
from diffbir_core.imageio import IMAGE_EXTENSIONS, resize, to_numpy, to_tensor

from .store import RunConfigError, jsonable

__all__ = ["Method", "resolve_method", "cleaner_method", "out_hw"]


@dataclass
class Method:
    """What restores: ``restore(img) -> img`` (HxWx3 float [0,1]), or ``outputs_dir`` for outputs:DIR."""

    arg: str
    kind: str  # bicubic | cleaner | preset | outputs
    restore: Callable[[np.ndarray], np.ndarray] | None = None
    outputs_dir: Path | None = None
    info: dict = field(default_factory=dict)

    def output_path(self, name: str) -> Path:
        for ext in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
            p = self.outputs_dir / f"{name}{ext}"
            if p.is_file():
                return p
        raise FileNotFoundError(
            f"outputs:{self.outputs_dir}: no restored image named {name}.* "
            f"(expected e.g. {self.outputs_dir / (name + '.png')})"
        )


def out_hw(img: np.ndarray, scale: float) -> tuple[int, int]:
    """Output size of an HxW image at ``scale`` (rounded, at least 1x1)."""
    return max(1, int(round(img.shape[0] * scale))), max(1, int(round(img.shape[1] * scale)))


def cleaner_method(
    arg: str, cleaner: Callable, *, scale: float, device: str = "cpu", info: dict | None = None
) -> Method:
    """A loaded stage-1 cleaner (``cleaner(x [1,3,h,w], out_size=(H, W))``) as a Method at ``scale``."""

    def clean(img: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return to_numpy(cleaner(to_tensor(img, device), out_size=out_hw(img, scale)))

    return Method(arg, "cleaner", clean, info=dict(info or {}))


def resolve_method(
    arg: str, *, scale: float, task: str, device: str = "cpu", weights_dir: str | None = None, seed: int = 231
) -> Method:
    """Turn METHOD into a `Method` (models load here; unknown names list the valid ones)."""
    if arg.startswith("outputs:"):
        d = Path(arg[len("outputs:") :]).expanduser()
        if not d.is_dir():
            raise RunConfigError(f"{arg}: folder {d} does not exist")
        return Method(arg, "outputs", outputs_dir=d, info={"outputs_dir": str(d)})
    if arg == "bicubic":

        def bicubic(img: np.ndarray) -> np.ndarray:
            return to_numpy(resize(to_tensor(img), out_hw(img, scale), "bicubic"))

        return Method(arg, "bicubic", bicubic, info={"resize": "diffbir_core.imageio.resize bicubic (antialias)"})
    kind, name = arg.split(":", 1) if arg.startswith(("cleaner:", "preset:")) else (None, arg)
    if kind in (None, "cleaner") and name in CLEANERS:
        cleaner = load_cleaner(name, weights_dir=weights_dir, device=device)
        return cleaner_method(
            arg, cleaner, scale=scale, device=device, info={"cleaner": name, "weights_dir": weights_dir}
        )
    if kind in (None, "preset") and name in PRESETS:
        params = RestoreParams.from_preset(
            name, upscale=scale, task="face" if task == "bfr" else "sr", seed=seed, device=str(device)
        )
        if task == "bfr":
            params = params.replace(face__aligned=True)
        pipe = api.make_pipeline(weights_dir=weights_dir, device=device)

        def run_preset(img: np.ndarray) -> np.ndarray:
            return api.restore(img, params, pipe=pipe).image

        return Method(arg, "preset", run_preset, info={"preset": name, "params": jsonable(dataclasses.asdict(params))})
    valid = ["bicubic", "outputs:DIR"] + [f"{c} (cleaner)" for c in CLEANERS] + [f"{p} (preset)" for p in PRESETS]
    raise RunConfigError(f"unknown method {arg!r}; valid methods: {', '.join(valid)}")
