"""Test sets of the paper's evaluation (paper arXiv 2308.15070, "Evaluation"): names, expected counts, layouts, sources.

`DATASETS` holds one `DatasetSpec` per set: RealSRSet, Real47, Set5 (BSR / SR), CelebA-Test, LFW-Test,
CelebChild-Test, WIDER-Test (BFR), and RealSR, DRealSR, DIV2K-val of the modern SR protocol (OSEDiff
``test_metrics.py``: pyiqa metrics, no border crop, 128 -> 512); the table of sets is the comment above `DATASETS`.
Provenance, file counts and sha256 lists: `diffbir_eval.registry` (``python -m diffbir_eval.data list|check|fetch``).
`open_dataset` also takes ``folder:LQ_DIR[:GT_DIR]`` and ``synthetic:HQ_DIR[:PRESET[:SEED]]`` (its docstring
says how they are matched and degraded); `open_dataset` + `validate` check before anything runs: missing
folders (with the download hint), image counts against the published ones, LQ without GT (and the reverse),
and GT sizes against LQ x scale. No official counterpart (the official repo ships no evaluation code).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "Item",
    "Dataset",
    "DatasetError",
    "open_dataset",
    "validate",
    "SyntheticConfig",
    "image_size",
]


class DatasetError(ValueError):
    """A dataset is missing, incomplete or inconsistent (the message says what and how to fix it)."""


@dataclass(frozen=True)
class DatasetSpec:
    """A test set by name."""

    name: str
    title: str
    task: Literal["bsr", "sr", "bfr", "custom"]
    scale: float  # output size / LQ size
    expected: int | None  # published number of LQ images (None: any)
    lq_dirs: tuple[str, ...]  # candidate folders under --root, first existing wins
    gt_dirs: tuple[str, ...] = ()  # empty: no ground truth
    lq_suffix: str = ""  # removed from LQ stems to find the GT stem (Set5: "x4")
    default_metrics: tuple[str, ...] = ("niqe",)
    crop_border: int = 0
    fid_reference: str | None = None  # METRIC_FILES name of reference statistics when FID has no GT folder
    source: str = ""

    @property
    def has_gt(self) -> bool:
        return bool(self.gt_dirs)


_BFR_REAL = dict(task="bfr", scale=1.0, default_metrics=("niqe", "maniqa", "fid"), fid_reference="fid_ffhq512")
_STABLESR = "StableSR test sets https://huggingface.co/datasets/Iceclear/StableSR-TestSets"
_OSEDIFF_SETS = "https://github.com/cswry/OSEDiff/tree/main/preset/datasets"  # README: "directly copied from StableSR"
# OSEDiff test_metrics.py's metrics (pyiqa; MANIQA there is the PIPAL checkpoint), FID folder-vs-folder against GT
_MODERN = ("psnr", "ssim_pyiqa", "lpips", "dists", "clipiqa", "niqe", "musiq", "maniqa-pipal", "fid")
_GFPGAN = "GFPGAN project page https://xinntao.github.io/projects/gfpgan (BFR test data)"

# The sets (expected counts from the primary sources; `diffbir_eval.registry` names them):
# | name            | images             | task | output      | where to get it                                |
# |-----------------|--------------------|------|-------------|------------------------------------------------|
# | realsrset       | 20 real LQ         | bsr  | x4          | BSRGAN repo, testsets/RealSRSet                |
# | real47          | 47 real LQ         | bsr  | x4          | DiffBIR repo, inputs/real47                    |
# | set5            | 5 LR/HR pairs (x4) | sr   | x4 (vs HR)  | SwinIR repo, testsets/Set5 (HR, LR_bicubic/X4) |
# | celeba_test     | 3,000 LQ/GT pairs  | bfr  | 512 -> 512  | GFPGAN project page (CelebA-Test)              |
# | lfw_test        | 1,711 real LQ      | bfr  | 512 -> 512  | GFPGAN project page (LFW-Test)                 |
# | celebchild_test | 180 real LQ        | bfr  | 512 -> 512  | GFPGAN project page (CelebChild-Test)          |
# | wider_test      | 970 real LQ        | bfr  | 512 -> 512  | CodeFormer repo, test data (WIDER-Test)        |
# | realsr          | 100 LQ/GT pairs    | sr   | 128 -> 512  | StableSR-TestSets (copy in the OSEDiff repo)   |
# | drealsr         | 93 LQ/GT pairs     | sr   | 128 -> 512  | StableSR-TestSets (copy in the OSEDiff repo)   |
# | div2k_val       | LQ/GT pairs        | sr   | 128 -> 512  | StableSR-TestSets (count unknown here)         |
DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec(
            "realsrset",
            "RealSRSet",
            "bsr",
            4.0,
            20,
            ("RealSRSet", "realsrset", "."),
            default_metrics=("niqe", "maniqa"),
            source="BSRGAN repository https://github.com/cszn/BSRGAN, folder testsets/RealSRSet",
        ),
        DatasetSpec(
            "real47",
            "Real47",
            "bsr",
            4.0,
            47,
            ("Real47", "real47", "."),
            default_metrics=("niqe", "maniqa"),
            source="DiffBIR repository https://github.com/XPixelGroup/DiffBIR, folder inputs/real47",
        ),
        DatasetSpec(
            "set5",
            "Set5 (x4, bicubic LR)",
            "sr",
            4.0,
            5,
            ("Set5/LR_bicubic/X4", "set5/LR_bicubic/X4", "LR_bicubic/X4"),
            ("Set5/HR", "set5/HR", "HR"),
            lq_suffix="x4",
            default_metrics=("psnr", "ssim", "niqe"),
            crop_border=4,
            source="SwinIR repository https://github.com/JingyunLiang/SwinIR, folder testsets/Set5",
        ),
        DatasetSpec(
            "celeba_test",
            "CelebA-Test",
            "bfr",
            1.0,
            3000,
            ("CelebA-Test/celeba_512_validation_lq", "celeba_512_validation_lq", "CelebA-Test/lq", "lq", "LQ"),
            ("CelebA-Test/celeba_512_validation", "celeba_512_validation", "CelebA-Test/hq", "hq", "gt", "GT"),
            default_metrics=("psnr", "ssim", "lpips", "ids", "fid"),
            source=f"{_GFPGAN}: CelebA-Test, 3,000 synthetic 512x512 LQ/GT pairs from CelebA-HQ",
        ),
        DatasetSpec(
            "lfw_test",
            "LFW-Test",
            lq_dirs=("LFW-Test", "lfw_test", "lfw", "."),
            expected=1711,
            source=f"{_GFPGAN}: LFW-Test, 1,711 real low-quality aligned faces from LFW",
            **_BFR_REAL,
        ),
        DatasetSpec(
            "celebchild_test",
            "CelebChild-Test",
            lq_dirs=("CelebChild-Test", "celebchild_test", "."),
            expected=180,
            source=f"{_GFPGAN}: CelebChild-Test, 180 real child faces",
            **_BFR_REAL,
        ),
        *[
            DatasetSpec(
                name,
                title,
                "sr",
                4.0,
                n,
                tuple(f"{d}/test_LR" for d in dirs) + ("test_LR", "lq", "LQ"),
                tuple(f"{d}/test_HR" for d in dirs) + ("test_HR", "gt", "GT"),
                default_metrics=_MODERN,
                source=src,
            )
            for name, title, n, dirs, src in (
                (
                    "realsr",
                    "RealSR (128 -> 512)",
                    100,
                    ("RealSR", "RealSRVal_crop128", "benchmark_realsr"),
                    f"{_STABLESR}; OSEDiff's copy: {_OSEDIFF_SETS}/benchmark_realsr",
                ),
                (
                    "drealsr",
                    "DRealSR (128 -> 512)",
                    93,
                    ("DRealSR", "DrealSRVal_crop128", "benchmark_drealsr"),
                    f"{_STABLESR}; OSEDiff's copy: {_OSEDIFF_SETS}/benchmark_drealsr",
                ),
                ("div2k_val", "DIV2K-val (128 -> 512)", None, ("DIV2K_V2_val", "DIV2K-val", "div2k_val"), _STABLESR),
            )
        ],
        DatasetSpec(
            "wider_test",
            "WIDER-Test",
            lq_dirs=("WIDER-Test", "Wider-Test", "wider_test", "."),
            expected=970,
            source="CodeFormer repository https://github.com/sczhou/CodeFormer (test data link in its README): "
            "WIDER-Test, 970 heavily degraded faces from WIDER Face",
            **_BFR_REAL,
        ),
    ]
}

_LQ_SUFFIXES = ("", "x2", "x3", "x4", "x8", "_lq", "_LQ", "_LR", "_lr")

_ALIASES = {k.replace("_", ""): k for k in DATASETS} | {
    s.title.lower().replace("-", "").replace(" ", ""): k for k, s in DATASETS.items()
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic LQ made from HQ images: degradation preset and base seed."""

    hq_dir: Path
    preset: str = "codeformer_face"
    seed: int = 0

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode("utf-8"))])


