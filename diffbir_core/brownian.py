"""Brownian-tree noise for the SDE samplers: torchsde's ``BrownianTree``, queried like official k-diffusion.

``BrownianTreeNoise.interval(sigma, sigma_next, like, sigma_min=, sigma_max=)`` returns the normalised increment
(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| of one fixed Brownian path over [sigma_min, sigma_max] (one
path per batch item for a list of seeds); ``k_samplers`` uses it for dpm++_sde / 2m_sde / 3m_sde. Plain
``(shape, like)`` draws (churn, guidance targets) go to ``fallback`` (a ``TorchNoise``).
Mirrors HEAD ``diffbir/sampler/k_diffusion.py:70-94`` (``BatchedBrownianTree``: sorted times, w0 = zeros_like(x),
one ``torchsde.BrownianTree(t0, w0, t1, entropy=seed)`` per seed, sign for reversed queries) and ``:97-119``
(``BrownianTreeNoiseSampler``, identity transform). Without a seed the official code draws
``torch.randint(0, 2**63 - 1, []).item()`` from the global RNG (``:76-77``) when the sampler starts (``:551, :623,
:665``); ``from_noise`` draws it the same way from a ``TorchNoise`` generator, so an official CPU run seeded with s
is reproduced draw for draw. torchsde is optional: imported in the constructor (``pip install torchsde==0.2.6``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .samplers import NoiseFn, TorchNoise

Tensor = torch.Tensor


def official_tree_seed(generator: torch.Generator | None = None) -> int:
    """The seed official k-diffusion draws for its Brownian tree (k_diffusion.py:77), from ``generator``
    (None: the global torch RNG, exactly as the official code)."""
    return int(torch.randint(0, 2 ** 63 - 1, [], generator=generator).item())


class BrownianTreeNoise:
    """Brownian-tree noise with fixed entropy; ``interval(sigma, sigma_next, like, sigma_min=, sigma_max=)``.

    The tree is built lazily at the first ``interval`` call on ``like``'s shape, dtype and device (torchsde draws
    with a ``torch.Generator`` of that device, so CPU and CUDA paths differ, as in the official code) over
    [sigma_min, sigma_max] (the sampler passes its schedule's smallest positive and largest sigma). Later calls
    must use the same shape/device/dtype and range. ``seed`` may be a list with one seed per batch item
    (official "batched" mode). ``seed=None`` draws one like the official code (global torch RNG).
    """

    def __init__(self, seed: int | Sequence[int] | None = None, *, fallback: NoiseFn | None = None) -> None:
        try:
            import torchsde
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("BrownianTreeNoise needs torchsde (optional dependency): pip install torchsde==0.2.6") \
                from e
        self._torchsde = torchsde
        if seed is None:
            seed = official_tree_seed()
        self.batched = not isinstance(seed, int)
        self.seeds = [int(s) for s in seed] if self.batched else [int(seed)]
        if not self.seeds:
            raise ValueError("BrownianTreeNoise needs at least one seed")
        self.fallback: NoiseFn = fallback if fallback is not None else TorchNoise(self.seeds[0])
        self._trees = None
        self._key = None
        self.count = 0

    @classmethod
    def from_noise(cls, noise: TorchNoise) -> BrownianTreeNoise:
        """Seed the tree from ``noise``'s generator as the official sampler seeds it from the global RNG
        (k_diffusion.py:77); ``noise`` then serves the plain draws. With ``noise = TorchNoise(s)`` used for the
        draws before the sampler (e.g. x_T), this matches an official CPU run after ``torch.manual_seed(s)``."""
        return cls(official_tree_seed(noise.generator), fallback=noise)

    def __call__(self, shape: tuple, like: Tensor) -> Tensor:
        return self.fallback(shape, like)

    def _build(self, like: Tensor, sigma_min: Tensor | float, sigma_max: Tensor | float) -> None:
        lo, hi = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        if not float(lo) > 0:
            raise ValueError(f"sigma_min must be > 0 for a Brownian tree, got {float(lo)}")
        t0, t1, self._sign = (lo, hi, 1) if lo < hi else (hi, lo, -1)        # BatchedBrownianTree.sort
        w0 = torch.zeros_like(like)
        if self.batched:
            if len(self.seeds) != like.shape[0]:
                raise ValueError(f"{len(self.seeds)} seeds for a batch of {like.shape[0]}")
            w0 = w0[0]
        self._trees = [self._torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in self.seeds]
        self._key = (tuple(like.shape), like.dtype, like.device, float(lo), float(hi))

    def interval(self, sigma: Tensor | float, sigma_next: Tensor | float, like: Tensor, *,
                 sigma_min: Tensor | float, sigma_max: Tensor | float) -> Tensor:
        """(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|, shaped like ``like`` (official
        ``BrownianTreeNoiseSampler.__call__``)."""
        key = (tuple(like.shape), like.dtype, like.device, float(torch.as_tensor(sigma_min)),
               float(torch.as_tensor(sigma_max)))
        if self._trees is None:
            self._build(like, sigma_min, sigma_max)
        elif key != self._key:
            raise ValueError(f"BrownianTreeNoise was built for {self._key} and cannot serve {key}; "
                             "use one noise object per sampler run")
        self.count += 1
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        w = w if self.batched else w[0]
        return w / (b - a).abs().sqrt()
