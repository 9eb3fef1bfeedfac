"""Write the offline HQ images of stage-1 CPU run 1 (results/train_stage1/README.md) to a folder.

Training: scikit-image's bundled photos and textures (grey ones as RGB). Held out (never trained on): Set5 HR
(``$DIFFBIR_SHARED_DIR/data/set5/HR``, default ../shared) and scikit-image's ``chelsea``. Writes
``<out>/train/*.png``, ``<out>/heldout/*.png`` and the two file lists ``<out>/train.txt`` / ``<out>/heldout.txt``.
Usage: python -m experiments.train_stage1.prepare_data /tmp/stage1_data
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from diffbir_core.atomic import write_bytes, write_text
from diffbir_core.imageio import save_image
from experiments.train_stage1.common import skimage_rgb

TRAIN = [
    "astronaut",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "clock",
    "cell",
    "page",
    "text",
]
HELDOUT_SKIMAGE = ["chelsea"]


SHARED = Path(os.environ.get("DIFFBIR_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))


def main(out: str) -> None:
    root = Path(out)
    set5 = SHARED / "data" / "set5" / "HR"
    lists: dict[str, list[str]] = {"train": [], "heldout": []}
    for split, names in (("train", TRAIN), ("heldout", HELDOUT_SKIMAGE)):
        for name in names:
            p = root / split / f"{name}.png"
            save_image(p, skimage_rgb(name).astype(np.uint8))
            lists[split].append(str(p))
    for f in sorted(set5.glob("*.png")):
        p = root / "heldout" / f"set5_{f.name}"
        write_bytes(p, f.read_bytes())
        lists["heldout"].append(str(p))
    for split, files in lists.items():
        write_text(root / f"{split}.txt", "\n".join(files) + "\n")
        print(f"{split}: {len(files)} images -> {root / (split + '.txt')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stage1_data")
