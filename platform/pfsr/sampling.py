"""Samplers of the probability-flow ODE and the reverse SDE (k-diffusion style: one function per solver).

Every solver has the keyword signature of `sample` without `method` and returns a `SampleResult`. `eps_fn(x, t)`
gives the predicted noise for a batch x [N x ...] at times t [N]; `x0_fn(x, t)`, when given, the data prediction,
which the data-prediction solvers (dpmpp_2m, unipc) use directly instead of (x - sigma eps) / alpha
(alpha ~ 0.0066 at t = 1, so that division amplifies the noise head's error 150-fold).

Solvers (SAMPLERS), default "pf_ode":
    pf_ode              probability-flow ODE, adaptive dopri5 at rtol/atol; fixed-step RK4 when `steps` is given
    sde                 Euler-Maruyama on the reverse SDE, `steps` steps (default 1000)
    dpmpp_2m            DPM-Solver++(2M), order 2, steps uniform in log-SNR; `steps` = network evaluations (default 10)
    dpmpp_2m_quadratic  the same on time-quadratic steps
    unipc               UniPC-bh2 (UniP-2 predictor + UniC-2 corrector), order 3; `steps` = evaluations (default 10)

The multistep solvers work in half log-SNR time lambda = log(alpha / sigma) and take `schedule=` (a key of
SCHEDULES) when called directly. **With fewer than 10 steps they take a first-order last step**, which keeps
few-step samples stable; from 10 steps on every step has the full order. That is the official DPM-Solver's rule
(dpm_solver_pytorch.py line 1198: `lower_order_final and steps < 10`), used here for UniPC too: the official UniPC
(uni_pc.py lines 636-637, `lower_order_final=True` by default) takes the first-order last step at every step count.
One rule keeps the two solvers comparable step for step; on the closed-form Gaussian data of tests/test_sampling.py
the two rules' UniPC endpoint errors differ by at most 1.3% from 10 to 40 steps.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from .diffusion import VPSDE, append_dims

DenoiserFn = Callable[[Tensor, Tensor], Tensor]

# Below this many steps the multistep solvers end with a first-order step (the official DPM-Solver's rule; the official
# UniPC does so at every step count, see the module docstring).
LOWER_ORDER_FINAL_BELOW = 10
DEFAULT_MULTISTEP_STEPS = 10


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


# ----------------------------------------------------------------------------------------------------------------
# Time-step schedules: steps -> times [steps + 1] (float64), from t_max = 1 down to t_min.


def get_times_logsnr(sde: VPSDE, steps: int) -> Tensor:
    """Uniform in half log-SNR lambda (DPM-Solver's 'logSNR'; the default)."""
    ends = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64)
    lam = sde.log_snr(ends)
    times = sde.t_from_log_snr(torch.linspace(lam[0].item(), lam[1].item(), steps + 1, dtype=torch.float64))
    times[0], times[-1] = sde.t_max, sde.t_min  # exact ends despite the round trip through lambda
    return times


def get_times_quadratic(sde: VPSDE, steps: int) -> Tensor:
    """Uniform in sqrt(t) (DPM-Solver's 'time_quadratic'): denser near t_min."""
    times = torch.linspace(sde.t_max ** 0.5, sde.t_min ** 0.5, steps + 1, dtype=torch.float64) ** 2
    times[0], times[-1] = sde.t_max, sde.t_min
    return times


SCHEDULES: dict[str, Callable[[VPSDE, int], Tensor]] = {
    "logsnr": get_times_logsnr,
    "time_quadratic": get_times_quadratic,
}


# ----------------------------------------------------------------------------------------------------------------
# Shared maths of the data-prediction multistep solvers.


class DataPrediction:
    """x0(x, t) for the data-prediction solvers: `x0_fn` when given, else (x - sigma eps) / alpha; counts calls."""

    def __init__(self, eps_fn: DenoiserFn, x0_fn: Optional[DenoiserFn], sde: VPSDE):
        self.fn = CountingFn(x0_fn if x0_fn is not None else eps_fn)
        self.from_eps = x0_fn is None
        self.sde = sde

    @property
    def nfe(self) -> int:
        return self.fn.calls

    def __call__(self, x: Tensor, t: float) -> Tensor:
        tt = _batch_t(t, x)
        out = self.fn(x, tt)
        if not self.from_eps:
            return out
        alpha, sigma = append_dims(self.sde.alpha(tt), x.ndim), append_dims(self.sde.sigma(tt), x.ndim)
        return (x - sigma * out) / alpha


