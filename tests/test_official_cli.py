"""The official HEAD command line through our CLI (issue 13): underscore flags, --version, --input, --n_samples,
per-stage tiles in pixels, precision/device defaults, the sampler registry and the captioner wiring.

Known answers come from the official argparse (tests/e2e_support.official_parser, a transcription of HEAD
inference.py:55-287), the official README commands and the official file naming (HEAD loop.py:218-224).
"""

from __future__ import annotations

import e2e_support as E
import numpy as np
import pytest
import torch
from PIL import Image

from diffbir_core import api, cli
from diffbir_core.config import PRESETS, SAMPLERS


def _params(argv):
    return cli.params_from_args(cli.build_parser().parse_args(argv))


def test_official_head_defaults_under_version():
    """`--version v2.1` with nothing else = HEAD inference.py's argparse defaults (official parser's own)."""
    argv = [
        "--task",
        "sr",
        "--version",
        "v2.1",
        "--captioner",
        "none",
        "--input",
        "in",
        "--output",
        "out",
        "--device",
        "cpu",
    ]
    off = E.official_parser("head").parse_args(argv)
    p = _params(argv)
    assert (p.sampler, p.steps, p.cfg_scale, p.upscale, p.strength, p.seed) == (
        off.sampler,
        off.steps,
        off.cfg_scale,
        off.upscale,
        off.strength,
        off.seed,
    )
    assert (p.pos_prompt, p.neg_prompt) == (off._pos_default, off._neg_default)
    assert (p.start_point, p.noise_aug) == (off.start_point_type, off.noise_aug)
    assert (p.s_churn, p.s_tmin, p.s_tmax, p.s_noise, p.eta, p.order) == (
        off.s_churn,
        off.s_tmin,
        off.s_tmax,
        off.s_noise,
        off.eta,
        off.order,
    )
    # --version v2 under HEAD defaults is NOT the ECCV preset (README: Presets)
    v2 = _params(["--version", "v2", "x", "-o", "y"])
    assert v2.sampler == "edm_dpm++_3m_sde" and v2.steps == 10 and PRESETS["v2"].sampler == "spaced"


def test_underscore_and_dash_spellings_agree():
    """The HEAD README ECCV command (underscores) = our dash flags; both give the v2 preset's values."""
    readme = [
        "--task",
        "sr",
        "--upscale",
        "4",
        "--version",
        "v2",
        "--sampler",
        "spaced",
        "--steps",
        "50",
        "--captioner",
        "none",
        "--pos_prompt",
        "",
        "--neg_prompt",
        "low quality, blurry, low-resolution, noisy, unsharp, weird textures",
        "--cfg_scale",
        "4",
        "--input",
        "inputs/demo/bsr",
        "--output",
        "results/v2_demo_bsr",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    p = _params(readme)
    assert p == PRESETS["v2"].replace(device="cpu").validate()
    dash = _params(["inputs/demo/bsr", "-o", "o", "--preset", "v2", "--cfg-scale", "4", "--device", "cpu"])
    assert dash == p
    q = _params(
        [
            "x",
            "-o",
            "y",
            "--preset",
            "v2.1",
            "--start_point_type",
            "cond",
            "--noise_aug",
            "50",
            "--s_churn",
            "0.5",
            "--s_tmin",
            "0.1",
            "--s_tmax",
            "20",
            "--s_noise",
            "0.9",
            "--eta",
            "0.8",
            "--order",
            "3",
            "--g_scale",
            "0.5",
            "--g_loss",
            "w_mse",
        ]
    )
    assert (q.start_point, q.noise_aug, q.s_churn, q.s_tmin, q.s_tmax, q.s_noise, q.eta, q.order) == (
        "cond",
        50,
        0.5,
        0.1,
        20.0,
        0.9,
        0.8,
        3,
    )
    assert q.guidance.scale == 0.5 and q.guidance.loss == "wmse"


def test_tile_flags_in_pixels_like_official():
    p = _params(
        [
            "x",
            "-o",
            "y",
            "--preset",
            "v2.1",
            "--cldm_tiled",
            "--cldm_tile_size",
            "256",
            "--cldm_tile_stride",
            "128",
            "--cleaner_tiled",
            "--cleaner_tile_size",
            "256",
            "--cleaner_tile_stride",
            "200",
            "--vae_encoder_tiled",
            "--vae_encoder_tile_size",
            "128",
            "--vae_decoder_tiled",
            "--vae_decoder_tile_size",
            "192",
        ]
    )
    t = p.tiles
    assert (t.diffusion, t.latent_tile, t.latent_stride) == (True, 32, 16)
    assert (t.cleaner, t.cleaner_tile, t.cleaner_overlap) == (True, 256, 56)
    assert (t.vae_encoder, t.vae_encoder_tile, t.vae_decoder, t.vae_decoder_tile) == (True, 128, True, 192)
    with pytest.raises(ValueError, match="multiple of 8"):
        _params(["x", "-o", "y", "--preset", "v2.1", "--cldm_tile_size", "250"])
    with pytest.raises(ValueError, match="not both"):
        _params(["x", "-o", "y", "--preset", "v2.1", "--cldm_tile_size", "256", "--latent-tile", "16"])


def test_version_task_mapping_and_errors():
    assert _params(["x", "-o", "y", "--version", "v1", "--task", "face"]).preset == "v1-face"
    assert _params(["x", "-o", "y", "--version", "v1"]).preset == "v1-general"
    face = _params(["x", "-o", "y", "--version", "v2.1", "--task", "face"])
    assert face.task == "face" and face.face.aligned is True  # HEAD bfr_loop: aligned faces
    whole = _params(["x", "-o", "y", "--version", "v2.1", "--task", "unaligned_face"])
    assert whole.task == "face" and whole.face.aligned is False
    with pytest.raises(ValueError, match="disagree"):
        _params(["x", "-o", "y", "--version", "v2", "--preset", "v2.1"])
    with pytest.raises(ValueError, match="--ckpt"):
        _params(["x", "-o", "y", "--version", "custom"])
    c = _params(
        ["x", "-o", "y", "--version", "custom", "--ckpt", "c.pt", "--sd-ckpt", "sd.ckpt", "--cleaner-ckpt", "sw.pt"]
    )
    assert (c.stage2.sd, c.stage2.control, c.cleaner_path, c.cleaner_for_task()) == (
        "sd.ckpt",
        "c.pt",
        "sw.pt",
        "swinir_general",
    )


def test_precision_and_device_defaults():
    assert cli.precision_for("auto", "cuda") == "float16" and cli.precision_for("auto", "cuda:1") == "float16"
    assert cli.precision_for("auto", "cpu") == "float32" and cli.precision_for("bf16", "cuda") == "bfloat16"
    args = cli.build_parser().parse_args(["x", "-o", "y"])
    assert args.device == "auto" and args.precision == "auto" and args.captioner == "auto"


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--cfg_scale",
        "--start_point_type",
        "--cldm_tile_size",
        "--n_samples",
        "--llava_bit",
        "--s_tmax",
        "--sde-noise",
        "--precision",
        "--device",
    ):
        assert flag in text, flag
    assert "(default: auto)" in text and "(default: 1)" in text


