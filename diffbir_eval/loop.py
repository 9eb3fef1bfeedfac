"""The restore-and-score loop of `diffbir_eval.run`: every image not yet done, then the tables (`diffbir_eval.summary`).

First, before any work: every metric weight file in ONE check (`resolve_run_files`) and the --out folder
(`diffbir_eval.store.check_out_dir`). Then, per image not yet done (``accelerate launch``: every N-th per process):
    1. LQ (read, or synthesised with the dataset's fixed per-image seed) and GT;
    2. restore (timed); output quantised to 8-bit levels - exactly what a saved PNG holds - and its size
       checked against GT (or LQ x scale);
    3. per-image metrics; FID features cached as ``features/fid/NAME.npy``;
    4. one JSON line appended to the row store (`diffbir_eval.store.RowStore`) and fsync'ed.
An interrupted run keeps every finished row; rerunning skips them and ends with the same ``metrics.csv``
as an uninterrupted run. Asking for more metrics later computes only the missing ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffbir_core.atomic import atomic_open
from diffbir_core.imageio import read_image, resize, save_image, to_numpy, to_tensor

from .datasets import image_size
from .methods import Method, resolve_method
from .metrics import METRIC_FILES, METRICS, build_metric, resolve_metric_file, resolve_metric_files
from .store import RowStore, RunConfigError, RunOptions, check_config, check_out_dir, jsonable, run_config
from .summary import finalize

__all__ = ["run_eval", "process_state", "quantize", "resized", "resolve_fid_reference", "resolve_run_files"]


def quantize(img: np.ndarray) -> np.ndarray:
    """Float image -> the same image on 8-bit levels (what an 8-bit PNG of it holds), float32 [0,1]."""
    return (np.rint(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def resized(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bicubic (antialiased) resize of an HxWx3 float image to ``hw``."""
    return to_numpy(resize(to_tensor(img), tuple(hw), "bicubic"))


