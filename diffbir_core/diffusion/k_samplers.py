"""The rest of the official HEAD samplers: the k-diffusion "EDM" family and DPM-Solver++ multistep (dpm++_m2).

Pure functions ``sample_*(denoiser, x_T, schedule, *, knobs, guidance, noise, seed, callback) -> z_0`` in the style of
``samplers.sample_dpmpp_2m`` (EDM preconditioning ``edm_denoise``, start x_T sqrt(1 + sigma_0^2), guidance on the
clean prediction once per step with x0_coef = its first-order coefficient, ``StepInfo`` callback), plus ``K_SAMPLERS``
(official name -> function), ``SAMPLER_KNOBS``, ``OFFICIAL_KNOB_DEFAULTS`` and ``run_k_sampler``.
Mirrors HEAD (/work/shared/official/DiffBIR-HEAD): ``diffbir/sampler/k_diffusion.py`` (lines in each docstring);
knob wiring ``edm_sampler.py:28-81``; knob defaults ``inference.py:205-240`` (what official runs use; k-diffusion's
own function defaults differ: s_tmax inf, lms order 4); sigma -> model t = t of the NEAREST schedule sigma
(``edm_sampler.py:116-119``, matters for churn / midpoint / half-step sigmas: ``timestep_for_sigma``); the sigma
schedule ``edm_sampler.py:83-96`` is ``schedule.make_edm_schedule`` for every EDM sampler (``official_sigma_max=True``
for the 1e-8 overwrite). dpm++_m2: ``dpms_sampler.py:17-101`` + ``dpm_solver_pytorch.py`` (NoiseScheduleVP
"discrete", multistep order 2, time_uniform, lower_order_final); it feeds the model FLOAT timesteps.
The official EDM / DPM-Solver samplers have no restoration guidance; the hook here is our extension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .noise import NoiseFn, noise_source
from .samplers import (
    Callback,
    Denoiser,
    Guidance,
    StepInfo,
    _apply_guidance,
    _check_param,
    _edm_start,
    _finish,
    _report,
    edm_denoise,
    sample_ddim,
    sample_dpmpp_2m,
    sample_spaced,
)
from .schedule import (
    EDMSchedule,
    Parameterization,
    TrainingSchedule,
    make_ddim_schedule,
    make_edm_schedule,
    make_spaced_schedule,
)

Tensor = torch.Tensor

# HEAD inference.py:205-240 (argparse defaults, used by every official run)
OFFICIAL_KNOB_DEFAULTS: dict[str, float | int] = {
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 300.0,
    "s_noise": 1.0,
    "eta": 1.0,
    "order": 1,
}


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
def timestep_for_sigma(schedule: EDMSchedule, sigma: Tensor | float) -> int:
    """Official sigma -> t (edm_sampler.py:117-119): t of the schedule sigma nearest to ``sigma`` (first on ties)."""
    sig = schedule.sigmas
    s = torch.as_tensor(sigma, dtype=sig.dtype).to("cpu")
    return int(schedule.timesteps[(s - sig).abs().argmin()])


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor, schedule: EDMSchedule, p: Parameterization):
    t = timestep_for_sigma(schedule, sigma)
    d, out = edm_denoise(denoiser, x, sigma, t, p)
    return d, out, t


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step (k_diffusion.py:56-63)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _churn_gamma(sig: Tensor, i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """Karras et al. 2022 Alg. 2 gamma_i (k_diffusion.py:128): min(S_churn / N, sqrt2 - 1) inside [S_tmin, S_tmax]."""
    return min(s_churn / (len(sig) - 1), 2**0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0


class _Increments:
    """The k-diffusion ``noise_sampler(sigma, sigma_next)``: Brownian increments when ``noise`` has
    ``interval`` (``BrownianTreeNoise``), otherwise one plain N(0,1) draw (k_diffusion.py:66-67)."""

    def __init__(self, noise: NoiseFn, sig: Tensor) -> None:
        self.noise = noise
        pos = sig[sig > 0]
        self.sigma_min, self.sigma_max = pos.min(), sig.max()  # k_diffusion.py:550, 622, 664

    def __call__(self, sigma: Tensor, sigma_next: Tensor, x: Tensor) -> Tensor:
        interval = getattr(self.noise, "interval", None)
        if interval is None:
            return self.noise(tuple(x.shape), x)
        return interval(sigma, sigma_next, x, sigma_min=self.sigma_min, sigma_max=self.sigma_max)


def _check_knobs(*, s_noise: float | None = None, eta: float | None = None, s_churn: float | None = None) -> None:
    if eta is not None and eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if s_churn is not None and s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    if s_noise is not None and s_noise < 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")


def _guided(guidance, d: Tensor, t: int, coef, noise: NoiseFn):
    g = _apply_guidance(guidance, d, t, coef, noise)
    return (g.update_pred_x0 if g is not None else d), g


def _setup(x_T: Tensor, schedule: EDMSchedule, parameterization: Parameterization, noise, seed):
    _check_param(parameterization)
    return noise_source(noise, seed), schedule.sigmas.to(x_T.device), _edm_start(x_T, schedule)


# ----------------------------------------------------------------------------------------------
# Karras et al. (2022) Algorithm 2 family: euler, heun, dpm_2 (s_churn, s_tmin, s_tmax, s_noise)
# ----------------------------------------------------------------------------------------------
def _churn_sampler(
    method: str,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    guidance,
    noise,
    seed,
    callback,
) -> Tensor:
    _check_knobs(s_noise=s_noise, s_churn=s_churn)
    noise, sig, x = _setup(x_T, schedule, parameterization, noise, seed)
    p = parameterization
    for i in range(schedule.num_steps):
        # 1. churn: raise the noise level to sigma_hat = sigma (1 + gamma); the draw happens at EVERY step
        gamma = _churn_gamma(sig, i, s_churn, s_tmin, s_tmax)
        eps = noise(tuple(x.shape), x) * s_noise
        sigma_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sig[i] ** 2) ** 0.5
        # 2. clean prediction at sigma_hat (model t = nearest schedule sigma), guidance on it
        d, out, t = _denoise(denoiser, x, sigma_hat, schedule, p)
        d_used, g = _guided(guidance, d, t, 1 - sig[i + 1] / sigma_hat, noise)
        deriv = (x - d_used) / sigma_hat  # to_d: Karras ODE derivative
        # 3. step to sigma_{i+1}
        if method == "euler" or sig[i + 1] == 0:
            x_new = x + deriv * (sig[i + 1] - sigma_hat)
        elif method == "heun":
            dt = sig[i + 1] - sigma_hat
            x_2 = x + deriv * dt
            d_2, _, _ = _denoise(denoiser, x_2, sig[i + 1], schedule, p)
            x_new = x + (deriv + (x_2 - d_2) / sig[i + 1]) / 2 * dt
        else:  # dpm_2: midpoint in log sigma
            sigma_mid = sigma_hat.log().lerp(sig[i + 1].log(), 0.5).exp()
            x_2 = x + deriv * (sigma_mid - sigma_hat)
            d_2, _, _ = _denoise(denoiser, x_2, sigma_mid, schedule, p)
            x_new = x + (x_2 - d_2) / sigma_mid * (sig[i + 1] - sigma_hat)
        x_new = _finish(x_new, g)
        _report(callback, i, t, x, out, d, x_new, g, sigma_hat)
        x = x_new
    return x


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 300.0,
    s_noise: float = 1.0,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler (Karras Alg. 2 without the 2nd-order correction), HEAD "edm_euler" (k_diffusion.py:122-140)."""
    return _churn_sampler(
        "euler",
        denoiser,
        x_T,
        schedule,
        parameterization=parameterization,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        guidance=guidance,
        noise=noise,
        seed=seed,
        callback=callback,
    )


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 300.0,
    s_noise: float = 1.0,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun (Karras Alg. 2; Euler on the last step), HEAD "edm_heun" (k_diffusion.py:163-189). 2 NFE per step."""
    return _churn_sampler(
        "heun",
        denoiser,
        x_T,
        schedule,
        parameterization=parameterization,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        guidance=guidance,
        noise=noise,
        seed=seed,
        callback=callback,
    )


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 300.0,
    s_noise: float = 1.0,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver-2 style midpoint steps with churn, HEAD "edm_dpm_2" (k_diffusion.py:192-220). 2 NFE per step."""
    return _churn_sampler(
        "dpm_2",
        denoiser,
        x_T,
        schedule,
        parameterization=parameterization,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        guidance=guidance,
        noise=noise,
        seed=seed,
        callback=callback,
    )


