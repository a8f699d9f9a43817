"""Training objectives: denoising score matching on both heads, L1 encoder regression, and the image-quality
loss through the probability-flow ODE with adjoint gradients (seed 000)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .config import LossConfig
from .diffusion import VPSDE, hybrid_mix
from .models.sr import Condition, PFSRModel
from .sampling import ProbabilityFlowODE


def dsm_loss(model: PFSRModel, r0: Tensor, cond: Condition, cfg: LossConfig,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """E_t,eps [w_e ||e - eps||^2 + w_d ||d - r0||^2] (cfg.dsm_target "heads", the reference code) or
    ||eps_hat - eps||^2 ("mixed"), t ~ U[t_min, 1]; means over pixels and batch. r0 [N x C x H x W]."""
    sde = model.sde
    n = r0.shape[0]
    t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(n, device=r0.device, generator=generator)
    eps = torch.randn(r0.shape, device=r0.device, generator=generator, dtype=r0.dtype)
    x_t = sde.marginal(r0, t, eps)
    e, d = model.heads(x_t, t, cond)
    if cfg.dsm_target == "mixed":
        eps_hat, _ = hybrid_mix(e, d, x_t, t, sde, model.hybrid_c)
        return F.mse_loss(eps_hat.float(), eps.float())
    return cfg.eps_weight * F.mse_loss(e.float(), eps.float()) + cfg.x0_weight * F.mse_loss(d.float(), r0.float())


def noise_level_bins(sde: VPSDE, num_bins: int) -> Tensor:
    """Edges [num_bins + 1] (float64) of equal-width bins of t over [t_min, 1]."""
    return torch.linspace(sde.t_min, sde.t_max, num_bins + 1, dtype=torch.float64)


@torch.no_grad()
def prediction_error(model: PFSRModel, r0: Tensor, cond: Condition, t_edges: Tensor,
                     generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Error of the hybrid prediction by noise level: what seed 000 minimizes to choose c.

    At the midpoint t_k of each bin [t_edges[k], t_edges[k + 1]], x_t = alpha r0 + sigma eps (eps drawn from
    `generator`, bin after bin) and (eps_hat, x0_hat) = model.denoise(x_t, t_k, cond), the heads mixed with the
    model's own c. r0 [N x C x H x W] is the clean diffused variable. Returns float64 CPU tensors [K]:
        "eps": mean ||eps_hat - eps||^2, the DSM loss of the mixed prediction (its mean over the equal-width bins
               estimates E_t~U[t_min,1], the "mixed" DSM target),
        "r0":  mean ||x0_hat - r0||^2 = (sigma/alpha)^2 "eps" at t_k (dominated by the noisiest bins).
    Both compare the mixed output with targets that do not depend on c, so models with different c compare by
    them when they see the same r0, bins and generator seed.
    """
    sde = model.sde
    mids = (t_edges[:-1] + t_edges[1:]) / 2
    eps_err, r0_err = [], []
    for t_k in mids.tolist():
        t = torch.full((r0.shape[0],), t_k, device=r0.device, dtype=r0.dtype)
        eps = torch.randn(r0.shape, device=r0.device, generator=generator, dtype=r0.dtype)
        eps_hat, x0_hat = model.denoise(sde.marginal(r0, t, eps), t, cond)
        eps_err.append(F.mse_loss(eps_hat.double(), eps.double()))
        r0_err.append(F.mse_loss(x0_hat.double(), r0.double()))
    return {"eps": torch.stack(eps_err).cpu(), "r0": torch.stack(r0_err).cpu()}


def l1_regression_loss(model: PFSRModel, lr: Tensor, hr: Tensor) -> Tensor:
    """Encoder pretraining: L1 between the RRDB's own SR output and HR."""
    return F.l1_loss(model.regress(lr), hr)


