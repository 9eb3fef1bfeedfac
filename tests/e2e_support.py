"""End-to-end parity support: replay the official ``inference.py`` runs of DIFFBIR_E2E_DIR with our code.

Set C (``shared/fixtures/diffbir_e2e/README.md``): whole official CLI runs (HEAD 3f8b530 = v2.1, tag v2.0.0)
with tiny configs and random weights under the official file names. For every run this module
    1. parses the recorded argv with the official flag set and defaults (HEAD ``inference.py:55-287``,
       v2.0.0 ``inference.py:33-64``) and translates it into OUR restore CLI's flags (`official_to_ours`),
    2. turns those into a `RestoreParams` through our CLI parser (`restore.build_parser` + `params_from_args`),
    3. builds the tiny models from the folder's own ``configs/`` yaml files and ``weights/<official name>``
       (names looked up through `weights.WEIGHTS`), injects them into `DiffBIRPipeline`,
    4. replays the recorded draws (``noise.NNN`` / ``x_T`` aliases, in meta ``noise_draws`` order) and
       records our intermediates (tokens, c_txt, c_img, x_T, z, decoded, colour-fixed image),
    5. writes the PNG with our own `imageio.save_image`.
Nothing about the particular runs is hard-coded: runs, sizes, steps and prompts come from meta.json / argv.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFBIR_SHARED_DIR", ROOT.parent / "shared"))
E2E_DIR = Path(os.environ.get("DIFFBIR_E2E_DIR", SHARED / "fixtures" / "diffbir_e2e"))

IMAGE_KEYS = ("stage1_out", "decoded", "colorfix_out")  # stored as .sub8 / .crop_tl / .crop_br slices


# ------------------------------------------------------------------------------------------------ meta
def load_meta(d: Path = E2E_DIR) -> dict:
    return json.loads((d / "meta.json").read_text())


def run_names(meta: dict, ok: bool) -> list[str]:
    return [n for n, r in meta["runs"].items() if bool(r["status"].get("ok")) == ok]


def code_flavor(run: dict) -> str:
    """ "head" or "v200" from the run's recorded code version."""
    return "v200" if "v2.0.0" in run["code"] else "head"


# ------------------------------------------------------------------------- official flag sets (facts)
def official_parser(flavor: str) -> argparse.ArgumentParser:
    """The official CLI's flags and defaults (names and defaults only), to read a recorded argv."""
    from diffbir_core.prompts import (
        DEFAULT_NEG_PROMPT,
        DEFAULT_POS_PROMPT,
        V2_NEG_PROMPT,
    )

    ap = argparse.ArgumentParser(prog="inference.py", exit_on_error=False)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=231)
    ap.add_argument("--n_samples", type=int, default=1)
    ap.add_argument("--pos_prompt", default=None)
    ap.add_argument("--neg_prompt", default=None)
    ap.add_argument("--guidance", action="store_true")
    ap.add_argument("--g_loss", default="w_mse", choices=["mse", "w_mse"])
    ap.add_argument("--g_scale", type=float, default=0.0)
    if flavor == "v200":  # v2.0.0 inference.py:33-64
        ap.add_argument("--task", required=True, choices=["sr", "dn", "fr", "fr_bg"])
        ap.add_argument("--upscale", type=float, required=True)
        ap.add_argument("--version", default="v2", choices=["v1", "v2"])
        ap.add_argument("--steps", type=int, default=50)
        ap.add_argument("--better_start", action="store_true")
        ap.add_argument("--tiled", action="store_true")
        ap.add_argument("--tile_size", type=int, default=512)
        ap.add_argument("--tile_stride", type=int, default=256)
        ap.add_argument("--cfg_scale", type=float, default=4.0)
        ap.add_argument("--g_start", type=int, default=1001)
        ap.add_argument("--g_stop", type=int, default=-1)
        ap.add_argument("--g_space", default="latent")
        ap.add_argument("--g_repeat", type=int, default=1)
        ap.add_argument("--device", default="cuda", choices=["cpu", "cuda", "mps"])
        ap.set_defaults(_pos_default="", _neg_default=V2_NEG_PROMPT)
        return ap
    # HEAD inference.py:55-287
    ap.add_argument("--task", required=True, choices=["sr", "face", "denoise", "unaligned_face"])
    ap.add_argument("--upscale", type=float, default=4)
    ap.add_argument("--version", default="v2.1", choices=["v1", "v2", "v2.1", "custom"])
    ap.add_argument("--sampler", default="edm_dpm++_3m_sde")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--start_point_type", default="noise", choices=["noise", "cond"])
    ap.add_argument("--cleaner_tiled", action="store_true")
    ap.add_argument("--cleaner_tile_size", type=int, default=512)
    ap.add_argument("--cleaner_tile_stride", type=int, default=256)
    ap.add_argument("--vae_encoder_tiled", action="store_true")
    ap.add_argument("--vae_encoder_tile_size", type=int, default=256)
    ap.add_argument("--vae_decoder_tiled", action="store_true")
    ap.add_argument("--vae_decoder_tile_size", type=int, default=256)
    ap.add_argument("--cldm_tiled", action="store_true")
    ap.add_argument("--cldm_tile_size", type=int, default=512)
    ap.add_argument("--cldm_tile_stride", type=int, default=256)
    ap.add_argument("--captioner", default="llava", choices=["none", "llava", "ram"])
    ap.add_argument("--cfg_scale", type=float, default=6.0)
    ap.add_argument("--rescale_cfg", action="store_true")
    ap.add_argument("--noise_aug", type=int, default=0)
    ap.add_argument("--s_churn", type=float, default=0)
    ap.add_argument("--s_tmin", type=float, default=0)
    ap.add_argument("--s_tmax", type=float, default=300)
    ap.add_argument("--s_noise", type=float, default=1)
    ap.add_argument("--eta", type=float, default=1)
    ap.add_argument("--order", type=int, default=1)
    ap.add_argument("--strength", type=float, default=1)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda", "mps"])
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--llava_bit", default="4", choices=["16", "8", "4"])
    ap.set_defaults(_pos_default=DEFAULT_POS_PROMPT, _neg_default=DEFAULT_NEG_PROMPT)
    return ap