@dataclass(frozen=True)
class Item:
    """One test image: ``name`` (GT stem, else LQ stem), its LQ file (None: synthetic) and GT file."""

    name: str
    lq: Path | None
    gt: Path | None


@dataclass
class Dataset:
    """A resolved test set: its spec, items in name order, and where they came from."""

    spec: DatasetSpec
    items: list[Item]
    lq_dir: Path | None
    gt_dir: Path | None
    synthetic: SyntheticConfig | None = None
    arg: str = ""
    allow_count_mismatch: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def has_gt(self) -> bool:
        return self.gt_dir is not None

    def load_lq(self, item: Item) -> tuple[np.ndarray, dict | None]:
        """The LQ image (HxWx3 float32 [0,1]) and, for synthetic pairs, the drawn degradation parameters."""
        from diffbir_core.imageio import read_image

        if self.synthetic is None:
            return read_image(item.lq).rgb, None
        from diffbir_core.degradation import degrade

        lq, params = degrade(read_image(item.gt).rgb, self.synthetic.preset, self.synthetic.rng(item.name))
        return lq, params

    def load_gt(self, item: Item) -> np.ndarray | None:
        from diffbir_core.imageio import read_image

        return None if item.gt is None else read_image(item.gt).rgb

    def describe(self) -> dict:
        d = {
            "arg": self.arg,
            "name": self.spec.name,
            "title": self.spec.title,
            "task": self.spec.task,
            "scale": self.spec.scale,
            "expected": self.spec.expected,
            "n_items": len(self.items),
            "lq_dir": str(self.lq_dir) if self.lq_dir else None,
            "gt_dir": str(self.gt_dir) if self.gt_dir else None,
            "source": self.spec.source,
        }
        if self.synthetic:
            d["synthetic"] = {
                "hq_dir": str(self.synthetic.hq_dir),
                "preset": self.synthetic.preset,
                "seed": self.synthetic.seed,
                "per_image_rng": "default_rng([seed, crc32(name)])",
            }
        return d


