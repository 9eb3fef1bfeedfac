"""Diffusion noise schedules: SD 2.1 training betas, zero-terminal-SNR rescale, IDDPM respacing, DDIM, EDM sigmas.

T = 1000, betas linear in sqrt space 0.00085 -> 0.012; q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I);
posterior mean = coef1 z0_hat + coef2 z_t (eq. 5 coefficients). Buffers in float64, stored float32 as the
official ``Sampler.register``.

Mirrors
    * make_beta_schedule("linear") of model/gaussian_diffusion.py (v2.0.0, HEAD); enforce_zero_terminal_snr of
      HEAD diffbir/model/gaussian_diffusion.py (v2.1; Lin et al. 2023, = diffusers rescale_zero_terminal_snr);
    * space_timesteps (IDDPM respace.py, as copied by DiT) and SpacedSampler.make_schedule of v2.0.0
      utils/sampler.py / HEAD diffbir/sampler/spaced_sampler.py; Diffusion.q_sample (float32 buffers).
    Deviations: ``make_spaced_schedule(betas, 1)`` raises ValueError (officially an IndexError; one respaced
    step would keep only t = 0); ``make_edm_schedule`` clamps abar_{T-1} >= 1e-8 instead of overwriting it
    (identical for zero-SNR v2.1; ``official_sigma_max=True`` restores the overwrite).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

Parameterization = Literal["eps", "v"]


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionConfig:
    """The official ``Diffusion`` config (``configs/inference/diffusion*.yaml``), linear betas only."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    zero_snr: bool = False
    parameterization: Parameterization = "eps"

    def __post_init__(self) -> None:
        if self.timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {self.timesteps}")
        if not 0.0 < self.linear_start < self.linear_end < 1.0:
            raise ValueError(f"need 0 < linear_start < linear_end < 1, got {self.linear_start}, {self.linear_end}")
        if self.parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {self.parameterization!r}")

    @classmethod
    def from_official(cls, params: Mapping) -> DiffusionConfig:
        """Build from the ``params`` dict of an official diffusion yaml (``target: model.Diffusion``)."""
        params = dict(params)
        schedule = params.pop("beta_schedule", "linear")
        if schedule != "linear":
            raise ValueError(f"only beta_schedule='linear' is supported (DiffBIR uses it), got {schedule!r}")
        params.pop("loss_type", None)  # training-only field
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown diffusion config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**params)


DIFFUSION_PRESETS: dict[str, DiffusionConfig] = {
    "v1": DiffusionConfig(),
    "v2": DiffusionConfig(),
    "v2.1": DiffusionConfig(zero_snr=True, parameterization="v"),
}


