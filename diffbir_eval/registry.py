"""Dataset registry: where each test set comes from, how many files it has, and their sha256 checksums.

One `SetRecord` per set of the paper's evaluation (paper arXiv 2308.15070, "Evaluation": RealSRSet, Real47, Set5,
CelebA-Test,
LFW-Test, CelebChild-Test, WIDER-Test) and of the modern SR protocol (StableSR's RealSR, DRealSR and DIV2K-val
crops, 128 -> 512, as used by OSEDiff's ``test_metrics.py``). For the sets we have, ``diffbir_eval/assets/checksums/
NAME.tsv`` lists every file (path relative to the set's folder, bytes, sha256) - made by `checksum_list` from
the shared test data (RealSRSet, Real47, Set5; identical to the upstream repositories' files) and from the OSEDiff
repository's copy of StableSR's RealSR / DRealSR crops (``preset/datasets/benchmark_*/test_{LR,HR}``).
For the others the count comes from the primary source named in ``count_source`` and the checksums are
unknown (`SetRecord.checksums` is None).

`check(name, folder)` verifies a local copy (count, names, sha256); `fetch(name, dest)` downloads the files
that are directly downloadable (GitHub raw files at a pinned commit) and verifies them; the CLI is
``python -m diffbir_eval.data``. The folder layout is the one `diffbir_eval.datasets.open_dataset` reads.
"""

from __future__ import annotations

import csv
import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from diffbir_core.atomic import atomic_open, write_bytes

__all__ = [
    "REGISTRY",
    "CheckReport",
    "DataError",
    "GitHubFiles",
    "SetRecord",
    "check",
    "checksum_list",
    "fetch",
    "load_checksums",
    "markdown_table",
    "sha256_file",
    "write_checksums",
]

CHECKSUMS = Path(__file__).resolve().parent / "assets" / "checksums"


class DataError(RuntimeError):
    """A set is unknown, incomplete, corrupted, or cannot be downloaded (the message says what to do)."""


@dataclass(frozen=True)
class GitHubFiles:
    """Files downloadable one by one from a GitHub repository at a pinned commit.

    ``folders`` maps the set's local sub-folder ("" = the set folder itself) to the folder in the repository."""

    repo: str
    commit: str
    folders: dict[str, str]

    def url(self, rel: str) -> str:
        sub, _, name = rel.rpartition("/")
        if sub not in self.folders:
            raise DataError(f"{rel}: no repository folder for local folder {sub!r}")
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.folders[sub]}/{name}"


@dataclass(frozen=True)
class SetRecord:
    """A test set: provenance, size and (where we have the files) checksums."""

    name: str  # = diffbir_eval.datasets.DATASETS key
    title: str
    url: str  # where a user gets it
    paper: str
    licence: str
    count: int | None  # files in the set's folder (LQ + GT), None: unknown
    count_source: str  # where the count comes from
    layout: str  # what the folder holds
    download: GitHubFiles | None = None  # None: not directly downloadable (say how in `how_to_get`)
    how_to_get: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def checksum_file(self) -> Path:
        return CHECKSUMS / f"{self.name}.tsv"

    @property
    def checksums(self) -> list[tuple[str, int, str]] | None:
        return load_checksums(self.checksum_file) if self.checksum_file.is_file() else None

    @property
    def total_bytes(self) -> int | None:
        c = self.checksums
        return None if c is None else sum(b for _, b, _ in c)


_GFPGAN = "https://xinntao.github.io/projects/gfpgan (GFPGAN, Wang et al. CVPR 2021: test data links)"
_STABLESR = "https://huggingface.co/datasets/Iceclear/StableSR-TestSets (StableSR, Wang et al. IJCV 2024)"

