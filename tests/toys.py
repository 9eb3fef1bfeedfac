"""Known-answer toy denoisers shared by the sampler and guidance tests."""

from __future__ import annotations

import torch


class GaussianDenoiser:
    """Exact eps / v prediction for data z0 ~ N(mu, s^2) i.i.d. (known answer for every sampler)."""

    def __init__(self, tr, mu=0.5, s=0.3):
        self.ac = torch.tensor(tr.alphas_cumprod, dtype=torch.float64)
        self.p, self.mu, self.s = tr.parameterization, mu, s

    def __call__(self, x, t):
        a = self.ac[t].view(-1, 1, 1, 1)
        xd = x.double()
        denom = a * self.s**2 + 1 - a
        eps = (1 - a).sqrt() * (xd - a.sqrt() * self.mu) / denom
        if self.p == "eps":
            return eps.float()
        x0 = self.mu + a.sqrt() * self.s**2 * (xd - a.sqrt() * self.mu) / denom
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()
