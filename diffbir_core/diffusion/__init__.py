"""The diffusion layer (DiT's ``diffusion/`` package in role): schedules, pure-function samplers, noise
sources, classifier-free guidance and latent image guidance. Nothing here knows about images or pipelines.

- `schedule`  training / spaced / DDIM / EDM schedules (make_*_schedule)
- `samplers`  sample_spaced, sample_ddim, sample_dpmpp_2m, sample_dpmpp_3m_sde, run_sampler, SAMPLER_NAMES
- `noise`     TorchNoise, ReplayNoise, NoiseReplayError
- `cfg`       CFGDenoiser, rescaled_cfg_scale
- `guidance`  LatentImageGuidance (paper eqs. 5-6)

Import the submodules directly (this package file imports nothing).
"""
