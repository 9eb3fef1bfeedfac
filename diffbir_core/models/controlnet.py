"""The control branch ("LAControlNet" in the paper, "IRControlNet" / ``ControlNet`` in the official code).

A trainable copy of the SD UNet's encoder half - time embedding, input blocks, middle block - whose first
conv takes ``concat(z_t, c)`` (4 latent + 4 condition-latent channels, paper arXiv 2308.15070, "Stage 2"). Every encoder
feature the UNet keeps as a skip connection (12 for SD 2.1: conv_in, 2 per level, 1 per downsample) and the
middle-block output pass a 1x1 zero-initialised conv; the resulting residuals (13 for SD 2.1) are what the
UNet adds to its decoder skips and middle output (see `diffbir_core.models.ldm.ControlLDM.forward`).

Built from diffusers building blocks, mirroring ``diffusers.ControlNetModel`` (same submodule names:
``conv_in``, ``time_embedding``, ``down_blocks``, ``mid_block``, ``controlnet_down_blocks``,
``controlnet_mid_block``) but WITHOUT its conditioning-embedding hint network: the hint is a latent,
concatenated to the input. Official key layout <-> ours: `diffbir_core.models.convert`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ControlNet"]


class ControlNet(nn.Module):
    """UNet encoder + middle copy emitting one residual per skip feature plus one for the middle block.

    Arguments mirror the structural part of ``diffusers.UNet2DConditionModel``'s config;
    ``attention_heads`` is the number of heads per level (diffusers calls it ``attention_head_dim``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        hint_channels: int = 4,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        layers_per_block: int = 2,
        attention_heads: Sequence[int] = (5, 10, 20, 20),
        cross_attention_dim: int = 1024,
        transformer_layers_per_block: int = 1,
        use_linear_projection: bool = True,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block

        n = len(block_out_channels)
        if len(down_block_types) != n or len(attention_heads) != n:
            raise ValueError("block_out_channels, down_block_types and attention_heads need one entry per level")
        self.in_channels, self.hint_channels = in_channels, hint_channels
        self.config = dict(
            in_channels=in_channels,
            hint_channels=hint_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            layers_per_block=layers_per_block,
            attention_heads=tuple(attention_heads),
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            use_linear_projection=use_linear_projection,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            upcast_attention=upcast_attention,
        )
        c0 = block_out_channels[0]
        temb = 4 * c0
        self.conv_in = nn.Conv2d(in_channels + hint_channels, c0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)  # [cos, sin] for flip_sin_to_cos=True
        self.time_embedding = TimestepEmbedding(c0, temb, act_fn="silu")

        self.down_blocks = nn.ModuleList()
        zero_convs = [c0]  # channels of every emitted skip feature, in emission order
        out_ch = c0
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            last = i == n - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=transformer_layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=temb,
                    add_downsample=not last,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=attention_heads[i],
                    attention_head_dim=out_ch // attention_heads[i],
                    downsample_padding=1,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                )
            )
            zero_convs += [out_ch] * (layers_per_block + (0 if last else 1))
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=temb,
            transformer_layers_per_block=transformer_layers_per_block,
            resnet_eps=norm_eps,
            resnet_act_fn="silu",
            output_scale_factor=1.0,
            resnet_time_scale_shift="default",
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=attention_heads[-1],
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, kernel_size=1) for c in zero_convs)
        self.controlnet_mid_block = nn.Conv2d(block_out_channels[-1], block_out_channels[-1], kernel_size=1)
        self.zero_init_outputs()

    @property
    def num_residuals(self) -> int:
        return len(self.controlnet_down_blocks) + 1

    @torch.no_grad()
    def zero_init_outputs(self) -> None:
        """Zero every output 1x1 conv (the paper's zero convolutions)."""
        for conv in [*self.controlnet_down_blocks, self.controlnet_mid_block]:
            conv.weight.zero_()
            conv.bias.zero_()

    @classmethod
    def from_unet(cls, unet, hint_channels: int = 4) -> ControlNet:
        """A fresh branch initialised as in the paper: encoder/middle weights copied from ``unet``, the
        ``hint_channels`` new input channels of the first conv zero, all zero convs zero."""
        c = unet.config
        heads = c.num_attention_heads or c.attention_head_dim
        n = len(c.block_out_channels)
        heads = (heads,) * n if isinstance(heads, int) else tuple(heads)
        tl = c.transformer_layers_per_block
        if not isinstance(tl, int):
            if len(set(tl)) != 1:
                raise ValueError(f"per-level transformer depths {tl} are not supported by the control branch")
            tl = tl[0]
        p = next(unet.parameters())
        with torch.device("meta"):  # every tensor is assigned below: skip the (slow) random init
            net = cls(
                in_channels=c.in_channels,
                hint_channels=hint_channels,
                block_out_channels=c.block_out_channels,
                down_block_types=c.down_block_types,
                layers_per_block=c.layers_per_block,
                attention_heads=heads,
                cross_attention_dim=c.cross_attention_dim,
                transformer_layers_per_block=tl,
                use_linear_projection=c.use_linear_projection,
                norm_num_groups=c.norm_num_groups,
                norm_eps=c.norm_eps,
                flip_sin_to_cos=c.flip_sin_to_cos,
                freq_shift=c.freq_shift,
                upcast_attention=c.upcast_attention,
            )
        net = net.to_empty(device=p.device).to(dtype=p.dtype)
        if any(True for _ in net.buffers()):
            raise RuntimeError("ControlNet gained buffers; from_unet must initialise them explicitly")
        with torch.no_grad():
            for name in ("time_embedding", "down_blocks", "mid_block"):
                getattr(net, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
            w = unet.conv_in.weight  # [C0, in, 3, 3]
            net.conv_in.weight.copy_(torch.cat([w, w.new_zeros(w.shape[0], hint_channels, *w.shape[2:])], dim=1))
            net.conv_in.bias.copy_(unet.conv_in.bias)
        net.zero_init_outputs()
        return net

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        """x ``[B,4,h,w]`` noisy latent, hint ``[B,4,h,w]`` condition latent, t ``[B]`` original timesteps,
        context ``[B,77,D]`` -> residuals in emission order (input block 0 first, middle last)."""
        if t.ndim == 0:
            t = t[None]
        t = t.expand(x.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))  # [B, 4*C0]
        h = self.conv_in(torch.cat([x, hint], dim=1))  # [B, C0, h, w]
        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=context)
        if len(skips) != len(self.controlnet_down_blocks):
            raise RuntimeError(
                f"control branch produced {len(skips)} skip features, expected {len(self.controlnet_down_blocks)}"
            )
        outs = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        outs.append(self.controlnet_mid_block(h))
        return outs
