"""PF-SR model: RRDB LR encoder + two-headed U-Net + hybrid parametrization on the VP SDE."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import Config
from ..degradation import upsample
from ..diffusion import VPSDE, hybrid_mix, sde_from_config
from .adaptive import AdaptiveCondition, optional_code_embedding
from .inverter import NoisePredictor, start_state
from .rrdb import RRDBNet
from .unet import UNet


@dataclass
class Condition:
    """What the U-Net sees of the LR image: RRDB features [N x F x h x w] and the bicubic upsampling
    [N x C x H x W] in [0, 1]."""

    features: Tensor
    upsampled: Tensor
    mean: Optional[Tensor] = None  # diffusion.mean rrdb: the frozen encoder's output, the residual's reference
    lr: Optional[Tensor] = None  # the LR input (the inverter's)
    code: Optional[Tensor] = None  # seed 004: the adaptive condition's code [N x d] (models with one)


class PFSRModel(nn.Module):
    """Conditional score model. `heads(x_t, t, cond)` -> (e, d): noise and data predictions of the diffused
    variable; `denoise` mixes them with lambda(t) = abar(t)^c into (eps_hat, x0_hat).

    The diffused variable is r = k (HR - bicubic_up(LR)) ("residual", k = residual_scale) or 2 HR - 1 ("hr").
    """

    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        self.config = config
        self.scale = m.scale
        self.diffuse = m.diffuse
        self.residual_scale = m.residual_scale
        self.hybrid_c = config.diffusion.hybrid_c
        self.sde: VPSDE = sde_from_config(config.diffusion)
        self.rrdb = RRDBNet(num_in_ch=m.in_channels, num_out_ch=m.in_channels, scale=m.scale, num_feat=m.rrdb_num_feat,
                            num_block=m.rrdb_num_block, num_grow_ch=m.rrdb_num_grow_ch,
                            feature_blocks=tuple(m.rrdb_feature_blocks))
        self.unet = UNet(in_channels=2 * m.in_channels, out_channels=2 * m.in_channels,
                         cond_channels=self.rrdb.feature_channels, base_channels=m.unet_base_channels,
                         channel_mult=tuple(m.unet_channel_mult), num_res_blocks=m.unet_num_res_blocks,
                         attention_levels=tuple(m.unet_attention_levels), num_heads=m.unet_num_heads,
                         dropout=m.unet_dropout)
        self.freeze_encoder = m.freeze_encoder
        if m.freeze_encoder:
            self.rrdb.requires_grad_(False)
        self.diffusion_mean = config.diffusion.mean
        # The inversion stage's noise predictor (seed 001); a checkpoint of that stage carries it.
        self.inverter: Optional[NoisePredictor] = None
        if config.train.stage == "inversion":
            self.inverter = NoisePredictor(in_channels=m.in_channels, feat_channels=self.rrdb.feature_channels,
                                           num_feat=config.inversion.num_feat, num_block=config.inversion.num_block,
                                           scale=m.scale)
        self.t_star = config.inversion.t_stars[0]  # sampler invsr's start time
        self.adaptive = None if m.adaptive_condition == "none" else AdaptiveCondition(
            in_channels=m.in_channels, feature_channels=self.rrdb.feature_channels,
            emb_channels=4 * m.unet_base_channels, dims=m.adaptive_condition_dims,
            levels=m.adaptive_condition_levels, prior=m.adaptive_condition)

    @property
    def lr_multiple(self) -> int:
        """LR sides must be multiples of this (the U-Net's depth divides the HR size)."""
        return self.unet.size_multiple // math.gcd(self.unet.size_multiple, self.scale)

    def check_lr_size(self, lr: Tensor) -> None:
        h, w = lr.shape[-2:]
        need = self.unet.size_multiple
        if (h * self.scale) % need or (w * self.scale) % need:
            raise ValueError(f"HR size {h * self.scale}x{w * self.scale} (LR {h}x{w} x{self.scale}) must be a multiple "
                             f"of {need} on both sides (U-Net depth); pad the LR image to a multiple of {self.lr_multiple}")

    def condition(self, lr: Tensor, code_seeds: Optional[Sequence[int]] = None, *,
                  prior_code: bool = True) -> Condition:
        """LR [N x C x h x w] in [0, 1] -> Condition. With adaptive conditions (seed 004) and prior_code, its code
        comes from the prior (the histogram draws item i's with code_seeds[i], default 0)."""
        self.check_lr_size(lr)
        if self.freeze_encoder:
            with torch.no_grad():
                features = self.rrdb.features(lr)
        else:
            features = self.rrdb.features(lr)
        mean = None
        if self.diffusion_mean == "rrdb":
            with torch.no_grad():  # the frozen encoder's estimate of HR (config validation insists on frozen)
                mean = self.rrdb(lr)
        cond = Condition(features=features, upsampled=upsample(lr, self.scale), mean=mean, lr=lr)
        if self.adaptive is not None and prior_code:
            cond.code = self.adaptive.prior_code(features, code_seeds or [0] * lr.shape[0])
        return cond

    def to_diffused(self, hr: Tensor, cond: Condition) -> Tensor:
        if self.diffuse == "residual":
            return self.residual_scale * (hr - (cond.upsampled if cond.mean is None else cond.mean))
        return 2 * hr - 1

    def from_diffused(self, r: Tensor, cond: Condition) -> Tensor:
        if self.diffuse == "residual":
            return (cond.upsampled if cond.mean is None else cond.mean) + r / self.residual_scale
        return (r + 1) / 2

    def inversion_start(self, cond: Condition, t: Tensor, xi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The inverter's start state at t* [N] from xi [N x C x H x W] -> (x_t*, mean, logvar). The LR
        estimate (bicubic or RRDB, the residual's reference) is r = 0 in the diffused variable, so r_init = 0."""
        if self.inverter is None:
            raise ValueError("this model has no inverter: train one with train.stage: inversion "
                             "(configs/*_inversion.yaml, --init this model's run)")
        mean, logvar = self.inverter(cond.lr, cond.features, t)
        return start_state(self.sde, t, mean, logvar, xi), mean, logvar

    def heads(self, x_t: Tensor, t: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        """x_t [N x C x H x W], t [N] -> (e, d), each [N x C x H x W]."""
        out = self.unet(torch.cat([x_t, 2 * cond.upsampled - 1], dim=1), t, cond.features,
                        code_emb=optional_code_embedding(self.adaptive, cond.code))
        return out.chunk(2, dim=1)

    def denoise(self, x_t: Tensor, t: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        """-> (eps_hat, x0_hat) of the hybrid parametrization."""
        e, d = self.heads(x_t, t, cond)
        return hybrid_mix(e, d, x_t, t, self.sde, self.hybrid_c)

    def denoiser_fns(self, cond: Condition):
        """(eps_fn, x0_fn) for `pfsr.sampling.sample`; each call is one network evaluation."""

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.denoise(x, t, cond)[0]

        def x0_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.denoise(x, t, cond)[1]

        return eps_fn, x0_fn

    def regress(self, lr: Tensor) -> Tensor:
        """The RRDB's own L1 regression output [N x C x sh x sw] (encoder stage, baseline)."""
        return self.rrdb(lr)


def build_model(config: Config) -> PFSRModel:
    return PFSRModel(config)
