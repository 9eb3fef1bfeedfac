"""Captioners: describe the raw LQ image in words that become part of the positive prompt (DiffBIR v2 / v2.1).

Mirrors official HEAD ``diffbir/utils/caption.py`` (EmptyCaptioner :49, LLaVACaptioner :55-149, RAMCaptioner
:152-171), chosen by ``--captioner none|llava|ram`` (inference.py:165-171, official default ``llava``) and
``--llava_bit 16|8|4`` (inference.py:285, default ``4``); ``diffbir/inference/loop.py:119-129`` builds one and
:165-169 captions the *raw* LQ image (before any cleaner) and joins ``caption, pos_prompt`` with ", ".

LLaVA runs through ``transformers`` (``LlavaForConditionalGeneration`` + the folder's tokenizer and image
processor; the ``llava-hf/llava-1.5-7b-hf`` port of ``liuhaotian/llava-v1.5-7b``) but builds inputs the official way:
the ``llava_v1`` conversation (llava/conversation.py:325-335, picked at caption.py:105), ``<image>`` before
the question (caption.py:96-97), the image padded to a square with the processor's mean colour
(llava/mm_utils.py:152-182, ``image_aspect_ratio="pad"``), the prompt tokenised in chunks around ``<image>``
(mm_utils.py:185-204), greedy decoding with at most 512 new tokens (caption.py:117-146), 4/8-bit like
llava/model/builder.py:32-43. RAM++ needs the ``ram`` package from GitHub (not on PyPI).
Default per device: ``llava`` on CUDA (official), ``none`` elsewhere (a 7B model on a few CPU cores takes
minutes per image); see `default_captioner`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .weights import Source, WeightsError, WeightSpec, offline, resolve_spec

log = logging.getLogger(__name__)

__all__ = [
    "CAPTIONERS",
    "DEFAULT_LLAVA_BIT",
    "LLAVA_BITS",
    "LLAVA_MAX_NEW_TOKENS",
    "LLAVA_QUESTION",
    "LLAVA_SPEC",
    "RAM_PLUS_SPEC",
    "Captioner",
    "CaptionerError",
    "LLaVACaptioner",
    "NoCaptioner",
    "RAMCaptioner",
    "default_captioner",
    "llava_v1_prompt",
    "make_captioner",
    "resolve_model_dir",
    "to_uint8_rgb",
]

CAPTIONERS = ("none", "llava", "ram")  # inference.py:168
LLAVA_BITS = ("16", "8", "4")  # inference.py:285
DEFAULT_LLAVA_BIT = "4"  # inference.py:285
LLAVA_QUESTION = "Please give me a very short description of this image."  # caption.py:84
LLAVA_MAX_NEW_TOKENS = 512  # caption.py:120
# conv_llava_v1 (llava/conversation.py:325-335): system, roles USER/ASSISTANT, SeparatorStyle.TWO with sep " ".
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"  # llava/constants.py DEFAULT_IMAGE_TOKEN
RAM_IMAGE_SIZE = 384  # caption.py:156

_GB = 1024**3
LLAVA_SPEC = WeightSpec(
    "llava_1.5_7b",
    "llava-1.5-7b-hf",
    "LLaVA-1.5-7B captioner (transformers port of liuhaotian/llava-v1.5-7b)",
    (Source(repo_id="llava-hf/llava-1.5-7b-hf"),),
    approx_bytes=14 * _GB,
    notes="a model folder (config.json, tokenizer, processor and safetensors shards, about 14 GB)",
)
RAM_PLUS_SPEC = WeightSpec(
    "ram_plus_swin_large",
    "ram_plus_swin_large_14m.pth",
    "RAM++ Swin-L tagger (recognize-anything)",
    (Source(repo_id="xinyu1205/recognize-anything-plus-model"),),
    approx_bytes=3 * _GB,
)
_RAM_INSTALL = (
    "The RAM++ captioner needs the `ram` package of recognize-anything, which is not on PyPI. Install it from "
    "GitHub:\n    pip install git+https://github.com/xinyu1205/recognize-anything.git\n"
    "It also needs the weights ram_plus_swin_large_14m.pth (huggingface.co/xinyu1205/recognize-anything-plus-model) "
    "and the bert-base-uncased tokenizer in the Hugging Face cache. Or use --captioner llava / --captioner none."
)


class CaptionerError(RuntimeError):
    """A captioner cannot run here: a missing package, an unsupported option, or bad input."""


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns an RGB image (HxWx3, float in [0, 1] or uint8) into a caption string."""

    def __call__(self, image: np.ndarray) -> str: ...


