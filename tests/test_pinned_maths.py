"""The maths pinned to independent computations: each solver at a fixed step count against float64 literals from a
numpy port of the official algorithms (below), the DSM targets and the distribution of its t, the quality loss's
input, the residual scale, the training step's EMA and learning-rate schedule. scripts/mutants.py checks that
mutations of the core fail here.

Solvers: scalar Gaussian data x0 ~ N(m, s^2) per element, whose exact denoiser is linear in x,
    x0*(x, t) = m + alpha s^2 (x - alpha m) / v,   score = -(x - alpha m) / v,   v = alpha^2 s^2 + sigma^2,
so every solver's recursion runs in numpy on three numbers (`numpy_reference` below: VP SDE beta 0.1 .. 20,
t_min 1e-3; DPM-Solver++(2M) as dpm_solver_pytorch.py's multistep_dpm_solver_second_update; UniPC-bh2 as uni_pc.py's
multistep_uni_pc_bh_update and sample(); RK4 as torchdiffeq's rk4 (the 3/8 rule)). The literals are its output
(`python tests/test_pinned_maths.py` prints them again).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfsr.config import config_from_dict
from pfsr.degradation import degrade, upsample
from pfsr.diffusion import VPSDE, append_dims
from pfsr.losses import LaplacianPyramidDistance, TrainingObjective, dsm_loss, quality_loss
from pfsr.models import build_model
from pfsr.sampling import sample, sample_pf_ode, sample_unipc
from pfsr.train import ema_decay_at, ema_update, lr_lambda, make_state

# ------------------------------------------------------------------------------------------------------------------
# numpy reference of the solvers (float64), independent of pfsr.

B0, B1, T_MIN = 0.1, 20.0, 1e-3
M = np.array([0.3, -0.5, 0.1])
S = np.array([0.5, 0.1, 0.8])
X_T = np.array([1.2, -0.7, 0.4])


def _log_alpha(t):
    return -0.25 * t * t * (B1 - B0) - 0.5 * t * B0


def _alpha(t):
    return np.exp(_log_alpha(t))


def _sigma(t):
    return np.sqrt(-np.expm1(2 * _log_alpha(t)))


def _lam(t):
    return np.log(_alpha(t) / _sigma(t))


def _t_of_lam(lam):
    """alpha^2 = 1 / (1 + e^(-2 lambda)); solve (B1 - B0)/4 t^2 + B0/2 t + log alpha = 0 for t > 0."""
    log_alpha = -0.5 * np.log1p(np.exp(-2 * lam))
    a, b = 0.25 * (B1 - B0), 0.5 * B0
    return (-b + np.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)


def _var(t):
    return _alpha(t) ** 2 * S**2 + _sigma(t) ** 2


def _x0(x, t):
    return M + _alpha(t) * S**2 * (x - _alpha(t) * M) / _var(t)


def _score(x, t):
    return -(x - _alpha(t) * M) / _var(t)


def _beta(t):
    return B0 + t * (B1 - B0)


def _pf_drift(x, t):
    return -0.5 * _beta(t) * x - 0.5 * _beta(t) * _score(x, t)


def _times_logsnr(n):
    ts = np.array([_t_of_lam(lam) for lam in np.linspace(_lam(1.0), _lam(T_MIN), n + 1)])
    ts[0], ts[-1] = 1.0, T_MIN
    return ts


def _times_quadratic(n):
    ts = np.linspace(1.0, np.sqrt(T_MIN), n + 1) ** 2
    ts[0], ts[-1] = 1.0, T_MIN
    return ts


def np_rk4(n):
    ts, x = np.linspace(1.0, T_MIN, n + 1), X_T.copy()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        k1 = _pf_drift(x, t0)
        k2 = _pf_drift(x + dt * k1 / 3, t0 + dt / 3)
        k3 = _pf_drift(x + dt * (k2 - k1 / 3), t0 + 2 * dt / 3)
        k4 = _pf_drift(x + dt * (k1 - k2 + k3), t1)
        x = x + dt * (k1 + 3 * k2 + 3 * k3 + k4) / 8
    return x


def np_dpmpp_2m(n, times=_times_logsnr):
    """First order on the first step and, when n < 10, on the last (dpm_solver_pytorch.py line 1198)."""
    ts, x, prev = times(n), X_T.copy(), None
    for i in range(n):
        s, t = ts[i], ts[i + 1]
        h = _lam(t) - _lam(s)
        phi = np.expm1(-h)
        d0 = _x0(x, s)
        x = _sigma(t) / _sigma(s) * x - _alpha(t) * phi * d0
        if not (i == 0 or (n < 10 and i == n - 1)):
            r0 = (_lam(s) - _lam(ts[i - 1])) / h
            x = x - 0.5 * _alpha(t) * phi * (d0 - prev) / r0
        prev = d0
    return x


def _unipc_update(x, models, times, t, order, corrector):
    s0 = times[-1]
    h = _lam(t) - _lam(s0)
    hh = -h
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_lam(times[-(k + 1)]) - _lam(s0)) / h
        rks.append(rk)
        d1s.append((models[-(k + 1)] - models[-1]) / rk)
    rks.append(1.0)
    h_phi_1 = np.expm1(hh)
    h_phi_k, factorial, b_h = h_phi_1 / hh - 1, 1, np.expm1(hh)
    R, b = [], []
    for k in range(1, order + 1):
        R.append(np.power(rks, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(R), np.array(b)
    x_ = _sigma(t) / _sigma(s0) * x - _alpha(t) * h_phi_1 * models[-1]
    pred = 0.0
    if order > 1:
        rhos_p = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        pred = sum(r * d for r, d in zip(rhos_p, d1s))
    x_t = x_ - _alpha(t) * b_h * pred
    if not corrector:
        return x_t, None
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    model_t = _x0(x_t, t)
    corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s))
    return x_ - _alpha(t) * b_h * (corr + rhos_c[-1] * (model_t - models[-1])), model_t


def np_unipc(n, order=2):
    """uni_pc.py sample(): warm-up orders 1 .. order-1 with corrector, no corrector on the last step; the first-order
    last step only when n < 10 (pfsr's rule; the official code takes it at every n)."""
    ts, x = _times_logsnr(n), X_T.copy()
    models, times = [_x0(x, ts[0])], [ts[0]]
    for step in range(1, order):
        x, model_x = _unipc_update(x, models, times, ts[step], step, corrector=True)
        models, times = models + [model_x], times + [ts[step]]
    for step in range(order, n + 1):
        step_order = min(order, n + 1 - step) if n < 10 else order
        x, model_x = _unipc_update(x, models, times, ts[step], step_order, corrector=step != n)
        models, times = models[1:] + [model_x], times[1:] + [ts[step]]
    return x


def np_sde(n, noise):
    """Euler-Maruyama on the reverse SDE with the given noise [n - 1 x 3] (none on the last step)."""
    ts, x = np.linspace(1.0, T_MIN, n + 1), X_T.copy()
    for i in range(n):
        t, dt = ts[i], ts[i + 1] - ts[i]
        x = x + (-0.5 * _beta(t) * x - _beta(t) * _score(x, t)) * dt
        if i < n - 1:
            x = x + np.sqrt(_beta(t)) * np.sqrt(-dt) * noise[i]
    return x


def numpy_reference():
    return {("pf_ode", 3, 2): np_rk4(3), ("dpmpp_2m", 5, 2): np_dpmpp_2m(5), ("dpmpp_2m", 10, 2): np_dpmpp_2m(10),
            ("dpmpp_2m", 12, 2): np_dpmpp_2m(12), ("dpmpp_2m_quadratic", 6, 2): np_dpmpp_2m(6, _times_quadratic),
            ("unipc", 5, 2): np_unipc(5), ("unipc", 10, 2): np_unipc(10), ("unipc", 12, 2): np_unipc(12),
            ("unipc", 12, 3): np_unipc(12, 3),
            ("sde", 1, 2): np_sde(1, np.zeros((0, 3)))}


# (method, steps, unipc order) -> x at t_min for X_T: printed by numpy_reference().
LITERALS = {
    ("pf_ode", 3, 2): [0.9154743312446877, -0.6014935737667932, 0.4195387670973832],
    ("dpmpp_2m", 5, 2): [0.8109488436044779, -0.547668334001511, 0.3757094555607452],
    ("dpmpp_2m", 10, 2): [0.918714618552301, -0.5705789245133776, 0.4305155945111744],
    ("dpmpp_2m", 12, 2): [0.9161105615042711, -0.5710372077458331, 0.4288086498683306],
    ("dpmpp_2m_quadratic", 6, 2): [0.8652263734209293, -0.5450159016654884, 0.4112996842070224],
    ("unipc", 5, 2): [0.8278665827585606, -0.5498212785596084, 0.3847190006325321],
    ("unipc", 10, 2): [0.9255547207102561, -0.5726792312236103, 0.4331490268278014],
    ("unipc", 12, 2): [0.9170615161514727, -0.5722875578067022, 0.42881387112183067],
    ("unipc", 12, 3): [0.8981663304130564, -0.5723266025095901, 0.4207660815882569],
    ("sde", 1, 2): [-10.749385225983044, 6.227945025489822, -3.5829940185631712],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


class GaussianDenoiser:
    """The exact eps and x0 of the data above, in torch ([3 x 1] batches)."""

    def __init__(self):
        self.sde = VPSDE(B0, B1, T_MIN)
        self.m, self.s = torch.tensor(M)[:, None], torch.tensor(S)[:, None]

    def _parts(self, x, t):
        alpha, sigma = append_dims(self.sde.alpha(t), x.ndim), append_dims(self.sde.sigma(t), x.ndim)
        return alpha, sigma, alpha**2 * self.s**2 + sigma**2

    def eps(self, x, t):
        alpha, sigma, var = self._parts(x, t)
        return sigma * (x - alpha * self.m) / var

    def x0(self, x, t):
        alpha, _, var = self._parts(x, t)
        return self.m + alpha * self.s**2 * (x - alpha * self.m) / var


def test_numpy_reference_gives_the_literals():
    for key, value in numpy_reference().items():
        np.testing.assert_allclose(value, LITERALS[key], rtol=0, atol=1e-15, err_msg=str(key))


@pytest.mark.parametrize("key", sorted(LITERALS), ids=lambda k: f"{k[0]}-{k[1]}-order{k[2]}")
@pytest.mark.parametrize("with_x0_fn", [False, True])
def test_solver_at_fixed_steps_matches_the_numpy_literal(key, with_x0_fn):
    method, steps, order = key
    g = GaussianDenoiser()
    x_T = torch.tensor(X_T)[:, None]
    x0_fn = g.x0 if with_x0_fn else None
    if order == 3:
        res = sample_unipc(g.eps, x_T, g.sde, steps=steps, order=3, x0_fn=x0_fn)
    else:
        res = sample(g.eps, x_T, g.sde, method=method, steps=steps, x0_fn=x0_fn)
    np.testing.assert_allclose(res.x[:, 0].numpy(), LITERALS[key], rtol=0, atol=1e-12)


def test_sde_steps_with_their_noise_match_numpy():
    """Four Euler-Maruyama steps: the noise is the sampler's own draws (three [3 x 1] draws of its generator)."""
    g = GaussianDenoiser()
    res = sample(g.eps, torch.tensor(X_T)[:, None], g.sde, method="sde", steps=4,
                 generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    noise = np.stack([torch.randn(3, 1, generator=gen, dtype=torch.float64)[:, 0].numpy() for _ in range(3)])
    np.testing.assert_allclose(res.x[:, 0].numpy(), np_sde(4, noise), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# Training targets and losses on a tiny real model (float64).

def tiny(**loss):
    config = config_from_dict({
        "model": {"scale": 4, "rrdb_num_feat": 8, "rrdb_num_block": 2, "rrdb_num_grow_ch": 8,
                  "rrdb_feature_blocks": [0, 1], "unet_base_channels": 8, "unet_channel_mult": [1, 2],
                  "unet_num_res_blocks": 1, "unet_attention_levels": [], "unet_num_heads": 2},
        "data": {"crop": 8, "batch_size": 1},
        "loss": loss,
    })
    torch.manual_seed(0)
    model = build_model(config).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised output layers: small random values, so both heads say something
        for p in model.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return config, model


def capture_unet(model):
    """Records (x_t, t, e, d) of every U-Net call: x_t is the first C input channels, e and d its two halves."""
    seen = []

    def hook(module, args, out):
        x_in, t, _ = args
        c = out.shape[1] // 2
        seen.append(tuple(v.detach().numpy().astype(np.float64)
                          for v in (x_in[:, :c], t, out[:, :c], out[:, c:])))

    return seen, model.unet.register_forward_hook(hook)


@pytest.fixture(scope="module")
def hr_batch(photos):
    crops = [photos[n][120:128, 200:208] for n in ("astronaut", "coffee", "chelsea")]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).double() / 255


def _alpha_sigma(t, ndim):
    shape = (-1,) + (1,) * (ndim - 1)
    return _alpha(t).reshape(shape), _sigma(t).reshape(shape)


@pytest.mark.parametrize("target, c", [("heads", 1.0), ("mixed", 0.5), ("mixed", 1.5)])
def test_dsm_loss_is_its_definition_by_hand(hr_batch, target, c):
    """heads: mean (e - eps)^2 + mean (d - r0)^2; mixed: mean (eps_hat - eps)^2 with
    eps_hat = abar^c e + (1 - abar^c) (x_t - alpha d) / sigma. r0 = 5 (HR - bicubic_up(LR)); x_t, t and the two heads
    are what the U-Net saw and said, eps = (x_t - alpha r0) / sigma from numpy's alpha and sigma."""
    config, model = tiny(dsm_target=target, eps_weight=1.0, x0_weight=1.0)
    model.hybrid_c = c
    lr = degrade(hr_batch, 4)
    cond = model.condition(lr)
    r0 = (5.0 * (hr_batch.numpy() - upsample(lr, 4).numpy()))
    seen, handle = capture_unet(model)
    try:
        loss = dsm_loss(model, model.to_diffused(hr_batch, cond), cond, config.loss, torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    (x_t, t, e, d), = seen
    alpha, sigma = _alpha_sigma(t, 4)
    eps = (x_t - alpha * r0) / sigma
    if target == "heads":
        expected = np.mean((e - eps) ** 2) + np.mean((d - r0) ** 2)
    else:
        lam = alpha ** (2 * c)
        expected = np.mean((lam * e + (1 - lam) * (x_t - alpha * d) / sigma - eps) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # t is drawn in float32, so are alpha and sigma


def test_dsm_noise_levels_are_uniform_on_t_min_to_1_and_the_noise_standard():
    """t of 2048 DSM draws: Kolmogorov-Smirnov distance to U[t_min, 1] below its 1% critical value 1.63 / sqrt(n)
    (0.036; this draw: 0.014), which a range narrower by a tenth already exceeds (0.1); the noise implied by x_t
    (eps = (x_t - alpha r0) / sigma) has mean 0 and variance 1 within 5 standard errors."""
    config, model = tiny()
    n = 2048
    hr = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lr = degrade(hr, 4)
    cond = model.condition(lr)
    seen, handle = capture_unet(model)
    try:
        with torch.no_grad():
            dsm_loss(model, model.to_diffused(hr, cond), cond, config.loss, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    (x_t, t, _, _), = seen
    cdf = (np.sort(t) - T_MIN) / (1 - T_MIN)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert 0 <= cdf[0] and cdf[-1] <= 1 and ks < 1.63 / math.sqrt(n), ks
    alpha, sigma = _alpha_sigma(t, 4)
    eps = (x_t - alpha * 5.0 * (hr.numpy() - upsample(lr, 4).numpy())) / sigma
    k = eps.size
    assert abs(eps.mean()) < 5 / math.sqrt(k) and abs(eps.var() - 1) < 5 * math.sqrt(2 / k)


def test_residual_scale_is_its_definition(hr_batch):
    """r = 5 (HR - bicubic_up(LR)) and back: the reference code's scale = 5 (ECDP lib/model/ecdp.py lines 63-65)."""
    config, model = tiny()
    assert config.model.residual_scale == 5.0
    lr = degrade(hr_batch, 4)
    cond = model.condition(lr)
    up = upsample(lr, 4)
    r = model.to_diffused(hr_batch, cond)
    torch.testing.assert_close(r, 5.0 * (hr_batch - up), rtol=1e-14, atol=1e-14)
    z = torch.randn(hr_batch.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(model.from_diffused(z, cond), up + z / 5.0, rtol=1e-14, atol=1e-14)


class RecordingDistance(LaplacianPyramidDistance):
    def forward(self, x, y):
        self.inputs = (x.detach().clone(), y.detach().clone())
        return super().forward(x, y)


def test_quality_loss_compares_the_decoded_image_with_hr(hr_batch):
    """The distance sees bicubic_up(LR) + r / 5, r the PF-ODE solution (K = 2 RK4 steps from x_1 drawn by the
    generator) and HR; the loss is that distance."""
    config, model = tiny(quality_solver="rk4", quality_steps=2)
    lr = degrade(hr_batch, 4)
    cond = model.condition(lr)
    distance = RecordingDistance().double()
    loss = quality_loss(model, cond, hr_batch, distance, config.loss, torch.Generator().manual_seed(11))
    x_T = torch.randn(hr_batch.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    with torch.no_grad():
        r = sample_pf_ode(lambda x, t: model.denoise(x, t, cond)[0], x_T, model.sde, steps=2).x
    image = upsample(lr, 4) + r / 5.0
    x_seen, y_seen = distance.inputs
    torch.testing.assert_close(x_seen, image, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_seen, hr_batch, rtol=0, atol=0)
    assert loss.item() == pytest.approx(LaplacianPyramidDistance().double()(image, hr_batch).item(), rel=1e-10)


@pytest.mark.parametrize("dsm_weight, train_encoder", [(0.0, False), (0.0, True), (2.0, False)])
def test_quality_stage_weights_and_the_encoder_switch(hr_batch, dsm_weight, train_encoder):
    """total = dsm_weight * DSM + quality_weight * quality (no DSM term at all at weight 0); the encoder gets a
    gradient only through DSM or with quality_train_encoder, and make_state freezes it when it gets none."""
    config, model = tiny(dsm_weight=dsm_weight, quality_weight=0.5, quality_train_encoder=train_encoder,
                         quality_solver="rk4", quality_steps=1)
    config.train.stage = "quality"
    make_state(model, config)
    encoder = [p for p in model.rrdb.parameters() if p.requires_grad]
    assert bool(encoder) == (dsm_weight > 0 or train_encoder)
    if dsm_weight == 0 and not train_encoder:  # gradients do not depend on requires_grad: compare them unfrozen
        model.rrdb.conv_first.requires_grad_(True)
        encoder = list(model.rrdb.conv_first.parameters())
    objective = TrainingObjective(model, config.loss, "quality")
    out = objective(hr_batch[:1], degrade(hr_batch[:1], 4), with_quality=True,
                    generator=torch.Generator().manual_seed(0))
    assert ("loss_dsm" in out) == (dsm_weight > 0)
    expected = dsm_weight * out["loss_dsm"].item() if dsm_weight > 0 else 0.0
    assert out["total"].item() == pytest.approx(expected + 0.5 * out["loss_quality"].item(), rel=1e-12)
    out["total"].backward()
    enc_grad = sum(float(p.grad.abs().sum()) for p in encoder if p.grad is not None)
    assert (enc_grad > 0) == (dsm_weight > 0 or train_encoder)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


# ------------------------------------------------------------------------------------------------------------------
# The training step's EMA and learning-rate schedule.

def test_ema_update_is_decay_times_old_plus_rest_times_new():
    old, new = torch.nn.Linear(2, 2).double(), torch.nn.Linear(2, 2).double()
    before = [p.detach().clone() for p in old.parameters()]
    ema_update(old, new, 0.9)
    for b, p, e in zip(before, new.parameters(), old.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach(), rtol=1e-14, atol=1e-14)


def test_ema_decay_warms_up_as_tensorflows_num_updates():
    config = config_from_dict({"train": {"ema_decay": 0.999}})
    # (1 + n) / (10 + n) until it passes 0.999 (n = 8991)
    assert [ema_decay_at(n, config) for n in (0, 1, 90, 8990, 8991, 10**6)] == [0.1, 2 / 11, 0.91, 8991 / 9000,
                                                                              0.999, 0.999]
    config.train.ema_warmup = False
    assert ema_decay_at(0, config) == 0.999


def test_lr_schedule_warms_up_linearly_then_steps_down():
    config = config_from_dict({"train": {"warmup_steps": 4, "lr_decay_steps": [10, 20], "lr_decay_factor": 0.5}})
    factor = lr_lambda(config)
    assert [factor(s) for s in (0, 1, 3, 9, 10, 19, 20, 50)] == [0.25, 0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    config.train.warmup_steps = 0
    assert lr_lambda(config)(0) == 1.0


if __name__ == "__main__":
    np.set_printoptions(precision=17)
    for key, value in numpy_reference().items():
        print(f"    {key}: {value.tolist()},")