class LaplacianPyramidDistance(nn.Module):
    """Weight-free image distance: L1 over the bands of a 5-level Laplacian pyramid of [N x 3 x H x W] in [0, 1].

    The default quality feature when no VGG19 weights are supplied: it needs no download and weighs edges and
    texture at several scales, as feature distances do, rather than raw pixels alone.
    """

    def __init__(self, levels: int = 5):
        super().__init__()
        self.levels = levels
        g = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
        self.register_buffer("kernel", (g[:, None] * g[None, :]).expand(3, 1, 5, 5).clone(), persistent=False)

    def _blur(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.kernel.to(x.dtype), groups=x.shape[1])

    def bands(self, x: Tensor) -> list[Tensor]:
        out = []
        for _ in range(self.levels - 1):
            if min(x.shape[-2:]) < 6:
                break
            low = self._blur(x)
            out.append(x - low)
            x = F.avg_pool2d(low, 2)
        out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return sum(F.l1_loss(a, b) * 2**i for i, (a, b) in enumerate(zip(self.bands(x), self.bands(y))))


def build_quality_distance(cfg: LossConfig) -> nn.Module:
    """The feature distance of the quality loss: "laplacian" (weight-free) or "vgg19" (needs weights)."""
    if cfg.quality_features == "laplacian":
        return LaplacianPyramidDistance()
    from .features import VGG19Distance

    return VGG19Distance(cfg.quality_vgg19_weights)


class ConditionedPFODE(ProbabilityFlowODE):
    """PF-ODE of the model for one batch of conditions; torchdiffeq's `forward(t, x)`."""

    def __init__(self, model: PFSRModel, cond: Condition):
        super().__init__(lambda x, t: model.denoise(x, t, cond)[0], model.sde)
        self.model = model  # registered so that its parameters are the function's


def uniform_grid(steps: int):
    """torchdiffeq grid_constructor of exactly `steps` equal steps. Its `step_size` option builds
    ceil((t1 - t0) / h + 1) points, which rounding turns into one extra ~1e-8 step (4 more network calls) for many
    K, e.g. K = 59 in float32."""

    def grid(func, y0: Tensor, t: Tensor) -> Tensor:
        g = torch.linspace(t[0].item(), t[-1].item(), steps + 1, dtype=t.dtype, device=t.device)
        g[0], g[-1] = t[0], t[-1]  # torchdiffeq asserts exact end points
        return g

    return grid


def solve_pf_ode_adjoint(model: PFSRModel, cond: Condition, x_T: Tensor, cfg: LossConfig, *,
                         adjoint: bool = True) -> Tensor:
    """x_T at t = 1 -> x at t_min, differentiable by the adjoint method (memory flat in the number of steps).

    The adjoint parameters are the trainable parameters the ODE function uses: the U-Net's, plus the LR feature
    tensor when the encoder is trained, through which the encoder's parameters receive their gradients.
    adjoint=False backpropagates through the solver's steps instead (memory grows with K): the reference that
    tests and bench/adjoint_memory.py compare against.
    """
    func = ConditionedPFODE(model, cond)
    sde = model.sde
    t_span = torch.tensor([sde.t_max, sde.t_min], device=x_T.device, dtype=x_T.dtype)
    if cfg.quality_solver == "rk4":
        # the adjoint pass reuses method and options: the same K steps backwards
        kwargs = dict(method="rk4", options={"grid_constructor": uniform_grid(cfg.quality_steps)})
    else:
        # step_t: the last step ends on t_min instead of stepping below it (sigma is NaN at t < 0) and
        # interpolating back; the backward pass runs up from t_min, where overshooting t = 1 is harmless.
        kwargs = dict(method="dopri5", rtol=cfg.quality_rtol, atol=cfg.quality_atol, options={"step_t": t_span[1:]})
    if not adjoint:
        return odeint(func, x_T, t_span, **kwargs)[-1]
    adjoint_params = tuple(p for p in model.unet.parameters() if p.requires_grad)
    if cond.features.requires_grad:
        adjoint_params += (cond.features,)
    adjoint_options = {} if cfg.quality_solver == "dopri5" else None  # None: the forward's options
    return odeint_adjoint(func, x_T, t_span, adjoint_params=adjoint_params, adjoint_options=adjoint_options,
                          **kwargs)[-1]


