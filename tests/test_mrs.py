"""Seed 003 (MR Sampler) on PF-SR's residual VP SDE.

The mapping (pfsr.sampling's docstring): X = mu + r / k is mean-reverting around mu = bicubic_up(LR) with
theta = beta / 2 and lambda = 1 / k; MRS's alpha_t is VPSDE.alpha, its sigma_t is VPSDE.sigma / k, its data
prediction mu + x0 / k. The MR-form updates below are written from the MRS paper / reference code
(grrrute/mr-sampler, utils/sampler.py: step_ode_1st, step_sde_1st, step_sde_2nd) in those symbols, with the mu terms.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfsr.diffusion import VPSDE, append_dims
from pfsr.sampling import LambdaGrid, mrs_sde_coefficients, sample, sample_dpmpp_2m, sample_mrs_sde

SDE = VPSDE()
K = 5.0  # residual_scale: lambda = 1 / k


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


class Gaussian:
    """r0 ~ N(m, s^2) per pixel; exact data prediction x0(x, t) = a_t + b_t x."""

    def __init__(self, m, s):
        self.m, self.s = m, s

    def ab(self, t: float):
        alpha, sigma = SDE.alpha(torch.tensor(t, dtype=torch.float64)), SDE.sigma(torch.tensor(t, dtype=torch.float64))
        var = alpha**2 * self.s**2 + sigma**2
        b = alpha * self.s**2 / var
        return self.m - b * alpha * self.m, b

    def x0(self, x, t):
        a, b = self.ab(t[0].item())
        return a + b * x

    def marginal(self, t: float):
        alpha, sigma = SDE.alpha(torch.tensor(t, dtype=torch.float64)), SDE.sigma(torch.tensor(t, dtype=torch.float64))
        return alpha * self.m, alpha**2 * self.s**2 + sigma**2


@pytest.fixture
def gaussian():
    m = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64)
    s = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5], dtype=torch.float64)
    s = s[torch.tensor([3, 6, 0, 7, 1, 5, 2, 4])]  # widths not ordered like the means
    return Gaussian(m, s)


def mr(grid: LambdaGrid, i: int):
    """MRS's alpha_t, sigma_t (= VP sigma / k) at grid points i and i + 1, and h."""
    return (grid.alpha[i].item(), grid.sigma[i].item() / K, grid.alpha[i + 1].item(), grid.sigma[i + 1].item() / K,
            grid.h(i))


def test_mr_form_ode_order_1_is_the_first_order_step():
    grid = LambdaGrid.build(SDE, 10, "logsnr")
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(3, 8, 8, dtype=torch.float64, generator=gen)
    for i in range(grid.steps):
        X_s = mu + torch.randn(3, 8, 8, dtype=torch.float64, generator=gen) / K
        x_theta = mu + 0.1 * torch.randn(3, 8, 8, dtype=torch.float64, generator=gen)
        a_s, s_s, a_t, s_t, h = mr(grid, i)
        X_t = s_t / s_s * X_s - a_t * math.expm1(-h) * x_theta + mu * (1 - s_t / s_s + s_t / s_s * a_s - a_t)
        r_t = grid.first_order_step(K * (X_s - mu), K * (x_theta - mu), i)
        assert (K * (X_t - mu) - r_t).abs().max().item() < 1e-12


@pytest.mark.parametrize("steps", [6, 12])
def test_mr_form_ode_order_2_is_dpmpp_2m(gaussian, steps):
    """MRS-ODE-2 in MR form with DPM-Solver's midpoint weight of the difference, warm-up and lower final order as
    the reference sampler: the same trajectory as sample_dpmpp_2m. The reference code's Taylor weight differs."""
    gen = torch.Generator().manual_seed(1)
    mu = torch.rand(8, dtype=torch.float64, generator=gen)
    r_T = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    grid = LambdaGrid.build(SDE, steps, "logsnr")
    ours = sample_dpmpp_2m(None, r_T, SDE, steps=steps, x0_fn=gaussian.x0)

    def run(taylor: bool):
        X, prev = mu + r_T / K, None
        for i in range(grid.steps):
            t = torch.full((4,), grid.t[i].item(), dtype=torch.float64)
            x_theta = mu + gaussian.x0(K * (X - mu), t) / K
            a_s, s_s, a_t, s_t, h = mr(grid, i)
            phi1 = math.expm1(-h)
            D = phi1 * x_theta
            if grid.step_order(i, 2) == 2:
                D1 = (x_theta - prev) / (grid.h(i - 1) / h)
                D = D - (phi1 / h + 1) * D1 if taylor else D + phi1 / 2 * D1  # -phi2 ~ phi1 / 2 ~ -h / 2
            X, prev = s_t / s_s * X - a_t * D + mu * (1 - s_t / s_s + s_t / s_s * a_s - a_t), x_theta
        return K * (X - mu)

    assert (run(taylor=False) - ours.x).abs().max().item() < 1e-12
    assert (run(taylor=True) - ours.x).abs().max().item() > 1e-6


