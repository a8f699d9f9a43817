"""Continuous-time VP SDE and the hybrid noise/data parametrization (seed 000, Song et al. 2021).

Notation: x_t = alpha(t) x_0 + sigma(t) eps with alpha^2 + sigma^2 = 1. The seed writes alpha for the signal
variance; here that is abar(t) = alpha(t)^2.
"""
from __future__ import annotations

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dimensions in all."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class VPSDE:
    """dx = -beta(t)/2 x dt + sqrt(beta(t)) dW with linear beta(t) = beta_min + t (beta_max - beta_min), t in [t_min, 1].

    All methods take and return tensors; times are tensors of any shape.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, 1.0

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, t_min={self.t_min})"

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        """log of the mean coefficient: -1/2 * integral_0^t beta."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def abar(self, t: Tensor) -> Tensor:
        """Signal variance alpha^2 (the seed's alpha)."""
        return torch.exp(2 * self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        # sqrt(1 - alpha^2) through expm1: exact near t = 0, where 1 - alpha^2 ~ beta_min t.
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha / sigma), decreasing in t (DPM-Solver's half log-SNR)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of log_snr."""
        neg_log_alpha = 0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        delta = self.beta_max - self.beta_min
        return 2 * neg_log_alpha / (0.5 * self.beta_min + torch.sqrt(0.25 * self.beta_min**2 + delta * neg_log_alpha))

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t) of the forward SDE."""
        return -0.5 * append_dims(self.beta(t), x.ndim) * x

    def diffusion(self, t: Tensor) -> Tensor:
        """g(t) of the forward SDE."""
        return torch.sqrt(self.beta(t))

    def marginal(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """q_sample: x_t = alpha x0 + sigma eps; t of shape [B]."""
        return append_dims(self.alpha(t), x0.ndim) * x0 + append_dims(self.sigma(t), x0.ndim) * noise

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def pf_ode_drift(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """dx/dt of the probability-flow ODE given the predicted noise: f - g^2/2 * score, score = -eps/sigma."""
        beta = append_dims(self.beta(t), x.ndim)
        return -0.5 * beta * (x - eps / append_dims(self.sigma(t), x.ndim))


def hybrid_mix(e: Tensor, d: Tensor, x_t: Tensor, t: Tensor, sde: VPSDE, c: float) -> tuple[Tensor, Tensor]:
    """Mix the noise head `e` and the data head `d` with lambda(t) = abar(t)^c.

    Returns (eps_hat, x0_hat):
        eps_hat = lambda e + (1 - lambda) (x_t - alpha d) / sigma
        x0_hat  = (x_t - sigma eps_hat) / alpha = lambda (x_t - sigma e) / alpha + (1 - lambda) d
    x0_hat uses the second form, which stays finite at t = 1 (alpha ~ 0.0066) for c >= 0.5, and eps_hat is
    finite at t_min because (1 - lambda) / sigma ~ c sigma there.
    """
    alpha = append_dims(sde.alpha(t), x_t.ndim)
    sigma = append_dims(sde.sigma(t), x_t.ndim)
    lam = append_dims(sde.abar(t) ** c, x_t.ndim)
    one_minus_lam = append_dims(-torch.expm1(c * 2 * sde.log_alpha(t)), x_t.ndim)
    eps_hat = lam * e + one_minus_lam * (x_t - alpha * d) / sigma
    x0_hat = lam * (x_t - sigma * e) / alpha + one_minus_lam * d
    return eps_hat, x0_hat


def sde_from_config(cfg) -> VPSDE:
    """VPSDE from a DiffusionConfig."""
    return VPSDE(cfg.beta_min, cfg.beta_max, cfg.t_min)


__all__ = ["VPSDE", "hybrid_mix", "append_dims", "sde_from_config"]