# ----------------------------------------------------------------------------------------------
# training schedule
# ----------------------------------------------------------------------------------------------
def linear_betas(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> np.ndarray:
    """beta_i = linspace(sqrt(start), sqrt(end), T)_i ** 2 in float64 (SD's "linear" schedule)."""
    return np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2


def enforce_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that abar_{T-1} = 0 (Lin et al. 2023, Alg. 1), as DiffBIR v2.1 does.

    sqrt(abar) is shifted so its last entry is 0 and scaled so its first entry is unchanged; betas are
    recomputed from the new abar (the last beta becomes exactly 1). float64 throughout.
    """
    b = torch.from_numpy(np.asarray(betas, dtype=np.float64))
    sqrt_ab = (1.0 - b).cumprod(0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).numpy()


@dataclass(frozen=True)
class TrainingSchedule:
    """The T-step training schedule. ``betas``/``alphas_cumprod`` float64 numpy, sqrt buffers float32."""

    betas: np.ndarray  # [T] float64
    alphas_cumprod: np.ndarray  # [T] float64
    sqrt_alphas_cumprod: torch.Tensor  # [T] float32 (official Diffusion buffer)
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # [T] float32
    parameterization: Parameterization = "eps"

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with the float32 buffers (official q_sample)."""
        if isinstance(t, int):
            t = torch.full((x0.shape[0],), t, dtype=torch.long)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        view = (-1,) + (1,) * (x0.ndim - 1)
        a = self.sqrt_alphas_cumprod.to(x0.device)[t.to(x0.device)].view(view)
        s = self.sqrt_one_minus_alphas_cumprod.to(x0.device)[t.to(x0.device)].view(view)
        return a * x0 + s * noise


def make_training_schedule(cfg: DiffusionConfig | str = "v2") -> TrainingSchedule:
    """Training schedule for a config or preset name ("v1", "v2", "v2.1")."""
    if isinstance(cfg, str):
        if cfg not in DIFFUSION_PRESETS:
            raise ValueError(f"unknown diffusion preset {cfg!r}; choose from {sorted(DIFFUSION_PRESETS)}")
        cfg = DIFFUSION_PRESETS[cfg]
    betas = linear_betas(cfg.timesteps, cfg.linear_start, cfg.linear_end)
    if cfg.zero_snr:
        betas = enforce_zero_terminal_snr(betas)
    ac = np.cumprod(1.0 - betas, axis=0)
    return TrainingSchedule(
        betas=betas,
        alphas_cumprod=ac,
        sqrt_alphas_cumprod=torch.tensor(np.sqrt(ac), dtype=torch.float32),
        sqrt_one_minus_alphas_cumprod=torch.tensor(np.sqrt(1.0 - ac), dtype=torch.float32),
        parameterization=cfg.parameterization,
    )


# ----------------------------------------------------------------------------------------------
# IDDPM respacing
# ----------------------------------------------------------------------------------------------
def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The IDDPM helper: which original timesteps an N-step sampler uses (a set, as the official one).

    ``section_counts`` is "N", "N1,N2,..." (equal sections of the original process, each strided with
    Python ``round`` of a fractional stride, half-to-even), a list of ints, or "ddimN" (fixed integer
    stride from the DDIM paper). With one section of N steps: stride = (T-1)/(N-1), so N=4, T=1000 gives
    {0, 333, 666, 999}.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, all_steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            all_steps.append(start + round(cur))
            cur += stride
        start += size
    return set(all_steps)


@dataclass(frozen=True)
class SpacedSchedule:
    """Respaced schedule over the used timesteps s_0 < ... < s_{N-1} (index i = respaced index).

    float64 numpy: ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev``; everything else float32 tensors
    of shape [N], cast from float64 like the official ``register``. ``sqrt_recip*`` contain +inf at the
    last index for a zero-terminal-SNR schedule (unused with v-prediction, as in the official code).
    """

    timesteps: torch.Tensor  # [N] int64, ascending original timesteps
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def make_spaced_schedule(betas: np.ndarray | TrainingSchedule, num_steps: int) -> SpacedSchedule:
    """The official ``SpacedSampler.make_schedule(num_steps)`` over training ``betas`` (float64)."""
    if isinstance(betas, TrainingSchedule):
        betas = betas.betas
    betas = np.asarray(betas, dtype=np.float64)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(
            f"num_steps must be an integer >= 2, got {num_steps!r}: the official respacing with one step "
            "keeps only t=0 (and crashes with IndexError); use 2 or more steps"
        )
    if num_steps > len(betas):
        raise ValueError(f"num_steps={num_steps} exceeds the {len(betas)} training timesteps")
    used = sorted(space_timesteps(len(betas), str(num_steps)))
    train_ac = np.cumprod(1.0 - betas, axis=0)

    # 1. respaced betas: beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}, abar_{s_-1} = 1
    new_betas, last = [], 1.0
    for s in used:
        new_betas.append(1.0 - train_ac[s] / last)
        last = train_ac[s]
    b = np.array(new_betas, dtype=np.float64)
    assert len(b) == num_steps

    # 2. derived quantities in float64 (inf/nan-producing divisions are expected for zero terminal SNR)
    alphas = 1.0 - b
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        sqrt_recip = np.sqrt(1.0 / ac)
        sqrt_recipm1 = np.sqrt(1.0 / ac - 1)
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        post_logvar = np.log(np.append(post_var[1], post_var[1:]))
        coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32)

    return SpacedSchedule(
        timesteps=torch.tensor(used, dtype=torch.long),
        betas=b,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(sqrt_recip),
        sqrt_recipm1_alphas_cumprod=f32(sqrt_recipm1),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(coef1),
        posterior_mean_coef2=f32(coef2),
    )


