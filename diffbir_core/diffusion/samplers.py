"""Samplers as pure functions ``sample_*(denoiser, x_T, schedule, ...) -> z_0`` (k-diffusion style).

spaced DDPM, DDIM, DPM-Solver++(2M), DPM-Solver++(3M) SDE over ``denoiser(x, t_int64[B]) -> eps or v``
(CFG and conditioning already bound, `cfg.CFGDenoiser`); noise from an injectable source (`noise.py`);
restoration guidance (`guidance.py`) is a callable on z0_hat (eq. 5) inside each step. The rest of the official
family is `k_samplers`; `registry.run_sampler` runs any of the 14 official ``--sampler`` names.

Mirrors
    * sample_spaced: v2.0.0 utils/sampler.py:269-340 p_sample/sample, HEAD diffbir/sampler/spaced_sampler.py:162
      (t = s_{N-1-k} for the model, respaced index N-1-k for the coefficients; a draw at EVERY step).
    * sample_ddim: HEAD diffbir/sampler/ddim_sampler.py:105-175 (noise drawn every step even for eta = 0).
    * sample_dpmpp_2m (the 3M SDE and the rest of the EDM family: `k_samplers`): HEAD
      diffbir/sampler/edm_sampler.py:140 + its k-diffusion copy (EDM
      preconditioning for eps / v, state x = z / alpha). Deviations: sigma_max via `make_edm_schedule`; SDE
      noise from the noise source instead of torchsde's Brownian tree; no NameError for a 1-step 3M-SDE run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .guidance import GuidanceOutput
from .noise import NoiseFn, noise_source
from .schedule import (
    DDIMSchedule,
    EDMSchedule,
    Parameterization,
    SpacedSchedule,
)

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x [B,C,h,w], t int64 [B]) -> eps or v
Callback = Callable[["StepInfo"], None]
Guidance = Callable[..., GuidanceOutput]  # (pred_x0, *, t, x0_coef, noise) -> GuidanceOutput

__all__ = [
    "StepInfo",
    "sample_spaced",
    "sample_ddim",
    "sample_dpmpp_2m",
    "spaced_step",
    "ddim_step",
    "edm_denoise",
    "pred_x0_eps",
]


@dataclass
class StepInfo:
    """What one sampler step saw and produced (passed to ``callback``; used by parity tests/previews).

    For the EDM samplers ``x_t``/``x_prev`` are the sigma-space states and ``pred_x0`` is "denoised".
    """

    step: int  # 0 .. N-1 in sampling order
    index: int  # schedule index of the coefficients (spaced/DDIM: N-1-step)
    t: int  # original timestep fed to the model
    x_t: Tensor
    model_output: Tensor  # after CFG (eps or v)
    pred_x0: Tensor  # before guidance
    x_prev: Tensor
    eps: Tensor | None = None
    pred_x0_guided: Tensor | None = None
    mean: Tensor | None = None
    variance: Tensor | None = None
    sigma: float | None = None
    guidance: GuidanceOutput | None = None


def _tvec(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _pick(buf: Tensor, index: int, x: Tensor) -> Tensor:
    """Official ``extract_into_tensor``: buffer[index] as [B,1,...] float32 on x's device."""
    idx = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
    return buf.to(x.device).gather(-1, idx).reshape(x.shape[0], *((1,) * (x.ndim - 1)))


def _check_param(p: str) -> None:
    if p not in ("eps", "v"):
        raise ValueError(f"parameterization must be 'eps' or 'v', got {p!r}")


def _apply_guidance(
    guidance: Guidance | None, pred_x0: Tensor, t: int, coef: Tensor | float, noise: NoiseFn
) -> GuidanceOutput | None:
    if guidance is None:
        return None
    return guidance(pred_x0, t=t, x0_coef=coef, noise=noise)


# ----------------------------------------------------------------------------------------------
# spaced DDPM (official default of v1/v2)
# ----------------------------------------------------------------------------------------------
def pred_x0_eps(
    schedule: SpacedSchedule, index: int, x_t: Tensor, model_output: Tensor, parameterization: Parameterization = "eps"
) -> tuple[Tensor, Tensor]:
    """(z0_hat, eps) from the model output at respaced index ``index`` (eq. 5; official coefficient order)."""
    _check_param(parameterization)
    if parameterization == "eps":
        x0 = (
            _pick(schedule.sqrt_recip_alphas_cumprod, index, x_t) * x_t
            - _pick(schedule.sqrt_recipm1_alphas_cumprod, index, x_t) * model_output
        )
        return x0, model_output
    a = _pick(schedule.sqrt_alphas_cumprod, index, x_t)
    s = _pick(schedule.sqrt_one_minus_alphas_cumprod, index, x_t)
    return a * x_t - s * model_output, a * model_output + s * x_t


