"""Training pairs for both stages: HQ crops and their synthetic LQ versions (paper arXiv 2308.15070, "Degradation
model", "Training").

`PairedDegradationDataset` reads HQ images (a folder, searched recursively; a text file listing one path
per line; or a list of paths), takes a random ``crop x crop`` patch (images smaller than the crop are
first resized up, bicubic, so their short side equals the crop), flips it horizontally with p = 0.5 and
degrades it with a `diffbir_core.degradation` preset. Aligned faces (``face_aligned=True``) are never
cropped: the whole image is resized to ``crop x crop`` so the face stays where the alignment put it.

Everything random comes from ``numpy.random.default_rng([seed, epoch, index])``: an item is a pure
function of (seed, index, epoch). ``dataset[i]`` uses the current ``dataset.epoch``; ``dataset[(i, epoch)]``
names the epoch explicitly, which is what `EpochSampler` feeds it (so worker processes need no shared
state and a resumed run sees exactly the data an uninterrupted run would).

Mirrors the official ``CodeformerDataset`` / ``RealESRGANDataset`` + batch transform, done per image on
the CPU (numpy/OpenCV) instead of per batch on the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from diffbir_core.degradation import DegradationConfig, degrade, get_degradation
from diffbir_core.imageio import IMAGE_EXTENSIONS, ImageReadError, read_image, resize, to_numpy, to_tensor

__all__ = ["PairedDegradationDataset", "EpochSampler", "collate_pairs", "list_images"]


def list_images(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image paths from a folder (recursive, sorted), a text file list (one path per line, relative paths
    are relative to the list file; blank lines and ``#`` comments skipped) or an explicit sequence."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"{p}: folder holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
            return files
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            return [p]
        if p.is_file():
            files = []
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    f = Path(line)
                    files.append(f if f.is_absolute() else p.parent / f)
            if not files:
                raise ValueError(f"{p}: file list is empty")
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{p}: {len(missing)} listed file(s) do not exist, e.g. {missing[:3]}")
            return files
        raise FileNotFoundError(f"{p}: no such folder or file list")
    files = [Path(f) for f in source]
    if not files:
        raise ValueError("the image list is empty: give a folder, a file list or at least one image path")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image path(s) do not exist, e.g. {missing[:3]}")
    return files


class PairedDegradationDataset(Dataset):
    """(HQ crop, degraded LQ crop) pairs. Items: ``dict(hq=3xHxW, lq=3xHxW (float32, [0,1]), params,
    index, epoch, path)``; ``params`` are the degradation's drawn values plus the crop box and flip."""

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        crop: int = 512,
        cfg: str | DegradationConfig = "realesrgan_2nd_order",
        seed: int = 0,
        face_aligned: bool = False,
        flip: bool = True,
        cache_images: bool = False,
    ) -> None:
        if crop < 8:
            raise ValueError(f"crop must be at least 8 pixels, got {crop}")
        self.files = list_images(source)
        self.crop = int(crop)
        self.cfg = get_degradation(cfg)
        self.seed = int(seed)
        self.face_aligned = bool(face_aligned)
        self.flip = bool(flip)
        self.epoch = 0
        self._cache: dict[int, np.ndarray] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _load(self, index: int) -> np.ndarray:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        try:
            rgb = read_image(self.files[index]).rgb
        except ImageReadError as e:
            raise ImageReadError(
                f"training image #{index} cannot be used: {e}. Remove it from the data set "
                "(or its file list) and start again."
            ) from e
        if self._cache is not None:
            self._cache[index] = rgb
        return rgb

    def _fit(self, rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        """Resize-if-smaller + random crop (or whole-image resize for aligned faces) -> crop x crop."""
        h, w = rgb.shape[:2]
        c = self.crop
        if self.face_aligned:
            out = rgb if (h, w) == (c, c) else to_numpy(resize(to_tensor(rgb), (c, c)))
            return out, {"resized_from": (h, w), "box": None}
        if min(h, w) < c:  # short side up to the crop size, keeping the aspect ratio
            s = c / min(h, w)
            nh, nw = max(c, round(h * s)), max(c, round(w * s))
            rgb = to_numpy(resize(to_tensor(rgb), (nh, nw)))
            h, w = nh, nw
        top = int(rng.integers(0, h - c + 1))
        left = int(rng.integers(0, w - c + 1))
        return rgb[top : top + c, left : left + c], {"resized_from": None, "box": (top, left, c, c)}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        index, epoch = int(index), int(epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        rng = np.random.default_rng([self.seed, epoch, index])
        hq, crop_info = self._fit(self._load(index), rng)  # 1. crop / resize
        flipped = bool(self.flip and rng.random() < 0.5)  # 2. horizontal flip
        if flipped:
            hq = hq[:, ::-1]
        hq = np.ascontiguousarray(hq, dtype=np.float32)
        lq, params = degrade(hq, self.cfg, rng)  # 3. degrade
        params = {**params, "crop": crop_info, "hflip": flipped}
        return {
            "hq": torch.from_numpy(hq).permute(2, 0, 1).contiguous(),  # 3, H, W
            "lq": torch.from_numpy(lq).permute(2, 0, 1).contiguous(),  # 3, H, W
            "params": params,
            "index": index,
            "epoch": epoch,
            "path": str(self.files[index]),
        }


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``hq`` / ``lq`` into B x 3 x H x W; keep ``params``, ``index``, ``epoch``, ``path`` as lists
    (parameter dicts differ per item, so the default collate cannot stack them)."""
    out: dict[str, Any] = {"hq": torch.stack([it["hq"] for it in items]), "lq": torch.stack([it["lq"] for it in items])}
    for k in ("params", "index", "epoch", "path"):
        out[k] = [it[k] for it in items]
    return out


class EpochSampler(Sampler):
    """Endless, resumable stream of ``(index, epoch)`` keys for one process of a data-parallel run.

    The global stream is epoch 0's permutation, then epoch 1's, ... (each from ``rng([seed, epoch])``).
    Each micro-step consumes ``batch_size * world_size`` keys; process ``rank`` takes its contiguous slice.
    ``start_micro_step`` skips what a resumed run has already consumed - no data is read to get there.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start_micro_step: int = 0
    ) -> None:
        if n <= 0:
            raise ValueError("EpochSampler needs a non-empty data set")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size, self.start = int(rank), int(world_size), int(start_micro_step)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_step = self.batch_size * self.world_size
        pos = self.start * per_step  # global position in the stream
        epoch, off = divmod(pos, self.n)
        perm = self._perm(epoch)
        while True:
            lo = self.rank * self.batch_size
            for j in range(per_step):  # one micro-step's global keys; keep this rank's slice
                if off == self.n:
                    epoch, off = epoch + 1, 0
                    perm = self._perm(epoch)
                if lo <= j < lo + self.batch_size:
                    yield int(perm[off]), epoch
                off += 1