# ----------------------------------------------------------------------------------------------
# DDIM and EDM (k-diffusion) discretisations of the same training schedule (v2.1 samplers)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DDIMSchedule:
    """HEAD ``DDIMSampler.make_schedule``: model timesteps and float32 alpha buffers (index = DDIM step).

    Official quirks kept: "uniform" uses stride c = T // N and ``range(0, T, c) + 1`` (so the model sees
    t = 1, 1+c, ...; when T % N != 0 there can be MORE than N steps, e.g. N=6 -> 7 steps; N with
    T-1 on the grid, e.g. 3 or 9, would need t = T and are refused), and the
    alpha "before" the first step is abar_0 (not 1).
    """

    timesteps: torch.Tensor  # [M] int64 ascending, the t fed to the model
    alphas: torch.Tensor  # [M] float32, abar at timesteps
    alphas_prev: torch.Tensor  # [M] float32
    sigmas: torch.Tensor  # [M] float32, eta * sqrt((1-a_prev)/(1-a) * (1 - a/a_prev))
    sqrt_alphas: torch.Tensor  # [M] float32
    sqrt_one_minus_alphas: torch.Tensor  # [M] float32
    eta: float

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def make_ddim_schedule(
    training: TrainingSchedule | np.ndarray,
    num_steps: int,
    eta: float = 0.0,
    discretize: Literal["uniform", "quad"] = "uniform",
) -> DDIMSchedule:
    """DDIM timesteps and buffers exactly as HEAD ``make_ddim_timesteps``/``make_ddim_sampling_parameters``."""
    ac = training.alphas_cumprod if isinstance(training, TrainingSchedule) else np.asarray(training, np.float64)
    T = len(ac)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if discretize == "uniform":
        c = T // num_steps
        if c < 1:
            raise ValueError(f"num_steps={num_steps} exceeds the {T} training timesteps")
        ts = np.asarray(list(range(0, T, c)))
    elif discretize == "quad":
        ts = ((np.linspace(0, np.sqrt(T * 0.8), num_steps)) ** 2).astype(int)
    else:
        raise ValueError(f"discretize must be 'uniform' or 'quad', got {discretize!r}")
    ts = ts + 1
    if ts.max() >= T:
        raise ValueError(
            f"DDIM with {num_steps} steps would use timestep {ts.max()} >= T={T} (the official "
            "'+1' offset runs past the schedule and crashes); choose another number of steps"
        )
    a = ac[ts]
    a_prev = np.asarray([ac[0]] + ac[ts[:-1]].tolist())
    sig = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))

    def f32(v: np.ndarray) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float32)

    return DDIMSchedule(
        timesteps=torch.tensor(ts, dtype=torch.long),
        alphas=f32(a),
        alphas_prev=f32(a_prev),
        sigmas=f32(sig),
        sqrt_alphas=f32(np.sqrt(a)),
        sqrt_one_minus_alphas=f32(np.sqrt(1.0 - a)),
        eta=float(eta),
    )


@dataclass(frozen=True)
class EDMSchedule:
    """Noise levels for the k-diffusion ("EDM") samplers: sigma_i = sqrt((1 - abar)/abar) at ``timesteps``.

    ``sigmas`` [N+1] float32 descending with a final 0; ``timesteps`` [N+1] int64, the discrete t the model
    is fed at each sigma (the official sigma -> t map is "nearest schedule sigma", so t_i belongs to sigma_i;
    the appended sigma 0 maps to t 0).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1


def make_edm_schedule(
    training: TrainingSchedule | np.ndarray,
    num_steps: int,
    kind: Literal["diffbir", "karras"] = "diffbir",
    rho: float = 7.0,
    official_sigma_max: bool = False,
) -> EDMSchedule:
    """Sigmas for the EDM samplers.

    "diffbir" (official HEAD ``EDMSampler.make_schedule``): t = linspace(T-1, 0, N, endpoint=False) cast to
    int (999, 749, 499, 249 for N=4); sigma = sqrt((1-abar)/abar); append 0. The official code overwrites
    abar at t=T-1 with 1e-8 so that zero-terminal-SNR schedules (abar = 0 there) get a finite
    sigma_max = 1e4. Deliberate deviation (default): abar_{T-1} is clamped, max(abar, 1e-8), instead of
    overwritten. Identical for zero-SNR schedules (v2.1, the configuration the official EDM samplers are
    meant for); for the v1/v2 schedule (abar_999 = 0.0047, sigma 14.6) the overwrite tells the sampler
    sigma = 1e4 while the model is fed t = 999, which wrecks the first step (see the Gaussian test).
    ``official_sigma_max=True`` reproduces the overwrite.
    "karras" (Karras et al. 2022, rho=7) between the smallest and largest training sigma (same 1e-8
    treatment of abar_{T-1}), each sigma mapped to the training t whose sigma is nearest in log space. Not used by the
    official code; offered as an option.
    """
    ac = training.alphas_cumprod if isinstance(training, TrainingSchedule) else np.asarray(training, np.float64)
    T = len(ac)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if kind == "diffbir":
        ts = np.linspace(T - 1, 0, num_steps, endpoint=False).astype(int)
        a = ac[ts].copy()
        a[0] = 1e-8 if official_sigma_max else max(a[0], 1e-8)
        sig = ((1 - a) / a) ** 0.5
    elif kind == "karras":
        a = ac.copy()
        a[-1] = 1e-8 if official_sigma_max else max(a[-1], 1e-8)
        train_sig = ((1 - a) / a) ** 0.5  # ascending in t
        smin, smax = train_sig[0], train_sig[-1]
        ramp = np.linspace(0, 1, num_steps)
        sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        ts = np.abs(np.log(sig)[:, None] - np.log(train_sig)[None, :]).argmin(axis=1)
    else:
        raise ValueError(f"kind must be 'diffbir' or 'karras', got {kind!r}")
    sig = np.append(sig, 0.0)
    ts = np.append(ts, 0)
    return EDMSchedule(sigmas=torch.tensor(sig, dtype=torch.float32), timesteps=torch.tensor(ts, dtype=torch.long))