@dataclass
class LambdaGrid:
    """A schedule with its alpha, sigma and lambda, all float64 [steps + 1]; index 0 is t = 1."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor

    @classmethod
    def build(cls, sde: VPSDE, steps: int, schedule: str) -> "LambdaGrid":
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}")
        t = SCHEDULES[schedule](sde, steps)
        return cls(t=t, alpha=sde.alpha(t), sigma=sde.sigma(t), lam=sde.log_snr(t))

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def h(self, i: int) -> float:
        """Step size in lambda of step i (from t[i] to t[i + 1]), > 0."""
        return (self.lam[i + 1] - self.lam[i]).item()

    def step_order(self, i: int, order: int) -> int:
        """Order of step i: warm-up from 1 (history of i + 1 evaluations), and lower in the last steps when few."""
        order = min(order, i + 1)
        if self.steps < LOWER_ORDER_FINAL_BELOW:
            order = min(order, self.steps - i)
        return order

    def first_order_step(self, x: Tensor, x0: Tensor, i: int) -> Tensor:
        """DPM-Solver++(1) (= DDIM) from t[i] to t[i + 1]: x_t = sigma_t / sigma_s x_s - alpha_t expm1(-h) x0_s."""
        ratio = (self.sigma[i + 1] / self.sigma[i]).item()
        return ratio * x - self.alpha_expm1(i) * x0

    def alpha_expm1(self, i: int) -> float:
        """alpha_t expm1(-h) of step i: the weight of the data prediction in the exponential-integrator step."""
        return (self.alpha[i + 1] * math.expm1(-self.h(i))).item()


def _steps_or_default(steps: Optional[int]) -> int:
    return DEFAULT_MULTISTEP_STEPS if steps is None else steps


# ----------------------------------------------------------------------------------------------------------------
# Solvers.


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

    With `steps`, fixed-step RK4 (3/8 rule) on `steps` equal steps instead: 4 evaluations a step. The state stays
    in x_T's dtype (torchdiffeq keeps time in float64 and hands eps_fn t in the state's dtype).
    """
    counted = CountingFn(eps_fn)
    func = ProbabilityFlowODE(counted, sde)
    t_span = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64, device=x_T.device)
    if steps is None:
        # step_t makes the last step end on t_min: by default dopri5 steps past the end and interpolates back,
        # which evaluates the model below t_min, even at t < 0 where sigma is NaN.
        x = odeint(func, x_T, t_span, rtol=rtol, atol=atol, method="dopri5", options={"step_t": t_span[1:]})[-1]
    else:
        # An explicit grid rather than step_size: ceil((t1 - t0) / step_size) can round up to one extra step.
        grid = torch.linspace(sde.t_max, sde.t_min, steps + 1, dtype=torch.float64, device=x_T.device)
        x = odeint(func, x_T, t_span, method="rk4", options={"grid_constructor": lambda f, y0, t: grid})[-1]
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


