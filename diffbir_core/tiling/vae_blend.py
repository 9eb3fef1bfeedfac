"""The official tiled VAE ("blend"): encode / decode overlapping tiles, fused with Gaussian weights.

Every tile is normalised with its OWN GroupNorm statistics, so neighbouring tiles can disagree in brightness and
contrast (seams); the seam-free alternative is `vae_sync`. Sizes: encoder tiles in image pixels (multiples of
8, fused in latent space), decoder tiles in latent pixels (fused in image space). Checked against the fixture
``tiled.safetensors`` (official v2.0.0 run on the tiny models).

Mirrors: v2.0.0 model/cldm.py:98 (vae_encode_tiled), :116 (vae_decode_tiled).
Deviation: ``sample=True`` draws ONE posterior sample from the blended posterior (the official code blends
per-tile samples, which shrinks the noise where tiles overlap).
"""

from __future__ import annotations

import torch

from .windows import Progress, Window, blend_tiles

Tensor = torch.Tensor

__all__ = ["check_vae_image", "posterior_to_latent", "vae_decode_tiled", "vae_encode_tiled", "vae_posterior_tiled"]


def check_vae_image(x: Tensor, what: str) -> None:
    """Refuse anything but a ``[B,C,H,W]`` image with H and W multiples of 8 (the VAE's downsampling)."""
    if x.ndim != 4 or x.shape[-1] % 8 or x.shape[-2] % 8:
        raise ValueError(f"{what}: image must be [B,C,H,W] with H and W multiples of 8, got {tuple(x.shape)}")


def vae_posterior_tiled(
    ldm, image: Tensor, tile_size: int, tile_stride: int, *, progress: Progress | None = None
) -> tuple[Tensor, Tensor]:
    """(mean, logvar) of the VAE posterior, tiles of ``tile_size`` / ``tile_stride`` image pixels (multiples of
    8) blended with ``gaussian_weights(tile/8, tile/8)`` in latent space (official ``vae_encode_tiled``)."""
    check_vae_image(image, "vae_posterior_tiled")
    if tile_size % 8 or tile_stride % 8:
        raise ValueError(f"VAE tile size/stride must be multiples of 8 pixels, got {tile_size}/{tile_stride}")
    h, w = image.shape[-2] // 8, image.shape[-1] // 8

    def run(win: Window) -> Tensor:
        h0, h1, w0, w1 = win
        mean, logvar = ldm.vae_posterior(image[..., h0 * 8 : h1 * 8, w0 * 8 : w1 * 8])
        return torch.cat([mean, logvar], 1)  # [B,2z,th,tw]

    moments = blend_tiles(run, (h, w), tile_size // 8, tile_stride // 8, stage="vae_encoder", progress=progress)
    return moments.chunk(2, dim=1)


def vae_encode_tiled(
    ldm,
    image: Tensor,
    tile_size: int,
    tile_stride: int,
    sample: bool = False,
    noise: Tensor | None = None,
    *,
    progress: Progress | None = None,
) -> Tensor:
    """Official ``vae_encode_tiled(image, tile_size, tile_stride, sample)`` (image pixels). ``sample=True`` draws
    ONE posterior sample from the blended posterior (the official code blends per-tile samples, which shrinks
    the noise where tiles overlap); ``noise`` is that draw (default ``torch.randn``)."""
    mean, logvar = vae_posterior_tiled(ldm, image, tile_size, tile_stride, progress=progress)
    return posterior_to_latent(ldm, mean, logvar, sample, noise)


def posterior_to_latent(ldm, mean: Tensor, logvar: Tensor, sample: bool, noise: Tensor | None) -> Tensor:
    """Latent from a VAE posterior: ``mean * scale_factor`` (``sample=False``) or
    ``(mean + exp(logvar / 2) * noise) * scale_factor`` (``noise`` default ``torch.randn``)."""
    if not sample:
        return mean * ldm.scale_factor
    if noise is None:
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
    return (mean + torch.exp(0.5 * logvar) * noise) * ldm.scale_factor


def vae_decode_tiled(ldm, z: Tensor, tile_size: int, tile_stride: int, *, progress: Progress | None = None) -> Tensor:
    """Official ``vae_decode_tiled(z, tile_size, tile_stride)`` (latent pixels); pixel weights
    ``gaussian_weights(8 tile, 8 tile)``."""

    def run(win: Window) -> Tensor:
        h0, h1, w0, w1 = win
        return ldm.vae_decode(z[..., h0:h1, w0:w1])

    return blend_tiles(
        run, tuple(z.shape[-2:]), tile_size, tile_stride, out_scale=8, stage="vae_decoder", progress=progress
    )
