"""DiffBIRPipeline end to end vs the official v2.0.0 SwinIRPipeline.run (fixture `pipeline_swinir`).

The official call: lq uint8 64x64 -> /255 -> stage 1 (short edge < 512: bicubic antialiased resize to
512, pad x64, SwinIR, crop) -> stage 2 (pad x64, prompts POS/NEG, cfg 4, 4 spaced steps, strength 1)
-> VAE decode -> (x+1)/2 -> wavelet colour fix with the stage-1 image -> resize to 64x64 -> uint8
(truncation). Our pipeline gets the same tiny models injected and the recorded noise replayed.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffbir_core.cleaners import CLEANERS, Cleaner
from diffbir_core.colorfix import to_uint8_official
from diffbir_core.config import RestoreParams
from diffbir_core.imageio import LoadedImage
from diffbir_core.models.ldm import Stage2Config, build_control_ldm
from diffbir_core.models.swinir import SwinIRConfig, load_swinir
from diffbir_core.pipeline import DiffBIRPipeline
from diffbir_core.diffusion.noise import ReplayNoise


@pytest.fixture(scope="module")
def tiny(parity_dir):
    cfg = Stage2Config.from_official(yaml.safe_load((parity_dir / "configs" / "cldm_tiny.yaml").read_text()))
    ldm = build_control_ldm(cfg, sd=parity_dir / "weights" / "sd_ldm.ckpt",
                            control=parity_dir / "weights" / "controlnet.pth")
    scfg = SwinIRConfig.from_official(yaml.safe_load((parity_dir / "configs" / "swinir_tiny.yaml").read_text()))
    swinir = load_swinir(parity_dir / "weights" / "swinir.pth", scfg)
    cleaner = Cleaner(CLEANERS["swinir_face"], swinir)
    return ldm, cleaner


@pytest.mark.parity
def test_official_swinir_pipeline_run(parity_dir, tiny):
    torch.set_num_threads(2)
    ldm, cleaner = tiny
    d = load_file(parity_dir / "tensors" / "pipeline_swinir.safetensors")
    prompts = json.loads((parity_dir / "meta.json").read_text())["prompts"]
    lq = d["lq_uint8_hwc"].numpy().astype(np.float64) / 255.0
    params = RestoreParams.from_preset(
        "v2", task="sr", cleaner="swinir_face", upscale=1.0, steps=4, sampler="spaced", cfg_scale=4.0, strength=1.0,
        pos_prompt=prompts["cat"], neg_prompt=prompts["neg"], color_fix="wavelet", better_start=False)
    pipe = DiffBIRPipeline(cleaners={"swinir_face": cleaner}, ldm=ldm)
    noise = ReplayNoise.from_tensors(d)
    latents = {}
    res = pipe.restore(LoadedImage(rgb=lq.astype(np.float32)), params, noise=noise, keep=latents)
    noise.assert_exhausted()
    z_ref = d["z_final"]
    dz = (latents["z_final"] - z_ref).abs().max().item()
    assert dz <= 1e-4 * max(1.0, z_ref.abs().max().item()), dz
    ours = to_uint8_official(torch.from_numpy(res.image).permute(2, 0, 1)[None])[0].numpy()
    ref = d["output_uint8_hwc"].numpy()
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()
