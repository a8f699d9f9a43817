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
    mrs_sde             MR Sampler's SDE solver in data prediction (seed 003), `order` 1 or 2 (default 2);
                        `steps` = evaluations (default 10); stochastic
    invsr               InvSR-style start (seed 001): one data prediction from a given start state at t_start < 1,
                        `steps` 1-5 (default 1); more steps continue with DPM-Solver++(2M) from t_start

Every solver starts at `t_start` (default 1) from the state given there, so a solve can begin below t = 1
(`sample(..., t_start=t, x_start=x_t)`). Default steps are per solver (DEFAULT_STEPS).

The multistep solvers work in half log-SNR time lambda = log(alpha / sigma) and take `schedule=` (a key of
SCHEDULES) when called directly. **With fewer than 10 steps they take a first-order last step**, which keeps
few-step samples stable; from 10 steps on every step has the full order. That is the official DPM-Solver's rule
(dpm_solver_pytorch.py line 1198: `lower_order_final and steps < 10`), used here for UniPC too: the official UniPC
(uni_pc.py lines 636-637, `lower_order_final=True` by default) takes the first-order last step at every step count.
One rule keeps the two solvers comparable step for step; on the closed-form Gaussian data of tests/test_sampling.py
the two rules' UniPC endpoint errors differ by at most 1.3% from 10 to 40 steps.

Mean-reverting view (seed 003, MR Sampler). PF-SR diffuses r = k (HR - mu) with mu = bicubic_up(LR) (or the
frozen encoder's output with diffusion.mean: rrdb); in image
space X = mu + r / k the VP SDE dr = -beta/2 r dt + sqrt(beta) dW is the mean-reverting SDE of MR Diffusion
    dX = theta_t (mu - X) dt + sigma_t dW,   theta_t = beta(t) / 2,   sigma_t = sqrt(beta(t)) / k,
whose stationary law is N(mu, lambda^2) with lambda^2 = sigma_t^2 / (2 theta_t), lambda = 1 / k. Symbols map as
    MRS alpha_t = exp(-int_0^t theta) = VPSDE.alpha(t);
    MRS sigma_t = lambda sqrt(1 - alpha_t^2) = VPSDE.sigma(t) / k;
    MRS lambda_t = log(alpha_t / sigma_t) = VPSDE.log_snr(t) + log k (steps h in lambda are the same);
    MRS data prediction x_theta = mu + x0 / k;   MRS "mu" terms = the offset mu of X (zero in r).
In these coordinates MRS's ODE updates in data prediction,
    order 1: X_t = sigma_t/sigma_s X_s - alpha_t (e^-h - 1) x_theta
                   + mu (1 - sigma_t/sigma_s + sigma_t/sigma_s alpha_s - alpha_t)
    order 2: the same with x_theta -> x_theta_s + (x_theta_s - x_theta_prev) / (2 r)
are exactly LambdaGrid.first_order_step and DPM-Solver++(2M) (tests/test_mrs.py checks both to float64 precision);
the reference code's order 2 weighs the difference by (e^-h - 1) / h + 1 instead of (e^-h - 1) / 2 (the "taylor"
variant of DPM-Solver; the two differ by O(h^3) a step). MRS's SDE solver (mrs_sde below) has no PF-SR
counterpart before it.
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
# Network evaluations when `steps` is None (pf_ode: adaptive dopri5).
DEFAULT_STEPS: dict[str, Optional[int]] = {"pf_ode": None, "sde": 1000, "dpmpp_2m": 10, "dpmpp_2m_quadratic": 10,
                                           "unipc": 10, "mrs_sde": 10, "invsr": 1}
INVSR_MAX_STEPS = 5
MRS_ORDERS = (1, 2)


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
# Time-step schedules: steps -> times [steps + 1] (float64), from t_start (default t_max = 1) down to t_min.


def _t_start(sde: VPSDE, t_start: Optional[float]) -> float:
    if t_start is None:
        return sde.t_max
    if not sde.t_min < t_start <= sde.t_max:
        raise ValueError(f"t_start must lie in (t_min, 1] = ({sde.t_min:g}, {sde.t_max:g}], got {t_start}")
    return float(t_start)


def get_times_logsnr(sde: VPSDE, steps: int, t_start: Optional[float] = None) -> Tensor:
    """Uniform in half log-SNR lambda (DPM-Solver's 'logSNR'; the default)."""
    t0 = _t_start(sde, t_start)
    ends = torch.tensor([t0, sde.t_min], dtype=torch.float64)
    lam = sde.log_snr(ends)
    times = sde.t_from_log_snr(torch.linspace(lam[0].item(), lam[1].item(), steps + 1, dtype=torch.float64))
    times[0], times[-1] = t0, sde.t_min  # exact ends despite the round trip through lambda
    return times


def get_times_quadratic(sde: VPSDE, steps: int, t_start: Optional[float] = None) -> Tensor:
    """Uniform in sqrt(t) (DPM-Solver's 'time_quadratic'): denser near t_min."""
    t0 = _t_start(sde, t_start)
    times = torch.linspace(t0 ** 0.5, sde.t_min ** 0.5, steps + 1, dtype=torch.float64) ** 2
    times[0], times[-1] = t0, sde.t_min
    return times


