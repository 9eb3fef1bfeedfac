"""Batch plumbing for the restore CLI: which files go in, where each result goes, and a loop that loses nothing.

* `collect_inputs`: files / folders (one level, sorted) / globs. ``**`` never follows symlinked folders and
  visits each real folder once, so symlink loops end at once; files directly in the output folder and the
  atomic writer's temporary files are never inputs.
* Output names are a function of the input alone: ``<input stem>.png`` (``photo.jpg`` -> ``photo.png``).
  `plan_outputs` refuses an output that resolves to an input, and refuses every input of a collision
  (``a.jpg`` + ``a.png`` -> ``a.png``) with a message naming them all - nothing is renamed by batch order.
* `output_is_valid`: an existing output that does not decode counts as missing (made again, with a notice).
* `check_output_dir` / `check_device`: one-line `BatchError`s before any model loads.
* `run_batch`: read -> restore -> atomic save per image; per-image OSError -> one line and go on; disk full
  (ENOSPC/EDQUOT) -> stop with a summary; Ctrl-C -> stop, the file being written is discarded (exit 130).
  With ``steps`` a second tqdm bar counts the stage-2 steps of the image (ETA inside the image; face mode shows
  one run per face + background). Every output gets its seed and parameters twice: a PNG text chunk
  ``diffbir`` (JSON) and a sidecar ``<stem>.json`` (`sidecar_record`) written atomically after the PNG.
No official counterpart (the official ``inference.py`` overwrites ``<stem>.png`` in place).
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic

__all__ = [
    "BatchError",
    "collect_inputs",
    "output_name",
    "OutputPlan",
    "plan_outputs",
    "output_is_valid",
    "check_output_dir",
    "check_device",
    "describe_os_error",
    "is_disk_full",
    "BatchSummary",
    "run_batch",
    "sidecar_record",
    "sidecar_path",
]


class BatchError(ValueError):
    """A usage problem found before any model loads (bad output folder, bad device, ...): one line, exit 2."""


# ---------------------------------------------------------------------------------------------- inputs
def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(p))


def _subdirs(d: Path, seen: set[str]) -> Iterator[Path]:
    """Sub-folders of ``d`` for a ``**`` walk: not symlinks, not hidden, each real folder once."""
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        try:
            if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        r = _real(e.path)
        if r not in seen:
            seen.add(r)
            yield d / e.name


def _match(d: Path, parts: tuple[str, ...], seen: set[str]) -> Iterator[Path]:
    if not parts:
        yield d
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        rest = rest or ("*",)  # a trailing ** matches every file below
        yield from _match(d, rest, seen)
        for sub in _subdirs(d, seen):
            yield from _match(sub, parts, seen)
        return
    if not glob.has_magic(head):
        q = d / head
        if rest:
            if q.is_dir():
                yield from _match(q, rest, seen)
        elif os.path.lexists(q):
            yield q
        return
    try:
        names = sorted(e.name for e in os.scandir(d))
    except OSError:
        return
    for name in names:
        if name.startswith(".") and not head.startswith("."):
            continue
        if not fnmatch.fnmatchcase(name, head):
            continue
        q = d / name
        if rest:
            if q.is_dir():  # one pattern level: bounded even through a symlink
                yield from _match(q, rest, seen)
        else:
            yield q


def _glob(spec: str) -> list[Path]:
    """`glob.glob(spec, recursive=True)` without following symlinked folders under ``**`` (loop-safe)."""
    parts = Path(spec).parts
    i = next((k for k, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    base = Path(*parts[:i]) if i else Path(".")
    if i == len(parts):
        return [base] if os.path.lexists(base) else []
    seen = {_real(base)}
    return list(_match(base, tuple(parts[i:]), seen))


def collect_inputs(
    specs: list[str], *, exclude: str | os.PathLike | None = None, notices: list[str] | None = None
) -> tuple[list[Path], list[str]]:
    """Expand files / folders / globs into a sorted, de-duplicated list of image files.

    Folders give their images (one level, sorted); globs may use ``**`` (symlinked folders are not followed).
    Files found through a folder or glob that lie directly in ``exclude`` (the output folder) are left out,
    counted in ``notices``; explicitly named files are kept (`plan_outputs` still refuses writing over them).
    Returns (files, problems): problems are inputs that matched nothing.
    """
    from .imageio import IMAGE_EXTENSIONS

    out_real = _real(exclude) if exclude is not None else None
    files: list[Path] = []
    problems: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_file():
            files.append(p)
            continue
        if p.is_dir():
            try:
                found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            except OSError as e:
                problems.append(f"{spec}: cannot list folder ({describe_os_error(e)})")
                continue
            empty = f"{spec}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})"
        else:
            found = sorted(m for m in _glob(os.path.expanduser(spec)) if m.is_file())
            empty = f"{spec}: no such file, folder or glob match"
        found = [q for q in found if not atomic.is_temp_name(q.name)]
        kept = [q for q in found if out_real is None or os.path.dirname(_real(q)) != out_real]
        if len(kept) < len(found) and notices is not None:
            notices.append(
                f"{spec}: {len(found) - len(kept)} file(s) in the output folder {exclude} left out "
                "(the output folder is never read as input)"
            )
        if not found:
            problems.append(empty)
        elif not kept:
            problems.append(f"{spec}: every match lies in the output folder {exclude}; choose another -o")
        files.extend(kept)
    seen: set[str] = set()
    unique = []
    for f in files:
        r = _real(f)
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique, problems


# ---------------------------------------------------------------------------------------------- outputs
def output_name(inp: str | os.PathLike) -> str:
    """The output file name for an input: ``<stem>.png`` (a function of the input's own name only)."""
    return f"{Path(inp).stem}.png"


@dataclass
class OutputPlan:
    """``jobs``: (input, output) pairs to run; ``refused``: one message per input that will not be written."""

    out_dir: Path
    jobs: list[tuple[Path, Path]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def plan_outputs(inputs: list[Path], out_dir: str | os.PathLike) -> OutputPlan:
    """Pair each input with ``out_dir / output_name(input)``; refuse any output that resolves to an input
    (same real path, or the same file through a link) and every input of an output-name collision."""
    out_dir = Path(out_dir)
    plan = OutputPlan(out_dir)
    in_real = {_real(i): i for i in inputs}
    groups: dict[str, list[tuple[Path, Path]]] = {}
    for inp in inputs:
        out = out_dir / output_name(inp)
        groups.setdefault(os.path.normcase(_real(out)), []).append((inp, out))
    for pairs in groups.values():
        if len(pairs) > 1:
            names = " and ".join(str(i) for i, _ in pairs)
            for inp, out in pairs:
                plan.refused.append(
                    f"{inp}: refused - {names} would all be written to {out} (outputs are named "
                    "<input stem>.png); rename one or restore them into different folders"
                )
            continue
        inp, out = pairs[0]
        victim = in_real.get(_real(out))
        if victim is None and out.exists():
            victim = next((i for i in inputs if _same_file(i, out)), None)
        if victim is not None:
            plan.refused.append(
                f"{inp}: refused - its output {out} is the input {victim}; an input is never "
                "written over (choose another -o)"
            )
            continue
        plan.jobs.append((inp, out))
    order = {id(i): k for k, i in enumerate(inputs)}
    plan.jobs.sort(key=lambda j: order.get(id(j[0]), 0))
    return plan


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_is_valid(path: str | os.PathLike) -> bool:
    """True if ``path`` is a non-empty image file that decodes (PNG: every chunk's CRC checked up to IEND)."""
    from PIL import Image

    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size == 0:
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(p) as im:
                fmt = im.format
                im.verify()
            if fmt != "PNG":  # verify() is thorough only for PNG; decode the others
                with Image.open(p) as im:
                    im.load()
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------- checks
def describe_os_error(e: OSError) -> str:
    """``No space left on device [ENOSPC]`` - the reason of an OSError in one line."""
    code = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    reason = e.strerror or str(e) or type(e).__name__
    return f"{reason} [{code}]" if code else reason


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Make sure ``out_dir`` is (or can be made) a writable folder - with a probe file, since permission bits
    do not tell the truth for root or read-only mounts. Removes temporary files left by killed runs."""
    d = Path(out_dir).expanduser()
    if d.exists() and not d.is_dir():
        raise BatchError(f"output {d} exists and is not a folder; choose another -o")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchError(f"cannot create the output folder {d}: {describe_os_error(e)}") from None
    try:
        atomic.probe_writable(d)
    except OSError as e:
        raise BatchError(f"cannot write into the output folder {d}: {describe_os_error(e)}") from None
    atomic.remove_stale_temps(d)
    return d


_DEVICE_RE = re.compile(r"(cpu|cuda|mps|auto)(?::(\d+))?")


def check_device(name: str) -> str:
    """Validate a device string (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``) against this machine and
    return it (``auto`` -> the best available). Raises `BatchError` with one line otherwise."""
    n = str(name).strip().lower()
    m = _DEVICE_RE.fullmatch(n)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise BatchError(f"unknown device {name!r}: use cpu, cuda, cuda:N, mps or auto")
    kind = m.group(1)
    if kind == "cpu":
        return "cpu"
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA initialization: ..." warnings become our message
        cuda_ok = torch.cuda.is_available()
        count = torch.cuda.device_count() if cuda_ok else 0
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if kind == "auto":
        return "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
    if kind == "mps":
        if not mps_ok:
            raise BatchError(f"device {name!r}: Apple MPS is not available on this machine; use cpu")
        return "mps"
    if not cuda_ok:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no usable NVIDIA GPU/driver found"
        raise BatchError(f"device {name!r}: CUDA is not available ({why}); use cpu")
    if m.group(2) is not None and int(m.group(2)) >= count:
        raise BatchError(f"device {name!r}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return n


# ---------------------------------------------------------------------------------------------- loop
@dataclass
class BatchSummary:
    total: int
    out_dir: Path
    done: int = 0
    skipped: int = 0
    remade: int = 0
    failed: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the batch stopped early (disk full)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if (self.failed or self.stopped) else 0

    def line(self) -> str:
        s = (
            f"restored {self.done}, skipped {self.skipped} existing, failed {len(self.failed)} of {self.total} "
            f"image(s) in {self.seconds:.1f}s -> {self.out_dir.resolve()}"
        )
        if self.stopped:
            s += f" (stopped early: {self.stopped})"
        return s


def sidecar_path(out: Path) -> Path:
    """``out/<stem>.png`` -> ``out/<stem>.json`` (the parameters of that output)."""
    return Path(out).with_suffix(".json")


def sidecar_record(inp: Path, out: Path, res: Any) -> dict:
    """What made ``out``: input, seed, every `RestoreParams` field (seed = the one used), timings, notices, version.
    ``RestoreParams.from_flat`` / ``replace`` can rebuild the call from ``params``."""
    from dataclasses import asdict, is_dataclass

    from . import __version__

    params = getattr(res, "params", None)
    p = asdict(params) if is_dataclass(params) else {}
    seed = getattr(res, "seed", None)
    if p:
        p["seed"] = seed
    return {
        "input": str(inp),
        "output": Path(out).name,
        "seed": seed,
        "params": p,
        "timings": {k: round(float(v), 4) for k, v in getattr(res, "timings", {}).items()},
        "notices": list(getattr(res, "notices", ())),
        "diffbir_core": __version__,
    }


class _StepBar:
    """The inner tqdm bar: one stage-2 run per ``step == 0`` (face mode: each face, then the background)."""

    def __init__(self, tqdm, steps: int, stream) -> None:
        self.bar = tqdm(total=steps, desc="  stage 2", unit="step", position=1, leave=False, file=stream)
        self.steps, self.runs = steps, 0

    def __call__(self, info: Any) -> None:
        if getattr(info, "step", 0) == 0:
            self.runs += 1
            self.bar.reset(total=self.steps)
            if self.runs > 1:
                self.bar.set_postfix_str(f"run {self.runs}")
        self.bar.update(1)

    def new_image(self) -> None:
        self.runs = 0
        self.bar.reset(total=self.steps)
        self.bar.set_postfix_str("")

    def close(self) -> None:
        self.bar.close()


def run_batch(
    plan: OutputPlan,
    restore: Callable[..., Any],
    *,
    overwrite: bool = False,
    quiet: bool = False,
    desc: str = "restore",
    fatal: tuple[type[BaseException], ...] = (),
    stream=None,
    steps: int | None = None,
    sidecar: bool = True,
) -> BatchSummary:
    """Run ``restore(LoadedImage) -> result`` (``result.image``, optional ``.alpha`` / ``.notices`` / ``.seed`` /
    ``.params``) for every job of ``plan`` and save each result atomically. With ``steps`` (stage-2 steps per run)
    and not ``quiet``, ``restore`` is called as ``restore(img, callback=on_step)`` and a per-step bar with ETA runs
    under the image bar. ``sidecar``: also write ``<stem>.json`` (`sidecar_record`). Exceptions in ``fatal``
    propagate (after the bars close); KeyboardInterrupt stops the batch (``summary.interrupted``), disk-full
    stops it (``summary.stopped``), any other per-image error is reported in one line and the batch goes on."""
    import json

    from tqdm import tqdm

    from .imageio import ImageReadError, read_image, save_image

    stream = stream or sys.stderr
    total = len(plan.jobs) + len(plan.refused)
    summary = BatchSummary(total=total, out_dir=plan.out_dir)
    for msg in plan.refused:
        print(msg, file=stream)
        summary.failed.append(msg.split(": refused", 1)[0])
    t0 = time.perf_counter()
    bar = tqdm(plan.jobs, desc=desc, unit="img", disable=quiet, file=stream, position=0)
    step_bar = _StepBar(tqdm, steps, stream) if steps and not quiet else None
    say = (lambda s: tqdm.write(s, file=stream)) if not quiet else (lambda s: print(s, file=stream))
    try:
        for inp, out in bar:
            if out.exists() and not overwrite:
                if output_is_valid(out):
                    summary.skipped += 1
                    continue
                say(f"note: existing output {out} does not decode; making it again")
                summary.remade += 1
            bar.set_postfix_str(inp.name)
            stage = "read"
            try:
                img = read_image(inp)
                for n in img.notices:
                    say(f"note: {inp.name}: {n}")
                stage = "restore"
                if step_bar is not None:
                    step_bar.new_image()
                    res = restore(img, callback=step_bar)
                else:
                    res = restore(img)
                stage = "write"
                record = sidecar_record(inp, out, res)
                meta = json.dumps(record, default=str)
                save_image(out, res.image, getattr(res, "alpha", None), text={"diffbir": meta})
                if sidecar:
                    atomic.write_text(sidecar_path(out), json.dumps(record, indent=1, default=str) + "\n")
                for n in getattr(res, "notices", ()):
                    say(f"note: {inp.name}: {n}")
                summary.done += 1
            except KeyboardInterrupt:
                summary.interrupted = True
                break
            except fatal:
                raise
            except ImageReadError as e:
                say(f"skipped: {e}")
                summary.failed.append(str(inp))
            except OSError as e:
                where = f"cannot write {out}" if stage == "write" else f"{stage} failed"
                if is_disk_full(e):
                    summary.failed.append(str(inp))
                    summary.stopped = f"{describe_os_error(e)} while writing {out}; free some space and run again"
                    say(f"failed: {inp}: {where}: {describe_os_error(e)}")
                    break
                say(f"failed: {inp}: {where}: {describe_os_error(e)}")
                summary.failed.append(str(inp))
            except (ValueError, RuntimeError) as e:
                say(f"failed: {inp}: {type(e).__name__}: {e}")
                summary.failed.append(str(inp))
    except KeyboardInterrupt:  # between images (bar update, validity check)
        summary.interrupted = True
    finally:
        if step_bar is not None:
            step_bar.close()
        bar.close()
        summary.seconds = time.perf_counter() - t0
    return summary