def sample_dpmpp_2m(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, *, steps: Optional[int] = None, rtol: float = 1e-4,
                    atol: float = 1e-4, generator: Optional[torch.Generator] = None,
                    x0_fn: Optional[DenoiserFn] = None, schedule: str = "logsnr") -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): data prediction, multistep, order 2; `steps` evaluations.

    Step i from t_i to t_{i+1}, h = lambda_{i+1} - lambda_i, r = h_{i-1} / h:
        x_{i+1} = sigma_{i+1} / sigma_i x_i - alpha_{i+1} expm1(-h) [(1 + 1/2r) x0_i - 1/2r x0_{i-1}]
    First order on the first step, and on the last one when steps < 10.
    """
    grid = LambdaGrid.build(sde, _steps_or_default(steps), schedule)
    model = DataPrediction(eps_fn, x0_fn, sde)
    x, x0_prev = x_T, None
    for i in range(grid.steps):
        x0 = model(x, grid.t[i].item())
        d = x0
        if grid.step_order(i, 2) == 2:
            r = grid.h(i - 1) / grid.h(i)
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x, x0_prev = grid.first_order_step(x, d, i), x0
    return SampleResult(x=x, nfe=model.nfe)


def unipc_coefficients(rks: list[float], h: float, order: int) -> tuple[list[float], list[float]]:
    """UniPC-bh2 weights (Zhao et al. 2023, Alg. 2/3 with B(h) = expm1(-h)) for data prediction.

    rks: (lambda_{i-k} - lambda_i) / h for k = 1..order-1 (the history's offsets, < 0), h > 0.
    Returns (rhos_p [order - 1], rhos_c [order]): predictor weights of the differences D_k, and corrector weights
    of the same differences plus the new evaluation's (last). Order conditions: R rho = b with R_jk = rk_k^j.
    """
    if order == 1:
        return [], [0.5]  # the h -> 0 limit, as the reference code
    hh = -h  # data prediction integrates in -lambda
    b_h = math.expm1(hh)
    h_phi_k, factorial = math.expm1(hh) / hh - 1, 1.0
    b = []
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor(rks + [1.0], dtype=torch.float64)
    R = torch.stack([r**j for j in range(order)])
    b = torch.tensor(b, dtype=torch.float64)
    # Order 2's predictor takes rho = 1/2, the h -> 0 limit (as the reference code): DPM-Solver++(2M) exactly.
    rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    return rhos_p, torch.linalg.solve(R, b).tolist()


def sample_unipc(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, *, steps: Optional[int] = None, rtol: float = 1e-4,
                 atol: float = 1e-4, generator: Optional[torch.Generator] = None, x0_fn: Optional[DenoiserFn] = None,
                 schedule: str = "logsnr", order: int = 2) -> SampleResult:
    """UniPC (Zhao et al. 2023), bh2 variant, data prediction: UniP-`order` predictor and UniC-`order` corrector;
    `steps` evaluations. Convergence order 3 with the default order=2. order=3 has smaller errors from about 10
    steps on but is erratic below that, and its warm-up step (order 1 + corrector) keeps it at order 3 too.

    The corrector of step i re-uses the evaluation at the predicted x_{i+1}, which is also the next step's
    history entry, so it costs nothing extra; the last step has no corrector (as the official code). Warm-up from
    order 1, and order 1 on the last step when steps < 10 (the official code: at every step count).
    """
    grid = LambdaGrid.build(sde, _steps_or_default(steps), schedule)
    model = DataPrediction(eps_fn, x0_fn, sde)
    x = x_T
    x0s = [model(x, grid.t[0].item())]  # x0 at t_{i-order+1} .. t_i, the last `order` evaluations
    for i in range(grid.steps):
        p = grid.step_order(i, order)
        h = grid.h(i)
        rks = [((grid.lam[i - k] - grid.lam[i]) / h).item() for k in range(1, p)]
        diffs = [(x0s[-1 - k] - x0s[-1]) / rk for k, rk in enumerate(rks, start=1)]
        rhos_p, rhos_c = unipc_coefficients(rks, h, p)
        base = grid.first_order_step(x, x0s[-1], i)
        # bh2: B(h) = expm1(-h), so the weight alpha_t B(h) of the correction is alpha_expm1 of the step.
        x = base - grid.alpha_expm1(i) * sum(rho * d for rho, d in zip(rhos_p, diffs))
        if i == grid.steps - 1:
            break
        x0_next = model(x, grid.t[i + 1].item())
        diffs_c = diffs + [x0_next - x0s[-1]]
        x = base - grid.alpha_expm1(i) * sum(rho * d for rho, d in zip(rhos_c, diffs_c))
        x0s = (x0s + [x0_next])[-order:]
    return SampleResult(x=x, nfe=model.nfe)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "pf_ode": sample_pf_ode,
    "sde": sample_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_quadratic": functools.partial(sample_dpmpp_2m, schedule="time_quadratic"),
    "unipc": sample_unipc,
}


def sample(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, method: str = "pf_ode", steps: Optional[int] = None,
           rtol: float = 1e-4, atol: float = 1e-4, generator: Optional[torch.Generator] = None,
           x0_fn: Optional[DenoiserFn] = None) -> SampleResult:
    """Solve from x_T [N x ...] (a draw of the prior at t = 1) to t_min with `method`, one of SAMPLERS."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return SAMPLERS[method](eps_fn, x_T, sde, steps=steps, rtol=rtol, atol=atol, generator=generator, x0_fn=x0_fn)
