"""Training objectives: denoising score matching on both heads, L1 encoder regression, and the image-quality
loss through the probability-flow ODE with adjoint gradients (seed 000)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .config import LossConfig
from .diffusion import VPSDE, append_dims, hybrid_mix
from .masks import structure_coefficient, structure_encoding
from .models.inverter import start_state
from .models.sr import Condition, PFSRModel
from .sampling import ProbabilityFlowODE


def modulated_noise(eps: Tensor, t: Tensor, sde: VPSDE, structure: Optional[Tensor], scale: float) -> Tensor:
    """Seed 002: eps' = eps + c(t) E(M), c(t) = scale sigma(t) beta(t); eps itself when structure (E(M),
    [N x 1 x H x W]) is None."""
    if structure is None:
        return eps
    return eps + append_dims(structure_coefficient(sde, t, scale), eps.ndim).to(eps.dtype) * structure


def dsm_loss(model: PFSRModel, r0: Tensor, cond: Condition, cfg: LossConfig,
             generator: Optional[torch.Generator] = None, structure: Optional[Tensor] = None) -> Tensor:
    """E_t,eps [w_e ||e - eps||^2 + w_d ||d - r0||^2] (cfg.dsm_target "heads", the reference code) or
    ||eps_hat - eps||^2 ("mixed"), t ~ U[t_min, 1]; means over pixels and batch. r0 [N x C x H x W].
    structure: E(M) [N x 1 x H x W] of seed 002; the noise is then eps' (`modulated_noise`) in x_t and targets."""
    sde = model.sde
    n = r0.shape[0]
    t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(n, device=r0.device, generator=generator)
    eps = torch.randn(r0.shape, device=r0.device, generator=generator, dtype=r0.dtype)
    eps = modulated_noise(eps, t, sde, structure, model.config.diffusion.noise_modulation_scale)
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