# ----------------------------------------------------------------------------------------------
# ancestral samplers: euler_a, dpm_2_a, dpm++_2s_a (eta, s_noise)
# ----------------------------------------------------------------------------------------------
def _ancestral_sampler(
    method: str,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization,
    eta: float,
    s_noise: float,
    guidance,
    noise,
    seed,
    callback,
) -> Tensor:
    _check_knobs(s_noise=s_noise, eta=eta)
    noise, sig, x = _setup(x_T, schedule, parameterization, noise, seed)
    inc = _Increments(noise, sig)
    p = parameterization
    for i in range(schedule.num_steps):
        # 1. clean prediction at sigma_i; split the step into a deterministic part to sigma_down + noise sigma_up
        d, out, t = _denoise(denoiser, x, sig[i], schedule, p)
        sigma_down, sigma_up = get_ancestral_step(sig[i], sig[i + 1], eta=eta)
        d_used, g = _guided(guidance, d, t, 1 - sigma_down / sig[i], noise)
        # 2. deterministic part
        if method == "euler_a" or sigma_down == 0:
            x_new = x + (x - d_used) / sig[i] * (sigma_down - sig[i])
        elif method == "dpm_2_a":
            sigma_mid = sig[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + (x - d_used) / sig[i] * (sigma_mid - sig[i])
            d_2, _, _ = _denoise(denoiser, x_2, sigma_mid, schedule, p)
            x_new = x + (x_2 - d_2) / sigma_mid * (sigma_down - sig[i])
        else:  # dpm++_2s_a: DPM-Solver++(2S), r = 1/2
            t_cur, t_next = sig[i].log().neg(), sigma_down.log().neg()
            h = t_next - t_cur
            s = t_cur + h / 2
            x_2 = (s.neg().exp() / t_cur.neg().exp()) * x - (-h / 2).expm1() * d_used
            d_2, _, _ = _denoise(denoiser, x_2, s.neg().exp(), schedule, p)
            x_new = (t_next.neg().exp() / t_cur.neg().exp()) * x - (-h).expm1() * d_2
        # 3. noise (official draw points: euler_a / 2s_a when sigma_{i+1} > 0, dpm_2_a when sigma_down != 0)
        if (sig[i + 1] > 0) if method != "dpm_2_a" else (sigma_down != 0):
            x_new = x_new + inc(sig[i], sig[i + 1], x) * s_noise * sigma_up
        x_new = _finish(x_new, g)
        _report(callback, i, t, x, out, d, x_new, g, sig[i])
        x = x_new
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral Euler, HEAD "edm_euler_a" (k_diffusion.py:143-160)."""
    return _ancestral_sampler(
        "euler_a",
        denoiser,
        x_T,
        schedule,
        parameterization=parameterization,
        eta=eta,
        s_noise=s_noise,
        guidance=guidance,
        noise=noise,
        seed=seed,
        callback=callback,
    )


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DPM-Solver-2, HEAD "edm_dpm_2_a" (k_diffusion.py:223-249). 2 NFE per step (1 on the last)."""
    return _ancestral_sampler(
        "dpm_2_a",
        denoiser,
        x_T,
        schedule,
        parameterization=parameterization,
        eta=eta,
        s_noise=s_noise,
        guidance=guidance,
        noise=noise,
        seed=seed,
        callback=callback,
    )


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DPM-Solver++(2S), HEAD "edm_dpm++_2s_a" (k_diffusion.py:513-544). 2 NFE per step."""
    return _ancestral_sampler(
        "dpm++_2s_a",
        denoiser,
        x_T,
        schedule,
        parameterization=parameterization,
        eta=eta,
        s_noise=s_noise,
        guidance=guidance,
        noise=noise,
        seed=seed,
        callback=callback,
    )


# ----------------------------------------------------------------------------------------------
# linear multistep (order)
# ----------------------------------------------------------------------------------------------
def lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """int_{sigma_i}^{sigma_{i+1}} of the j-th Lagrange basis polynomial on sigma_i, ..., sigma_{i-order+1}
    (k_diffusion.py:252-262; scipy quad, epsrel 1e-4, on the float32 sigmas as the official code)."""
    from scipy import integrate  # scipy is a requirement; imported only when lms runs

    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    order: int = 1,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Linear multistep in sigma, HEAD "edm_lms" (k_diffusion.py:265-282); official CLI order = 1 (= Euler),
    k-diffusion's own default 4. The first steps use order min(i + 1, order). Deterministic."""
    if not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    noise, sig, x = _setup(x_T, schedule, parameterization, noise, seed)
    sig_np = sig.detach().cpu().numpy()
    ds: list[Tensor] = []
    for i in range(schedule.num_steps):
        d, out, t = _denoise(denoiser, x, sig[i], schedule, parameterization)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, sig_np, i, j) for j in range(cur)]
        d_used, g = _guided(guidance, d, t, -coeffs[0] / sig[i], noise)  # x += c_0 (x - D) / sigma_i + ...
        ds.append((x - d_used) / sig[i])
        if len(ds) > order:
            ds.pop(0)
        x_new = _finish(x + sum(c * dv for c, dv in zip(coeffs, reversed(ds))), g)
        _report(callback, i, t, x, out, d, x_new, g, sig[i])
        x = x_new
    return x


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ SDE family: dpm++_sde, dpm++_2m_sde, dpm++_3m_sde (eta, s_noise; Brownian-tree noise)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Stochastic DPM-Solver++ (2 NFE per step, half step at r), HEAD "edm_dpm++_sde" (k_diffusion.py:547-586).

    Noise: ``BrownianTreeNoise`` gives the official Brownian increments (it queries the path at the half step
    too); a plain noise source gives independent N(0,1) draws (2 per step)."""
    _check_knobs(s_noise=s_noise, eta=eta)
    noise, sig, x = _setup(x_T, schedule, parameterization, noise, seed)
    inc = _Increments(noise, sig)

    def sigma_fn(v):
        return v.neg().exp()

    def t_fn(v):
        return v.log().neg()

    for i in range(schedule.num_steps):
        d, out, t = _denoise(denoiser, x, sig[i], schedule, parameterization)
        if sig[i + 1] == 0:  # Euler to sigma = 0
            d_used, g = _guided(guidance, d, t, 1.0, noise)
            x_new = x + (x - d_used) / sig[i] * (sig[i + 1] - sig[i])
        else:
            t_cur, t_next = t_fn(sig[i]), t_fn(sig[i + 1])
            h = t_next - t_cur
            s = t_cur + h * r
            fac = 1 / (2 * r)
            sd_full, _ = get_ancestral_step(sigma_fn(t_cur), sigma_fn(t_next), eta)
            d_used, g = _guided(guidance, d, t, 1 - sd_full / sig[i], noise)
            # step 1: to the intermediate time s (ancestral split)
            sd, su = get_ancestral_step(sigma_fn(t_cur), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t_cur)) * x - (t_cur - s_).expm1() * d_used
            x_2 = x_2 + inc(sigma_fn(t_cur), sigma_fn(s), x) * s_noise * su
            d_2, _, _ = _denoise(denoiser, x_2, sigma_fn(s), schedule, parameterization)
            # step 2: full step with the combined clean prediction
            sd, su = get_ancestral_step(sigma_fn(t_cur), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            d_d = (1 - fac) * d_used + fac * d_2
            x_new = (sigma_fn(t_next_) / sigma_fn(t_cur)) * x - (t_cur - t_next_).expm1() * d_d
            x_new = x_new + inc(sigma_fn(t_cur), sigma_fn(t_next), x) * s_noise * su
        x_new = _finish(x_new, g)
        _report(callback, i, t, x, out, d, x_new, g, sig[i])
        x = x_new
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE, HEAD "edm_dpm++_2m_sde" (k_diffusion.py:615-657; HEAD uses solver_type "midpoint").
    eta = 0 is the deterministic DPM-Solver++(2M) (not bitwise: k-diffusion's 2M uses a different formula)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    _check_knobs(s_noise=s_noise, eta=eta)
    noise, sig, x = _setup(x_T, schedule, parameterization, noise, seed)
    inc = _Increments(noise, sig)
    old = h_last = None
    for i in range(schedule.num_steps):
        d, out, t = _denoise(denoiser, x, sig[i], schedule, parameterization)
        h = None
        if sig[i + 1] == 0:  # denoising step
            d_used, g = _guided(guidance, d, t, 1.0, noise)
            x_new = d_used
        else:
            h = (-sig[i + 1].log()) - (-sig[i].log())
            eta_h = eta * h
            coef = (-h - eta_h).expm1().neg()
            d_used, g = _guided(guidance, d, t, coef, noise)
            x_new = sig[i + 1] / sig[i] * (-eta_h).exp() * x + coef * d_used
            if old is not None:
                rr = h_last / h
                if solver_type == "heun":
                    x_new = x_new + (coef / (-h - eta_h) + 1) * (1 / rr) * (d_used - old)
                else:
                    x_new = x_new + 0.5 * coef * (1 / rr) * (d_used - old)
            if eta:
                x_new = x_new + inc(sig[i], sig[i + 1], x) * sig[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        x_new = _finish(x_new, g)
        _report(callback, i, t, x, out, d, x_new, g, sig[i])
        old, h_last = d_used, h
        x = x_new
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: EDMSchedule,
    *,
    parameterization: Parameterization = "eps",
    eta: float = 1.0,
    s_noise: float = 1.0,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(3M) SDE, HEAD default "edm_dpm++_3m_sde" (k_diffusion.py:660-707).

    The registry's `edm_dpm++_3m_sde` (the one 3M SDE implementation); with a plain noise source one draw per
    stochastic step; also accepts ``BrownianTreeNoise`` for the official Brownian increments."""
    _check_knobs(s_noise=s_noise, eta=eta)
    noise, sig, x = _setup(x_T, schedule, parameterization, noise, seed)
    inc = _Increments(noise, sig)
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(schedule.num_steps):
        d, out, t = _denoise(denoiser, x, sig[i], schedule, parameterization)
        h = None
        if sig[i + 1] == 0:  # denoising step
            d_used, g = _guided(guidance, d, t, 1.0, noise)
            x_new = d_used
        else:
            h = (-sig[i + 1].log()) - (-sig[i].log())
            h_eta = h * (eta + 1)
            d_used, g = _guided(guidance, d, t, (-h_eta).expm1().neg(), noise)
            x_new = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * d_used
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (d_used - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x_new = x_new + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x_new = x_new + phi_2 * ((d_used - d_1) / (h_1 / h))
            if eta:
                x_new = x_new + inc(sig[i], sig[i + 1], x) * sig[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        x_new = _finish(x_new, g)
        _report(callback, i, t, x, out, d, x_new, g, sig[i])
        d_1, d_2 = d_used, d_1
        h_1, h_2 = h, h_1
        x = x_new
    return x


# ----------------------------------------------------------------------------------------------
# dpm++_m2: DPM-Solver++ multistep, order 2, on the discrete VP schedule (HEAD dpms_sampler.py)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPMSolverSchedule:
    """HEAD ``NoiseScheduleVP("discrete", betas=float32 betas)`` evaluated at the time_uniform grid.

    ``t`` [N+1] continuous times linspace(1, 1/total_N, N+1); ``model_t`` = (t - 1/total_N) * 1000 (float, fed to
    the model); ``alpha``/``sigma``/``lam`` = alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t, all float32
    from the piecewise-linear log-alpha interpolation. ``total_N`` is T minus the entries whose lambda < -5.1
    (``numerical_clip_alpha``: the zero-terminal-SNR end of v2.1 is cut off)."""

    t: Tensor
    model_t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor
    total_N: int

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0]) - 1