REGISTRY: dict[str, SetRecord] = {
    r.name: r
    for r in [
        SetRecord(
            "realsrset",
            "RealSRSet",
            "https://github.com/cszn/BSRGAN/tree/master/testsets/RealSRSet",
            "Zhang et al., Designing a Practical Degradation Model for Deep Blind Image Super-Resolution (BSRGAN), "
            "ICCV 2021",
            "Apache-2.0 (BSRGAN repository)",
            20,
            "files in cszn/BSRGAN@5ce1a9c testsets/RealSRSet",
            "20 real low-quality images (no GT), *.png",
            GitHubFiles("cszn/BSRGAN", "5ce1a9c6ae292f30ccfce4b597ecb73c70401733", {"": "testsets/RealSRSet"}),
        ),
        SetRecord(
            "real47",
            "Real47",
            "https://github.com/XPixelGroup/DiffBIR/tree/main/inputs/real47",
            "Lin et al., DiffBIR (arXiv 2308.15070)",
            "Apache-2.0 (DiffBIR repository)",
            47,
            "files in XPixelGroup/DiffBIR@3f8b530 inputs/real47",
            "47 real low-quality photos (no GT), *.jpg",
            GitHubFiles("XPixelGroup/DiffBIR", "3f8b5304245ba0ffd6f1995e51c27c3c72d7618f", {"": "inputs/real47"}),
        ),
        SetRecord(
            "set5",
            "Set5 (x4, bicubic LR)",
            "https://github.com/JingyunLiang/SwinIR/tree/main/testsets/Set5",
            "Bevilacqua et al., BMVC 2012",
            "images: research use (original authors); copy in the Apache-2.0 SwinIR repository",
            10,
            "files in JingyunLiang/SwinIR@6545850 testsets/Set5/{HR,LR_bicubic/X4}",
            "HR/*.png (5) and LR_bicubic/X4/*x4.png (5)",
            GitHubFiles(
                "JingyunLiang/SwinIR",
                "6545850fbf8df298df73d81f3e8cba638787c8bd",
                {"HR": "testsets/Set5/HR", "LR_bicubic/X4": "testsets/Set5/LR_bicubic/X4"},
            ),
        ),
        SetRecord(
            "celeba_test",
            "CelebA-Test",
            _GFPGAN,
            "Wang et al., GFPGAN, CVPR 2021 (from CelebA-HQ, Karras et al.)",
            "CelebA licence: non-commercial research only",
            6000,
            "GFPGAN paper (test data: 3,000 synthetic LQ/GT pairs = 6,000 files); not verified against files here",
            "celeba_512_validation_lq/ and celeba_512_validation/ (512x512)",
            how_to_get="download CelebA-Test from the GFPGAN project page (Google Drive) and unpack it into DIR",
        ),
        SetRecord(
            "lfw_test",
            "LFW-Test",
            _GFPGAN,
            "Wang et al., GFPGAN, CVPR 2021 (from LFW, Huang et al. 2007)",
            "LFW: research use",
            1711,
            "GFPGAN paper (test data: 1,711 real faces); not verified here",
            "1,711 aligned 512x512 faces",
            how_to_get="download LFW-Test from the GFPGAN project page (Google Drive) and unpack it into DIR",
        ),
        SetRecord(
            "celebchild_test",
            "CelebChild-Test",
            _GFPGAN,
            "Wang et al., GFPGAN, CVPR 2021",
            "research use (images from the internet)",
            180,
            "GFPGAN paper (test data: 180 child faces); not verified here",
            "180 aligned 512x512 faces",
            how_to_get="download CelebChild-Test from the GFPGAN project page (Google Drive) and unpack it into DIR",
        ),
        SetRecord(
            "wider_test",
            "WIDER-Test",
            "https://github.com/sczhou/CodeFormer (README: test data)",
            "Zhou et al., CodeFormer, NeurIPS 2022 (from WIDER Face, Yang et al. 2016)",
            "WIDER Face: non-commercial research",
            970,
            "CodeFormer paper (WIDER-Test: 970 faces); not verified here",
            "970 aligned 512x512 faces",
            how_to_get="download WIDER-Test from the CodeFormer README's test-data link and unpack it into DIR",
        ),
        SetRecord(
            "realsr",
            "RealSR (StableSR crops, 128 -> 512)",
            _STABLESR,
            "Cai et al., Toward Real-World Single Image Super-Resolution (RealSR v3), ICCV 2019; crops by StableSR",
            "research use (RealSR); copy in the Apache-2.0 OSEDiff repository",
            200,
            "files in cswry/OSEDiff@fcc4f09 preset/datasets/benchmark_realsr/test_{LR,HR} (100 pairs; OSEDiff's "
            "log: '100 GT images vs 100 SR images')",
            "test_LR/*.png (128x128) and test_HR/*.png (512x512), same names",
            GitHubFiles(
                "cswry/OSEDiff",
                "fcc4f09c7ed66a9bc0ba9433940d76b343142426",
                {
                    "test_LR": "preset/datasets/benchmark_realsr/test_LR",
                    "test_HR": "preset/datasets/benchmark_realsr/test_HR",
                },
            ),
            notes=("OSEDiff README: 'These benchmarks were directly copied from StableSR'",),
        ),
        SetRecord(
            "drealsr",
            "DRealSR (StableSR crops, 128 -> 512)",
            _STABLESR,
            "Wei et al., Component Divide-and-Conquer for Real-World Image Super-Resolution (DRealSR), ECCV 2020; "
            "crops by StableSR",
            "research use (DRealSR); copy in the Apache-2.0 OSEDiff repository",
            186,
            "files in cswry/OSEDiff@fcc4f09 preset/datasets/benchmark_drealsr/test_{LR,HR} (93 pairs; OSEDiff's "
            "log: '93 GT images vs 93 SR images')",
            "test_LR/*.png (128x128) and test_HR/*.png (512x512), same names",
            GitHubFiles(
                "cswry/OSEDiff",
                "fcc4f09c7ed66a9bc0ba9433940d76b343142426",
                {
                    "test_LR": "preset/datasets/benchmark_drealsr/test_LR",
                    "test_HR": "preset/datasets/benchmark_drealsr/test_HR",
                },
            ),
            notes=("OSEDiff README: 'These benchmarks were directly copied from StableSR'",),
        ),
        SetRecord(
            "div2k_val",
            "DIV2K-val (StableSR crops, 128 -> 512)",
            _STABLESR,
            "Agustsson & Timofte, NTIRE 2017 (DIV2K); 512x512 crops degraded with the Real-ESRGAN pipeline by StableSR",
            "DIV2K: research use",
            None,
            "unknown here: count the files of the StableSR-TestSets download",
            "LQ 128x128 / GT 512x512 pairs, same names",
            how_to_get="download the DIV2K validation crops from the StableSR-TestSets Hugging Face dataset "
            "(or OSEDiff's Google Drive link in its README) and unpack them into DIR",
        ),
    ]
}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
    )


