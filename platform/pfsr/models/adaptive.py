"""Quantized adaptive conditions (seed 004, Liang et al. 2024), for conditional SR.

While training, a small encoder of the clean diffused variable (the HR residual) gives y [N x d]; finite scalar
quantization with the seed's f(y) = floor(L sigmoid(y)) and a straight-through estimator gives the code y_q in
{0..L-1}^d, which two linear layers embed and add to the U-Net's time embedding; all trained jointly with DSM.
At sampling time the code comes from a prior:
    histogram  the seed's online sampling weights: an EMA (the model's EMA decay) of the code counts of each
               training batch, summed over the DDP ranks; a code index is drawn from it
    lr         a small predictor from the RRDB's LR features, trained with cross-entropy on the quantized codes
               (detached, so that it does not change the encoder or the RRDB); the most likely code
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

PRIORS = ("histogram", "lr")
ENCODER_CHANNELS = 32


def quantize_ste(y: Tensor, levels: int) -> Tensor:
    """f_STE(y) = y + sg(floor(L sigmoid(y)) - y): the value is the code in {0..L-1}, the gradient passes
    unchanged to y. y [N x d] -> [N x d]."""
    q = torch.floor(levels * torch.sigmoid(y)).clamp(max=levels - 1)  # sigmoid rounds to 1.0 for large y
    return y + (q - y).detach()


def code_index(code: Tensor, levels: int) -> Tensor:
    """Codes [N x d] in {0..L-1} -> indices [N] in [0, L^d): sum_i code_i L^i."""
    weights = levels ** torch.arange(code.shape[1], device=code.device, dtype=torch.int64)
    return (code.detach().round().long() * weights).sum(dim=1)


def code_from_index(index: Tensor, dims: int, levels: int) -> Tensor:
    """Inverse of code_index: [N] -> [N x d] float."""
    weights = levels ** torch.arange(dims, device=index.device, dtype=torch.int64)
    return ((index[:, None] // weights) % levels).float()


class CodeEncoder(nn.Module):
    """Clean diffused variable [N x C x H x W] -> y [N x dims] (three stride-2 convolutions, global mean)."""

    def __init__(self, *, in_channels: int, dims: int, channels: int = ENCODER_CHANNELS):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, stride=2, padding=1), nn.SiLU())
        self.proj = nn.Linear(2 * channels, dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x).mean(dim=(2, 3)))


class AdaptiveCondition(nn.Module):
    """Encoder, code embedding, LR predictor and histogram of seed 004's codes (see the module docstring).

    The histogram is a buffer [L^d] (so the EMA model and checkpoints carry it); `prior` names the one used at
    sampling time.
    """

    def __init__(self, *, in_channels: int, feature_channels: int, emb_channels: int, dims: int, levels: int,
                 prior: str):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
        self.dims, self.levels, self.prior = dims, levels, prior
        self.encoder = CodeEncoder(in_channels=in_channels, dims=dims)
        self.embed = nn.Sequential(nn.Linear(dims, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.predictor = nn.Sequential(nn.Linear(feature_channels, 64), nn.SiLU(), nn.Linear(64, dims * levels))
        self.register_buffer("histogram", torch.zeros(levels ** dims))

    def encode(self, x0: Tensor) -> Tensor:
        """Clean diffused variable [N x C x H x W] -> quantized code [N x d] (straight-through)."""
        return quantize_ste(self.encoder(x0), self.levels)

    def predictor_logits(self, features: Tensor) -> Tensor:
        """RRDB features [N x F x h x w] -> logits [N x d x L]."""
        return self.predictor(features.mean(dim=(2, 3))).reshape(-1, self.dims, self.levels)

    def predictor_loss(self, features: Tensor, code: Tensor) -> Tensor:
        """Cross-entropy of the LR predictor on the quantized codes (both detached)."""
        logits = self.predictor_logits(features.detach())
        return F.cross_entropy(logits.reshape(-1, self.levels).float(), code.detach().round().long().reshape(-1))

    @torch.no_grad()
    def update_histogram(self, code: Tensor, decay: float) -> None:
        """w <- decay w + (1 - decay) counts of this step's codes [N x d], counts summed over the DDP ranks."""
        counts = torch.bincount(code_index(code, self.levels), minlength=self.histogram.numel()).to(self.histogram)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        self.histogram.mul_(decay).add_(counts, alpha=1 - decay)

    @torch.no_grad()
    def prior_code(self, features: Tensor, seeds: Sequence[int]) -> Tensor:
        """The code of each item at sampling time [N x d]: drawn from the histogram with a CPU generator seeded by
        seeds[i] (the same on any device), or the LR predictor's most likely code."""
        if self.prior == "lr":
            return self.predictor_logits(features).argmax(dim=-1).float()
        weights = self.histogram.double().cpu()
        if weights.sum() <= 0:  # an untrained model: every code equally likely
            weights = torch.ones_like(weights)
        index = torch.stack([torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(int(s)))[0]
                             for s in seeds])
        return code_from_index(index, self.dims, self.levels).to(features.device)

    def describe(self) -> str:
        """One line for logs, metrics.json and the X-PFSR-Notes header."""
        return self.describe_prior(self.dims, self.levels, self.prior)

    @staticmethod
    def describe_prior(dims: int, levels: int, prior: str) -> str:
        source = "histogram of training codes" if prior == "histogram" else "LR predictor from RRDB features"
        return f"adaptive condition: {dims} dims x {levels} levels, code from the {prior} prior ({source})"


def describe_config(model_config: dict) -> Optional[str]:
    """`AdaptiveCondition.describe` from a checkpoint's config["model"] (None without adaptive conditions)."""
    prior = model_config.get("adaptive_condition", "none")
    if prior == "none":
        return None
    return AdaptiveCondition.describe_prior(model_config["adaptive_condition_dims"],
                                            model_config["adaptive_condition_levels"], prior)


def optional_code_embedding(adaptive: Optional[AdaptiveCondition], code: Optional[Tensor]) -> Optional[Tensor]:
    """The code's embedding [N x emb] to add to the time embedding, or None without adaptive conditions."""
    if adaptive is None:
        return None
    if code is None:
        raise ValueError("this model has adaptive conditions: the Condition needs a code (model.condition(lr) "
                         "draws one from the prior)")
    return adaptive.embed(code)
