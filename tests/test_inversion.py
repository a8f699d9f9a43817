"""Seed 001 (InvSR) on PF-SR: the inversion objective against its closed-form optimum, the inverter model, and
the invsr sampler.

Gaussian residuals r0 ~ N(m, v) per pixel with the exact (linear) data prediction at t*:
    x0*(x) = m + c (x - alpha m),   c = alpha v / (alpha^2 v + sigma^2),
and the start x = sigma (mu + s xi). Then x0* - r0 = (m - r0) + c (sigma mu + sigma s xi - alpha m), so
    E ||x0* - r0||^2 = c^2 (sigma mu - alpha m)^2 + c^2 sigma^2 s^2 + v:
with s fixed the optimum is mu* = alpha m / sigma, and with s free the loss falls with s (to s = 0).
"""
from __future__ import annotations

import math

import pytest
import torch

from pfsr.config import ConfigError, load_config
from pfsr.diffusion import VPSDE, append_dims
from pfsr.errors import InputError
from pfsr.inference import super_resolve
from pfsr.losses import TrainingObjective, inversion_loss
from pfsr.models.sr import build_model
from pfsr.sampling import sample

SDE = VPSDE()
T_STAR = 0.1942  # configs' first t* (SD-Turbo's t = 250 by SNR)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


def gaussian_problem():
    m = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    v = torch.tensor([0.05, 0.2, 0.5, 1.0, 0.1, 0.8], dtype=torch.float64)
    # antithetic batch: the empirical means of r0 - m and of xi are exactly 0, so the empirical loss has the
    # population optimum and full-batch descent reaches it without sampling noise
    z = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xi = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r0 = m + v.sqrt() * torch.cat([z, -z, z, -z])
    xi = torch.cat([xi, xi, -xi, -xi])

    def x0_fn(x, t):
        alpha, sigma = append_dims(SDE.alpha(t), x.ndim), append_dims(SDE.sigma(t), x.ndim)
        return m + alpha * v / (alpha**2 * v + sigma**2) * (x - alpha * m)

    return m, v, r0, xi, x0_fn


def fit(logvar_free: bool, steps: int = 400):
    m, v, r0, xi, x0_fn = gaussian_problem()
    t = torch.full((r0.shape[0],), T_STAR, dtype=torch.float64)
    mean = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    logvar = torch.full((6,), math.log(0.25), dtype=torch.float64, requires_grad=logvar_free)
    opt = torch.optim.Adam([mean, logvar] if logvar_free else [mean], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss, _ = inversion_loss(x0_fn, SDE, r0, t, mean.expand_as(r0), logvar.expand_as(r0), xi)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return m, mean.detach(), logvar.detach()


def test_learned_mean_reaches_the_closed_form_optimum():
    m, mean, logvar = fit(logvar_free=False)
    t = torch.tensor(T_STAR, dtype=torch.float64)
    optimum = SDE.alpha(t) * m / SDE.sigma(t)
    assert (mean - optimum).abs().max().item() < 1e-3, (mean, optimum)
    assert (logvar == math.log(0.25)).all()


def test_free_log_variance_shrinks_the_start_noise():
    _, _, logvar = fit(logvar_free=True, steps=300)
    s = torch.exp(0.5 * logvar)
    assert (s < 0.5 * 0.5).all(), s  # from s = 0.5: the start noise is the loss's own variance term


def test_inversion_stage_trains_the_inverter_alone():
    """One optimizer step of the stage: the inverter moves, the frozen PF-SR model does not; its loss is the
    L2 of the one-call data prediction (plus the Laplacian features at quality_weight > 0)."""
    from pfsr.train import make_state, train_step

    config = load_config("configs/tiny_inversion.yaml", {"data.batch_size": 2, "data.crop": 32})
    torch.manual_seed(0)
    state = make_state(build_model(config), config)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    objective = TrainingObjective(state.model, config.loss, "inversion")
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    metrics = train_step(objective, hr, state, config, torch.Generator().manual_seed(1))
    assert {"train/loss_l2", "train/loss_quality", "train/start_std"} <= set(metrics)
    changed = {k.split(".")[0] for k, v in state.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"inverter"}


def test_invsr_sampler_is_one_data_prediction_from_the_start():
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, _, _, _, x0_fn = gaussian_problem()
    one = sample(None, None, SDE, method="invsr", x0_fn=x0_fn, x_start=x, t_start=T_STAR)
    assert one.nfe == 1
    assert torch.equal(one.x, x0_fn(x, torch.full((2,), T_STAR, dtype=torch.float64)))
    three = sample(None, None, SDE, method="invsr", steps=3, x0_fn=x0_fn, x_start=x, t_start=T_STAR)
    same = sample(None, None, SDE, method="dpmpp_2m", steps=3, x0_fn=x0_fn, x_start=x, t_start=T_STAR)
    assert three.nfe == 3 and torch.equal(three.x, same.x)
    with pytest.raises(ValueError, match="1 to 5 steps"):
        sample(None, None, SDE, method="invsr", steps=6, x0_fn=x0_fn, x_start=x, t_start=T_STAR)


def test_invsr_needs_an_inverter_and_steps_1_to_5():
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = build_model(load_config("configs/tiny.yaml")).eval()
    with pytest.raises(InputError, match="train.stage: inversion"):
        super_resolve(plain, lr, method="invsr")
    model = build_model(load_config("configs/tiny_inversion.yaml")).eval()
    with pytest.raises(InputError, match="1 to 5 steps"):
        super_resolve(model, lr, method="invsr", steps=6)
    sr, nfe = super_resolve(model, lr, method="invsr")
    assert nfe == 1 and sr.shape == (1, 3, 64, 64)
    # at initialization the predictor outputs mean 0, logvar 0: the seed's "random start noise" ablation
    cond = model.condition(lr)
    t = torch.full((1,), model.t_star)
    xi = torch.randn(1, 3, 64, 64)
    x, mean, logvar = model.inversion_start(cond, t, xi)
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(logvar, torch.zeros_like(logvar))
    assert torch.allclose(x, model.sde.sigma(t) * xi)


def test_diffusion_mean_rrdb_config_rules():
    rrdb = load_config("configs/tiny_rrdb.yaml")
    assert rrdb.diffusion.mean == "rrdb" and rrdb.model.freeze_encoder
    with pytest.raises(ConfigError, match="diffusion.mean.*frozen"):
        load_config("configs/tiny.yaml", {"diffusion.mean": "rrdb"})
    with pytest.raises(ConfigError, match="diffusion.mean.*diffuse: residual"):
        load_config("configs/tiny_rrdb.yaml", {"model.diffuse": "hr"})
    with pytest.raises(ConfigError, match="diffusion.mean"):
        load_config("configs/tiny_rrdb.yaml", {"train.stage": "encoder"})
    for name in ("pfsr_x4_small_rrdb", "div2k_x4_rrdb", "tiny_inversion", "pfsr_x4_small_inversion",
                 "div2k_x4_inversion"):
        load_config(f"configs/{name}.yaml")


def test_rrdb_mean_diffuses_the_residual_of_the_encoder_output():
    torch.manual_seed(0)
    model = build_model(load_config("configs/tiny_rrdb.yaml")).eval()
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    hr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    cond = model.condition(lr)
    with torch.no_grad():
        rrdb = model.regress(lr)
    assert torch.allclose(model.to_diffused(hr, cond), 5 * (hr - rrdb), atol=1e-6)
    assert torch.allclose(model.from_diffused(torch.zeros_like(hr), cond), rrdb)