def _list(folder: Path) -> list[Path]:
    from diffbir_core.data import list_images

    try:
        return list_images(folder)
    except (ValueError, FileNotFoundError) as e:
        raise DatasetError(str(e)) from e


def _find(root: Path, candidates: tuple[str, ...], spec: DatasetSpec, what: str) -> Path:
    from diffbir_core.imageio import IMAGE_EXTENSIONS

    for c in candidates:
        p = (root / c) if c != "." else root
        # "." (root itself) only counts when images sit directly in it
        if p.is_dir() and any(
            f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for f in (p.iterdir() if c == "." else p.rglob("*"))
        ):
            return p
    looked = ", ".join(str(root / c) if c != "." else str(root) for c in candidates)
    raise DatasetError(
        f"{spec.title}: no {what} folder found under --root {root} (looked in: {looked}).\n"
        f"  Get it from: {spec.source}\n  and point --root at the folder that holds it."
    )


def _pair(lq_files: list[Path], gt_files: list[Path] | None, lq_suffix: str = "") -> tuple[list[Item], list[str]]:
    """Match LQ and GT files by stem (LQ stem minus ``lq_suffix``); returns items and problems."""
    problems: list[str] = []

    def key(p: Path, suffix: str = "") -> str:
        s = p.stem
        return s[: -len(suffix)] if suffix and s.endswith(suffix) else s

    lq = {}
    for f in lq_files:
        k = key(f, lq_suffix)
        if k in lq:
            problems.append(f"two LQ files share the name {k!r}: {lq[k].name}, {f.name}")
        lq[k] = f
    if gt_files is None:
        return [Item(k, lq[k], None) for k in sorted(lq)], problems
    gt = {}
    for f in gt_files:
        if f.stem in gt:
            problems.append(f"two GT files share the name {f.stem!r}: {gt[f.stem].name}, {f.name}")
        gt[f.stem] = f
    no_gt = sorted(set(lq) - set(gt))
    no_lq = sorted(set(gt) - set(lq))
    if no_gt:
        problems.append(f"{len(no_gt)} LQ image(s) have no GT with the same name, e.g. {no_gt[:5]}")
    if no_lq:
        problems.append(f"{len(no_lq)} GT image(s) have no LQ with the same name, e.g. {no_lq[:5]}")
    return [Item(k, lq[k], gt[k]) for k in sorted(set(lq) & set(gt))], problems