def spaced_step(
    denoiser: Denoiser,
    x_t: Tensor,
    schedule: SpacedSchedule,
    index: int,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    noise: NoiseFn,
    step: int | None = None,
) -> StepInfo:
    """One official ``p_sample`` at respaced index ``index`` (steps 1-5 of the fixture README)."""
    t = int(schedule.timesteps[index])
    # 1. model output (CFG inside the denoiser), original timestep t
    out = denoiser(x_t, _tvec(t, x_t))
    # 2. z0_hat (eq. 5) with the respaced coefficients
    x0, eps = pred_x0_eps(schedule, index, x_t, out, parameterization)
    # 3. restoration guidance may replace z0_hat (x0_coef = coef1: v2 rescale 1/coef1)
    coef1 = _pick(schedule.posterior_mean_coef1, index, x_t)
    g = _apply_guidance(guidance, x0, t, coef1, noise)
    x0_used = g.update_pred_x0 if g is not None else x0
    # 4. posterior mean / fixed-small variance
    mean = coef1 * x0_used + _pick(schedule.posterior_mean_coef2, index, x_t) * x_t
    if g is not None and g.state_shift is not None:
        mean = mean + g.state_shift  # rule v1: mean += 0.5 sum delta
    var = _pick(schedule.posterior_variance, index, x_t)
    # 5. noise drawn at every step, used only if index != 0
    n = noise(tuple(x_t.shape), x_t)
    nonzero = torch.full((x_t.shape[0],), float(index != 0), device=x_t.device).view(-1, *([1] * (x_t.ndim - 1)))
    x_prev = mean + nonzero * torch.sqrt(var) * n
    return StepInfo(
        step=schedule.num_steps - 1 - index if step is None else step,
        index=index,
        t=t,
        x_t=x_t,
        model_output=out,
        eps=eps,
        pred_x0=x0,
        pred_x0_guided=g.pred_x0 if g else None,
        mean=mean,
        variance=var,
        x_prev=x_prev,
        guidance=g,
    )


def _run_steps(
    step_fn,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule,
    parameterization: Parameterization,
    guidance: Guidance | None,
    noise: NoiseFn | None,
    seed: int | None,
    callback: Callback | None,
) -> Tensor:
    """Shared loop of the index-stepping samplers (spaced DDPM, DDIM): step k uses index N-1-k."""
    _check_param(parameterization)
    noise = noise_source(noise, seed)
    x = x_T
    n = schedule.num_steps
    for k in range(n):
        info = step_fn(
            denoiser, x, schedule, n - 1 - k, parameterization=parameterization, guidance=guidance, noise=noise, step=k
        )
        if callback is not None:
            callback(info)
        x = info.x_prev
    return x


