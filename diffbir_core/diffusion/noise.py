"""Injectable N(0, 1) noise sources for the samplers: seeded (`TorchNoise`), replayed (`ReplayNoise`) or the
official Brownian tree of the SDE samplers (`BrownianTreeNoise`, torchsde; HEAD k_diffusion.py:70-119).

A noise source is a callable ``noise(shape, like) -> Tensor`` (k-diffusion's ``noise_sampler`` idea). Every
sampler, the better start and latent guidance draw through it, so recorded official draws can be replayed
draw for draw (`ReplayNoise.from_tensors(fixture)` + `assert_exhausted()`).

Mirrors: ``torch.manual_seed(seed)`` + ``torch.randn`` / ``randn_like`` of the official samplers on CPU
(v2.0.0 utils/sampler.py:292 in p_sample, :322 x_T in sample; HEAD diffbir/sampler/*.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

try:  # cheap (~30 ms); only the Brownian-tree noise of the SDE samplers needs it
    import torchsde
except ImportError:  # pragma: no cover - depends on the environment
    torchsde = None

Tensor = torch.Tensor
NoiseFn = Callable[[tuple, Tensor], Tensor]  # (shape, like) -> N(0, 1) tensor on like's device / dtype

__all__ = [
    "NoiseFn",
    "TorchNoise",
    "ReplayNoise",
    "NoiseReplayError",
    "noise_source",
    "BrownianTreeNoise",
    "official_tree_seed",
]


class TorchNoise:
    """N(0,1) draws from a private CPU ``torch.Generator`` (``seed`` None -> nondeterministic seed).

    On CPU a generator seeded with s produces the same stream as ``torch.manual_seed(s)`` followed by
    ``torch.randn_like``, so ``TorchNoise(seed)`` reproduces an official run seeded with s. Draws are made
    on the CPU and moved to ``like``'s device/dtype, so results do not depend on the device.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self.count = 0

    def __call__(self, shape: tuple, like: Tensor) -> Tensor:
        self.count += 1
        n = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        return n.to(device=like.device, dtype=like.dtype)


class NoiseReplayError(RuntimeError):
    pass


class ReplayNoise:
    """Replays recorded draws in order; errors on a shape mismatch, when exhausted, or (``assert_exhausted``)
    when recorded draws are left over."""

    def __init__(self, draws: Sequence[Tensor]) -> None:
        self._draws = list(draws)
        self.used = 0

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str = "noise.") -> ReplayNoise:
        """All ``prefix``NNN entries of a fixture file, sorted by their number."""
        keys = sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :]))
        return cls([tensors[k] for k in keys])

    @property
    def remaining(self) -> int:
        return len(self._draws) - self.used

    def __call__(self, shape: tuple, like: Tensor) -> Tensor:
        if self.used >= len(self._draws):
            raise NoiseReplayError(
                f"noise replay exhausted: draw #{self.used} requested but only "
                f"{len(self._draws)} were recorded (the sampler draws more than the reference)"
            )
        n = self._draws[self.used]
        if tuple(n.shape) != tuple(shape):
            raise NoiseReplayError(
                f"noise replay draw #{self.used}: recorded shape {tuple(n.shape)} != requested {tuple(shape)}"
            )
        self.used += 1
        return n.to(device=like.device, dtype=like.dtype)

    def assert_exhausted(self) -> None:
        if self.remaining:
            raise NoiseReplayError(f"{self.remaining} of {len(self._draws)} recorded noise draws were not used")


def noise_source(noise: NoiseFn | None, seed: int | None) -> NoiseFn:
    """The sampler's noise: ``noise`` if given, else a `TorchNoise(seed)` stream (not both)."""
    if noise is not None and seed is not None:
        raise ValueError("pass either noise= or seed=, not both")
    return noise if noise is not None else TorchNoise(seed)


# ----------------------------------------------------------------------------------------------
# Brownian tree (official SDE samplers): (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| of one fixed path
# over [sigma_min, sigma_max]; plain (shape, like) draws go to ``fallback``. HEAD k_diffusion.py:70-94
# (BatchedBrownianTree: sorted times, w0 = zeros, one torchsde.BrownianTree(t0, w0, t1, entropy=seed) per seed)
# and :97-119 (BrownianTreeNoiseSampler). Without a seed the official code draws torch.randint(0, 2**63 - 1, [])
# from the global RNG (:76-77) when the sampler starts; `from_noise` draws it the same way from a TorchNoise.
# torchsde (requirements: torchsde==0.2.6) is needed only when a BrownianTreeNoise is built.
# ----------------------------------------------------------------------------------------------
def official_tree_seed(generator: torch.Generator | None = None) -> int:
    """The seed official k-diffusion draws for its Brownian tree (k_diffusion.py:77), from ``generator``
    (None: the global torch RNG, exactly as the official code)."""
    return int(torch.randint(0, 2**63 - 1, [], generator=generator).item())


class BrownianTreeNoise:
    """Brownian-tree noise with fixed entropy; ``interval(sigma, sigma_next, like, sigma_min=, sigma_max=)``.

    The tree is built lazily at the first ``interval`` call on ``like``'s shape, dtype and device (torchsde draws
    with a ``torch.Generator`` of that device, so CPU and CUDA paths differ, as in the official code) over
    [sigma_min, sigma_max] (the sampler passes its schedule's smallest positive and largest sigma). Later calls
    must use the same shape/device/dtype and range. ``seed`` may be a list with one seed per batch item
    (official "batched" mode). ``seed=None`` draws one like the official code (global torch RNG).
    """

    def __init__(self, seed: int | Sequence[int] | None = None, *, fallback: NoiseFn | None = None) -> None:
        if torchsde is None:  # pragma: no cover - depends on the environment
            raise ImportError("BrownianTreeNoise needs torchsde (in requirements.txt): pip install torchsde==0.2.6")
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
        t0, t1, self._sign = (lo, hi, 1) if lo < hi else (hi, lo, -1)  # BatchedBrownianTree.sort
        w0 = torch.zeros_like(like)
        if self.batched:
            if len(self.seeds) != like.shape[0]:
                raise ValueError(f"{len(self.seeds)} seeds for a batch of {like.shape[0]}")
            w0 = w0[0]
        self._trees = [self._torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in self.seeds]
        self._key = (tuple(like.shape), like.dtype, like.device, float(lo), float(hi))

    def interval(
        self,
        sigma: Tensor | float,
        sigma_next: Tensor | float,
        like: Tensor,
        *,
        sigma_min: Tensor | float,
        sigma_max: Tensor | float,
    ) -> Tensor:
        """(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|, shaped like ``like`` (official
        ``BrownianTreeNoiseSampler.__call__``)."""
        key = (
            tuple(like.shape),
            like.dtype,
            like.device,
            float(torch.as_tensor(sigma_min)),
            float(torch.as_tensor(sigma_max)),
        )
        if self._trees is None:
            self._build(like, sigma_min, sigma_max)
        elif key != self._key:
            raise ValueError(
                f"BrownianTreeNoise was built for {self._key} and cannot serve {key}; "
                "use one noise object per sampler run"
            )
        self.count += 1
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        w = w if self.batched else w[0]
        return w / (b - a).abs().sqrt()
