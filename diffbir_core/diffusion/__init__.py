"""The diffusion layer (DiT's ``diffusion/`` package in role): schedules, pure-function samplers, noise
sources, classifier-free guidance and latent image guidance. Nothing here knows about images or pipelines.

- `schedule`  training / spaced / DDIM / EDM schedules (make_*_schedule)
- `samplers`  sample_spaced, sample_ddim, sample_dpmpp_2m (+ the shared step pieces); `k_samplers` the rest
- `k_samplers` the rest of the official HEAD family (EDM euler ... dpm++_3m_sde, dpm++_m2)
- `registry`  run_sampler(name, ...) for the 14 official names (config.SAMPLER_NAMES, the one list)
- `noise`     TorchNoise, ReplayNoise, NoiseReplayError, BrownianTreeNoise (torchsde)
- `cfg`       CFGDenoiser, rescaled_cfg_scale
- `guidance`  LatentImageGuidance (paper eqs. 5-6)

Import the submodules directly (this package file imports nothing).
"""