def _interp(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear f(x) through (xp, yp), xp ascending, extended linearly beyond the ends
    (the behaviour of dpm_solver_pytorch.py:1273-1312 ``interpolate_fn``)."""
    k = torch.searchsorted(xp, x, right=False).clamp(1, xp.shape[0] - 1)  # segment [k-1, k]
    x0, x1, y0, y1 = xp[k - 1], xp[k], yp[k - 1], yp[k]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def make_dpm_solver_schedule(training: TrainingSchedule | np.ndarray, num_steps: int) -> DPMSolverSchedule:
    """Schedule of HEAD dpm++_m2 (dpm_solver_pytorch.py:97-113 NoiseScheduleVP, :115-126 clip, :128-155 marginals,
    :471-492 time_uniform steps, :273-282 model input time). ``training`` = training schedule or float64 betas."""
    betas = training.betas if isinstance(training, TrainingSchedule) else np.asarray(training, np.float64)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"dpm++_m2 needs an integer num_steps >= 2 (multistep order 2), got {num_steps!r}")
    b = torch.tensor(betas, dtype=torch.float32)  # dpms_sampler.py:39 registers float32
    log_alphas = 0.5 * torch.log(1 - b).cumsum(dim=0)
    # numerical_clip_alpha: drop the tail where lambda < -5.1
    lambs = log_alphas - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alphas))
    cut = int(torch.searchsorted(torch.flip(lambs, [0]), -5.1))
    if cut > 0:
        log_alphas = log_alphas[:-cut]
    total_n = int(log_alphas.shape[0])
    t_array = torch.linspace(0.0, 1.0, total_n + 1)[1:]
    t = torch.linspace(1.0, 1.0 / total_n, num_steps + 1)
    lmc = _interp(t, t_array, log_alphas)
    return DPMSolverSchedule(
        t=t,
        model_t=(t - 1.0 / total_n) * 1000.0,
        alpha=torch.exp(lmc),
        sigma=torch.sqrt(1.0 - torch.exp(2.0 * lmc)),
        lam=lmc - 0.5 * torch.log(1.0 - torch.exp(2.0 * lmc)),
        total_N=total_n,
    )


@torch.no_grad()
def sample_dpmpp_m2(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: DPMSolverSchedule,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """HEAD "dpm++_m2": DPM-Solver++ (data prediction), multistep, order 2, solver_type "dpmsolver", time_uniform,
    lower_order_final (dpms_sampler.py:88-98, dpm_solver_pytorch.py:1159-1191 with :565-610 and :814-870).

    Runs in the VP space directly from ``x_T`` (no sigma scaling). ``denoiser(x, t)`` receives FLOAT timesteps
    ``schedule.model_t[i]`` (e.g. 999.0, 899.1, ...), as the official model does; the step index also goes to
    guidance / StepInfo as round(t). N steps = N model evaluations; with N < 10 the last step is first order."""
    _check_param(parameterization)
    noise = noise_source(noise, seed)
    n = schedule.num_steps
    dev = x_T.device
    al, sg, lam = (v.to(dev) for v in (schedule.alpha, schedule.sigma, schedule.lam))

    def data_pred(x: Tensor, i: int):
        tt = schedule.model_t[i].to(dev).expand(x.shape[0])  # float timesteps [B]
        out = denoiser(x, tt)
        eps = out if parameterization == "eps" else al[i] * out + sg[i] * x  # model_wrapper "v" (:292-294)
        return (x - sg[i] * eps) / al[i], out  # data_prediction_fn (:451-460)

    x = x_T
    m_prev: list[Tensor] = []
    for i in range(n):
        # 1. clean prediction at t_i (guided), kept for the multistep history
        d, out = data_pred(x, i)
        t_int = round(float(schedule.model_t[i]))
        h = lam[i + 1] - lam[i]
        phi_1 = torch.expm1(-h)
        d_used, g = _guided(guidance, d, t_int, -al[i + 1] * phi_1, noise)
        m_prev = (m_prev + [d_used])[-2:]
        # 2. order: 1 at the first step and (N < 10) the last step, else 2
        order = 1 if i == 0 else (min(2, n - i) if n < 10 else 2)
        if order == 1:  # dpm_solver_first_update (:583-592)
            x_new = sg[i + 1] / sg[i] * x - al[i + 1] * phi_1 * d_used
        else:  # multistep second update (:834-848)
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (1.0 / r0) * (m_prev[-1] - m_prev[-2])
            x_new = (sg[i + 1] / sg[i]) * x - (al[i + 1] * phi_1) * m_prev[-1] - 0.5 * (al[i + 1] * phi_1) * d1_0
        x_new = _finish(x_new, g)
        if callback is not None:
            callback(
                StepInfo(
                    step=i,
                    index=i,
                    t=t_int,
                    x_t=x,
                    model_output=out,
                    pred_x0=d,
                    x_prev=x_new,
                    pred_x0_guided=g.pred_x0 if g else None,
                    sigma=float(sg[i] / al[i]),
                    guidance=g,
                )
            )
        x = x_new
    return x


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
K_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "dpm++_m2": sample_dpmpp_m2,
    "edm_euler": sample_euler,
    "edm_euler_a": sample_euler_ancestral,
    "edm_heun": sample_heun,
    "edm_dpm_2": sample_dpm_2,
    "edm_dpm_2_a": sample_dpm_2_ancestral,
    "edm_lms": sample_lms,
    "edm_dpm++_2s_a": sample_dpmpp_2s_ancestral,
    "edm_dpm++_sde": sample_dpmpp_sde,
    "edm_dpm++_2m_sde": sample_dpmpp_2m_sde,
    "edm_dpm++_3m_sde": sample_dpmpp_3m_sde,
}

# which official knobs each of the 14 HEAD --sampler choices reads (edm_sampler.py:28-41; pipeline.py:179-199:
# spaced and dpm++_m2 read none, ddim is built with eta=0 whatever --eta says)
SAMPLER_KNOBS: dict[str, tuple[str, ...]] = {
    "spaced": (),
    "ddim": (),
    "dpm++_m2": (),
    "edm_euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "edm_euler_a": ("eta", "s_noise"),
    "edm_heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "edm_dpm_2": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "edm_dpm_2_a": ("eta", "s_noise"),
    "edm_lms": ("order",),
    "edm_dpm++_2s_a": ("eta", "s_noise"),
    "edm_dpm++_sde": ("eta", "s_noise"),
    "edm_dpm++_2m": (),
    "edm_dpm++_2m_sde": ("eta", "s_noise"),
    "edm_dpm++_3m_sde": ("eta", "s_noise"),
}
OFFICIAL_SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_KNOBS)


def run_k_sampler(
    name: str,
    denoiser: Denoiser,
    x_T: Tensor,
    training: TrainingSchedule,
    steps: int,
    *,
    guidance: Guidance | None = None,
    noise: NoiseFn | None = None,
    seed: int | None = None,
    callback: Callback | None = None,
    official_sigma_max: bool = False,
    **knobs: Any,
) -> Tensor:
    """Any of the 14 official names with the official schedule; ``knobs`` = the official knobs (missing ones take
    ``OFFICIAL_KNOB_DEFAULTS``; a knob the sampler does not read is refused). spaced/ddim/edm_dpm++_2m run the
    functions of ``samplers``; ``ddim`` also accepts ``eta`` (our extension; the official pipeline fixes 0)."""
    if name not in SAMPLER_KNOBS:
        raise ValueError(f"unknown sampler {name!r}; choose from {OFFICIAL_SAMPLER_NAMES}")
    allowed = SAMPLER_KNOBS[name] + (("eta",) if name == "ddim" else ())
    bad = sorted(set(knobs) - set(allowed))
    if bad:
        raise ValueError(f"sampler {name!r} does not use {bad}; it reads {list(allowed) or 'no knobs'}")
    kw = {k: knobs.get(k, OFFICIAL_KNOB_DEFAULTS[k]) for k in SAMPLER_KNOBS[name]}
    common = {
        "parameterization": training.parameterization,
        "guidance": guidance,
        "noise": noise,
        "seed": seed,
        "callback": callback,
    }
    if name == "spaced":
        return sample_spaced(denoiser, x_T, make_spaced_schedule(training, steps), **common)
    if name == "ddim":
        return sample_ddim(
            denoiser, x_T, make_ddim_schedule(training, steps, eta=float(knobs.get("eta", 0.0))), **common
        )
    if name == "dpm++_m2":
        return sample_dpmpp_m2(denoiser, x_T, make_dpm_solver_schedule(training, steps), **common)
    sched = make_edm_schedule(training, steps, official_sigma_max=official_sigma_max)
    if name == "edm_dpm++_2m":
        return sample_dpmpp_2m(denoiser, x_T, sched, **common)
    return K_SAMPLERS[name](denoiser, x_T, sched, **kw, **common)


__all__ = [
    "K_SAMPLERS",
    "OFFICIAL_KNOB_DEFAULTS",
    "OFFICIAL_SAMPLER_NAMES",
    "SAMPLER_KNOBS",
    "DPMSolverSchedule",
    "get_ancestral_step",
    "lms_coefficient",
    "make_dpm_solver_schedule",
    "run_k_sampler",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_m2",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "timestep_for_sigma",
]
