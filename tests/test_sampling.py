"""Samplers on Gaussian data, where the score and the probability-flow map are known in closed form.

x0 ~ N(m, s^2) per pixel, so x_t ~ N(alpha m, alpha^2 s^2 + sigma^2) and
    eps*(x, t) = sigma (x - alpha m) / (alpha^2 s^2 + sigma^2),   x0*(x, t) = m + alpha s^2 (x - alpha m) / (...),
and the PF-ODE maps x_T to the same quantile at t_min:
    x(t_min) = alpha_0 m + sqrt(alpha_0^2 s^2 + sigma_0^2) (x_T - alpha_1 m) / sqrt(alpha_1^2 s^2 + sigma_1^2).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfsr.diffusion import VPSDE, append_dims
from pfsr.sampling import SAMPLERS, SCHEDULES, sample, sample_unipc

SDE = VPSDE()
FEW_STEP = {"dpmpp_2m": 2, "dpmpp_2m_quadratic": 2, "unipc": 3}  # method -> claimed order of convergence


class Gaussian:
    """Per-pixel Gaussian data N(m, s^2) with means m and deviations s [C x H x W]; its exact denoisers."""

    def __init__(self, m: torch.Tensor, s: torch.Tensor, sde: VPSDE = SDE):
        self.m, self.s, self.sde = m, s, sde
        self.calls = 0

    def _coeffs(self, x, t):
        alpha, sigma = append_dims(self.sde.alpha(t), x.ndim), append_dims(self.sde.sigma(t), x.ndim)
        return alpha, sigma, alpha**2 * self.s**2 + sigma**2

    def eps(self, x, t):
        self.calls += 1
        alpha, sigma, var = self._coeffs(x, t)
        return sigma * (x - alpha * self.m) / var

    def x0(self, x, t):
        self.calls += 1
        alpha, _, var = self._coeffs(x, t)
        return self.m + alpha * self.s**2 * (x - alpha * self.m) / var

    def flow_endpoint(self, x_T):
        t = torch.tensor([self.sde.t_max, self.sde.t_min], dtype=torch.float64)
        (a1, a0), (s1, s0) = self.sde.alpha(t), self.sde.sigma(t)
        std0, std1 = (a0**2 * self.s**2 + s0**2).sqrt(), (a1**2 * self.s**2 + s1**2).sqrt()
        return a0 * self.m + std0 * (x_T - a1 * self.m) / std1


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


@pytest.fixture
def gaussian():
    m = torch.linspace(-1, 1, 48, dtype=torch.float64).reshape(3, 4, 4)
    shuffle = torch.randperm(48, generator=torch.Generator().manual_seed(1))  # means and widths uncorrelated
    s = torch.linspace(0.05, 1.5, 48, dtype=torch.float64)[shuffle]
    return Gaussian(m, s.reshape(3, 4, 4))


@pytest.fixture
def x_T():
    return torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def max_err(a, b):
    return (a - b).abs().max().item()


def test_pf_ode_dopri5_reaches_closed_form_endpoint(gaussian, x_T):
    times = []

    def eps_fn(x, t):
        times.append(t.min().item())
        return gaussian.eps(x, t)

    # rtol/atol bound the local error: on the sharpest pixel (s = 0.05) the global error is 2e-3 at the seed
    # default 1e-4, 1e-3 at 1e-5 and 4e-5 at 1e-6.
    res = sample(eps_fn, x_T, SDE, method="pf_ode", rtol=1e-6, atol=1e-6)
    assert max_err(res.x, gaussian.flow_endpoint(x_T)) < 1e-3
    assert res.nfe == len(times) == gaussian.calls
    assert res.nfe % 6 == 2  # dopri5: 2 evaluations to pick the first step, 6 a step (first same as last)
    # dopri5 must end its last step on t_min, not step past it (sigma(t < 0) is NaN) and interpolate back.
    assert min(times) >= SDE.t_min


def test_pf_ode_default_tolerance_and_float32(gaussian, x_T):
    ref = sample(gaussian.eps, x_T, SDE)
    assert max_err(ref.x, gaussian.flow_endpoint(x_T)) < 5e-3
    seen = []

    def eps_fn(x, t):
        seen.append((x.dtype, t.dtype))
        return gaussian.eps(x.double(), t.double()).float()

    res = sample(eps_fn, x_T.float(), SDE, rtol=1e-6, atol=1e-6)
    assert res.x.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}
    assert max_err(res.x.double(), gaussian.flow_endpoint(x_T)) < 1e-3


@pytest.mark.parametrize("steps", [7, 30])
def test_pf_ode_fixed_step_rk4(gaussian, x_T, steps):
    res = sample(gaussian.eps, x_T, SDE, method="pf_ode", steps=steps)
    assert res.nfe == 4 * steps == gaussian.calls
    if steps == 30:
        assert max_err(res.x, gaussian.flow_endpoint(x_T)) < 1e-3


def test_sde_matches_marginal_at_t_min():
    # 8 pixels with s away from 0: the last Euler-Maruyama step adds no noise (variance short by
    # beta(t_min) dt ~ 1e-4) and the O(dt) bias is smaller still; both are far below the standard errors.
    m = torch.tensor([-1.0, -0.5, 0.0, 0.3, 0.5, 0.8, 1.0, 1.5], dtype=torch.float64).reshape(2, 2, 2)
    s = torch.tensor([0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.4, 1.5], dtype=torch.float64).reshape(2, 2, 2)
    g = Gaussian(m, s)
    n = 4096
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 2, 2, 2, dtype=torch.float64, generator=gen)
    res = sample(g.eps, x_T, SDE, method="sde", steps=1000, generator=gen)
    assert res.nfe == 1000
    t = torch.tensor(SDE.t_min, dtype=torch.float64)
    mean, var = SDE.alpha(t) * m, SDE.alpha(t) ** 2 * s**2 + SDE.sigma(t) ** 2
    # 5 standard errors: sample mean sd = sqrt(var / n), sample variance sd = var sqrt(2 / (n - 1)).
    assert ((res.x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((res.x.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all()


@pytest.mark.parametrize("method", sorted(FEW_STEP))
def test_few_step_solver_converges_at_claimed_order(gaussian, x_T, method):
    steps = [20, 40, 80, 160]  # from h ~ 0.5 in log-SNR; at 10 steps (h ~ 1) the error is not yet asymptotic
    exact = gaussian.flow_endpoint(x_T)
    errors = [max_err(sample(gaussian.eps, x_T, SDE, method=method, steps=n).x, exact) for n in steps]
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    claimed = FEW_STEP[method]
    assert errors[-1] < 1e-3
    assert claimed - 0.3 < order < claimed + 0.5, f"{method}: errors {errors}, observed order {order:.2f}"


@pytest.mark.parametrize("method", sorted(FEW_STEP))
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 17])
def test_few_step_nfe_equals_steps(gaussian, x_T, method, steps):
    res = sample(gaussian.eps, x_T, SDE, method=method, steps=steps)
    assert res.nfe == steps == gaussian.calls
    assert torch.isfinite(res.x).all()


@pytest.mark.parametrize("method", sorted(FEW_STEP))
def test_few_step_default_steps_and_float32(gaussian, x_T, method):
    ref = sample(gaussian.eps, x_T, SDE, method=method)
    assert ref.nfe == 10
    res = sample(lambda x, t: gaussian.eps(x.double(), t.double()).float(), x_T.float(), SDE, method=method)
    assert res.x.dtype == torch.float32 and max_err(res.x.double(), ref.x) < 1e-4


@pytest.mark.parametrize("method", sorted(FEW_STEP))
def test_x0_fn_changes_nothing_for_exact_model(gaussian, x_T, method):
    via_eps = sample(gaussian.eps, x_T, SDE, method=method, steps=12)
    calls = gaussian.calls

    def eps_unused(x, t):
        raise AssertionError("data-prediction solvers must use x0_fn when given")

    via_x0 = sample(eps_unused, x_T, SDE, method=method, steps=12, x0_fn=gaussian.x0)
    assert via_x0.nfe == 12 == gaussian.calls - calls
    assert max_err(via_x0.x, via_eps.x) < 1e-10


def test_unipc_higher_predictor_order_also_converges(gaussian, x_T):
    exact = gaussian.flow_endpoint(x_T)
    errors = [max_err(sample_unipc(gaussian.eps, x_T, SDE, steps=n, order=3).x, exact) for n in (40, 80, 160)]
    assert errors[-1] < 1e-5 and errors[0] > errors[1] > errors[2]


def test_schedules_run_from_one_to_t_min():
    for name, fn in SCHEDULES.items():
        t = fn(SDE, 10)
        assert t.dtype == torch.float64 and t.shape == (11,), name
        assert t[0].item() == SDE.t_max and t[-1].item() == SDE.t_min, name
        assert (t[1:] < t[:-1]).all(), name
    lam = SDE.log_snr(SCHEDULES["logsnr"](SDE, 10))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), rtol=1e-9)


def test_unknown_method_and_schedule_name_the_choices(gaussian, x_T):
    with pytest.raises(ValueError) as info:
        sample(gaussian.eps, x_T, SDE, method="euler")
    assert all(name in str(info.value) for name in SAMPLERS)
    with pytest.raises(ValueError, match="logsnr"):
        sample_unipc(gaussian.eps, x_T, SDE, schedule="karras")
    with pytest.raises(ValueError, match="steps"):
        sample(gaussian.eps, x_T, SDE, method="dpmpp_2m", steps=0)