def inversion_loss(x0_fn, sde: VPSDE, r0: Tensor, t: Tensor, mean: Tensor, logvar: Tensor, xi: Tensor,
                   r_init: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Seed 001's objective of the start noise: one data prediction x0_fn(x_t*, t*) from
    x_t* = alpha r_init + sigma (mean + exp(logvar / 2) xi), and its mean squared distance to the clean r0.
    Returns (L2 loss, x0_hat); the caller adds the image-quality features of x0_hat."""
    x0_hat = x0_fn(start_state(sde, t, mean, logvar, xi, r_init), t)
    return F.mse_loss(x0_hat.float(), r0.float()), x0_hat


def l1_regression_loss(model: PFSRModel, lr: Tensor, hr: Tensor) -> Tensor:
    """Encoder pretraining: L1 between the RRDB's own SR output and HR."""
    return F.l1_loss(model.regress(lr), hr)


class LaplacianPyramidDistance(nn.Module):
    """Weight-free image distance: L1 over the bands of a 5-level Laplacian pyramid of [N x 3 x H x W] in [0, 1].

    The default quality feature when no VGG19 weights are supplied: it needs no download and weighs edges and
    texture at several scales, as feature distances do, rather than raw pixels alone. With energy_weight > 0 it
    adds energy_weight times the L1 between the bands' local energies (mean |band| over windows of
    `energy_window` pixels of each level): a term blind to where texture lies within a window, so it asks for
    the HR's amount of detail without asking for its exact phase, which a deterministic sample cannot know.
    """

    def __init__(self, levels: int = 5, energy_weight: float = 0.0, energy_window: int = 8):
        super().__init__()
        self.levels = levels
        self.energy_weight = energy_weight
        self.energy_window = energy_window
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

    def local_energy(self, band: Tensor) -> Tensor:
        """[N x C x H x W] -> mean |band| per window [N x C x ceil(H / w) x ceil(W / w)]."""
        return F.avg_pool2d(band.abs(), self.energy_window, ceil_mode=True)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        bands = list(zip(self.bands(x), self.bands(y)))
        distance = sum(F.l1_loss(a, b) * 2**i for i, (a, b) in enumerate(bands))
        if self.energy_weight > 0:  # the detail bands only: the last is the low-pass residual
            distance = distance + self.energy_weight * sum(
                F.l1_loss(self.local_energy(a), self.local_energy(b)) * 2**i for i, (a, b) in enumerate(bands[:-1]))
        return distance


def build_quality_distance(cfg: LossConfig) -> nn.Module:
    """The feature distance of the quality loss: "laplacian" (weight-free) or "vgg19" (needs weights)."""
    if cfg.quality_features == "laplacian":
        return LaplacianPyramidDistance(energy_weight=cfg.quality_detail_weight)
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
        cond_ode = dataclasses.replace(cond, features=cond.features.to(dtype), upsampled=cond.upsampled.to(dtype),
                                       mean=None if cond.mean is None else cond.mean.to(dtype))
        x_T = torch.randn(hr.shape, device=hr.device, generator=generator, dtype=dtype)
        r = solve_pf_ode_adjoint(model, cond_ode, x_T, cfg, adjoint=adjoint)
        return distance(model.from_diffused(r, cond_ode), hr.to(dtype))


class TrainingObjective(nn.Module):
    """Everything one training step differentiates, in one forward (so DDP sees a single call).

    forward(hr [N x C x H x W] in [0, 1], lr [N x C x h x w], with_quality, mask [N x H x W] labels or None)
    -> dict of scalar losses with "total".
    Stages: "encoder" (L1 regression of the RRDB), "diffusion" (DSM), "quality" (w_dsm * DSM + w * quality; with
    w_dsm = 0 no DSM is computed, and without quality_train_encoder the quality loss sees detached LR features),
    "inversion" (seed 001: L2 of the one-call data prediction from the inverter's start + w * quality, t* drawn
    from inversion.t_stars per sample).
    Seed 002 (diffusion.noise_modulation "structure"): the DSM noise is modulated by E(mask), computed here, on the
    training device. Seed 004 (model.adaptive_condition): the code of the HR residual conditions the U-Net, the
    LR predictor's cross-entropy is added ("loss_code"), and "code" [N x d] (not a loss) is returned for the
    histogram.
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
                    else "Laplacian pyramid L1 (weight-free)" + (
                        f" + {c.quality_detail_weight:g} x local band energy L1" if c.quality_detail_weight else ""))
        solver = f"rk4, {c.quality_steps} steps" if c.quality_solver == "rk4" else \
            f"dopri5, rtol {c.quality_rtol:g}"
        through = "the one-call data prediction at t*" if self.stage == "inversion" else \
            f"PF-ODE by the adjoint method ({solver})"
        return f"{features}; {through}; weight {c.quality_weight:g} every {c.quality_every} step(s); " \
               f"DSM weight {c.dsm_weight:g}; encoder {'trained' if c.quality_train_encoder else 'not trained'} " \
               f"through it"

    def forward(self, hr: Tensor, lr: Tensor, with_quality: bool = False,
                generator: Optional[torch.Generator] = None, mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        if self.stage == "encoder":
            l1 = l1_regression_loss(self.model, lr, hr)
            return {"loss_l1": l1, "total": l1}
        cond = self.model.condition(lr, prior_code=False)
        r0 = self.model.to_diffused(hr, cond)
        if self.stage == "inversion":
            return self._inversion(hr, cond, r0, with_quality, generator)
        adaptive = self.model.adaptive
        if adaptive is not None:
            cond.code = adaptive.encode(r0)
        out = {"total": torch.zeros((), device=hr.device)}
        if self.cfg.dsm_weight > 0:
            dsm = dsm_loss(self.model, r0, cond, self.cfg, generator, structure=self._structure(mask, r0))
            out = {"loss_dsm": dsm, "total": self.cfg.dsm_weight * dsm}
        if adaptive is not None:
            out["loss_code"] = adaptive.predictor_loss(cond.features, cond.code)
            out["total"] = out["total"] + out["loss_code"]
            out["code"] = cond.code.detach()
        if with_quality and self.distance is not None and self.cfg.quality_weight > 0:
            if not self.cfg.quality_train_encoder:  # the encoder out of the adjoint parameters (reference code)
                cond = dataclasses.replace(cond, features=cond.features.detach())
            q = quality_loss(self.model, cond, hr, self.distance, self.cfg, generator)
            out["loss_quality"] = q
            out["total"] = out["total"] + self.cfg.quality_weight * q
        return out

    def _inversion(self, hr: Tensor, cond: Condition, r0: Tensor, with_quality: bool,
                   generator: Optional[torch.Generator]) -> dict[str, Tensor]:
        model = self.model
        t_stars = torch.tensor(model.config.inversion.t_stars, device=r0.device, dtype=r0.dtype)
        t = t_stars[torch.randint(len(t_stars), (r0.shape[0],), device=r0.device, generator=generator)]
        xi = torch.randn(r0.shape, device=r0.device, generator=generator, dtype=r0.dtype)
        mean, logvar = model.inverter(cond.lr, cond.features, t)
        l2, x0_hat = inversion_loss(lambda x, tt: model.denoise(x, tt, cond)[1], model.sde, r0, t, mean, logvar, xi)
        out = {"loss_l2": l2, "total": l2, "start_std": torch.exp(0.5 * logvar.detach().float()).mean()}
        if with_quality and self.distance is not None and self.cfg.quality_weight > 0:
            q = self.distance(model.from_diffused(x0_hat.float(), cond), hr.float())
            out["loss_quality"] = q
            out["total"] = l2 + self.cfg.quality_weight * q
        return out
    def _structure(self, mask: Optional[Tensor], r0: Tensor) -> Optional[Tensor]:
        """E(mask) [N x 1 x H x W] on r0's device when the config modulates the noise, else None."""
        if self.model.config.diffusion.noise_modulation == "none":
            return None
        if mask is None:
            raise ValueError("diffusion.noise_modulation 'structure' needs the batch's masks (a loader made with "
                             "with_masks=True over shards from `pfsr prep --masks`)")
        return structure_encoding(mask.to(r0.device), dtype=r0.dtype)
