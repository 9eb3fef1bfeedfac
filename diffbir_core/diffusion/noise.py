"""Injectable N(0, 1) noise sources for the samplers: seeded (`TorchNoise`) or replayed (`ReplayNoise`).

A noise source is a callable ``noise(shape, like) -> Tensor`` (k-diffusion's ``noise_sampler`` idea). Every
sampler, the better start and latent guidance draw through it, so recorded official draws can be replayed
draw for draw (`ReplayNoise.from_tensors(fixture)` + `assert_exhausted()`).

Mirrors: ``torch.manual_seed(seed)`` + ``torch.randn`` / ``randn_like`` of the official samplers on CPU
(v2.0.0 utils/sampler.py:292 in p_sample, :322 x_T in sample; HEAD diffbir/sampler/*.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

Tensor = torch.Tensor
NoiseFn = Callable[[tuple, Tensor], Tensor]  # (shape, like) -> N(0, 1) tensor on like's device / dtype

__all__ = ["NoiseFn", "TorchNoise", "ReplayNoise", "NoiseReplayError", "noise_source"]


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
        keys = sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
        return cls([tensors[k] for k in keys])

    @property
    def remaining(self) -> int:
        return len(self._draws) - self.used

    def __call__(self, shape: tuple, like: Tensor) -> Tensor:
        if self.used >= len(self._draws):
            raise NoiseReplayError(f"noise replay exhausted: draw #{self.used} requested but only "
                                   f"{len(self._draws)} were recorded (the sampler draws more than the reference)")
        n = self._draws[self.used]
        if tuple(n.shape) != tuple(shape):
            raise NoiseReplayError(f"noise replay draw #{self.used}: recorded shape {tuple(n.shape)} "
                                   f"!= requested {tuple(shape)}")
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