def to_uint8_rgb(image: Any) -> np.ndarray:
    """HxWx3 uint8 from uint8, float in [0, 1] (as `imageio.read_image` gives) or a PIL image; else ValueError."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image, as the official loop passes
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"a captioner takes an HxWx3 RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"a captioner takes uint8 or float images in [0, 1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("the image has NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"a float image must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)  # exact inverse of read_image's /255


def _device_type(device: Any) -> str:
    return str(device).split(":")[0]


class NoCaptioner:
    """``--captioner none``: the empty caption (official EmptyCaptioner, caption.py:49-52)."""

    name = "none"

    def __call__(self, image: np.ndarray) -> str:
        to_uint8_rgb(image)  # same input contract as the others
        return ""

    def __repr__(self) -> str:
        return "NoCaptioner()"


# ----------------------------------------------------------------------------------------------
# LLaVA


def llava_v1_prompt(question: str = LLAVA_QUESTION) -> str:
    """The official prompt: ``<image>\\n`` + question (caption.py:96-97) in conv ``llava_v1`` (caption.py:105,
    112-115): ``system + " " + "USER: " + msg + " " + "ASSISTANT:"`` (SeparatorStyle.TWO, conversation.py:54-64)."""
    return f"{LLAVA_V1_SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def resolve_model_dir(
    spec: WeightSpec,
    *,
    path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """A Hugging Face model *folder* for ``spec``, searched like `weights.resolve` searches files: explicit
    ``path`` -> ``<weights_dir>/<spec.filename>`` and ``$DIFFBIR_WEIGHTS_DIR/<spec.filename>`` -> the Hugging
    Face cache -> download (never when ``HF_HUB_OFFLINE=1``). A folder counts when it holds ``config.json``.
    Raises `WeightsError` naming the folder, every place looked at and how to get it."""
    repo = next(s.repo_id for s in spec.sources if s.repo_id)
    how_to = (
        f"How to get it: download the model folder huggingface.co/{repo} (~{(spec.approx_bytes or 0) // _GB} GB):\n"
        f"    hf download {repo} --local-dir $DIFFBIR_WEIGHTS_DIR/{spec.filename}\n"
        f"  (or pass --weights-dir DIR holding {spec.filename}/, or an explicit folder path).\n"
        "  With internet, unset HF_HUB_OFFLINE and it downloads on first use; set HF_ENDPOINT to use a mirror.\n"
        "  Or restore without a caption: --captioner none."
    )
    if path is not None:
        p = Path(path).expanduser()
        if (p / "config.json").is_file():
            return p
        raise WeightsError(f"{spec.description}: the given folder {p} does not exist or has no config.json.\n{how_to}")
    looked: list[str] = []
    for d in (weights_dir, os.environ.get("DIFFBIR_WEIGHTS_DIR")):
        if not d:
            continue
        p = Path(d).expanduser() / spec.filename
        looked.append(str(p))
        if (p / "config.json").is_file():
            return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    looked.append(f"HF cache: {repo}")
    try:
        hit = Path(snapshot_download(repo, local_files_only=True))
        if (hit / "config.json").is_file():
            return hit
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    why = "downloads are disabled (HF_HUB_OFFLINE=1)" if offline() else "download not attempted"
    if download and not offline():
        try:
            return Path(snapshot_download(repo))
        except Exception as e:  # noqa: BLE001 - reported in the one error below
            why = f"download failed: {type(e).__name__}: {e}"
    raise WeightsError(
        f"Missing weights: {spec.description} - folder {spec.filename!r}.\n"
        f"  Looked in: {'; '.join(looked)}\n  {why}\n{how_to}"
    )


def official_input_ids(prompt: str, tokenizer: Any, image_token_id: int, n_image_tokens: int) -> list[int]:
    """Token ids of ``prompt`` as llava/mm_utils.py:185-204 builds them: each chunk around ``<image>`` is tokenised
    on its own, the first chunk's BOS is kept and later chunks' BOS dropped; the image slot becomes
    ``n_image_tokens`` copies of ``image_token_id`` (transformers' Llava expands the slot to one token per
    image feature, where the official code splices features in at a single -200 index)."""
    chunks = [tokenizer(c).input_ids for c in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids: list[int] = chunks[0][:1] if offset else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.extend([image_token_id] * n_image_tokens)
        ids.extend(chunk[offset:])
    return ids


def pad_to_square(image: np.ndarray, mean: tuple[float, ...]) -> np.ndarray:
    """expand2square (mm_utils.py:152-163): pad the short side, centred (top/left gets ``(long-short)//2``),
    with background ``int(m*255)`` per channel (mm_utils.py:171)."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.array([int(m * 255) for m in mean], np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out


class LLaVACaptioner:
    """``--captioner llava``: LLaVA-1.5-7B, loaded lazily on the first call (or by `load`).

    ``bits``: "16" (fp16 on CUDA), "8" or "4" (bitsandbytes, CUDA only, official default "4"). Off CUDA,
    bitsandbytes cannot run: the model loads unquantised in ``dtype`` (fp32 by default, or "bf16") with a
    notice. ``model_path`` is a transformers model folder (llava-hf layout); without it the folder is found
    by `resolve_model_dir` (``weights_dir`` / ``$DIFFBIR_WEIGHTS_DIR`` / HF cache / download).
    """

    name = "llava"

    def __init__(
        self,
        device: Any = "cuda",
        bits: str | int = DEFAULT_LLAVA_BIT,
        *,
        model_path: str | os.PathLike | None = None,
        weights_dir: str | os.PathLike | None = None,
        download: bool = True,
        dtype: str | None = None,
        question: str = LLAVA_QUESTION,
        max_new_tokens: int = LLAVA_MAX_NEW_TOKENS,
    ):
        bits = str(bits)
        if bits not in LLAVA_BITS:
            raise CaptionerError(f"llava bits must be one of {', '.join(LLAVA_BITS)}, got {bits!r}")
        if dtype not in (None, "fp32", "fp16", "bf16"):
            raise CaptionerError(f"llava dtype must be fp32, fp16 or bf16, got {dtype!r}")
        if int(max_new_tokens) < 1:
            raise CaptionerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if importlib.util.find_spec("transformers") is None:
            raise CaptionerError("the llava captioner needs `transformers` (pip install -r requirements.txt)")
        self.device = str(device)
        self.on_cuda = _device_type(device) == "cuda"
        self.bits = bits
        if bits != "16" and not self.on_cuda:
            msg = (
                f"llava: {bits}-bit quantisation (bitsandbytes) needs a CUDA device; on {self.device} the model "
                f"loads unquantised in {dtype or 'fp32'} (about {'28' if dtype in (None, 'fp32') else '14'} GB "
                "of memory, minutes per image)."
            )
            warnings.warn(msg, stacklevel=2)
            log.warning("%s", msg)
            self.bits = "16"
        if self.bits != "16" and importlib.util.find_spec("bitsandbytes") is None:
            raise CaptionerError(
                f"llava --llava-bit {bits} needs the optional package bitsandbytes: pip install bitsandbytes "
                "(or use --llava-bit 16, about 14 GB of GPU memory, or --captioner none)"
            )
        self.dtype_name = dtype or ("fp16" if self.on_cuda else "fp32")  # official: fp16 (builder.py:43, :163)
        self.model_path, self.weights_dir, self.download = model_path, weights_dir, download
        self.question = question
        self.prompt = llava_v1_prompt(question)
        self.max_new_tokens = int(max_new_tokens)
        self.model = None
        self.tokenizer = None
        self.image_processor = None
        self.folder: Path | None = None

    def __repr__(self) -> str:
        return f"LLaVACaptioner(device={self.device!r}, bits={self.bits!r}, dtype={self.dtype_name!r})"

    def load(self) -> LLaVACaptioner:
        """Find the weights and load processor + model (done by the first call; call it to fail early)."""
        if self.model is not None:
            return self
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        folder = resolve_model_dir(
            LLAVA_SPEC, path=self.model_path, weights_dir=self.weights_dir, download=self.download
        )
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype_name]
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.bits != "16":
            from transformers import BitsAndBytesConfig

            # builder.py:32-41; the official vision tower is loaded apart and stays fp16 (builder.py:163).
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=self.bits == "8",
                load_in_4bit=self.bits == "4",
                bnb_4bit_compute_dtype=torch.float16,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_quant_type="nf4",
                llm_int8_skip_modules=["vision_tower", "lm_head"],
            )
        if self.on_cuda:
            kwargs["device_map"] = {"": self.device}  # load shards straight onto the GPU (builder.py:27-30)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            # the PIL backend is the official CLIPImageProcessor (bicubic PIL resize); torchvision's differs slightly
            image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
            model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
        except Exception as e:
            raise WeightsError(f"could not load {LLAVA_SPEC.description} from {folder}: {type(e).__name__}: {e}") from e
        if not self.on_cuda:
            model = model.to(self.device)
            log.warning(
                "llava runs on %s in %s: expect minutes per image (use CUDA, or --captioner none)",
                self.device,
                self.dtype_name,
            )
        self.model, self.tokenizer, self.image_processor, self.folder = model.eval(), tokenizer, image_processor, folder
        log.info("llava captioner loaded from %s (%s-bit, %s, %s)", folder, self.bits, self.dtype_name, self.device)
        return self

    def inputs(self, image: np.ndarray) -> dict[str, Any]:
        """``input_ids``, ``attention_mask``, ``pixel_values`` for one image, built as the official code does."""
        import torch

        self.load()
        rgb = to_uint8_rgb(image)
        ip = self.image_processor
        square = pad_to_square(rgb, tuple(ip.image_mean))  # image_aspect_ratio "pad" (mm_utils.py:169-173)
        from PIL import Image

        pixel_values = ip(images=Image.fromarray(square), return_tensors="pt")["pixel_values"]  # 1x3xSxS
        cfg = self.model.config
        patch = cfg.vision_config.patch_size
        n_img = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)  # one feature per patch
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            n_img += 1  # the CLIP CLS feature is kept
        ids = official_input_ids(self.prompt, self.tokenizer, cfg.image_token_id, n_img)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)  # 1xL
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values.to(self.model.device, dtype=self.model.dtype),
        }

    def __call__(self, image: np.ndarray) -> str:
        import torch

        inputs = self.inputs(image)
        with torch.no_grad():
            # caption.py:136-146: temperature 0 -> do_sample False, num_beams 1, max_new_tokens 512, use_cache.
            out = self.model.generate(
                **inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens, use_cache=True
            )
        new = out[:, inputs["input_ids"].shape[1] :]  # transformers returns prompt + new tokens
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip()  # caption.py:147-149