@torch.no_grad()
def sample_spaced(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: SpacedSchedule,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Official v2.0.0 / HEAD ``SpacedSampler.sample`` from ``x_T``; returns the final latent z_0."""
    return _run_steps(spaced_step, denoiser, x_T, schedule, parameterization, guidance, noise, seed, callback)


# ----------------------------------------------------------------------------------------------
# DDIM (HEAD ddim_sampler.py)
# ----------------------------------------------------------------------------------------------
def ddim_step(
    denoiser: Denoiser,
    x_t: Tensor,
    schedule: DDIMSchedule,
    index: int,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    noise: NoiseFn,
    step: int | None = None,
) -> StepInfo:
    t = int(schedule.timesteps[index])
    out = denoiser(x_t, _tvec(t, x_t))
    if parameterization == "eps":
        e_t = out
    else:  # predict_eps_from_z_and_v
        e_t = _pick(schedule.sqrt_alphas, index, x_t) * out + _pick(schedule.sqrt_one_minus_alphas, index, x_t) * x_t
    a_t = _pick(schedule.alphas, index, x_t)
    a_prev = _pick(schedule.alphas_prev, index, x_t)
    sigma_t = _pick(schedule.sigmas, index, x_t)
    sqrt_one_minus_at = _pick(schedule.sqrt_one_minus_alphas, index, x_t)
    x0 = (x_t - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_coef = (1.0 - a_prev - sigma_t**2).sqrt()
    g = None
    if guidance is not None:
        coef = a_prev.sqrt() - dir_coef * a_t.sqrt() / sqrt_one_minus_at
        g = _apply_guidance(guidance, x0, t, coef, noise)
    x0_used = x0
    if g is not None and g.applied:
        x0_used = g.update_pred_x0
        e_t = (x_t - a_t.sqrt() * x0_used) / sqrt_one_minus_at  # eps consistent with the guided z0_hat
    dir_xt = dir_coef * e_t
    n = sigma_t * noise(tuple(x_t.shape), x_t)  # drawn every step (official)
    x_prev = a_prev.sqrt() * x0_used + dir_xt + n
    if g is not None and g.state_shift is not None:
        x_prev = x_prev + g.state_shift
    return StepInfo(
        step=schedule.num_steps - 1 - index if step is None else step,
        index=index,
        t=t,
        x_t=x_t,
        model_output=out,
        eps=e_t,
        pred_x0=x0,
        pred_x0_guided=g.pred_x0 if g else None,
        x_prev=x_prev,
        guidance=g,
    )


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DDIMSchedule,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """HEAD ``DDIMSampler.sample`` (eta is part of the schedule, see ``make_ddim_schedule``)."""
    return _run_steps(ddim_step, denoiser, x_T, schedule, parameterization, guidance, noise, seed, callback)


# ----------------------------------------------------------------------------------------------
# EDM / k-diffusion samplers (v2.1 default: edm_dpm++_3m_sde)
# ----------------------------------------------------------------------------------------------
def edm_denoise(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, t: int, parameterization: Parameterization = "eps"
) -> tuple[Tensor, Tensor]:
    """(denoised, model_output) with HEAD ``EDMSampler.convert_to_denoiser`` preconditioning.

    eps: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1); v: c_skip = 1/(sigma^2+1),
    c_out = -sigma/sqrt(sigma^2+1), c_in = 1/sqrt(sigma^2+1). ``t`` = the discrete timestep of ``sigma``.
    """
    s = sigma * x.new_ones([x.shape[0]])
    view = (-1,) + (1,) * (x.ndim - 1)
    if parameterization == "eps":
        c_skip, c_out = torch.ones_like(s), -s
    else:
        c_skip, c_out = 1.0 / (s**2 + 1.0), -s / (s**2 + 1.0) ** 0.5
    c_in = 1 / (s**2 + 1.0) ** 0.5
    out = denoiser(x * c_in.view(view), _tvec(t, x))
    return out * c_out.view(view) + x * c_skip.view(view), out


def _edm_start(x_T: Tensor, schedule: EDMSchedule) -> Tensor:
    return x_T * torch.sqrt(1.0 + schedule.sigmas[0].to(x_T.device) ** 2.0)


def _finish(x_new: Tensor, g) -> Tensor:
    """x_{i+1} plus the guidance state shift (v1 rule), shared by the EDM samplers here and in `k_samplers`."""
    if g is not None and g.state_shift is not None:
        x_new = x_new + g.state_shift
    return x_new


def _report(callback, i, t, x, out, d, x_new, g, sigma) -> None:
    """One `StepInfo` to ``callback`` (EDM samplers)."""
    if callback is not None:
        callback(
            StepInfo(
                step=i,
                index=i,
                t=t,
                x_t=x,
                model_output=out,
                pred_x0=d,
                x_prev=x_new,
                pred_x0_guided=g.pred_x0 if g else None,
                sigma=float(sigma),
                guidance=g,
            )
        )


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (k-diffusion ``sample_dpmpp_2m``, HEAD "edm_dpm++_2m"). Deterministic; ``noise`` is only
    used by latent-space guidance with sampled targets."""
    _check_param(parameterization)
    noise = noise_source(noise, seed)
    sig = schedule.sigmas.to(x_T.device)
    x = _edm_start(x_T, schedule)
    old = None
    for i in range(schedule.num_steps):
        t = int(schedule.timesteps[i])
        d, out = edm_denoise(denoiser, x, sig[i], t, parameterization)
        t_cur, t_next = -sig[i].log(), -sig[i + 1].log()
        h = t_next - t_cur
        g = _apply_guidance(guidance, d, t, -(-h).expm1(), noise)  # first-order coefficient of denoised
        d_used = g.update_pred_x0 if g is not None else d
        ratio = (-t_next).exp() / (-t_cur).exp()  # sigma_fn(t_next) / sigma_fn(t)
        if old is None or sig[i + 1] == 0:
            x_new = ratio * x - (-h).expm1() * d_used
        else:
            r = (t_cur - (-sig[i - 1].log())) / h
            d_d = (1 + 1 / (2 * r)) * d_used - (1 / (2 * r)) * old
            x_new = ratio * x - (-h).expm1() * d_d
        x_new = _finish(x_new, g)
        _report(callback, i, t, x, out, d, x_new, g, sig[i])
        old = d_used
        x = x_new
    return x