@pytest.mark.parametrize("order", [1, 2])
def test_mr_form_sde_is_mrs_sde(gaussian, order):
    """The reference's step_sde_1st / step_sde_2nd in MR form, with the noise the sampler draws: the same path."""
    steps = 12
    gen = torch.Generator().manual_seed(2)
    mu = torch.rand(8, dtype=torch.float64, generator=gen)
    r_T = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    ours = sample_mrs_sde(None, r_T, SDE, steps=steps, x0_fn=gaussian.x0, order=order,
                          generator=torch.Generator().manual_seed(7))
    noise = torch.Generator().manual_seed(7)
    grid = LambdaGrid.build(SDE, steps, "logsnr")
    X, prev = mu + r_T / K, None
    for i in range(steps):
        t = torch.full((4,), grid.t[i].item(), dtype=torch.float64)
        x_theta = mu + gaussian.x0(K * (X - mu), t) / K
        a_s, s_s, a_t, s_t, h = mr(grid, i)
        z = torch.randn(X.shape, generator=noise, dtype=torch.float64)
        phi1 = 1 - math.exp(-2 * h)
        X_next = s_t / s_s * math.exp(-h) * X + a_t * phi1 * x_theta + s_t * math.sqrt(phi1) * z
        X_next = X_next + mu * (1 - a_t / a_s * math.exp(-2 * h) - a_t * phi1)
        if grid.step_order(i, order) == 2:
            X_next = X_next + a_t * (1 - phi1 / 2 / h) * (x_theta - prev) / (grid.h(i - 1) / h)
        X, prev = X_next, x_theta
    assert ours.nfe == steps
    assert (K * (X - mu) - ours.x).abs().max().item() < 1e-11


