"""InvSR-style noise predictor (seed 001, Yue et al. 2025): the start noise of a frozen PF-SR model at t*.

The predictor sees the LR image and the RRDB features and outputs a Gaussian over the start noise (the VAE-style
reparametrization of InvSR's NoisePredictor); the sampler starts from
    x_t* = alpha(t*) r_init + sigma(t*) (mean + exp(logvar / 2) xi),   xi ~ N(0, I),
with r_init the diffused variable of the LR estimate, which is 0 in PF-SR's residual coordinates (r = k (HR - mu)
with mu the bicubic or RRDB estimate).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..diffusion import VPSDE, append_dims
from .unet import group_norm, timestep_embedding, zero_module


class InverterBlock(nn.Module):
    """Residual block at LR resolution with the t* embedding added between its convs: [N x F x h x w] -> same."""

    def __init__(self, *, num_feat: int, emb_ch: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(num_feat), nn.SiLU(), nn.Conv2d(num_feat, num_feat, 3, padding=1))
        self.emb_proj = nn.Linear(emb_ch, num_feat)
        self.out_layers = nn.Sequential(group_norm(num_feat), nn.SiLU(), nn.Conv2d(num_feat, num_feat, 3, padding=1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_proj(emb)[:, :, None, None]
        return x + self.out_layers(h)


class NoisePredictor(nn.Module):
    """(LR [N x C x h x w] in [0, 1], RRDB features [N x F x h x w], t* [N]) -> (mean, logvar), each
    [N x C x sh x sw]. The output conv starts at zero: mean 0 and logvar 0, i.e. random start noise."""

    def __init__(self, *, in_channels: int, feat_channels: int, num_feat: int, num_block: int, scale: int):
        super().__init__()
        self.num_feat = num_feat
        emb_ch = 4 * num_feat
        self.time_embed = nn.Sequential(nn.Linear(num_feat, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(in_channels + feat_channels, num_feat, 3, padding=1)
        self.blocks = nn.ModuleList(InverterBlock(num_feat=num_feat, emb_ch=emb_ch) for _ in range(num_block))
        self.upsample = nn.Sequential(nn.Conv2d(num_feat, num_feat * scale**2, 3, padding=1), nn.PixelShuffle(scale))
        self.conv_out = nn.Sequential(group_norm(num_feat), nn.SiLU(),
                                      zero_module(nn.Conv2d(num_feat, 2 * in_channels, 3, padding=1)))

    def forward(self, lr: Tensor, features: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        assert lr.shape[-2:] == features.shape[-2:], (lr.shape, features.shape)
        emb = self.time_embed(timestep_embedding(t, self.num_feat))
        h = self.conv_in(torch.cat([2 * lr - 1, features], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        mean, logvar = self.conv_out(self.upsample(h)).chunk(2, dim=1)
        return mean, logvar


def start_state(sde: VPSDE, t: Tensor, mean: Tensor, logvar: Tensor, xi: Tensor,
                r_init: Optional[Tensor] = None) -> Tensor:
    """x_t* = alpha(t*) r_init + sigma(t*) (mean + exp(logvar / 2) xi); t [N], the rest [N x C x H x W]."""
    alpha, sigma = append_dims(sde.alpha(t), xi.ndim), append_dims(sde.sigma(t), xi.ndim)
    x = sigma * (mean + torch.exp(0.5 * logvar) * xi)
    return x if r_init is None else x + alpha * r_init
