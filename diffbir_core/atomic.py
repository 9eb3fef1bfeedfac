"""The one atomic writer: every file the project writes appears complete or not at all.

`atomic_path(dest)` yields a temporary path in the destination's own folder (same file system, so the
final `os.replace` is atomic); the caller's writer (PIL, safetensors, torch.save, savefig, ...) writes
there; on success the data are flushed and fsync'ed, the temporary file replaces ``dest`` and the folder
entry is fsync'ed. On any exception - KeyboardInterrupt included - the temporary file is removed and
``dest`` is left as it was. A hard kill (SIGKILL, power loss) can leave a temporary file behind, never
a half-written ``dest``: temporary names are hidden (``.NAME.<pid>-<token>.tmp<suffix>``) and
`remove_stale_temps` deletes those whose writing process is gone. No official counterpart (the official
scripts write with ``Image.save`` / ``torch.save`` directly).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_path",
    "atomic_open",
    "write_bytes",
    "write_text",
    "is_temp_name",
    "remove_stale_temps",
    "probe_writable",
]

# .<name>.<pid>-<8 hex>.tmp<suffix>; the suffix repeats the destination's so writers that pick a format
# from the extension (PIL, matplotlib) still see ".png".
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<token>[0-9a-f]{8})\.tmp(?P<suffix>\.[^.]*)?$")


def _temp_name(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{dest.suffix}"


def is_temp_name(name: str) -> bool:
    """True for names made by this module (input collection skips them)."""
    return _TEMP_RE.match(name) is not None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; write there. On normal exit it atomically becomes ``dest``.

    The temporary file already exists (empty, created exclusively with the process umask), so a writer that
    opens it with "w"/"wb" truncates it; on any exception it is removed and the exception propagates.
    """
    dest = Path(dest)
    folder = dest.parent
    if mkdir:
        folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / _temp_name(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``open(dest, mode)`` that writes atomically (mode "w"/"wb"/"wt"; ``kwargs`` go to `open`)."""
    if not mode.startswith("w") or "+" in mode:
        raise ValueError(f"atomic_open writes whole files: mode must be 'w', 'wb' or 'wt', got {mode!r}")
    with atomic_path(dest) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    """Atomic `Path.write_bytes`."""
    with atomic_open(dest, "wb") as f:
        f.write(data)
    return Path(dest)


def write_text(dest: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomic `Path.write_text` (UTF-8 by default)."""
    with atomic_open(dest, "w", encoding=encoding) as f:
        f.write(text)
    return Path(dest)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete this module's temporary files in ``folder`` whose writing process no longer runs
    (left by a hard kill). Files of live writers, and anything not named by this module, are kept."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None or not e.is_file(follow_symlinks=False):
            continue
        if not _pid_alive(int(m.group("pid"))):
            p = Path(e.path)
            _remove_quietly(p)
            removed.append(p)
    return removed


def probe_writable(folder: str | os.PathLike) -> None:
    """Create, write, fsync and delete a small file in ``folder``; raises the OSError that a real write would
    meet (EACCES, EROFS, ENOSPC, ...)."""
    folder = Path(folder)
    probe = folder / f".diffbir-write-probe.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        n = os.write(fd, b"diffbir write probe\n")
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(probe))
        os.fsync(fd)
    finally:
        os.close(fd)
        _remove_quietly(probe)