@pytest.mark.parametrize("order", [1, 2])
def test_point_mass_first_order_step_keeps_the_forward_marginal(order):
    """x0 = c exactly (a point mass): from x ~ N(alpha_1 c, sigma_1^2) every step lands on N(alpha_t c, sigma_t^2);
    checked at each of the 8 evaluations and at t_min, within 5 standard errors (the difference term is 0 here)."""
    c = torch.tensor([-1.0, -0.3, 0.0, 0.4, 0.8, 1.2, 2.0, 3.0], dtype=torch.float64)
    n = 8192
    gen = torch.Generator().manual_seed(3)
    a1, s1 = SDE.alpha(torch.tensor(1.0, dtype=torch.float64)), SDE.sigma(torch.tensor(1.0, dtype=torch.float64))
    x_T = a1 * c + s1 * torch.randn(n, 8, dtype=torch.float64, generator=gen)
    seen = []

    def x0_fn(x, t):
        seen.append((t[0].item(), x.clone()))
        return c.expand_as(x)

    res = sample(None, x_T, SDE, method="mrs_sde", steps=8, x0_fn=x0_fn, generator=gen, order=order)
    seen.append((SDE.t_min, res.x))
    assert len(seen) == 9 and res.nfe == 8
    for t, x in seen:
        tt = torch.tensor(t, dtype=torch.float64)
        mean, var = SDE.alpha(tt) * c, SDE.sigma(tt) ** 2
        assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all(), t
        assert ((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all(), t


def propagate(gaussian: Gaussian, steps: int, order: int):
    """Mean and variance at t_min of mrs_sde's recursion from the exact marginal at t = 1, exactly: with
    x0_i = a_i + b_i x_i the step is x_{i+1} = u + v x_i + w x_{i-1} + c_z z, so (x_i, x_{i-1}) stays Gaussian."""
    grid = LambdaGrid.build(SDE, steps, "logsnr")
    mean, var = gaussian.marginal(1.0)
    mean_prev, var_prev, cov = mean, var, var  # x_{-1} is never used (warm-up at order 1)
    a_prev = b_prev = None
    for i in range(steps):
        a, b = gaussian.ab(grid.t[i].item())
        p = grid.step_order(i, order)
        c_x, c_0, c_d, c_z = mrs_sde_coefficients(grid, i, p)
        u, v, w = c_0 * a, c_x + c_0 * b, 0.0 * b
        if p == 2:
            d = c_d / (grid.h(i - 1) / grid.h(i))
            u, v, w = u + d * (a - a_prev), v + d * b, -d * b_prev
        new_mean = u + v * mean + w * mean_prev
        new_var = v**2 * var + w**2 * var_prev + 2 * v * w * cov + c_z**2
        new_cov = v * var + w * cov
        mean_prev, var_prev, cov, mean, var = mean, var, new_cov, new_mean, new_var
        a_prev, b_prev = a, b
    return mean, var


@pytest.mark.parametrize("order", [1, 2])
def test_gaussian_moments_converge_at_the_claimed_order(gaussian, order):
    exact_mean, exact_var = gaussian.marginal(SDE.t_min)
    steps = [20, 40, 80, 160]
    errors = []
    for n in steps:
        mean, var = propagate(gaussian, n, order)
        errors.append(max((mean - exact_mean).abs().max().item(), (var - exact_var).abs().max().item()))
    measured = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    # The mean comes out exact (to 1e-14) at any step count; the variance carries the error: at 160 steps 0.13
    # (order 1) and 5e-3 (order 2) on the widest pixel.
    assert abs(measured - order) < 0.3, f"order {order}: errors {errors}, measured {measured:.2f}"
    assert errors[-1] < (0.2 if order == 1 else 1e-2)


@pytest.mark.parametrize("order", [1, 2])
def test_mrs_sde_samples_follow_the_propagated_moments(gaussian, order):
    """The sampler itself against the exact recursion at 6 steps (big steps, so the two orders differ)."""
    n = 20000
    gen = torch.Generator().manual_seed(4)
    m1, v1 = gaussian.marginal(1.0)
    x_T = m1 + v1.sqrt() * torch.randn(n, 8, dtype=torch.float64, generator=gen)
    res = sample(None, x_T, SDE, method="mrs_sde", steps=6, x0_fn=gaussian.x0, generator=gen, order=order)
    mean, var = propagate(gaussian, 6, order)
    assert ((res.x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((res.x.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all()
    _, other = propagate(gaussian, 6, 3 - order)
    assert ((other - var).abs() > 10 * var * math.sqrt(2 / (n - 1))).any()  # the check tells the orders apart


def test_start_below_one_and_order_errors(gaussian):
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    calls = []

    def x0_fn(x, t):
        calls.append(t[0].item())
        return gaussian.x0(x, t)

    def eps_fn(x, t):  # the noise prediction of the same Gaussian (sde and pf_ode take noise)
        return (x - append_dims(SDE.alpha(t), 2) * x0_fn(x, t)) / append_dims(SDE.sigma(t), 2)

    for method in ("dpmpp_2m", "unipc", "mrs_sde", "sde", "pf_ode"):
        calls.clear()
        res = sample(eps_fn if method in ("sde", "pf_ode") else None, None, SDE, method=method, steps=4,
                     x0_fn=None if method in ("sde", "pf_ode") else x0_fn, x_start=x, t_start=0.3,
                     generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(res.x).all()
        if calls:
            assert calls[0] == pytest.approx(0.3) and max(calls) <= 0.3 + 1e-12, method
    with pytest.raises(ValueError, match="mrs_sde sampler only"):
        sample(None, x, SDE, method="dpmpp_2m", x0_fn=gaussian.x0, order=2)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        sample(None, x, SDE, method="mrs_sde", x0_fn=gaussian.x0, order=3)
    with pytest.raises(ValueError, match="t_start"):
        sample(None, None, SDE, method="dpmpp_2m", x0_fn=gaussian.x0, x_start=x)
    with pytest.raises(ValueError, match="exactly one"):
        sample(None, x, SDE, method="dpmpp_2m", x0_fn=gaussian.x0, x_start=x, t_start=0.5)