def open_dataset(
    arg: str, *, root: str | os.PathLike | None = None, scale: float | None = None, allow_count_mismatch: bool = False
) -> Dataset:
    """Resolve ``arg`` (a name of `DATASETS`, ``folder:LQ[:GT]`` or ``synthetic:HQ[:PRESET[:SEED]]``).

    ``--root DIR`` is searched for each set's folder under any of its usual names (see ``lq_dirs``/``gt_dirs``;
    ``.`` means DIR itself). Besides the named sets:

    * ``folder:LQ_DIR[:GT_DIR]`` - any folder (pairs matched by file stem; an LQ suffix such as ``x4`` or ``_lq`` is
      recognised), output scale from ``--scale`` or the GT/LQ size ratio;
    * ``synthetic:HQ_DIR[:PRESET[:SEED]]`` - pairs made from HQ images with a `diffbir_core.degradation` preset
      (default ``codeformer_face``, seed 0). Image ``name`` is degraded with the generator
      ``numpy.random.default_rng([SEED, crc32(name)])``: the same LQ whatever the order, sharding or resume.
    """
    if arg.startswith("folder:"):
        parts = arg[len("folder:") :].split(":")
        if not parts[0] or len(parts) > 2:
            raise DatasetError(f"bad dataset {arg!r}: use folder:LQ_DIR or folder:LQ_DIR:GT_DIR")
        lq_dir = Path(parts[0]).expanduser()
        gt_dir = Path(parts[1]).expanduser() if len(parts) == 2 and parts[1] else None
        for d, what in ((lq_dir, "LQ"), (gt_dir, "GT")):
            if d is not None and not d.is_dir():
                raise DatasetError(f"{what} folder {d} does not exist")
        lq_files, gt_files = _list(lq_dir), (_list(gt_dir) if gt_dir else None)
        # LQ names often carry a suffix (babyx4.png <-> baby.png): use the one that pairs the most files
        items, problems = max(
            (_pair(lq_files, gt_files, sfx) for sfx in _LQ_SUFFIXES), key=lambda r: (len(r[0]), -len(r[1]))
        )
        if scale is None:
            scale = _infer_scale(items) if gt_dir else 1.0
        spec = DatasetSpec(
            "folder",
            f"folder {lq_dir.name}",
            "custom",
            float(scale),
            None,
            (str(lq_dir),),
            (str(gt_dir),) if gt_dir else (),
            default_metrics=("psnr", "ssim", "niqe") if gt_dir else ("niqe",),
        )
        ds = Dataset(spec, items, lq_dir, gt_dir, arg=arg, notes=problems)
    elif arg.startswith("synthetic:"):
        parts = arg[len("synthetic:") :].split(":")
        if not parts[0] or len(parts) > 3:
            raise DatasetError(f"bad dataset {arg!r}: use synthetic:HQ_DIR[:PRESET[:SEED]]")
        hq = Path(parts[0]).expanduser()
        if not hq.is_dir():
            raise DatasetError(f"HQ folder {hq} does not exist")
        preset = parts[1] if len(parts) > 1 and parts[1] else "codeformer_face"
        from diffbir_core.degradation import DEGRADATIONS

        if preset not in DEGRADATIONS:
            raise DatasetError(f"unknown degradation preset {preset!r}; choose from: {', '.join(DEGRADATIONS)}")
        try:
            seed = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        except ValueError:
            raise DatasetError(f"bad seed {parts[2]!r} in {arg!r}: must be an integer") from None
        files = _list(hq)
        items, problems = _pair(files, files)
        items = [Item(it.name, None, it.gt) for it in items]
        task = "bfr" if "face" in preset else "bsr"  # face presets degrade aligned faces
        spec = DatasetSpec(
            "synthetic",
            f"synthetic {hq.name} ({preset}, seed {seed})",
            task,
            1.0,
            None,
            (),
            (str(hq),),
            default_metrics=("psnr", "ssim", "niqe"),
        )
        ds = Dataset(spec, items, None, hq, SyntheticConfig(hq, preset, seed), arg=arg, notes=problems)
    else:
        key = arg.lower().replace("-", "").replace("_", "").replace(" ", "")
        if key not in _ALIASES:
            raise DatasetError(
                f"unknown dataset {arg!r}; choose one of {', '.join(DATASETS)}, "
                "folder:LQ_DIR[:GT_DIR] or synthetic:HQ_DIR[:PRESET[:SEED]]"
            )
        spec = DATASETS[_ALIASES[key]]
        if root is None:
            raise DatasetError(
                f"{spec.title}: say where it is with --root DIR (the folder holding "
                f"{spec.lq_dirs[0]!r}).\n  Get it from: {spec.source}"
            )
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"--root {root} is not a folder")
        if scale is not None and scale != spec.scale:
            spec = replace(spec, scale=float(scale))
        lq_dir = _find(root, spec.lq_dirs, spec, "LQ")
        gt_dir = _find(root, spec.gt_dirs, spec, "GT") if spec.gt_dirs else None
        items, problems = _pair(_list(lq_dir), _list(gt_dir) if gt_dir else None, spec.lq_suffix)
        ds = Dataset(spec, items, lq_dir, gt_dir, arg=arg, notes=problems)
    ds.allow_count_mismatch = allow_count_mismatch
    return ds


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, EXIF orientation applied (as `read_image` does)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        orient = im.getexif().get(0x0112, 1)
    return (w, h) if orient in (5, 6, 7, 8) else (h, w)