# ----------------------------------------------------------------------------------------------
# RAM++


class RAMCaptioner:
    """``--captioner ram``: RAM++ (Swin-L, 384 px) tags joined by ", " (caption.py:152-171).

    Needs the ``ram`` package (recognize-anything, GitHub only): refused at construction with the install
    command when it is missing. Weights ``ram_plus_swin_large_14m.pth`` are found like every other file
    (``weights_path`` / ``weights_dir`` / ``$DIFFBIR_WEIGHTS_DIR`` / HF cache / download); loaded lazily.
    """

    name = "ram"

    def __init__(
        self,
        device: Any = "cuda",
        *,
        weights_path: str | os.PathLike | None = None,
        weights_dir: str | os.PathLike | None = None,
        download: bool = True,
    ):
        if importlib.util.find_spec("ram") is None:
            raise CaptionerError(_RAM_INSTALL)
        self.device = str(device)
        self.weights_path, self.weights_dir, self.download = weights_path, weights_dir, download
        self.model = None
        self.transform = None

    def __repr__(self) -> str:
        return f"RAMCaptioner(device={self.device!r})"

    def load(self) -> RAMCaptioner:
        if self.model is not None:
            return self
        try:
            from ram import get_transform
            from ram.models import ram_plus
        except ImportError as e:
            raise CaptionerError(f"{_RAM_INSTALL}\n(import failed: {e})") from e
        path = resolve_spec(
            RAM_PLUS_SPEC,
            path=self.weights_path,
            dirs=[self.weights_dir, os.environ.get("DIFFBIR_WEIGHTS_DIR")],
            download=self.download,
        )
        self.transform = get_transform(image_size=RAM_IMAGE_SIZE)
        self.model = ram_plus(pretrained=str(path), image_size=RAM_IMAGE_SIZE, vit="swin_l").eval().to(self.device)
        return self

    def __call__(self, image: np.ndarray) -> str:
        import torch
        from PIL import Image
        from ram import inference_ram

        self.load()
        x = self.transform(Image.fromarray(to_uint8_rgb(image))).unsqueeze(0).to(self.device)  # 1x3x384x384
        with torch.no_grad():
            tags_en, _tags_zh = inference_ram(x, self.model)  # "armchair | blanket | lamp"
        return tags_en.replace(" | ", ", ")


