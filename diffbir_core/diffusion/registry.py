"""Sampler registry: the 14 official ``--sampler`` names -> ``run_sampler(name, denoiser, x_T, training, steps)``.

The name list is `config.SAMPLER_NAMES` (the one list; the CLI, the demo and validation read it); this module
checks at import that `k_samplers.SAMPLER_KNOBS` implements exactly those names. Knobs (official HEAD
inference.py:205-240: s_churn 0, s_tmin 0, s_tmax 300, s_noise 1, eta 1, order 1) go only to the samplers that
read them (edm_sampler.py:28-41); ddim is built with eta 0 as HEAD pipeline.py:181. ``sde_noise="brownian"``
gives the SDE samplers (edm_dpm++_sde / 2m_sde / 3m_sde) the official torchsde Brownian tree, seeded from the
noise source at the sampler's start as the official code seeds it from the global RNG (k_diffusion.py:76-77).
Mirrors: HEAD diffbir/pipeline.py:176-215 (sampler by name), diffbir/sampler/edm_sampler.py.
"""

from __future__ import annotations

from typing import Literal

from ..config import SAMPLER_NAMES
from .k_samplers import OFFICIAL_KNOB_DEFAULTS, SAMPLER_KNOBS, run_k_sampler
from .noise import BrownianTreeNoise, NoiseFn, TorchNoise
from .samplers import Callback, Denoiser, Guidance
from .schedule import TrainingSchedule

__all__ = ["SAMPLER_NAMES", "SDE_SAMPLERS", "KNOB_NAMES", "run_sampler", "sampler_knobs"]

SDE_SAMPLERS = ("edm_dpm++_sde", "edm_dpm++_2m_sde", "edm_dpm++_3m_sde")  # Brownian-tree noise in HEAD
KNOB_NAMES = tuple(OFFICIAL_KNOB_DEFAULTS)  # s_churn, s_tmin, s_tmax, s_noise, eta, order

if tuple(sorted(SAMPLER_KNOBS)) != tuple(sorted(SAMPLER_NAMES)):  # pragma: no cover - a programming error
    raise ImportError(
        f"config.SAMPLER_NAMES {SAMPLER_NAMES} and the implemented samplers {tuple(SAMPLER_KNOBS)} "
        "differ: keep the one list in config.py in step with diffusion.k_samplers"
    )


def sampler_knobs(name: str) -> tuple[str, ...]:
    """The official knobs ``name`` reads (the others are ignored, as the official sampler ignores them)."""
    if name not in SAMPLER_KNOBS:
        raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLER_NAMES}")
    return SAMPLER_KNOBS[name]


def run_sampler(
    name: str,
    denoiser: Denoiser,
    x_T,
    training: TrainingSchedule,
    steps: int,
    *,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
    edm_official_sigma_max: bool = False,
    sde_noise: Literal["torch", "brownian"] = "torch",
    eta: float | None = None,
    s_noise: float | None = None,
    s_churn: float | None = None,
    s_tmin: float | None = None,
    s_tmax: float | None = None,
    order: int | None = None,
):
    """Build the schedule for ``name`` from ``training`` and run it (parameterization from ``training``).

    Knobs left None take the official defaults; a knob the sampler does not read is dropped (``ddim`` runs with
    eta 0 whatever ``eta`` says, as HEAD). ``edm_official_sigma_max``: EDM schedules overwrite
    abar_{T-1} with 1e-8 as HEAD edm_sampler.py:90 (default: clamp, identical for zero-terminal-SNR v2.1)."""
    reads = sampler_knobs(name)
    given = {"eta": eta, "s_noise": s_noise, "s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "order": order}
    knobs = {k: v for k, v in given.items() if v is not None and k in reads}
    if sde_noise not in ("torch", "brownian"):
        raise ValueError(f"sde_noise must be 'torch' or 'brownian', got {sde_noise!r}")
    if sde_noise == "brownian" and name in SDE_SAMPLERS:
        base = noise if noise is not None else TorchNoise(seed)
        noise = (
            BrownianTreeNoise.from_noise(base)
            if isinstance(base, TorchNoise)
            else BrownianTreeNoise(seed if seed is not None else 0, fallback=base)
        )
        seed = None
    return run_k_sampler(
        name,
        denoiser,
        x_T,
        training,
        steps,
        guidance=guidance,
        noise=noise,
        seed=seed,
        callback=callback,
        official_sigma_max=edm_official_sigma_max,
        **knobs,
    )
