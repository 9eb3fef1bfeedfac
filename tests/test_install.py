"""Packaging (issue 14): the wheel built from pyproject.toml installs and works away from the source tree.

1. ``pip wheel --no-deps --no-build-isolation`` on a copy of the tracked + new files (so the worktree stays clean);
2. a fresh venv WITHOUT the project: its own site-packages first, the dependency environment (this interpreter's
   site-packages: torch, diffusers, ...) appended through a ``.pth`` file, never the source tree;
3. ``pip install --no-deps --no-index`` of the wheel into it; every console script and import runs from a folder
   outside the repository, and ``diffbir_core.__file__`` must lie inside the new venv;
4. the declared requirements (core and every extra) are satisfied by what is installed, checked with
   ``packaging`` against ``importlib.metadata`` of the installed wheel (pip's resolver rules, not our own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

_CHECK_REQUIREMENTS = r"""
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
dist = md.distribution("diffbir-core")
extras = [e for e in (dist.metadata.get_all("Provides-Extra") or [])]
bad = []
for line in dist.requires or []:
    req = Requirement(line)
    envs = [{"extra": ""}] + [{"extra": e} for e in extras]
    if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        bad.append(f"{req}: not installed")
        continue
    if not req.specifier.contains(have, prereleases=True):
        bad.append(f"{req}: installed {have}")
print(json.dumps({"extras": extras, "requires": dist.requires, "bad": bad,
                  "scripts": sorted(e.name for e in dist.entry_points if e.group == "console_scripts")}))
"""


def _sources(dst: Path) -> None:
    """Copy what git would package (tracked + untracked-not-ignored files) to ``dst``."""
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    src, wheels, env_dir = base / "src", base / "wheels", base / "venv"
    _sources(src)
    run = dict(capture_output=True, text=True, timeout=600)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheels),
        ],
        **run,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("diffbir_core-*.whl")
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    own = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], **run
        ).stdout.strip()
    )
    deps = Path(sysconfig.get_paths()["purelib"])  # this interpreter's packages: torch, diffusers, ...
    assert not (deps / "diffbir_core").exists(), "the dependency environment already holds diffbir_core"
    (own / "zz_dependency_env.pth").write_text(f"{deps}\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], **run)
    assert r.returncode == 0, r.stdout + r.stderr
    work = base / "elsewhere"  # outside the repository: nothing can import from the source tree
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return {"py": py, "bin": env_dir / "bin", "work": work, "env": env, "venv": env_dir, "wheel": wheel}


def _run(installed, *cmd, timeout=600):
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=installed["work"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_holds_every_module_and_the_data_files(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for pkg in ("diffbir_core", "diffbir_eval", "diffbir_demo"):
        for f in (ROOT / pkg).rglob("*.py"):
            assert str(f.relative_to(ROOT)) in names, f
    for f in (ROOT / "diffbir_eval" / "assets").rglob("*"):
        if f.is_file():
            assert str(f.relative_to(ROOT)) in names, f
    assert not any(n.startswith(("tests/", "results/", "notebooks/")) for n in names)


def test_imports_come_from_the_installed_package(installed):
    r = _run(
        installed,
        installed["py"],
        "-c",
        "import diffbir_core, diffbir_eval, diffbir_demo; from diffbir_core import DiffBIRPipeline, RestoreParams;"
        "from importlib.resources import files;"
        "print(diffbir_core.__file__); print(DiffBIRPipeline.__module__, RestoreParams.__module__);"
        "print(files('diffbir_eval').joinpath('assets/niqe_pris_params.mat').is_file())",
    )
    assert r.returncode == 0, r.stderr
    path, mods, asset = r.stdout.split("\n")[:3]
    assert Path(path).resolve().is_relative_to(installed["venv"].resolve()), path
    assert mods == "diffbir_core.pipeline diffbir_core.config" and asset == "True"


def test_declared_requirements_are_met(installed):
    r = _run(installed, installed["py"], "-c", _CHECK_REQUIREMENTS)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["bad"] == [], info["bad"]
    assert {"demo", "eval", "train", "faces", "captioner", "dev"} <= set(info["extras"])
    assert info["scripts"] == ["diffbir-demo", "diffbir-eval", "diffbir-restore", "diffbir-weights"]
    core = [q for q in info["requires"] if "extra ==" not in q]
    assert any(q.startswith("torch>=") for q in core) and not any("==" in q.split(";")[0] for q in info["requires"])


def test_console_scripts_run(installed):
    b = installed["bin"]
    for script in ("diffbir-restore", "diffbir-weights", "diffbir-eval", "diffbir-demo"):
        r = _run(installed, b / script, "--help", timeout=300)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (script, r.stdout, r.stderr)
    r = _run(installed, b / "diffbir-weights", "list", "--preset", "v2")
    assert r.returncode == 0, r.stderr
    for f in ("BSRNet.pth", "v2-1_512-ema-pruned.ckpt", "v2.pth", "scunet_color_real_psnr.pth"):
        assert f in r.stdout
    r = _run(installed, b / "diffbir-weights", "download", "--preset", "v2.1")  # HF_HUB_OFFLINE=1: refused clearly
    # every task's cleaner (realesrgan SwinIR, face SwinIR) + SD zsnr + control, in one message
    assert r.returncode == 2 and "4 missing" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_restore_cli_from_outside_the_repository(installed):
    out = installed["work"] / "out"
    r = _run(
        installed,
        installed["bin"] / "diffbir-restore",
        ROOT / "assets" / "samples" / "49.jpg",
        "-o",
        out,
        "--preset",
        "offline",
        "--upscale",
        "1",
        "-q",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    from PIL import Image

    with Image.open(out / "49.png") as im, Image.open(ROOT / "assets" / "samples" / "49.jpg") as src:
        assert im.size == src.size
    assert json.loads((out / "49.json").read_text())["params"]["preset"] == "offline"