def _infer_scale(items: list[Item]) -> float:
    if not items:
        return 1.0
    (lh, lw), (gh, gw) = image_size(items[0].lq), image_size(items[0].gt)
    return gh / lh if gh / lh == gw / lw else 1.0


def validate(ds: Dataset, *, check_sizes: bool = True) -> Dataset:
    """Raise `DatasetError` listing every problem (pairing, counts, sizes); returns ``ds`` when fine."""
    problems = list(ds.notes)
    spec = ds.spec
    if not ds.items:
        problems.append("no usable images")
    if spec.expected is not None and len(ds.items) != spec.expected and not ds.allow_count_mismatch:
        where = ds.lq_dir if ds.lq_dir else ds.gt_dir
        problems.append(
            f"{len(ds.items)} images at {where}, but {spec.title} has {spec.expected} "
            f"(incomplete download? get it from: {spec.source}; pass --allow-count-mismatch to "
            "evaluate what is there)"
        )
    if check_sizes and not ds.has_gt and ds.synthetic is None:  # no pairs to compare: still read every header
        bad = []
        for it in ds.items:
            try:
                image_size(it.lq)
            except Exception as e:
                bad.append(f"{it.lq.name}: {type(e).__name__}: {e}")
        if bad:
            problems.append(f"{len(bad)} unreadable LQ image(s): " + "; ".join(bad[:5]))
    if check_sizes and ds.has_gt and ds.synthetic is None:
        bad: list[str] = []
        for it in ds.items:
            try:
                (lh, lw), (gh, gw) = image_size(it.lq), image_size(it.gt)
            except Exception as e:  # unreadable file
                bad.append(f"{it.name}: unreadable ({type(e).__name__}: {e})")
                continue
            want = (round(lh * spec.scale), round(lw * spec.scale))
            if (gh, gw) != want:
                bad.append(f"{it.name}: LQ {lh}x{lw} x{spec.scale:g} = {want[0]}x{want[1]} but GT is {gh}x{gw}")
        if bad:
            problems.append(
                f"{len(bad)} LQ/GT size mismatch(es) (GT must be LQ size x scale {spec.scale:g}; "
                f"set --scale or crop the GT): " + "; ".join(bad[:5])
            )
    if problems:
        raise DatasetError(f"dataset {ds.arg or spec.name} is not usable:\n  - " + "\n  - ".join(problems))
    return ds