SCHEDULES: dict[str, Callable[..., Tensor]] = {
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
    """A schedule with its alpha, sigma and lambda, all float64 [steps + 1]; index 0 is t_start (default 1)."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor

    @classmethod
    def build(cls, sde: VPSDE, steps: int, schedule: str, t_start: Optional[float] = None) -> "LambdaGrid":
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}")
        t = SCHEDULES[schedule](sde, steps, t_start)
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
                  x0_fn: Optional[DenoiserFn] = None, t_start: Optional[float] = None) -> SampleResult:
    """Probability-flow ODE (Song et al. 2021) from t_start (1) to t_min with adaptive dopri5 at rtol/atol (seed 000).

    With `steps`, fixed-step RK4 (3/8 rule) on `steps` equal steps instead: 4 evaluations a step. The state stays
    in x_T's dtype (torchdiffeq keeps time in float64 and hands eps_fn t in the state's dtype).
    """
    counted = CountingFn(eps_fn)
    func = ProbabilityFlowODE(counted, sde)
    t0 = _t_start(sde, t_start)
    t_span = torch.tensor([t0, sde.t_min], dtype=torch.float64, device=x_T.device)
    if steps is None:
        # step_t makes the last step end on t_min: by default dopri5 steps past the end and interpolates back,
        # which evaluates the model below t_min, even at t < 0 where sigma is NaN.
        x = odeint(func, x_T, t_span, rtol=rtol, atol=atol, method="dopri5", options={"step_t": t_span[1:]})[-1]
    else:
        # An explicit grid rather than step_size: ceil((t1 - t0) / step_size) can round up to one extra step.
        grid = torch.linspace(t0, sde.t_min, steps + 1, dtype=torch.float64, device=x_T.device)
        x = odeint(func, x_T, t_span, method="rk4", options={"grid_constructor": lambda f, y0, t: grid})[-1]
    return SampleResult(x=x, nfe=counted.calls)


def sample_sde(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, *, steps: Optional[int] = None, rtol: float = 1e-4,
               atol: float = 1e-4, generator: Optional[torch.Generator] = None,
               x0_fn: Optional[DenoiserFn] = None, t_start: Optional[float] = None) -> SampleResult:
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dW-bar, `steps` steps (default 1000);
    the last step adds no noise."""
    steps = 1000 if steps is None else steps
    counted = CountingFn(eps_fn)
    ts = torch.linspace(_t_start(sde, t_start), sde.t_min, steps + 1, dtype=torch.float64)
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
                    x0_fn: Optional[DenoiserFn] = None, schedule: str = "logsnr",
                    t_start: Optional[float] = None) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): data prediction, multistep, order 2; `steps` evaluations.

    Step i from t_i to t_{i+1}, h = lambda_{i+1} - lambda_i, r = h_{i-1} / h:
        x_{i+1} = sigma_{i+1} / sigma_i x_i - alpha_{i+1} expm1(-h) [(1 + 1/2r) x0_i - 1/2r x0_{i-1}]
    First order on the first step, and on the last one when steps < 10.
    """
    grid = LambdaGrid.build(sde, _steps_or_default(steps), schedule, t_start)
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
                 schedule: str = "logsnr", order: int = 2, t_start: Optional[float] = None) -> SampleResult:
    """UniPC (Zhao et al. 2023), bh2 variant, data prediction: UniP-`order` predictor and UniC-`order` corrector;
    `steps` evaluations. Convergence order 3 with the default order=2. order=3 has smaller errors from about 10
    steps on but is erratic below that, and its warm-up step (order 1 + corrector) keeps it at order 3 too.

    The corrector of step i re-uses the evaluation at the predicted x_{i+1}, which is also the next step's
    history entry, so it costs nothing extra; the last step has no corrector (as the official code). Warm-up from
    order 1, and order 1 on the last step when steps < 10 (the official code: at every step count).
    """
    grid = LambdaGrid.build(sde, _steps_or_default(steps), schedule, t_start)
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


def mrs_sde_coefficients(grid: LambdaGrid, i: int, order: int) -> tuple[float, float, float, float]:
    """Weights (c_x, c_0, c_d, c_z) of MR Sampler's SDE step i in data prediction (seed 003, MRS-SDE-`order`):
        x_{i+1} = c_x x_i + c_0 x0_i + c_d D1 + c_z z,   D1 = (x0_i - x0_{i-1}) / r,  r = h_{i-1} / h,  z ~ N(0, I)
    with c_x = sigma_{i+1}/sigma_i e^-h, c_0 = alpha_{i+1} (1 - e^-2h), c_d = alpha_{i+1} (1 - (1 - e^-2h) / 2h)
    (0 at order 1) and c_z = sigma_{i+1} sqrt(1 - e^-2h): the exact integral of the reverse SDE with x0 constant
    (order 1) or linear in lambda (order 2) over the step.
    """
    h = grid.h(i)
    one_minus = -math.expm1(-2 * h)  # 1 - e^-2h, exact for small h
    c_x = (grid.sigma[i + 1] / grid.sigma[i]).item() * math.exp(-h)
    c_0 = grid.alpha[i + 1].item() * one_minus
    c_d = grid.alpha[i + 1].item() * (1 - one_minus / (2 * h)) if order == 2 else 0.0
    c_z = grid.sigma[i + 1].item() * math.sqrt(one_minus)
    return c_x, c_0, c_d, c_z


def sample_mrs_sde(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, *, steps: Optional[int] = None, rtol: float = 1e-4,
                   atol: float = 1e-4, generator: Optional[torch.Generator] = None,
                   x0_fn: Optional[DenoiserFn] = None, order: int = 2, schedule: str = "logsnr",
                   t_start: Optional[float] = None) -> SampleResult:
    """MR Sampler's SDE solver (Li et al. 2025, seed 003) in data prediction, multistep, `order` 1 or 2; `steps`
    evaluations (default 10), steps uniform in log-SNR. Step i: see mrs_sde_coefficients. Warm-up from order 1
    and order 1 on the last step when steps < 10, as the reference code; every step adds noise, the last one too
    (sigma(t_min) ~ 0.01), so each step ends on the forward marginal when x0 is exact.
    """
    if order not in MRS_ORDERS:
        raise ValueError(f"mrs_sde order must be 1 or 2, got {order}")
    grid = LambdaGrid.build(sde, _steps_or_default(steps), schedule, t_start)
    model = DataPrediction(eps_fn, x0_fn, sde)
    x, x0_prev = x_T, None
    for i in range(grid.steps):
        x0 = model(x, grid.t[i].item())
        p = grid.step_order(i, order)
        c_x, c_0, c_d, c_z = mrs_sde_coefficients(grid, i, p)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = c_x * x + c_0 * x0 + c_z * noise
        if p == 2:
            x_next = x_next + c_d * (x0 - x0_prev) / (grid.h(i - 1) / grid.h(i))
        x, x0_prev = x_next, x0
    return SampleResult(x=x, nfe=model.nfe)


def sample_invsr(eps_fn: DenoiserFn, x_T: Tensor, sde: VPSDE, *, steps: Optional[int] = None, rtol: float = 1e-4,
                 atol: float = 1e-4, generator: Optional[torch.Generator] = None,
                 x0_fn: Optional[DenoiserFn] = None, t_start: Optional[float] = None) -> SampleResult:
    """InvSR's arbitrary-step sampling (Yue et al. 2025, seed 001) from a start state x_T at t_start (the
    inverter's prediction, `pfsr.models.inverter`): `steps` 1 (default) returns the data prediction there, one
    evaluation, as the inversion stage trains it; 2-5 continue with DPM-Solver++(2M) from t_start, `steps`
    evaluations in all.
    """
    steps = DEFAULT_STEPS["invsr"] if steps is None else steps
    if not 1 <= steps <= INVSR_MAX_STEPS:
        raise ValueError(f"invsr takes 1 to {INVSR_MAX_STEPS} steps, got {steps}")
    if steps > 1:
        return sample_dpmpp_2m(eps_fn, x_T, sde, steps=steps, x0_fn=x0_fn, t_start=t_start)
    model = DataPrediction(eps_fn, x0_fn, sde)
    return SampleResult(x=model(x_T, _t_start(sde, t_start)), nfe=model.nfe)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "pf_ode": sample_pf_ode,
    "sde": sample_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_quadratic": functools.partial(sample_dpmpp_2m, schedule="time_quadratic"),
    "unipc": sample_unipc,
    "mrs_sde": sample_mrs_sde,
    "invsr": sample_invsr,
}
STOCHASTIC = frozenset({"sde", "mrs_sde"})  # samplers that draw noise while solving


def sample(eps_fn: DenoiserFn, x_T: Optional[Tensor], sde: VPSDE, method: str = "pf_ode",
           steps: Optional[int] = None, rtol: float = 1e-4, atol: float = 1e-4,
           generator: Optional[torch.Generator] = None, x0_fn: Optional[DenoiserFn] = None, *,
           t_start: Optional[float] = None, x_start: Optional[Tensor] = None, order: Optional[int] = None
           ) -> SampleResult:
    """Solve to t_min with `method`, one of SAMPLERS, from x_T [N x ...] (a draw of the prior at t = 1) or from
    `x_start` at `t_start` < 1 (x_T None then). `order`: mrs_sde's order (1 or 2, default 2), for it alone."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if (x_T is None) == (x_start is None):
        raise ValueError("give exactly one of x_T (the prior draw at t = 1) and x_start (the state at t_start)")
    if x_start is not None and t_start is None:
        raise ValueError("x_start needs its time t_start")
    kwargs = {"t_start": _t_start(sde, t_start)}
    if order is not None:
        if method != "mrs_sde":
            raise ValueError(f"order applies to the mrs_sde sampler only, not {method}")
        kwargs["order"] = order
    return SAMPLERS[method](eps_fn, x_T if x_start is None else x_start, sde, steps=steps, rtol=rtol, atol=atol,
                            generator=generator, x0_fn=x0_fn, **kwargs)
