"""Samplers of the probability-flow ODE and the reverse SDE (k-diffusion style: one function per solver).

Every solver has the signature of `sample` without `method` and returns a `SampleResult`. `eps_fn(x, t)` gives the
predicted noise for a batch x [N x ...] at times t [N]; `x0_fn(x, t)`, when given, the data prediction, which
data-prediction solvers use directly instead of (x - sigma eps) / alpha (alpha ~ 0.0066 at t = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from .diffusion import VPSDE, append_dims

DenoiserFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleResult:
    x: Tensor  # the sample at t_min
    nfe: int  # network evaluations


class CountingFn:
    """Wraps eps_fn / x0_fn and counts calls (one call = one network evaluation of the batch)."""

    def __init__(self, fn: DenoiserFn):
        self.fn, self.calls = fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x, t)


def _batch_t(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class ProbabilityFlowODE(nn.Module):
    """dx/dt = f(x, t) - g(t)^2/2 * score(x, t), score = -eps_hat / sigma; torchdiffeq's `forward(t, x)`."""

    def __init__(self, eps_fn: DenoiserFn, sde: VPSDE):
        super().__init__()
        self.eps_fn, self.sde = eps_fn, sde

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = _batch_t(t, x)
        return self.sde.pf_ode_drift(x, tt, self.eps_fn(x, tt))


def sample_pf_ode(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, *, steps: Optional[int] = None, rtol: float = 1e-4,
                  atol: float = 1e-4, generator: Optional[torch.Generator] = None,
                  x0_fn: Optional[DenoiserFn] = None) -> SampleResult:
    """Probability-flow ODE (Song et al. 2021) from t = 1 to t_min with adaptive dopri5 at rtol/atol (seed 000).

    With `steps`, fixed-step RK4 with that many steps instead (4 evaluations a step)."""
    counted = CountingFn(eps_fn)
    func = ProbabilityFlowODE(counted, sde)
    t_span = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64 if x_T.dtype == torch.float64 else torch.float32,
                          device=x_T.device)
    if steps is None:
        x = odeint(func, x_T, t_span, rtol=rtol, atol=atol, method="dopri5")[-1]
    else:
        step = (sde.t_max - sde.t_min) / steps
        x = odeint(func, x_T, t_span, method="rk4", options={"step_size": step})[-1]
    return SampleResult(x=x, nfe=counted.calls)


def sample_sde(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, *, steps: Optional[int] = None, rtol: float = 1e-4,
               atol: float = 1e-4, generator: Optional[torch.Generator] = None,
               x0_fn: Optional[DenoiserFn] = None) -> SampleResult:
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dW-bar, `steps` steps (default 1000);
    the last step adds no noise."""
    steps = 1000 if steps is None else steps
    counted = CountingFn(eps_fn)
    ts = torch.linspace(sde.t_max, sde.t_min, steps + 1, dtype=torch.float64)
    x = x_T
    for i in range(steps):
        t, dt = ts[i].item(), (ts[i + 1] - ts[i]).item()  # dt < 0
        tt = _batch_t(t, x)
        sigma = append_dims(sde.sigma(tt), x.ndim)
        score = -counted(x, tt) / sigma
        g = append_dims(sde.diffusion(tt), x.ndim)
        x = x + (sde.drift(x, tt) - g**2 * score) * dt
        if i < steps - 1:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + g * (-dt) ** 0.5 * noise
    return SampleResult(x=x, nfe=counted.calls)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "pf_ode": sample_pf_ode,
    "sde": sample_sde,
}


def sample(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, method: str = "pf_ode", steps: Optional[int] = None,
           rtol: float = 1e-4, atol: float = 1e-4, generator: Optional[torch.Generator] = None,
           x0_fn: Optional[DenoiserFn] = None) -> SampleResult:
    """Solve from x_T (a draw of the prior at t = 1) to t_min with `method`, one of SAMPLERS."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return SAMPLERS[method](eps_fn, x_T, sde, steps=steps, rtol=rtol, atol=atol, generator=generator, x0_fn=x0_fn)