class _SingleProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def process_state():
    """accelerate's PartialState under ``accelerate launch`` (WORLD_SIZE > 1), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState  # optional: only under `accelerate launch`

        # without CUDA, accelerate only forms a process group (gloo) when told the run is on the CPU
        return PartialState(cpu=not torch.cuda.is_available())
    return _SingleProcess()


def _fid_ref_arg(ds, opts: RunOptions) -> str | None:
    """The FID reference in effect: --fid-ref, else None (the GT folder), else the set's default; a set with
    neither GT nor a default reference is refused here, before any file is looked for."""
    if opts.fid_ref is not None:
        return opts.fid_ref
    if ds.has_gt:
        return None
    if ds.spec.fid_reference:
        return ds.spec.fid_reference
    raise RunConfigError(
        f"FID needs a reference and {ds.spec.title} has no GT: pass --fid-ref GT_DIR, "
        f"--fid-ref STATS.npz (arrays mu, sigma) or --fid-ref {', '.join(METRIC_FILES)}"
    )


def resolve_run_files(ds, opts: RunOptions) -> dict[str, Path]:
    """Every weight file the run's metrics need, plus the FID reference statistics when one is named, resolved
    in ONE `resolve_metric_files` call: a run lacking several files fails once, listing all of them."""
    ref = _fid_ref_arg(ds, opts) if "fid" in opts.metrics else None
    extra = {ref: "the FID reference statistics (--fid-ref)"} if ref in METRIC_FILES else None
    return resolve_metric_files(
        opts.metrics, weights_dir=opts.metric_weights, weight_paths=opts.weight_paths, extra=extra
    )


def resolve_fid_reference(ds, opts: RunOptions, files: dict[str, Path] | None = None) -> dict:
    """-> {"kind": "folder"|"stats", "path": ...} (checked now, so a missing file fails before any work);
    ``files``: already resolved metric files (`resolve_run_files`)."""
    ref = _fid_ref_arg(ds, opts)
    if ref is None:
        return {"kind": "folder", "path": str(ds.gt_dir), "what": "the dataset's GT images"}
    if ref in METRIC_FILES:
        p = (files or {}).get(ref) or resolve_metric_file(
            ref, path=opts.weight_paths.get(ref), weights_dir=opts.metric_weights
        )
        return {"kind": "stats", "path": str(p), "what": METRIC_FILES[ref].description}
    p = Path(ref).expanduser()
    if p.is_dir():
        return {"kind": "folder", "path": str(p), "what": "a folder of reference images"}
    if p.is_file():
        return {"kind": "stats", "path": str(p), "what": "reference statistics file"}
    raise RunConfigError(f"--fid-ref {ref}: no such folder or statistics file")


def run_eval(
    ds, method_arg: str, out_dir: str | os.PathLike, opts: RunOptions, *, method: Method | None = None, state=None
) -> dict | None:
    """Restore and score ``ds`` into ``out_dir``; returns the summary (main process) or None.

    ``method`` may be given directly (tests, notebooks); otherwise ``method_arg`` is resolved - only when
    there is work left.
    """
    state = state or process_state()
    out_dir = Path(out_dir)
    per_image = [m for m in opts.metrics if METRICS[m].kind != "set"]
    want_fid = "fid" in opts.metrics
    if not ds.has_gt:
        fr = [m for m in opts.metrics if METRICS[m].needs_gt]
        if fr:
            nr = ", ".join(k for k, s in METRICS.items() if s.kind == "nr")
            raise RunConfigError(
                f"metric(s) {', '.join(fr)} need ground truth; {ds.spec.title} has none (no-reference metrics: {nr})"
            )
    # 0. before any work: every metric weight file in ONE check (`resolve_run_files`), then the --out folder
    if want_fid and _fid_ref_arg(ds, opts) not in METRIC_FILES:
        resolve_fid_reference(ds, opts)  # a bad --fid-ref folder / file is a configuration error: said first
    files = resolve_run_files(ds, opts)
    fid_ref = resolve_fid_reference(ds, opts, files) if want_fid else None
    items = ds.items[: opts.limit] if opts.limit else list(ds.items)
    cfg = run_config(ds, method_arg, opts)
    if state.is_main_process:
        check_out_dir(out_dir)
        check_config(out_dir, cfg)
    state.wait_for_everyone()

    # 1. what is left: names missing a column, or (FID) a feature file
    store = RowStore(out_dir, state.process_index)
    done = store.load()
    feat_dir = out_dir / "features" / "fid"

    def missing(it) -> tuple[list[str], bool]:
        have = done.get(it.name, {}).get("values", {})
        ms = [m for m in per_image if any(c not in have for c, _ in METRICS[m].columns)]
        return ms, want_fid and not (feat_dir / f"{it.name}.npy").is_file()

    todo = [it for it in items if any(missing(it))]
    mine = todo[state.process_index :: state.num_processes]
    if opts.verbose and state.is_main_process:
        print(
            f"[eval] {ds.spec.title}: {len(items)} images, {len(items) - len(todo)} already done, "
            f"{len(todo)} to do on {state.num_processes} process(es) -> {out_dir}",
            flush=True,
        )

    if method is None and method_arg.startswith("outputs:"):
        method = resolve_method(method_arg, scale=ds.spec.scale, task=ds.spec.task)
    if method is not None and method.kind == "outputs":  # every output must be there before scoring starts
        lost = []
        for it in todo:
            try:
                method.output_path(it.name)
            except FileNotFoundError:
                lost.append(it.name)
        if lost:
            raise RunConfigError(
                f"{method_arg}: {len(lost)} of {len(todo)} images have no output file "
                f"(NAME.png, NAME.jpg, ...), e.g. {lost[:5]}"
            )
    if mine:
        # 2. metrics first (a missing weight file fails before any restoration), then the method
        metrics = {
            m: build_metric(m, crop_border=opts.crop_border, device=opts.device, files=files)
            for m in per_image + (["fid"] if want_fid else [])
        }
        if method is None:
            method = resolve_method(
                method_arg,
                scale=ds.spec.scale * opts.lq_downscale,
                task=ds.spec.task,
                device=opts.device,
                weights_dir=opts.weights_dir,
                seed=opts.seed,
            )
        img_dir = out_dir / "images"
        for k, it in enumerate(mine):
            need, need_feat = missing(it)
            t0 = time.perf_counter()
            gt = ds.load_gt(it)
            row: dict[str, Any] = {"name": it.name, "values": {}}
            saved = img_dir / f"{it.name}.png"
            if method.kind == "outputs":
                out, restore_s = read_image(method.output_path(it.name)).rgb, None
                lq_hw = None
            elif saved.is_file() and it.name in done:  # restored before, only metrics were missing
                out, restore_s, lq_hw = read_image(saved).rgb, None, None
            else:
                lq, deg = ds.load_lq(it)
                lq_hw = list(lq.shape[:2])
                t1 = time.perf_counter()
                if opts.lq_downscale != 1.0:  # 1/F smaller input, F x larger method scale
                    out = method.restore(
                        resized(
                            lq,
                            (
                                max(1, round(lq.shape[0] / opts.lq_downscale)),
                                max(1, round(lq.shape[1] / opts.lq_downscale)),
                            ),
                        )
                    )
                else:
                    out = method.restore(lq)
                restore_s = time.perf_counter() - t1
                row["restore_s"] = restore_s
                row["lq_size"] = lq_hw
                if deg is not None:
                    row["degradation"] = jsonable(deg)
            out = quantize(out)
            if gt is not None:
                want_hw = tuple(gt.shape[:2])
            else:
                lh, lw = lq_hw if lq_hw else image_size(it.lq)
                want_hw = (max(1, int(round(lh * ds.spec.scale))), max(1, int(round(lw * ds.spec.scale))))
            if opts.lq_downscale != 1.0 and want_hw is not None and tuple(out.shape[:2]) != want_hw:
                out = quantize(resized(out, want_hw))  # rounding of the shrunk size: back to the exact size
            if want_hw is not None and tuple(out.shape[:2]) != want_hw:
                ref = "GT size" if gt is not None else "LQ x scale"
                raise RuntimeError(
                    f"{method_arg} gave a {out.shape[0]}x{out.shape[1]} image for {it.name}; "
                    f"expected {want_hw[0]}x{want_hw[1]} ({ref})"
                )
            row["out_size"] = list(out.shape[:2])
            if opts.save_images and not saved.is_file():
                save_image(saved, out)
            for m in need:
                row["values"].update(metrics[m](out, gt))
            if need_feat:
                with atomic_open(feat_dir / f"{it.name}.npy", "wb") as fh:
                    np.save(fh, metrics["fid"].features(out))
            store.append(jsonable(row))
            if opts.verbose:
                vals = " ".join(f"{c}={v:.4g}" for c, v in row["values"].items())
                rs = f"restore {restore_s:.1f}s, " if restore_s is not None else ""
                print(
                    f"[eval{'' if state.num_processes == 1 else f' p{state.process_index}'}] "
                    f"{k + 1}/{len(mine)} {it.name}: {rs}total {time.perf_counter() - t0:.1f}s {vals}",
                    flush=True,
                )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    fid_net = metrics.get("fid") if mine else None
    return finalize(ds, method_arg, out_dir, opts, method=method, fid_ref=fid_ref, items=items, fid_net=fid_net)
