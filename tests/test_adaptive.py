"""Seed 004 (quantized adaptive conditions) on the platform: the straight-through quantizer, the code's path into
the U-Net, the histogram and LR priors, one exact ODE step with the oracle code on a mixture of point masses, and
a checkpoint through export, `pfsr upscale` and the notes it records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfsr import cli
from pfsr.checkpoint import load_model, save, serving_checkpoint, training_checkpoint
from pfsr.config import load_config
from pfsr.diffusion import VPSDE
from pfsr.losses import TrainingObjective
from pfsr.models.adaptive import code_from_index, code_index, quantize_ste
from pfsr.models.sr import build_model
from pfsr.sampling import sample
from pfsr.train import make_state, train_loop

ROOT = Path(__file__).parents[1]
SMALL = {"model.rrdb_num_feat": 8, "model.rrdb_num_block": 2, "model.rrdb_num_grow_ch": 8,
         "model.rrdb_feature_blocks": [0, 1], "model.unet_base_channels": 16, "model.unet_channel_mult": [1, 2],
         "model.unet_attention_levels": [1], "data.crop": 16, "data.batch_size": 4, "train.warmup_steps": 1,
         "train.log_every": 1, "model.adaptive_condition_dims": 6, "model.adaptive_condition_levels": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


def _config(prior: str = "histogram", **over):
    return load_config(ROOT / "configs" / "tiny.yaml", SMALL | {"model.adaptive_condition": prior} | over)


def test_quantizer_values_and_straight_through_gradients():
    y = torch.linspace(-6, 6, 49, dtype=torch.float64).reshape(7, 7).requires_grad_()
    for levels in (2, 3, 5):
        q = quantize_ste(y, levels)
        expected = np.minimum(np.floor(levels / (1 + np.exp(-y.detach().numpy()))), levels - 1)
        np.testing.assert_array_equal(q.detach().numpy(), expected)
        w = torch.randn(7, 7, dtype=torch.float64)
        (grad,) = torch.autograd.grad((q * w).sum(), y)
        assert torch.equal(grad, w)  # the identity: f_STE(y) = y + sg(f(y) - y)
    assert torch.equal(code_from_index(code_index(q, 5), 7, 5), q.detach().float())


def test_code_reaches_the_unet_and_the_encoder_learns_through_it():
    config = _config()
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # the U-Net's zero-initialized output layers would hide the code's path at step 0
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    objective = TrainingObjective(model, config.loss, "diffusion")
    hr, lr = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 4, 4)
    losses = objective(hr, lr, generator=torch.Generator().manual_seed(0))
    assert losses["code"].shape == (4, 6) and set(losses["code"].unique().tolist()) <= {0.0, 1.0}
    losses["total"].backward()
    enc = model.adaptive.encoder.proj.weight.grad
    assert enc is not None and enc.abs().sum() > 0  # DSM gradient through the straight-through estimator
    # the code changes the prediction: one bit flipped changes the heads
    cond = model.condition(lr, prior_code=False)
    cond.code = torch.zeros(4, 6)
    with torch.no_grad():
        x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 0.5)
        e0, _ = model.heads(x, t, cond)
        cond.code = cond.code.clone()
        cond.code[:, 2] = 1
        e1, _ = model.heads(x, t, cond)
    assert (e0 - e1).abs().max() > 1e-4


def test_histogram_is_the_ema_of_code_counts_and_the_priors_draw_from_it():
    config = _config(**{"model.adaptive_condition_dims": 3, "model.adaptive_condition_levels": 3})
    model = build_model(config)
    a = model.adaptive
    codes1 = torch.tensor([[0, 1, 2], [0, 1, 2], [2, 2, 2]], dtype=torch.float32)  # indices 21, 21, 26
    codes2 = torch.tensor([[1, 0, 0]], dtype=torch.float32)  # index 1
    a.update_histogram(codes1, 0.9)
    a.update_histogram(codes2, 0.9)
    expected = torch.zeros(27)
    expected[21], expected[26], expected[1] = 0.9 * 0.1 * 2, 0.9 * 0.1 * 1, 0.1
    torch.testing.assert_close(a.histogram, expected)
    drawn = a.prior_code(torch.zeros(200, 8, 2, 2), seeds=range(200))
    index = code_index(drawn, 3)
    assert set(index.tolist()) == {1, 21, 26}
    assert torch.equal(drawn, a.prior_code(torch.zeros(200, 8, 2, 2), seeds=range(200)))  # seeded
    freq = torch.bincount(index, minlength=27)[[1, 21, 26]].float() / 200
    torch.testing.assert_close(freq, expected[[1, 21, 26]] / expected.sum(), atol=0.1, rtol=0)
    # the LR prior: the predictor's most likely code
    lr_model = build_model(_config("lr"))
    features = torch.randn(2, lr_model.rrdb.feature_channels, 3, 3)
    logits = lr_model.adaptive.predictor_logits(features)
    assert torch.equal(lr_model.adaptive.prior_code(features, [0, 0]), logits.argmax(-1).float())


def test_one_ode_step_is_exact_with_the_oracle_code_on_point_masses():
    """Data: a mixture of 4 point masses. With the code naming the component the exact denoiser is constant
    (x0 = a_k), the PF-ODE trajectory is straight (in alpha/sigma coordinates) and one DPM-Solver step from t = 1
    lands on alpha(t_min) a_k + sigma(t_min) eps exactly; without the code the exact denoiser (posterior mean) is
    not, and one step misses."""
    sde = VPSDE(0.1, 20.0, 1e-3)
    g = torch.Generator().manual_seed(0)
    points = 3 * torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    k = torch.arange(4).repeat(2)
    eps = torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64)
    one = torch.ones(8, dtype=torch.float64)
    x_T = sde.marginal(points[k], one, eps)

    def oracle_x0(x, t):  # the code (k) names the component: the denoiser is the point itself
        return points[k]

    def posterior_x0(x, t):  # no code: E[x0 | x_t] over the mixture
        a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        d2 = ((x[:, None] - a[..., None, None, None] * points[None]) ** 2).flatten(2).sum(-1)
        w = torch.softmax(-d2 / (2 * s**2), dim=1)
        return torch.einsum("nk,kchw->nchw", w, points)

    def eps_of(x0_fn):
        return lambda x, t: (x - sde.alpha(t)[:, None, None, None] * x0_fn(x, t)) / sde.sigma(t)[:, None, None, None]

    target = sde.marginal(points[k], sde.t_min * one, eps)
    exact = sample(eps_of(oracle_x0), x_T, sde, method="dpmpp_2m", steps=1, x0_fn=oracle_x0)
    assert exact.nfe == 1
    torch.testing.assert_close(exact.x, target, rtol=0, atol=1e-12)
    missed = sample(eps_of(posterior_x0), x_T, sde, method="dpmpp_2m", steps=1, x0_fn=posterior_x0)
    assert (missed.x - target).abs().max() > 0.5


def test_adaptive_checkpoint_through_export_and_upscale(tmp_path, capsys):
    config = _config("lr", **{"train.steps": 2})
    torch.manual_seed(0)
    state = make_state(build_model(config), config)
    batches = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    train_loop(state, config, batches, generator=torch.Generator().manual_seed(0))
    assert state.model.adaptive.histogram.sum() > 0
    torch.testing.assert_close(state.ema.adaptive.histogram, state.model.adaptive.histogram, rtol=0, atol=0)
    path = tmp_path / "qac.pt"
    save(serving_checkpoint(training_checkpoint(state, config)), path)
    model = load_model(path)
    assert torch.equal(model.adaptive.histogram, state.ema.adaptive.histogram) and model.adaptive.prior == "lr"
    Image.fromarray((np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    assert cli.main(["upscale", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--checkpoint", str(path),
                     "--sampler", "dpmpp_2m", "--steps", "2", "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "out.png").size == (48, 48)
    assert "code from the lr prior" in capsys.readouterr().out
