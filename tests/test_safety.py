"""Issue 16 - lose nothing, never lie: acceptance tests for the atomic writer, the batch CLI, reading and weights.

Known answers come from independent sources: hashlib for checksums, Pillow's own `exif_transpose` for
orientation, the values we wrote for float TIFFs, byte comparison for "untouched", the OS for signals.
The CLI runs on the offline preset (the real converted Real-ESRGAN x4plus) on tiny images.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin  # noqa: F401  (PNG writer registered before tests patch it)

from diffbir_core import weights as W
from diffbir_core.config import RestoreParams
from diffbir_core.imageio import ImageReadError, read_image, save_image

ROOT = Path(__file__).resolve().parents[1]


def _cli_main():
    try:
        from diffbir_core.cli import main
    except ImportError:
        from diffbir_core.cli import main
    return main


def _img(path, size=(12, 10), color=(120, 60, 30)):
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = color
    arr[::2, ::2] = 255
    Image.fromarray(arr).save(path)
    return path


def _decodes(p: Path) -> bool:
    try:
        with Image.open(p) as im:
            im.load()
        return True
    except Exception:
        return False


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def no_models(monkeypatch):
    """Fail loudly if the CLI builds a pipeline (i.e. would load a model)."""
    import diffbir_core.pipeline as pl

    class _Refuse:
        def __init__(self, *a, **k):
            raise AssertionError("a model pipeline was built although the run should stop before")

    monkeypatch.setattr(pl, "DiffBIRPipeline", _Refuse)


# ------------------------------------------------------------------------------------ interrupted batches
_DRIVER = r"""
import io, os, sys, time
from pathlib import Path
from PIL import Image, PngImagePlugin  # noqa: F401  (registers the PNG writer)
sys.path.insert(0, os.environ["WT_ROOT"])
_orig = Image.SAVE["PNG"]
_n = [0]
def _slow(im, fp, filename, *a, **k):  # simulates a slow disk: the N-th PNG is half written, then a long pause
    _n[0] += 1
    if _n[0] != int(os.environ.get("SLOW_AT", "0")):
        return _orig(im, fp, filename, *a, **k)
    buf = io.BytesIO()
    _orig(im, buf, filename, *a, **k)
    data = buf.getvalue()
    fp.write(data[: len(data) // 2]); fp.flush(); os.fsync(fp.fileno())
    Path(os.environ["SIGNAL_FILE"]).write_text("writing")
    time.sleep(120)
    fp.write(data[len(data) // 2:])
Image.SAVE["PNG"] = _slow
try:
    from diffbir_core.cli import main
except ImportError:
    from diffbir_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_cli(tmp_path, args, slow_at=0, env_extra=None, **popen):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = dict(
        os.environ,
        WT_ROOT=str(ROOT),
        SLOW_AT=str(slow_at),
        SIGNAL_FILE=str(tmp_path / "writing.flag"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        **(env_extra or {}),
    )
    return subprocess.Popen(
        [sys.executable, str(driver), *args],
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _batch(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _img(src / name)
    return src, tmp_path / "out"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_signal_during_a_write_leaves_no_invalid_output_and_rerun_completes(tmp_path, sig):
    src, out = _batch(tmp_path)
    args = [str(src), "-o", str(out), "--upscale", "1", "-q"]
    proc = _run_cli(tmp_path, args, slow_at=2)
    flag = tmp_path / "writing.flag"
    t0 = time.time()
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 300, "the CLI never reached the second write"
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    names = sorted(p.name for p in out.iterdir())
    visible = [n for n in names if not n.startswith(".")]
    # the finished image (and its parameter sidecar) is kept; b.png was being written and is absent
    assert visible == ["a.json", "a.png"], names
    assert _decodes(out / "a.png")
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "Traceback" not in err and "interrupted" in err
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
        assert names == visible  # the partial temporary file was removed
    else:
        assert proc.returncode == -signal.SIGKILL
    rerun = _run_cli(tmp_path, args)
    o, e = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, e
    assert "skipped 1" in o and "restored 2" in o
    names = sorted(p.name for p in out.iterdir())
    # and no stale temporary file of the killed run
    assert names == ["a.json", "a.png", "b.json", "b.png", "c.json", "c.png"]
    assert all(_decodes(out / n) for n in names if n.endswith(".png"))


def test_invalid_existing_output_is_made_again(tmp_path, capsys):
    src = _img(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    good = out / "ref.png"
    _img(good)
    (out / "a.png").write_bytes(good.read_bytes()[:40])  # what a killed non-atomic writer leaves
    rc = _cli_main()([str(src), "-o", str(out), "--upscale", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 0 and "does not decode" in captured.err
    assert _decodes(out / "a.png") and Image.open(out / "a.png").size == (12, 10)


# ------------------------------------------------------------------------------------ never write over an input
def test_output_folder_equal_to_input_folder_leaves_inputs_untouched(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    _img(src / "a.png")
    _img(src / "b.jpg", size=(9, 7))
    _img(src / "c.png", color=(1, 2, 3))
    before = _digests(src)
    main = _cli_main()
    assert main([str(src), "-o", str(src), "--overwrite", "--upscale", "1", "-q"]) == 2
    assert main([str(src / "*.png"), "-o", str(src), "--overwrite", "--upscale", "1", "-q"]) == 2
    assert "output folder" in capsys.readouterr().err
    # explicitly named inputs inside the output folder: the one whose output is itself is refused
    rc = main([str(src / "a.png"), "-o", str(src), "--overwrite", "--upscale", "1", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "never written over" in err
    assert _digests(src) == before


def test_output_through_a_symlink_to_an_input_is_refused(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").symlink_to(src / "a.png")
    before = _digests(src)
    rc = _cli_main()([str(src), "-o", str(out), "--overwrite", "--upscale", "1", "-q"])
    assert rc == 1 and "never written over" in capsys.readouterr().err
    assert _digests(src) == before


def test_same_stem_inputs_are_refused_naming_both(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "a.jpg")
    _img(src / "a.png", color=(9, 9, 9))
    _img(src / "b.png")
    other = tmp_path / "other"
    other.mkdir()
    _img(other / "b.png", color=(200, 0, 0))
    out = tmp_path / "out"
    rc = _cli_main()([str(src), str(other), "-o", str(out), "--upscale", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert str(src / "a.jpg") in captured.err and str(src / "a.png") in captured.err
    assert str(src / "b.png") in captured.err and str(other / "b.png") in captured.err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written under an ambiguous name
    from diffbir_core.batch import output_name, plan_outputs

    assert output_name("x/photo.jpg") == output_name("y/photo.png") == "photo.png"  # input's own name only
    plan = plan_outputs([src / "a.jpg", src / "b.png"], out)
    assert plan.jobs == [(src / "a.jpg", out / "a.png"), (src / "b.png", out / "b.png")] and not plan.refused


def test_two_symlink_loop_finishes_in_seconds(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    _img(d / "top.png")
    _img(d / "sub" / "deep.png")
    (d / "l1").symlink_to(d, target_is_directory=True)
    (d / "l2").symlink_to(d, target_is_directory=True)
    (d / "sub" / "back").symlink_to(d, target_is_directory=True)
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from diffbir_core.batch import collect_inputs\n"
        "import diffbir_core.imageio\n"  # (imports torch: not part of the timing)
        f"t = time.time(); f, p = collect_inputs([{str(d / '**' / '*.png')!r}, {str(d / '**')!r}, {str(d)!r}])\n"
        "print(sorted(x.name for x in f), time.time() - t)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    names, secs = res.stdout.rsplit("]", 1)
    assert names + "]" == "['deep.png', 'top.png']"
    assert float(secs) < 5.0


def test_collection_skips_output_folder_and_temp_files(tmp_path):
    from diffbir_core.batch import collect_inputs

    src = tmp_path / "in"
    (src / "restored").mkdir(parents=True)
    _img(src / "a.png")
    _img(src / "restored" / "a.png")
    _img(src / ".a.png.123-0123abcd.tmp.png")
    notices: list[str] = []
    files, problems = collect_inputs([str(src / "**" / "*.png")], exclude=src / "restored", notices=notices)
    assert files == [src / "a.png"] and not problems and "left out" in notices[0]
    assert collect_inputs([str(src)]) == ([src / "a.png"], [])  # the writer's temporary files are never inputs


# ------------------------------------------------------------------------------------ clear messages, no traceback
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--cfg-scale", "nan"),
        ("--guidance-scale", "inf"),
        ("--strength", "nan"),
        ("--max-memory", "nan"),
        ("--upscale", "inf"),
        ("--max-memory", "-1"),
    ],
)
def test_nan_inf_rejected_before_models_load(tmp_path, capsys, no_models, flag, value):
    src = _img(tmp_path / "a.png")
    rc = _cli_main()([str(src), "-o", str(tmp_path / "o"), flag, value, "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
        (dict(strength=float("inf")), "strength must be a finite number"),
        (dict(guidance__scale=float("nan")), "guidance.scale must be a finite number"),
        (dict(tiles__max_memory_gb=float("inf")), "tiles.max_memory_gb must be a finite number"),
        (dict(tiles__max_memory_gb=0.0), "max memory must be > 0"),
        (dict(tiles__cleaner_tile=0), "cleaner tile size"),
        (dict(tiles__cleaner_overlap=512), "cleaner overlap"),
        (dict(tiles__latent_tile=4), "latent tile size"),
        (dict(tiles__latent_stride=0), "latent stride"),
        (dict(tiles__latent_stride=65), "latent stride"),
        (dict(face__max_faces=0), "max_faces"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(cleaner="nope"), "unknown cleaner"),
    ],
)
def test_params_validate_rejects(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RestoreParams.from_preset("v2", **kw).validate()


def test_cleaner_names_agree_with_the_registry():
    from diffbir_core.cleaners import CLEANERS
    from diffbir_core.config import CLEANER_NAMES

    assert set(CLEANER_NAMES) == set(CLEANERS)
    assert RestoreParams.from_preset("v2", seed=2**63 - 1, cleaner="bicubic").validate().seed == 2**63 - 1


def test_output_is_a_file(tmp_path, capsys, no_models):
    src = _img(tmp_path / "a.png")
    target = tmp_path / "out.png"
    target.write_bytes(b"x")
    rc = _cli_main()([str(src), "-o", str(target), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert target.read_bytes() == b"x"


def test_unwritable_output_folder(tmp_path, capsys, no_models, monkeypatch):
    src = _img(tmp_path / "a.png")
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o500)
    else:  # root ignores permission bits: the kernel's answer for a read-only folder, at the OS call
        real_open = os.open

        def fake_open(path, flags, *a, **k):
            if os.path.dirname(os.path.abspath(os.fspath(path))) == str(out) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", fake_open)
    try:
        rc = _cli_main()([str(src), "-o", str(out), "-q"])
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write into the output folder" in err and "EACCES" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_full_disk_stops_with_a_summary(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for n in ("a.png", "b.png", "c.png"):
        _img(src / n)
    out = tmp_path / "out"
    calls = []
    real = Image.SAVE["PNG"]

    def full(im, fp, filename, *a, **k):
        calls.append(filename)
        buf = io.BytesIO()
        real(im, buf, filename, *a, **k)
        fp.write(buf.getvalue()[:20])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setitem(Image.SAVE, "PNG", full)
    rc = _cli_main()([str(src), "-o", str(out), "--upscale", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 1 and len(calls) == 1  # stopped at the first full write
    assert "No space left on device [ENOSPC]" in captured.err and "Traceback" not in captured.err
    assert "stopped early" in captured.out and "failed 1 of 3" in captured.out
    assert list(out.iterdir()) == []  # no partial file


def test_other_write_error_is_one_line_and_the_batch_goes_on(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for n in ("a.png", "b.png"):
        _img(src / n)
    out = tmp_path / "out"
    real = Image.SAVE["PNG"]
    calls = []

    def flaky(im, fp, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 1:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(im, fp, filename, *a, **k)

    monkeypatch.setitem(Image.SAVE, "PNG", flaky)
    rc = _cli_main()([str(src), "-o", str(out), "--upscale", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 1 and "restored 1" in captured.out and "failed 1" in captured.out
    assert "EACCES" in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["b.json", "b.png"]


@pytest.mark.parametrize(
    "device, msg", [("foo", "unknown device 'foo'"), ("cuda:x", "unknown device"), ("mps:0", "unknown device")]
)
def test_bad_device_one_line(tmp_path, capsys, no_models, device, msg):
    src = _img(tmp_path / "a.png")
    rc = _cli_main()([str(src), "-o", str(tmp_path / "o"), "--device", device, "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_check_device_against_this_machine(monkeypatch):
    from diffbir_core.batch import BatchError, check_device

    assert check_device("cpu") == "cpu" and check_device(" CPU ") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") in ("cpu", "mps")
    with pytest.raises(BatchError, match="CUDA is not available"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == "cuda:0" and check_device("auto") == "cuda"
    with pytest.raises(BatchError, match="1 CUDA device"):
        check_device("cuda:3")


# ------------------------------------------------------------------------------------ the atomic writer
def test_atomic_writer_keeps_the_old_file_on_interruption(tmp_path, monkeypatch):
    from diffbir_core import atomic

    dest = tmp_path / "x.png"
    save_image(dest, np.full((4, 5, 3), 0.5, np.float32))
    old = dest.read_bytes()

    def interrupted(im, fp, filename, *a, **k):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setitem(Image.SAVE, "PNG", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(dest, np.zeros((4, 5, 3), np.float32))
    assert dest.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    with pytest.raises(ValueError):
        with atomic.atomic_open(tmp_path / "t.txt", "w") as f:
            f.write("half")
            raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    assert atomic.write_text(tmp_path / "t.txt", "whole").read_text() == "whole"


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    from diffbir_core import atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".a.png.{pid}-0123abcd.tmp.png"
    live = tmp_path / f".b.png.{os.getpid()}-0123abcd.tmp.png"
    other = tmp_path / ".hidden_user_file.png"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert atomic.is_temp_name(stale.name) and not atomic.is_temp_name(other.name)
    assert atomic.remove_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_safetensors_cache_is_written_atomically(tmp_path, monkeypatch):
    import safetensors.torch as st

    dest = tmp_path / "w.safetensors"
    W.save_safetensors({"a": torch.ones(3)}, dest)
    old = dest.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        W.save_safetensors({"a": torch.zeros(3)}, dest)
    assert dest.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ------------------------------------------------------------------------------------ checkpoints
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_payload_checkpoint_refused_and_marker_never_appears(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pth"
    sd = {"w": torch.arange(4.0)}
    torch.save({"state_dict": sd, "extra": _Payload(marker)}, p)
    monkeypatch.delenv(W.TRUSTED_ENV, raising=False)
    with pytest.raises(W.UnsafeCheckpointError, match=r"posix\.system|os\.system") as ei:
        W.load_state_dict(p)
    assert "trusted" in str(ei.value)
    assert not marker.exists()
    got = W.load_state_dict(p, trusted=True)  # opt-in: tensors read, the payload is an inert stub
    assert torch.equal(got["w"], sd["w"]) and not marker.exists()
    monkeypatch.setenv(W.TRUSTED_ENV, "1")
    assert set(W.load_state_dict(p)) == {"w"} and not marker.exists()


_BUILD_TARGETS = [("torch._utils", "_rebuild_tensor_v2"), ("collections", "Counter")]  # allowed, no __setstate__


def _splice_build_payload(tmp_path) -> Path:
    """A real torch zip checkpoint whose data.pkl is {"state_dict": <tensors>, "evil0"/"evil1": <BUILD with slot
    state {"diffbir_pwned": True} on an allowed global: a torch function, a class>, "foreign": <a
    non-allowlisted global>}. A BUILD that runs would setattr on those objects process-wide."""
    src = tmp_path / "plain.pth"
    torch.save({"w": torch.arange(3.0)}, src)
    with zipfile.ZipFile(src) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in entries if n.endswith("/data.pkl"))
    body = entries[pkl_name]
    assert body[:2] == b"\x80\x02" and body[-1:] == b"."
    body = body[2:-1]  # the state dict expression, memo indices untouched (the prefix below uses no memo)

    def u(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    evil = b""
    for k, (mod, name) in enumerate(_BUILD_TARGETS):  # GLOBAL, None, {k: True}, TUPLE2 (state, slotstate), BUILD
        evil += (
            u(f"evil{k}")
            + f"c{mod}\n{name}\n".encode()
            + b"N"
            + b"}"
            + u("diffbir_pwned")
            + b"\x88"
            + b"s"
            + b"\x86"
            + b"b"
        )
    foreign = u("foreign") + b"c__main__\nForeignThing\n" + b")" + b"R"
    entries[pkl_name] = b"\x80\x02}(" + u("state_dict") + body + evil + foreign + b"u."
    dst = tmp_path / "build.pth"
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
    return dst


def _build_targets():
    import collections
    import importlib

    return [getattr(importlib.import_module(m), n) for m, n in _BUILD_TARGETS] + [collections.Counter]


def test_build_on_allowed_globals_never_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(W.TRUSTED_ENV, raising=False)
    p = _splice_build_payload(tmp_path)
    try:
        with pytest.raises(W.UnsafeCheckpointError, match="ForeignThing"):
            W.load_state_dict(p)
        got = W.load_state_dict(p, trusted=True)
        assert torch.equal(got["w"], torch.arange(3.0))
        for obj in _build_targets():  # the BUILDs did not patch torch or the standard library
            assert not hasattr(obj, "diffbir_pwned"), obj
    finally:
        for obj in _build_targets():
            if hasattr(obj, "diffbir_pwned"):
                delattr(obj, "diffbir_pwned")


def test_wrong_checksum_refused_and_verification_cached(tmp_path, monkeypatch):
    f = tmp_path / "tiny.pth"
    f.write_bytes(b"tiny weights")
    good = hashlib.sha256(b"tiny weights").hexdigest()  # independent source
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFBIR_CACHE", str(cache))
    calls = []
    real = W.sha256_file
    monkeypatch.setattr(W, "sha256_file", lambda p: calls.append(p) or real(p))
    W.verify_sha256(f, good)
    W.verify_sha256(f, good.upper())
    assert len(calls) == 1 and (cache / "verified_sha256.json").is_file()  # hashed on first use only
    spec = W.WeightSpec("tiny", "tiny.pth", "a tiny test file", sha256=good)
    assert W.resolve_spec(spec, dirs=[tmp_path]) == f
    bad = W.WeightSpec("tiny", "tiny.pth", "a tiny test file", sha256="0" * 64)
    with pytest.raises(W.WeightsError) as ei:
        W.resolve_spec(bad, dirs=[tmp_path])
    assert "0" * 64 in str(ei.value) and good in str(ei.value) and "expected" in str(ei.value)
    f.write_bytes(b"tiny weightz")  # same size, new content (and mtime): hashed again, refused
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(W.WeightsError, match=hashlib.sha256(b"tiny weightz").hexdigest()):
        W.resolve_spec(spec, dirs=[tmp_path])
    assert len(calls) == 2  # the mismatch check reused the cached digest; the changed file was hashed again


# ------------------------------------------------------------------------------------ reading
def test_float_tiff_ranges(tmp_path):
    import tifffile

    vals = np.linspace(0, 255, 30, dtype=np.float32).reshape(5, 6)
    p = tmp_path / "gray255.tif"
    Image.fromarray(vals, "F").save(p)  # Pillow mode F: a float TIFF holding 0-255
    img = read_image(p)
    np.testing.assert_allclose(img.rgb[..., 0], vals / 255.0, atol=1e-6)
    assert any("0-255" in n for n in img.notices)
    rgb = np.random.default_rng(0).uniform(0, 255, (4, 7, 3)).astype(np.float32)
    p2 = tmp_path / "rgb255.tif"
    tifffile.imwrite(p2, rgb, photometric="rgb")
    np.testing.assert_allclose(read_image(p2).rgb, rgb / 255.0, atol=1e-6)
    unit = rgb / 255.0
    p3 = tmp_path / "rgb1.tif"
    tifffile.imwrite(p3, unit, photometric="rgb")
    np.testing.assert_allclose(read_image(p3).rgb, unit, atol=1e-6)
    deep = (np.random.default_rng(1).integers(0, 65535, (4, 7, 3))).astype(np.uint16)
    p4 = tmp_path / "rgb16.tif"
    tifffile.imwrite(p4, deep, photometric="rgb")
    np.testing.assert_allclose(read_image(p4).rgb, deep / 65535.0, atol=1e-6)
    hdr = tmp_path / "hdr.tif"
    tifffile.imwrite(hdr, rgb * 1000, photometric="rgb")
    with pytest.raises(ImageReadError, match="beyond"):
        read_image(hdr)
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((3, 3), np.nan, np.float32), "F").save(nan)
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(nan)


def _png_with_exif(png: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = exif.tobytes()[6:]  # PNG eXIf holds the TIFF structure without the "Exif\0\0" prefix
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    return png[:33] + chunk + png[33:]  # right after IHDR


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_on_16bit_png(tmp_path, orientation):
    import cv2

    rgb16 = np.random.default_rng(orientation).integers(0, 65535, (5, 8, 3), dtype=np.uint16)
    _, enc = cv2.imencode(".png", rgb16[..., ::-1])
    p = tmp_path / "deep.png"
    p.write_bytes(_png_with_exif(enc.tobytes(), orientation))
    assert Image.open(p).getexif().get(0x0112) == orientation
    img = read_image(p)
    assert img.bit_depth == 16
    exif = Image.Exif()
    exif[0x0112] = orientation
    for c in range(3):  # Pillow's own exif_transpose on each 16-bit channel is the known answer
        ch = Image.fromarray(rgb16[..., c])
        ch.info["exif"] = exif.tobytes()
        want = np.asarray(ImageOps.exif_transpose(ch), dtype=np.float64) / 65535.0
        np.testing.assert_allclose(img.rgb[..., c], want, atol=1e-6)
    gray = (rgb16[..., 0]).copy()  # 16-bit grayscale goes through Pillow: also oriented
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    g = tmp_path / "g16.png"
    g.write_bytes(_png_with_exif(buf.getvalue(), orientation))
    ch = Image.fromarray(gray)
    ch.info["exif"] = exif.tobytes()
    np.testing.assert_allclose(read_image(g).rgb[..., 0], np.asarray(ImageOps.exif_transpose(ch)) / 65535.0, atol=1e-6)


def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    def ihdr_png(w, h):
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c" + b"\x00" * 64)

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    big = tmp_path / "bomb.png"
    big.write_bytes(ihdr_png(12000, 12001))  # just over MAX_PIXELS, under Pillow's own refusal
    with pytest.raises(ImageReadError, match="pixel limit"):
        read_image(big)
    huge = tmp_path / "huge.png"
    huge.write_bytes(ihdr_png(50000, 50000))  # Pillow itself refuses at open
    with pytest.raises(ImageReadError, match="pixel limit"):
        read_image(huge)
    small = tmp_path / "s.png"
    small.write_bytes(ihdr_png(20, 20))
    with pytest.raises(ImageReadError, match="pixel limit"):
        read_image(small, max_pixels=100)


def test_animated_gif_gets_a_frame_notice(tmp_path):
    frames = [Image.fromarray(np.full((6, 7, 3), v, np.uint8)) for v in (10, 128, 250)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = read_image(p)
    assert any("3 frames" in n and "frame 1" in n for n in img.notices)
    with Image.open(p) as first:  # Pillow's own frame 0 is the known answer
        np.testing.assert_allclose(img.rgb, np.asarray(first.convert("RGB"), np.float32) / 255.0, atol=1e-6)


def test_trust_checkpoints_flag_is_the_explicit_opt_in(tmp_path, monkeypatch, no_models, capsys):
    monkeypatch.setenv(W.TRUSTED_ENV, "0")
    assert not W.trusted_checkpoints()
    src = _img(tmp_path / "a.png")
    assert _cli_main()([str(src), "-o", str(tmp_path / "o"), "--trust-checkpoints", "--device", "foo", "-q"]) == 2
    assert W.trusted_checkpoints()