def test_n_samples_names_like_official(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    arr = np.full((10, 12, 3), 90, np.uint8)
    arr[::2, ::2] = 255
    Image.fromarray(arr).save(src / "a.png")
    out = tmp_path / "out"
    rc = cli.main(
        ["--input", str(src), "--output", str(out), "--upscale", "1", "--n_samples", "2", "-q", "--device", "cpu"]
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["a_0.png", "a_1.png"]  # HEAD loop.py:218-224


def test_captioner_caption_goes_before_the_prompt():
    """HEAD loop.py:165-169: the captioner sees the raw LQ; pos = ", ".join([caption, pos_prompt])."""
    seen = []

    def captioner(rgb):
        seen.append(rgb.shape)
        return "a red house"

    img = np.random.default_rng(0).random((10, 12, 3), dtype=np.float32)
    pipe = api.make_pipeline(
        cleaners={
            "bicubic": lambda x, out_size=None, clamp=True: torch.nn.functional.interpolate(
                x, size=out_size, mode="bicubic"
            )
        },
        device="cpu",
    )
    params = PRESETS["offline"].replace(cleaner="bicubic", pos_prompt="sharp", upscale=1.0)
    res = api.restore(img, params, pipe=pipe, captioner=captioner)
    assert seen == [(10, 12, 3)] and res.extra["caption"] == "a red house"
    assert res.extra["pos_prompt"] == "a red house, sharp"


def test_registry_runs_every_official_name_with_its_knobs():
    """All 14 names run by name; knobs reach only the samplers that read them (HEAD edm_sampler.py:28-41)."""
    from diffbir_core.diffusion import k_samplers as ks
    from diffbir_core.diffusion.registry import run_sampler
    from diffbir_core.diffusion.schedule import make_edm_schedule, make_training_schedule

    tr = make_training_schedule("v2")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def den(x, t):
        return 0.1 * x

    assert len(SAMPLERS) == 14
    for name in SAMPLERS:
        z = run_sampler(name, den, x_T, tr, 4, seed=1, s_churn=0.3, eta=0.5, order=2)
        assert z.shape == x_T.shape and torch.isfinite(z).all(), name
    ref = ks.K_SAMPLERS["edm_euler"](
        den,
        x_T,
        make_edm_schedule(tr, 3),
        parameterization="eps",
        seed=1,
        s_churn=0.3,
        s_tmin=0.0,
        s_tmax=300.0,
        s_noise=1.0,
    )
    assert torch.equal(run_sampler("edm_euler", den, x_T, tr, 3, seed=1, s_churn=0.3, eta=0.5), ref)
    with pytest.raises(ValueError, match="unknown sampler"):
        run_sampler("euler", den, x_T, tr, 3)