def checksum_list(folder: str | os.PathLike, only: list[str] | None = None) -> list[tuple[str, int, str]]:
    """[(relative path, bytes, sha256)] of every file under ``folder`` (or of the paths in ``only``)."""
    folder = Path(folder)
    rels = only if only is not None else _files(folder)
    return [(r, (folder / r).stat().st_size, sha256_file(folder / r)) for r in rels]


def write_checksums(path: str | os.PathLike, rows: list[tuple[str, int, str]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(p, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["path", "bytes", "sha256"])
        w.writerows(rows)
    return p


def load_checksums(path: str | os.PathLike) -> list[tuple[str, int, str]]:
    with open(path, newline="") as f:
        r = csv.reader(f, delimiter="\t")
        head = next(r)
        if head != ["path", "bytes", "sha256"]:
            raise DataError(f"{path}: not a checksum list (header {head})")
        return [(p, int(b), s) for p, b, s in r]


def _record(name: str) -> SetRecord:
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        raise DataError(f"unknown set {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key]


@dataclass
class CheckReport:
    """What `check` found in a local copy."""

    name: str
    folder: Path
    expected_count: int | None
    found: list[str]
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    bad_sha: list[str] = field(default_factory=list)
    checksums_known: bool = False

    @property
    def ok(self) -> bool:
        count_ok = self.expected_count is None or len(self.found) == self.expected_count
        return count_ok and not (self.missing or self.extra or self.bad_sha)

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {len(self.found)} files in {self.folder}"
            + (f" (expected {self.expected_count})" if self.expected_count is not None else " (count unknown)")
        ]
        for what, items in (
            ("missing", self.missing),
            ("not in the list", self.extra),
            ("sha256 differs", self.bad_sha),
        ):
            if items:
                lines.append(f"  {len(items)} {what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        if not self.checksums_known:
            lines.append("  checksums unknown for this set: only the file count was checked")
        lines.append("  OK" if self.ok else "  NOT OK")
        return "\n".join(lines)


def check(name: str, folder: str | os.PathLike) -> CheckReport:
    """Verify a local copy: file count, names and sha256 (where the checksum list is known)."""
    rec = _record(name)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{rec.title}: {folder} is not a folder. Get the set from {rec.url}")
    found = _files(folder)
    sums = rec.checksums
    rep = CheckReport(rec.name, folder, rec.count, found, checksums_known=sums is not None)
    if sums is not None:
        want = {p: (b, s) for p, b, s in sums}
        rep.missing = sorted(set(want) - set(found))
        rep.extra = sorted(set(found) - set(want))
        for p in sorted(set(want) & set(found)):
            b, s = want[p]
            if (folder / p).stat().st_size != b or sha256_file(folder / p) != s:
                rep.bad_sha.append(p)
    return rep


def fetch(name: str, dest: str | os.PathLike, *, timeout: float = 30.0) -> CheckReport:
    """Download a directly downloadable set into ``dest`` (verified file by file), then `check` it.

    Sets without a direct download raise `DataError` saying exactly where to get them; a network failure raises
    `DataError` naming the first URL that failed and how to finish by hand."""
    rec = _record(name)
    dest = Path(dest)
    sums = rec.checksums
    if rec.download is None or sums is None:
        raise DataError(
            f"{rec.title} cannot be downloaded directly: {rec.how_to_get or 'get it from ' + rec.url}.\n"
            f"  Source: {rec.url}\n  Then verify it with: python -m diffbir_eval.data check {rec.name} DIR"
        )
    done = 0
    for rel, size, sha in sums:
        target = dest / rel
        if target.is_file() and target.stat().st_size == size and sha256_file(target) == sha:
            done += 1
            continue
        url = rec.download.url(rel)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = r.read()
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(
                f"{rec.title}: download failed at {url} ({type(e).__name__}: {e}); {done}/{len(sums)} files are in "
                f"{dest}.\n  With internet, run the same command again (it resumes), or download the files of "
                f"{rec.url} by hand into {dest} keeping the layout {rec.layout!r}, then run: "
                f"python -m diffbir_eval.data check {rec.name} {dest}"
            ) from e
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise DataError(
                f"{url}: got {len(data)} bytes with another sha256 than the registry's "
                f"({rec.checksum_file.name}); the upstream file changed - not written"
            )
        write_bytes(target, data)
        done += 1
    return check(rec.name, dest)


def markdown_table() -> str:
    """The registry as a Markdown table (``python -m diffbir_eval.data list``)."""
    rows = ["| name | set | files | size | checksums | source | licence |", "|---|---|---|---|---|---|---|"]
    for r in REGISTRY.values():
        size = f"{r.total_bytes / 1e6:.1f} MB" if r.total_bytes is not None else "unknown"
        sums = f"diffbir_eval/assets/checksums/{r.name}.tsv" if r.checksums is not None else "unknown"
        dl = " (fetch: yes)" if r.download and r.checksums is not None else ""
        rows.append(
            f"| `{r.name}` | {r.title} | {r.count if r.count is not None else 'unknown'} ({r.count_source}) | "
            f"{size} | {sums}{dl} | {r.url}; {r.paper} | {r.licence} |"
        )
    return "\n".join(rows)
