"""U-Net with BigGAN residual blocks (guided-diffusion style), conditioned on LR features and continuous time."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of continuous t in [0, 1] (scaled to [0, 1000]): [N] -> [N x dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Resample(nn.Module):
    """Nearest x2 upsampling or 2x2 average-pool downsampling (no parameters, as BigGAN's blocks)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.mode == "down":
            return F.avg_pool2d(x, 2)
        return x


class ResBlock(nn.Module):
    """BigGAN residual block: resampling inside the block, scale-shift norm from the time embedding, and the LR
    features (already at this block's resolution) added after the first conv through a 1x1 conv.

    x [N x in_ch x H x W], emb [N x emb_ch] -> [N x out_ch x H' x W'], H' = 2H (up), H/2 (down) or H;
    cond_at(H', W') gives the LR features at the output resolution [N x cond_ch x H' x W'].
    """

    def __init__(self, *, in_ch: int, out_ch: int, emb_ch: int, cond_ch: int, resample: str = "none",
                 dropout: float = 0.0):
        super().__init__()
        self.in_norm = group_norm(in_ch)
        self.resample = Resample(resample)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.cond_proj = nn.Conv2d(cond_ch, out_ch, 1)
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch)
        self.out_norm = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor, cond_at: Callable[[int, int], Tensor]) -> Tensor:
        h = self.in_conv(self.resample(F.silu(self.in_norm(x))))
        h = h + self.cond_proj(cond_at(*h.shape[-2:]))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(self.resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of [N x C x H x W], residual."""

    def __init__(self, *, channels: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(n, c, h * w))  # [N x 3C x HW]
        # contiguous [N x heads x HW x C/heads]: the fused (flash) kernels need a unit last-dim stride; the permuted
        # view falls back to the math kernel, which holds the whole HW x HW attention matrix (GBs on a photo tile)
        q, k, v = qkv.reshape(n, 3, self.num_heads, c // self.num_heads, h * w).permute(1, 0, 2, 4, 3).contiguous()
        out = F.scaled_dot_product_attention(q, k, v)  # [N x heads x HW x C/heads]
        out = out.permute(0, 1, 3, 2).reshape(n, c, h * w)
        return x + self.proj(out).reshape(n, c, h, w)


class UNet(nn.Module):
    """Score network: x_t and the bicubic upsampling [N x 2C x H x W], t [N], LR features [N x F x h x w]
    -> [N x 2C x H x W]: the noise head and the data head stacked on channels.

    H and W must be multiples of 2^(len(channel_mult) - 1) (`size_multiple`).
    """

    def __init__(self, *, in_channels: int = 6, out_channels: int = 6, cond_channels: int = 256,
                 base_channels: int = 128, channel_mult: tuple[int, ...] = (1, 1, 2, 2), num_res_blocks: int = 2,
                 attention_levels: tuple[int, ...] = (3,), num_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        self.base_channels = base_channels
        emb_ch = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        block = dict(emb_ch=emb_ch, cond_ch=cond_channels, dropout=dropout)

        self.in_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(in_ch=ch, out_ch=base_channels * mult, **block)]
                ch = base_channels * mult
                if level in attention_levels:
                    layers.append(AttentionBlock(channels=ch, num_heads=num_heads))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([ResBlock(in_ch=ch, out_ch=ch, resample="down", **block)]))
                skip_channels.append(ch)

        self.middle = nn.ModuleList([ResBlock(in_ch=ch, out_ch=ch, **block), AttentionBlock(channels=ch, num_heads=num_heads),
                                     ResBlock(in_ch=ch, out_ch=ch, **block)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(in_ch=ch + skip_channels.pop(), out_ch=base_channels * mult, **block)]
                ch = base_channels * mult
                if level in attention_levels:
                    layers.append(AttentionBlock(channels=ch, num_heads=num_heads))
                if level > 0 and i == num_res_blocks:
                    layers.append(ResBlock(in_ch=ch, out_ch=ch, resample="up", **block))
                self.up.append(nn.ModuleList(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor, cond_at) -> Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, cond_at)
            else:
                h = layer(h)
        return h

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, code_emb: Tensor | None = None) -> Tensor:
        """code_emb [N x 4 base_channels]: added to the time embedding (seed 004's adaptive condition)."""
        n, _, height, width = x.shape
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"U-Net input {height}x{width} must be a multiple of {self.size_multiple} on both sides")
        if t.shape != (n,):
            raise ValueError(f"t must have shape [{n}], got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
        if code_emb is not None:
            emb = emb + code_emb.to(emb.dtype)
        resized: dict[tuple[int, int], Tensor] = {}

        def cond_at(h: int, w: int) -> Tensor:  # LR features brought to each resolution once per call
            if (h, w) not in resized:
                resized[(h, w)] = F.interpolate(cond, size=(h, w), mode="bilinear", align_corners=False)
            return resized[(h, w)]

        h = self.in_conv(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, cond_at)
            skips.append(h)
        h = self._run(self.middle, h, emb, cond_at)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb, cond_at)
        return self.out(h)
