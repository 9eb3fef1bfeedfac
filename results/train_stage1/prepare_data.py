"""Write the offline HQ images of the small stage-1 CPU run (results/train_stage1/README.md) to a folder.

Training: scikit-image's bundled photos and textures (grey ones as RGB). Held out (never trained on):
Set5 HR (../shared/data/set5/HR) and scikit-image's ``chelsea``. Writes ``<out>/train/*.png``,
``<out>/heldout/*.png`` and the two file lists ``<out>/train.txt`` / ``<out>/heldout.txt``.
Usage: python results/train_stage1/prepare_data.py /tmp/stage1_data
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

TRAIN = ["astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
         "stereo_motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "cell", "page", "text"]
HELDOUT_SKIMAGE = ["chelsea"]


def _rgb(im: np.ndarray) -> np.ndarray:
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    return im[..., :3]


def main(out: str) -> None:
    import skimage.data as skd

    from diffbir_core.imageio import save_image

    root = Path(out)
    set5 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "set5" / "HR"
    lists: dict[str, list[str]] = {"train": [], "heldout": []}
    for split, names in (("train", TRAIN), ("heldout", HELDOUT_SKIMAGE)):
        for name in names:
            im = getattr(skd, name)()
            if isinstance(im, tuple):  # stereo_motorcycle -> (left, right, disparity): keep the left view
                im = im[0]
            p = root / split / f"{name}.png"
            save_image(p, _rgb(im).astype(np.uint8))
            lists[split].append(str(p))
    for f in sorted(set5.glob("*.png")):
        p = root / "heldout" / f"set5_{f.name}"
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, p)
        lists["heldout"].append(str(p))
    for split, files in lists.items():
        (root / f"{split}.txt").write_text("\n".join(files) + "\n")
        print(f"{split}: {len(files)} images -> {root / (split + '.txt')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stage1_data")