class NotTranslatable(ValueError):
    """An official option our CLI has no equivalent for."""


# ------------------------------------------------------------------------------- official -> ours
def official_to_ours(argv: list[str], flavor: str) -> list[str]:
    """Translate an official ``inference.py`` argv (without the program name) into our restore CLI's argv.

    Every official option is mapped explicitly (its official default included), so our presets only pick
    the weights; the official behaviour of the glue (EDM sigma_max overwrite) is selected with its flag."""
    a = official_parser(flavor).parse_args(argv)
    pos = a.pos_prompt if a.pos_prompt is not None else a._pos_default
    neg = a.neg_prompt if a.neg_prompt is not None else a._neg_default
    if a.n_samples != 1:
        raise NotTranslatable("--n_samples > 1 (our CLI writes one sample per input)")
    out = [
        a.input,
        "--output",
        a.output,
        "--upscale",
        str(a.upscale),
        "--steps",
        str(a.steps),
        "--cfg-scale",
        str(a.cfg_scale),
        "--pos-prompt",
        pos,
        "--neg-prompt",
        neg,
        "--seed",
        str(a.seed),
        "--device",
        a.device,
    ]
    if flavor == "v200":
        task = {"sr": "sr", "dn": "denoise", "fr": "face", "fr_bg": "face"}[a.task]
        preset = {"v1": "v1-face" if task == "face" else "v1-general", "v2": "v2"}[a.version]
        out += ["--preset", preset, "--task", task, "--sampler", "spaced"]
        out += ["--aligned"] if a.task == "fr" else (["--whole-photo"] if a.task == "fr_bg" else [])
        if a.better_start:
            out += ["--better-start"]
        if a.tiled:
            out += [
                "--tiled-diffusion",
                "--latent-tile",
                str(a.tile_size // 8),
                "--latent-stride",
                str(a.tile_stride // 8),
            ]
        if a.guidance:
            out += [
                "--guidance-scale",
                str(a.g_scale),
                "--guidance-loss",
                {"mse": "mse", "w_mse": "wmse"}[a.g_loss],
                "--guidance-space",
                a.g_space,
                "--guidance-start",
                str(a.g_start),
                "--guidance-stop",
                str(a.g_stop),
                "--guidance-repeat",
                str(a.g_repeat),
                "--guidance-rule",
                "v2",
            ]
        return out
    # HEAD: the official command line runs unchanged through our parser (underscore flags, --version, --input)
    return list(argv) + ["--edm-sigma-max", "official"]  # HEAD edm_sampler.py:90 overwrites abar[999] always


def official_to_ours_explicit(argv: list[str]) -> list[str]:
    """HEAD argv -> our dash flags, every official option spelled out (a second route to the same params)."""
    a = official_parser("head").parse_args(argv)
    pos = a.pos_prompt if a.pos_prompt is not None else a._pos_default
    neg = a.neg_prompt if a.neg_prompt is not None else a._neg_default
    out = [
        a.input,
        "--output",
        a.output,
        "--upscale",
        str(a.upscale),
        "--steps",
        str(a.steps),
        "--cfg-scale",
        str(a.cfg_scale),
        "--pos-prompt",
        pos,
        "--neg-prompt",
        neg,
        "--seed",
        str(a.seed),
        "--device",
        a.device,
    ]
    if a.version == "custom":
        raise NotTranslatable("--version custom")
    task = {"sr": "sr", "face": "face", "denoise": "denoise", "unaligned_face": "face"}[a.task]
    preset = {"v1": "v1-face" if task == "face" else "v1-general", "v2": "v2", "v2.1": "v2.1"}[a.version]
    out += [
        "--preset",
        preset,
        "--task",
        task,
        "--sampler",
        a.sampler,
        "--strength",
        str(a.strength),
        "--start-point",
        a.start_point_type,
        "--noise-aug",
        str(a.noise_aug),
        "--edm-sigma-max",
        "official",  # HEAD edm_sampler.py:90 overwrites abar[999] for every schedule
        "--precision",
        {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[a.precision],
        "--captioner",
        a.captioner,
    ]
    out += ["--aligned"] if a.task == "face" else (["--whole-photo"] if a.task == "unaligned_face" else [])
    if a.rescale_cfg:
        out += ["--rescale-cfg"]
    if a.cldm_tiled:
        out += [
            "--tiled-diffusion",
            "--latent-tile",
            str(a.cldm_tile_size // 8),
            "--latent-stride",
            str(a.cldm_tile_stride // 8),
        ]
    if a.guidance:  # HEAD's parser has only these three (inference.py:248-263)
        out += ["--guidance-scale", str(a.g_scale), "--guidance-loss", {"mse": "mse", "w_mse": "wmse"}[a.g_loss]]
    return out


def substitute(argv: list[str], fixture: Path, output: Path) -> list[str]:
    return [s.replace("{FIXTURE}", str(fixture)).replace("{OUTPUT_DIR}", str(output)) for s in argv]


def params_for(run: dict, fixture: Path, output: Path):
    """(our argv, our parsed args, RestoreParams) for a recorded official run."""
    from diffbir_core.cli import build_parser, params_from_args

    argv = substitute(run["argv"][1:], fixture, output)
    ours = official_to_ours(argv, code_flavor(run))
    args = build_parser().parse_args(ours)
    return ours, args, params_from_args(args)


# ------------------------------------------------------------------------------- tiny models
def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def config_dir(fixture: Path, flavor: str) -> Path:
    return fixture / "configs" / ("v2.0.0" if flavor == "v200" else "head")


def weight_file(fixture: Path, name: str) -> Path:
    """``weights/<official file name>`` of our weight entry ``name`` (symlinks resolved)."""
    from diffbir_core.weights import WEIGHTS

    p = fixture / "weights" / WEIGHTS[name].filename
    assert p.exists(), f"{p} missing (weight {name!r})"
    p = p.resolve()
    if p.stat().st_size < 256:  # a symlink that a copy turned into a text file naming its target (README)
        target = p.parent / p.read_text().strip()
        assert target.is_file() and target.parent == p.parent, f"{p}: neither a checkpoint nor a link placeholder"
        p = target
    return p


class ModelCache:
    """Builds (once) the tiny cleaners / ControlLDMs a run needs from the fixture's configs and weights."""

    def __init__(self, fixture: Path):
        self.fixture = fixture
        self._cache: dict[Any, Any] = {}

    def cleaner(self, name: str, flavor: str):
        key = ("cleaner", name)
        if key not in self._cache:
            from diffbir_core.cleaners import CLEANERS, Cleaner

            spec = CLEANERS[name]
            cdir = config_dir(self.fixture, flavor)
            wf = weight_file(self.fixture, spec.weight)
            if spec.kind == "swinir":
                from diffbir_core.models.swinir import SwinIRConfig, load_swinir

                net = load_swinir(wf, SwinIRConfig.from_official(_yaml(cdir / "swinir.yaml")))
            elif spec.kind == "rrdbnet":
                from diffbir_core.models.rrdbnet import RRDBNetConfig, load_rrdbnet

                net = load_rrdbnet(wf, RRDBNetConfig(**_yaml(cdir / "bsrnet.yaml")["params"]))
            elif spec.kind == "scunet":
                from diffbir_core.models.scunet import SCUNetConfig, load_scunet

                net = load_scunet(wf, SCUNetConfig.from_official(_yaml(cdir / "scunet.yaml")["params"]))
            else:
                raise AssertionError(spec.kind)
            self._cache[key] = Cleaner(spec, net.requires_grad_(False))
        return self._cache[key]

    def ldm(self, params, flavor: str):
        s2 = params.stage2
        key = ("ldm", s2.sd, s2.control)
        if key not in self._cache:
            from diffbir_core.models.ldm import Stage2Config, build_control_ldm

            cfg = Stage2Config.from_official(_yaml(config_dir(self.fixture, flavor) / "cldm.yaml")["params"])
            self._cache[key] = build_control_ldm(
                cfg, sd=weight_file(self.fixture, s2.sd), control=weight_file(self.fixture, s2.control)
            ).eval()
        return self._cache[key]


# ------------------------------------------------------------------------------- recording
@dataclass
class Recorded:
    tokens: list = field(default_factory=list)
    c_img: list = field(default_factory=list)
    model_conds: list = field(default_factory=list)
    model_t: list = field(default_factory=list)
    _txt_ids: list = field(default_factory=list)


class _Observe:
    """Wrap instance methods of the injected ControlLDM to record what our pipeline computes (no change)."""

    def __init__(self, ldm, rec: Recorded):
        self.ldm, self.rec, self.saved = ldm, rec, {}

    def __enter__(self):
        ldm, rec = self.ldm, self.rec
        text_fwd, fwd = ldm.text.forward, ldm.forward

        def text_forward(tokens, *a, **k):
            rec.tokens.append(tokens.detach().clone())
            return text_fwd(tokens, *a, **k)

        vae_post = ldm.vae_posterior

        def vae_posterior(x, *a, **k):
            mean, logvar = vae_post(x, *a, **k)
            rec.c_img.append((mean * ldm.scale_factor).detach().clone())  # c_img = posterior mode * 0.18215
            return mean, logvar

        def forward(x, t, cond, *a, **k):
            # the first call of each distinct text condition (cond, uncond): with tiled diffusion the CFG denoiser
            # runs every tile with cond before the first uncond call
            txt = cond["c_txt"]
            if len(rec.model_conds) < 4 and not any(c.shape == txt.shape and torch.equal(c, txt) for c in rec._txt_ids):
                rec._txt_ids.append(txt.detach().clone())
                rec.model_conds.append({kk: v.detach().clone() for kk, v in cond.items()})
            rec.model_t.append([int(v) for v in t])
            return fwd(x, t, cond, *a, **k)

        self.saved = {"text": text_fwd}
        ldm.text.forward = text_forward
        ldm.vae_posterior = vae_posterior
        ldm.forward = forward
        return self

    def __exit__(self, *exc):
        for name in ("vae_posterior", "forward"):
            self.ldm.__dict__.pop(name, None)
        self.ldm.text.__dict__.pop("forward", None)


def replay_draws(run: dict, tensors: dict) -> list[torch.Tensor]:
    """The recorded draws in call order (``noise.NNN``, or the tensor it is aliased to)."""
    out = []
    for d in run["noise_draws"]:
        key = d["key"]
        if key not in tensors:
            alias = run["aliases"].get(key, "")
            target = alias.split(" ")[0]
            assert target in tensors, f"draw {key} neither stored nor aliased to a stored tensor ({alias!r})"
            key = target
        out.append(tensors[key])
    return out


@dataclass
class Outcome:
    params: Any
    argv: list[str]
    image_u8: np.ndarray
    png_path: Path
    keep: dict
    rec: Recorded
    noise_left: int


def run_ours(
    name: str,
    fixture: Path,
    models: ModelCache,
    out_dir: Path,
    *,
    meta: dict | None = None,
    params_override: dict | None = None,
    callback=None,
) -> Outcome:
    """Run our pipeline for the official run ``name`` and save its PNG with our own writer."""
    from PIL import Image
    from safetensors.torch import load_file

    from diffbir_core import api
    from diffbir_core.diffusion.noise import ReplayNoise
    from diffbir_core.face.pipeline import FacePipeline
    from diffbir_core.imageio import read_image, save_image
    from diffbir_core.pipeline import DiffBIRPipeline
    from diffbir_core.speed import SpeedOptions

    meta = meta or load_meta(fixture)
    run = meta["runs"][name]
    flavor = code_flavor(run)
    ours, args, params = params_for(run, fixture, out_dir)
    if params_override:
        params = params.replace(**params_override)
    tensors = load_file(str(fixture / run["tensors_file"])) if run["status"].get("ok") else {}
    cleaner_name = params.cleaner_for_task()
    pipe = DiffBIRPipeline(
        cleaners={cleaner_name: models.cleaner(cleaner_name, flavor)},
        ldm=models.ldm(params, flavor),
        device="cpu",
        speed=SpeedOptions(batched_cfg=False),
    )
    noise = ReplayNoise(replay_draws(run, tensors)) if run["status"].get("ok") else None
    rec = Recorded()
    keep: dict = {}
    from diffbir_core.cli import inputs_of

    inp = Path(inputs_of(args)[0])
    files = sorted(p for p in inp.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert len(files) == 1, files
    with _Observe(pipe._injected_ldm, rec):
        res = api.restore(
            read_image(files[0]), params, pipe=FacePipeline(pipe), noise=noise, keep=keep, callback=callback
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    png = save_image(out_dir / f"{files[0].stem}.png", res.image, res.alpha)
    img = np.asarray(Image.open(png).convert("RGB"))
    return Outcome(params, ours, img, png, keep, rec, noise.remaining if noise is not None else 0)


# ------------------------------------------------------------------------------- comparison
def rel_dev(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|got - ref|, tolerance 1e-4 * max(1, max|ref|))."""
    assert tuple(got.shape) == tuple(ref.shape), f"shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    dev = (got.double() - ref.double()).abs().max().item()
    return dev, 1e-4 * max(1.0, ref.abs().max().item())


def image_slices(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fixture's three slices of an image-sized tensor."""
    return {"sub8": t[..., ::8, ::8], "crop_tl": t[..., 0:32, 0:32], "crop_br": t[..., -32:, -32:]}


def compare_run(name: str, out: Outcome, fixture: Path, meta: dict) -> dict[str, tuple[float, float]]:
    """Every comparable tensor: {name: (max dev, tolerance)}; plus "png" (max abs uint8 diff, 2)."""
    from PIL import Image
    from safetensors.torch import load_file

    run = meta["runs"][name]
    ref = load_file(str(fixture / run["tensors_file"]))
    res: dict[str, tuple[float, float]] = {}
    ours = {
        "stage1_out": out.keep.get("clean"),
        "decoded": out.keep.get("decoded_cropped"),
        "colorfix_out": out.keep.get("colorfix_out"),
    }
    for key, t in ours.items():
        full = run["image_tensor_stats_full"][key]["full"]
        assert t is not None, f"{key} not recorded"
        assert list(t.shape) == full["shape"], f"{key}: shape {list(t.shape)} vs official {full['shape']}"
        for suf, s in image_slices(t).items():
            res[f"{key}.{suf}"] = rel_dev(s, ref[f"{key}.{suf}"])
    # text: first tokenization = positive prompt, second = negative (official prepare_condition order)
    toks = [t for t in out.rec.tokens]
    assert toks, "no text encoded"
    res["tokens_cond"] = (float((toks[0] != ref["tokens_cond"]).sum()), 0.0)
    if "tokens_uncond" in ref:
        res["tokens_uncond"] = (float((toks[1] != ref["tokens_uncond"]).sum()), 0.0)
    conds = out.rec.model_conds
    res["c_txt_cond"] = rel_dev(conds[0]["c_txt"], ref["c_txt_cond"])
    if "c_txt_uncond" in ref:
        res["c_txt_uncond"] = rel_dev(conds[1]["c_txt"], ref["c_txt_uncond"])
    res["c_img"] = rel_dev(out.rec.c_img[0], ref["c_img"])
    c_s = ref.get("c_img_sampler", ref["c_img"])
    got_s = conds[0]["c_img"]
    if got_s.shape != c_s.shape:  # tiled diffusion: the first model call sees the top-left tile (row-major windows)
        c_s = c_s[..., : got_s.shape[-2], : got_s.shape[-1]]
    res["c_img_sampler"] = rel_dev(got_s, c_s)
    res["x_T"] = rel_dev(out.keep["x_T"], ref["x_T"])
    res["z_sampled"] = rel_dev(out.keep["z_final"], ref["z_sampled"])
    official = np.asarray(Image.open(fixture / "runs" / name / "official_output" / out.png_path.name).convert("RGB"))
    assert official.shape == out.image_u8.shape, f"png shape {out.image_u8.shape} vs official {official.shape}"
    res["png"] = (float(np.abs(official.astype(int) - out.image_u8.astype(int)).max()), 2.0)
    return res


def official_prompt_csv(fixture: Path, name: str) -> dict | None:
    import csv

    p = fixture / "runs" / name / "official_output" / "prompt.csv"
    if not p.exists():
        return None
    with p.open(newline="") as f:
        return next(csv.DictReader(f))


def quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