# ----------------------------------------------------------------------------------------------
# Factory


def default_captioner(device: Any) -> str:
    """``llava`` on CUDA (the official default, inference.py:169), ``none`` elsewhere: LLaVA-7B unquantised on
    CPU takes minutes and ~28 GB per image. Pass ``--captioner llava`` to get the official behaviour anywhere."""
    return "llava" if _device_type(device) == "cuda" else "none"


def make_captioner(name: str | None, device: Any = "cpu", **opts: Any) -> Captioner:
    """Build a captioner by its CLI name (``none`` / ``llava`` / ``ram``; ``None`` or ``"auto"`` -> the device's
    default). ``opts`` go to the class: llava takes ``bits`` (alias ``llava_bit``), ``model_path``,
    ``weights_dir``, ``download``, ``dtype``, ``question``, ``max_new_tokens``; ram takes ``weights_path``,
    ``weights_dir``, ``download``; none takes nothing (``weights_dir`` is accepted and ignored)."""
    key = default_captioner(device) if name in (None, "auto") else str(name).lower()
    if key not in CAPTIONERS:
        raise CaptionerError(f"unknown captioner {name!r}; choose one of {', '.join(CAPTIONERS)} (or auto)")
    if "llava_bit" in opts:
        if "bits" in opts:
            raise CaptionerError("give llava_bit or bits, not both")
        opts["bits"] = opts.pop("llava_bit")
    if key == "none":
        unknown = set(opts) - {"weights_dir", "bits", "download"}
        if unknown:
            raise CaptionerError(f"captioner none takes no options, got {sorted(unknown)}")
        return NoCaptioner()
    if key == "llava":
        return LLaVACaptioner(device, **opts)
    opts.pop("bits", None)  # --llava-bit has a default in the CLI; it means nothing to RAM
    return RAMCaptioner(device, **opts)
