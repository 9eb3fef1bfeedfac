"""The training loop of both stages on `accelerate` (paper arXiv 2308.15070, "Training"): ``train(cfg) -> summary``.

Optimiser: AdamW at ``lr``, constant or (``lr_schedule = "cosine"``) linear warm-up + cosine decay to
``lr_min`` (`lr_at`). Multi-GPU data parallel with ``accelerate launch``, gradient accumulation, mixed
precision on GPU only (on CPU it is switched off: fp16/bf16 there are ~200x slower). Each process reads its
own slice of one deterministic data stream (`diffbir_core.data.EpochSampler`), and every micro-step reseeds
torch from (seed, micro-step, rank): a resumed run repeats exactly what an uninterrupted run does.
SIGTERM / SIGINT write a checkpoint and return. Logs: ``log.csv`` (train), ``val.csv`` (validation),
TensorBoard when installed, validation images ``val/<step>.png``. Tasks: `tasks`, checkpoints: `checkpoint`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from diffbir_core.atomic import atomic_open, remove_stale_temps, write_text
from diffbir_core.data import EpochSampler, PairedDegradationDataset, collate_pairs
from diffbir_core.imageio import save_image

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .tasks import make_task

log = logging.getLogger("diffbir_core.train")

__all__ = ["train", "lr_at"]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up ``lr * (step + 1) / warmup_steps``,
    then ``lr`` (constant) or ``lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2`` with p = (step - warmup) /
    (max_steps - warmup) (cosine). A pure function of the step, so a resumed run follows the same curve."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))


def _step_seed(seed: int, micro_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1)[0])


def _step_of(row: Mapping[str, str]) -> int | None:
    """The step of a log row; None for a row cut short by a crash (fewer fields than the header)."""
    if any(v is None for v in row.values()):
        return None
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):  # a row cut short by a crash
        return None


class _CsvLog:
    """Append-only CSV, each row flushed as it is written; on resume, rows after the resumed step (and a row
    cut short by a crash) are dropped - they will be redone. The file is first (re)written whole, atomically
    (`diffbir_core.atomic.atomic_open`): a crash while trimming never loses the rows kept."""

    def __init__(self, path: Path, columns: Sequence[str], keep_until: int | None) -> None:
        self.path, self.columns = path, list(columns)
        rows: list[dict[str, str]] = []
        if keep_until is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if (s := _step_of(r)) is not None and s <= keep_until]
        with atomic_open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in self.columns})

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
            f.flush()


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        log.info("tensorboard is not installed: logging to CSV only")
        return None
    return SummaryWriter(str(out_dir / "tb"))


def _save_grid(path: Path, rows: Sequence[torch.Tensor]) -> None:
    """Save rows of (N, 3, H, W) [0, 1] images as one PNG (each row one tensor, N images across)."""
    strips = [torch.cat(list(r.detach().float().clamp(0, 1).cpu()), dim=2) for r in rows]  # 3, H, N*W each
    grid = torch.cat(strips, dim=1)  # 3, rows*H, N*W
    save_image(path, grid.permute(1, 2, 0).numpy())


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked after every step (all processes stop together)."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.flag = True

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        f = torch.tensor([1.0 if self.flag else 0.0], device=accelerator.device)
        return bool(accelerator.gather(f).max().item() > 0)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run. Returns a summary: final ``step``, ``last_loss``, ``losses`` (step,
    loss) of this run, the last ``checkpoint`` folder, ``out_dir`` and the trained ``model`` (unwrapped)."""
    from accelerate import Accelerator  # optional heavy dependency: only when training runs

    if not cfg.data:
        raise ValueError("TrainConfig.data is empty: give a folder or file list of HQ training images")
    mp = cfg.mixed_precision
    if mp != "no" and not torch.cuda.is_available():
        warnings.warn(f"mixed_precision={mp!r} needs a GPU; training on CPU in fp32", stacklevel=2)
        mp = "no"
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out_dir = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)  # temporary files of a killed run (`diffbir_core.atomic`)
        write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    # 1. model and optimiser
    task = make_task(cfg)
    for m in task.modules().values():
        m.to(device)
    opt = torch.optim.AdamW(task.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume, out_dir)
        start = load_checkpoint(task, opt, accelerator, cfg, ckpt)
        accelerator.print(f"resumed from {ckpt} at step {start}")
    train_model, opt = accelerator.prepare(task.modules()["model"], opt)
    if cfg.stage == "stage1":
        task.model = accelerator.unwrap_model(train_model)

    # 2. data: one deterministic stream, this process's slice, resumed where the checkpoint stopped
    ds = PairedDegradationDataset(
        cfg.data,
        crop=cfg.crop,
        cfg=cfg.degradation,
        seed=cfg.seed,
        face_aligned=cfg.face_aligned,
        cache_images=cfg.cache_images,
    )
    sampler = EpochSampler(
        len(ds), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, start_micro_step=start * cfg.grad_accum
    )
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_pairs,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
    )
    val_batch = None
    if cfg.val_data and cfg.val_images > 0:
        vds = PairedDegradationDataset(
            cfg.val_data,
            crop=cfg.crop,
            cfg=cfg.degradation,
            seed=cfg.seed + 1,
            face_aligned=cfg.face_aligned,
            flip=False,
        )
        val_batch = collate_pairs([vds[(i, 0)] for i in range(min(cfg.val_images, len(vds)))])

    # 3. logs
    tlog = vlog = tb = None
    if accelerator.is_main_process:
        keep = start if cfg.resume else None
        tlog = _CsvLog(out_dir / "log.csv", ["step", "loss", "lr", "samples_per_s", "elapsed_s"], keep)
        vcols = (
            ["step", "val_loss", "psnr_lq", "psnr_pred", "psnr_gain"]
            if cfg.stage == "stage1"
            else ["step", "val_loss", "val_loss_t10", "val_loss_t50", "val_loss_t90", "psnr_x0_t50"]
        )
        vlog = _CsvLog(out_dir / "val.csv", vcols, keep)
        tb = _tensorboard(out_dir)

    # 4. loop: grad_accum micro-steps per optimiser step (numbered steps below follow the module docstring)
    step, micro = start, start * cfg.grad_accum
    t0, window_loss, window_n, last_loss = time.time(), 0.0, 0, float("nan")
    history: list[tuple[int, float]] = []
    last_ckpt: Path | None = None
    it = iter(loader)
    stop = _StopFlag()  # SIGTERM / SIGINT (e.g. `timeout`, a cluster pre-emption): checkpoint, then return
    try:
        while step < cfg.max_steps:
            step_loss = 0.0
            for g in opt.param_groups:  # schedule: a function of the optimiser step only
                g["lr"] = lr_at(cfg, step)
            for _ in range(cfg.grad_accum):
                batch = next(it)
                seed = _step_seed(cfg.seed, micro, rank)
                torch.manual_seed(seed)  # dropout / drop-path / diffusion noise: a function of the step
                gen = torch.Generator().manual_seed(seed)
                with accelerator.accumulate(train_model):
                    with accelerator.autocast():
                        loss = (
                            task.loss(train_model, batch, device)
                            if cfg.stage == "stage1"
                            else task.loss(train_model, batch, device, gen)
                        )
                    accelerator.backward(loss)
                    if cfg.grad_clip and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(task.trainable(), cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step_loss += loss.detach().float() / cfg.grad_accum
                micro += 1
            step += 1
            last_loss = accelerator.gather(step_loss.reshape(1)).mean().item()
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}; lower lr or enable grad_clip")
            history.append((step, last_loss))
            window_loss, window_n = window_loss + last_loss, window_n + 1
            if accelerator.is_main_process and (step % cfg.log_every == 0 or step == cfg.max_steps):
                el = time.time() - t0
                row = {
                    "step": step,
                    "loss": window_loss / window_n,
                    "lr": opt.param_groups[0]["lr"],
                    "samples_per_s": (step - start) * cfg.batch_size * world * cfg.grad_accum / max(el, 1e-9),
                    "elapsed_s": el,
                }
                tlog.write(row)
                if tb:
                    tb.add_scalar("train/loss", row["loss"], step)
                window_loss, window_n = 0.0, 0
            if val_batch is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
                if accelerator.is_main_process:
                    metrics, rows = task.validate(val_batch, device)
                    vlog.write({"step": step, **metrics})
                    _save_grid(out_dir / "val" / f"{step:07d}.png", rows)
                    if tb:
                        for k, v in metrics.items():
                            tb.add_scalar(f"val/{k}", v, step)
                    accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                accelerator.wait_for_everyone()
            stopping = stop.requested(accelerator)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    last_ckpt = save_checkpoint(task, opt, accelerator, cfg, step)
                accelerator.wait_for_everyone()
            if stopping:
                accelerator.print(f"stop requested by signal: checkpoint at step {step} written, exiting")
                break
    finally:
        stop.restore()
    if tb:
        tb.close()
    return {
        "step": step,
        "last_loss": last_loss,
        "losses": history,
        "checkpoint": last_ckpt,
        "out_dir": out_dir,
        "model": task.model,
    }
