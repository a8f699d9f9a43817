"""VP SDE coefficients against analytic float64 references, and the hybrid noise/data mix at the ends of time."""
from __future__ import annotations

import math

import pytest
import torch

from pfsr.diffusion import VPSDE, hybrid_mix

SDE = VPSDE()


def one_minus_abar_series(t: torch.Tensor) -> torch.Tensor:
    """1 - alpha^2 = 1 - exp(-u), u = integral_0^t beta, by its Taylor series in float64 (u < 1e-3 here)."""
    t = t.double()
    u = SDE.beta_min * t + 0.5 * (SDE.beta_max - SDE.beta_min) * t**2
    return u * (1 - u / 2 + u**2 / 6 - u**3 / 24 + u**4 / 120)


def test_sigma_exact_near_zero():
    t = torch.logspace(-8, -2, 61, dtype=torch.float64)
    ref = one_minus_abar_series(t).sqrt()
    assert torch.allclose(SDE.sigma(t), ref, rtol=1e-13, atol=0)
    # float32 too: sqrt(1 - alpha^2) in float32 would lose every digit at t = 1e-8 (alpha^2 rounds to 1).
    sigma32 = SDE.sigma(t.float())
    assert sigma32.dtype == torch.float32
    assert torch.allclose(sigma32.double(), ref, rtol=1e-6, atol=0)


def test_alpha_sigma_on_the_unit_circle_and_at_t1():
    t = torch.linspace(SDE.t_min, 1, 1001, dtype=torch.float64)
    assert torch.allclose(SDE.alpha(t) ** 2 + SDE.sigma(t) ** 2, torch.ones_like(t), atol=1e-14)
    assert SDE.abar(t).sub(SDE.alpha(t) ** 2).abs().max() < 1e-15
    # alpha(1) = exp(-(beta_min + beta_max) / 4)
    assert math.isclose(SDE.alpha(torch.tensor(1.0, dtype=torch.float64)).item(), math.exp(-20.1 / 4), rel_tol=1e-14)


def test_log_snr_and_its_inverse():
    t = torch.linspace(SDE.t_min, 1, 2001, dtype=torch.float64)
    lam = SDE.log_snr(t)
    assert (lam.diff() < 0).all()
    assert torch.allclose(lam, torch.log(SDE.alpha(t) / SDE.sigma(t)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(SDE.t_from_log_snr(lam), t, rtol=1e-12, atol=1e-15)
    grid = torch.linspace(lam[0].item(), lam[-1].item(), 101, dtype=torch.float64)
    assert torch.allclose(SDE.log_snr(SDE.t_from_log_snr(grid)), grid, rtol=0, atol=1e-10)
    # float32 keeps the inverse to float32 accuracy (no cancellation near t_min)
    t32 = SDE.t_from_log_snr(SDE.log_snr(t.float()))
    assert torch.allclose(t32.double(), t, rtol=1e-5, atol=0)


def heads(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e, d = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    return x, e, d


@pytest.mark.parametrize("c", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hybrid_mix_finite_at_both_ends(c, dtype):
    x, e, d = heads(dtype)
    ref = heads(torch.float64)
    for t_end in (SDE.t_min, 1.0):
        t = torch.full((4,), t_end, dtype=dtype)
        eps_hat, x0_hat = hybrid_mix(e, d, x, t, SDE, c)
        assert torch.isfinite(eps_hat).all() and torch.isfinite(x0_hat).all(), (c, t_end)
        # and accurate: float32 agrees with the float64 mix to float32 precision (no cancellation blows up)
        eps64, x064 = hybrid_mix(ref[1], ref[2], ref[0], t.double(), SDE, c)
        assert torch.allclose(eps_hat.double(), eps64, rtol=1e-4, atol=1e-5)
        assert torch.allclose(x0_hat.double(), x064, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", [0.5, 1.0, 1.5])
def test_hybrid_mix_consistent_and_limits(c):
    x, e, d = heads(torch.float64)
    # x0_hat = (x - sigma eps_hat) / alpha wherever dividing by alpha is well conditioned (float64: all t)
    for t_val in torch.linspace(SDE.t_min, 1, 21, dtype=torch.float64).tolist():
        t = torch.full((4,), t_val, dtype=torch.float64)
        eps_hat, x0_hat = hybrid_mix(e, d, x, t, SDE, c)
        alpha, sigma = SDE.alpha(t)[:, None, None, None], SDE.sigma(t)[:, None, None, None]
        assert torch.allclose(x0_hat, (x - sigma * eps_hat) / alpha, rtol=1e-9, atol=1e-9), t_val
        assert torch.allclose(eps_hat, (x - alpha * x0_hat) / sigma, rtol=1e-9, atol=1e-9), t_val
    # noise head rules at t_min (lambda = abar^c -> 1, off by ~ c sigma), data head at t = 1 for c > 1/2
    t = torch.full((4,), SDE.t_min, dtype=torch.float64)
    eps_hat, _ = hybrid_mix(e, d, x, t, SDE, c)
    assert (eps_hat - e).abs().max() < 0.2 * c
    if c > 0.5:
        t = torch.ones(4, dtype=torch.float64)
        _, x0_hat = hybrid_mix(e, d, x, t, SDE, c)
        alpha1 = SDE.alpha(t[:1]).item()
        assert (x0_hat - d).abs().max() < 10 * alpha1 ** (2 * c - 1)