def quality_loss(model: PFSRModel, cond: Condition, hr: Tensor, distance: nn.Module, cfg: LossConfig,
                 generator: Optional[torch.Generator] = None, *, adjoint: bool = True) -> Tensor:
    """Feature distance between the PF-ODE solution from x_1 ~ N(0, I) and HR [N x C x H x W] in [0, 1].

    The ODE runs in the parameters' precision, at least float32, even under bf16 autocast (float64 models stay
    float64, as the gradient tests need).
    """
    dtype = torch.promote_types(next(model.unet.parameters()).dtype, torch.float32)
    with torch.autocast(device_type=hr.device.type, enabled=False):
        cond_ode = Condition(features=cond.features.to(dtype), upsampled=cond.upsampled.to(dtype))
        x_T = torch.randn(hr.shape, device=hr.device, generator=generator, dtype=dtype)
        r = solve_pf_ode_adjoint(model, cond_ode, x_T, cfg, adjoint=adjoint)
        return distance(model.from_diffused(r, cond_ode), hr.to(dtype))


class TrainingObjective(nn.Module):
    """Everything one training step differentiates, in one forward (so DDP sees a single call).

    forward(hr [N x C x H x W] in [0, 1], lr [N x C x h x w], with_quality) -> dict of scalar losses with "total".
    Stages: "encoder" (L1 regression of the RRDB), "diffusion" (DSM), "quality" (w_dsm * DSM + w * quality; with
    w_dsm = 0 no DSM is computed, and without quality_train_encoder the quality loss sees detached LR features).
    """

    def __init__(self, model: PFSRModel, cfg: LossConfig, stage: str):
        super().__init__()
        self.model, self.cfg, self.stage = model, cfg, stage
        needs_quality = stage == "quality" or cfg.quality_weight > 0
        self.distance = build_quality_distance(cfg) if needs_quality and stage != "encoder" else None
        if self.distance is not None:
            self.distance.requires_grad_(False)

    def describe_quality(self) -> str:
        """Which image-quality loss runs (for logs): features, solver, weight, or that there is none."""
        if self.distance is None:
            return "off"
        c = self.cfg
        features = ("VGG19 conv5_4 features, L1 (pretrained weights)" if c.quality_features == "vgg19"
                    else "Laplacian pyramid L1 (weight-free)")
        solver = f"rk4, {c.quality_steps} steps" if c.quality_solver == "rk4" else \
            f"dopri5, rtol {c.quality_rtol:g}"
        return f"{features}; PF-ODE by the adjoint method ({solver}); weight {c.quality_weight:g} every " \
               f"{c.quality_every} step(s); DSM weight {c.dsm_weight:g}; encoder " \
               f"{'trained' if c.quality_train_encoder else 'not trained'} through it"

    def forward(self, hr: Tensor, lr: Tensor, with_quality: bool = False,
                generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        if self.stage == "encoder":
            l1 = l1_regression_loss(self.model, lr, hr)
            return {"loss_l1": l1, "total": l1}
        cond = self.model.condition(lr)
        out = {"total": torch.zeros((), device=hr.device)}
        if self.cfg.dsm_weight > 0:
            dsm = dsm_loss(self.model, self.model.to_diffused(hr, cond), cond, self.cfg, generator)
            out = {"loss_dsm": dsm, "total": self.cfg.dsm_weight * dsm}
        if with_quality and self.distance is not None and self.cfg.quality_weight > 0:
            if not self.cfg.quality_train_encoder:  # the encoder out of the adjoint parameters (reference code)
                cond = Condition(features=cond.features.detach(), upsampled=cond.upsampled)
            q = quality_loss(self.model, cond, hr, self.distance, self.cfg, generator)
            out["loss_quality"] = q
            out["total"] = out["total"] + self.cfg.quality_weight * q
        return out
