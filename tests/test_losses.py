"""Training objectives on a tiny real PFSRModel and real photo crops: adjoint gradients against backprop through
the same RK4 steps, DSM descent, the quality loss's precision under bf16 autocast, stages and the hybrid c."""
from __future__ import annotations

import pytest
import torch

from pfsr.config import ConfigError, config_from_dict
from pfsr.degradation import degrade
from pfsr.diffusion import VPSDE, hybrid_mix
from pfsr.losses import LaplacianPyramidDistance, TrainingObjective, dsm_loss, quality_loss
from pfsr.models import build_model
from pfsr.train import set_trainable

CROP = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


def tiny_config(**loss):
    return config_from_dict({
        "model": {"scale": 4, "rrdb_num_feat": 8, "rrdb_num_block": 2, "rrdb_num_grow_ch": 8,
                  "rrdb_feature_blocks": [0, 1], "unet_base_channels": 8, "unet_channel_mult": [1, 2],
                  "unet_num_res_blocks": 1, "unet_attention_levels": [1], "unet_num_heads": 2},
        "data": {"crop": CROP, "batch_size": 1},
        "loss": loss,
    })


def tiny_model(config, seed: int = 0):
    """The tiny model with its zero-initialised layers (output convs, attention projections) set to small random
    values: zeros there would cut every gradient but the last layer's, and the LR features off the output."""
    torch.manual_seed(seed)
    model = build_model(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    set_trainable(model, config.train.stage)
    return model


@pytest.fixture(scope="module")
def hr_crops(photos):
    """[4 x 3 x 16 x 16] crops of real photos in [0, 1]."""
    crops = [torch.from_numpy(photos[name][200:200 + CROP, 200:200 + CROP]).permute(2, 0, 1).float() / 255
             for name in ("astronaut", "coffee", "chelsea", "rocket")]
    return torch.stack(crops)


def _flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("solver, max_rel", [(dict(quality_solver="rk4", quality_steps=20), 1e-3),
                                             (dict(quality_solver="dopri5", quality_rtol=1e-4, quality_atol=1e-4), 5e-2)])
def test_adjoint_gradients_match_backprop_through_the_solver(hr_crops, solver, max_rel):
    """odeint_adjoint's gradients (U-Net parameters, and the encoder's through the feature tensor) equal
    backprop through the same solver steps (K fixed RK4 steps, or dopri5's accepted steps ending on t_min), in
    float64. They differ by the adjoint's own discretisation error (its backward solve of the state and the
    adjoint), which for RK4 shrinks about as h^3 here: relative 1.2e-3 at K = 10, 1.4e-4 at K = 20; for dopri5 it
    follows the tolerance: 2.2e-2 at 1e-4 (its adaptive backward solve picks its own steps)."""
    config = tiny_config(**solver)
    model = tiny_model(config).double()
    assert not model.freeze_encoder
    distance = LaplacianPyramidDistance().double()
    hr = hr_crops[:1].double()
    lr = degrade(hr, config.model.scale)
    unet = [p for p in model.unet.parameters() if p.requires_grad]
    encoder = [p for p in model.rrdb.parameters() if p.requires_grad]
    assert unet and encoder

    results = {}
    for adjoint in (False, True):
        model.zero_grad(set_to_none=False)
        for p in unet + encoder:
            p.grad = torch.zeros_like(p)
        cond = model.condition(lr)
        loss = quality_loss(model, cond, hr, distance, config.loss, torch.Generator().manual_seed(3), adjoint=adjoint)
        loss.backward()
        results[adjoint] = loss.item(), _flat_grads(unet), _flat_grads(encoder)

    (loss_d, unet_d, enc_d), (loss_a, unet_a, enc_a) = results[False], results[True]
    assert loss_a == pytest.approx(loss_d, rel=1e-12)  # same forward solve
    for direct, adj in ((unet_d, unet_a), (enc_d, enc_a)):
        assert direct.norm() > 1e-6  # non-trivial gradients
        rel = ((adj - direct).norm() / direct.norm()).item()
        assert rel < max_rel, rel


def test_dsm_loss_decreases_on_a_fixed_batch(hr_crops):
    config = tiny_config()
    model = tiny_model(config)
    lr = degrade(hr_crops, config.model.scale)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(6):
        cond = model.condition(lr)
        # same t and eps every step: the loss is a fixed function of the parameters
        loss = dsm_loss(model, model.to_diffused(hr_crops, cond), cond, config.loss, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_quality_loss_runs_in_float32_under_bf16_autocast(hr_crops):
    config = tiny_config(quality_weight=0.5, quality_steps=2)
    model = tiny_model(config)
    lr = degrade(hr_crops[:2], config.model.scale)
    out_dtypes: list[torch.dtype] = []
    handle = model.unet.register_forward_hook(lambda mod, args, out: out_dtypes.append(out.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cond = model.condition(lr)
            dsm = dsm_loss(model, model.to_diffused(hr_crops[:2], cond), cond, config.loss)
            dsm_dtypes, out_dtypes[:] = list(out_dtypes), []
            q = quality_loss(model, cond, hr_crops[:2], LaplacianPyramidDistance(), config.loss,
                             torch.Generator().manual_seed(0))
        ode_dtypes = list(out_dtypes)
        (dsm + q).backward()
    finally:
        handle.remove()
    assert dsm_dtypes == [torch.bfloat16]  # autocast was on for the DSM step
    assert cond.features.dtype == torch.bfloat16
    assert len(ode_dtypes) == 4 * 2 and set(ode_dtypes) == {torch.float32}  # RK4: 4 calls a step
    assert q.dtype == torch.float32 and torch.isfinite(q)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in (p.grad for p in model.rrdb.parameters() if p.requires_grad))


@pytest.mark.parametrize("stage, weight, with_quality, keys", [
    ("encoder", 0.0, False, {"loss_l1", "total"}),
    ("diffusion", 0.0, True, {"loss_dsm", "total"}),
    ("quality", 0.5, False, {"loss_dsm", "total"}),
    ("quality", 0.5, True, {"loss_dsm", "loss_quality", "total"}),
])
def test_training_objective_stages(hr_crops, stage, weight, with_quality, keys):
    config = tiny_config(quality_weight=weight, quality_steps=2)
    config.train.stage = stage
    model = tiny_model(config)
    objective = TrainingObjective(model, config.loss, stage)
    out = objective(hr_crops[:2], degrade(hr_crops[:2], 4), with_quality=with_quality,
                    generator=torch.Generator().manual_seed(0))
    assert set(out) == keys
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    parts = out.get("loss_l1", out.get("loss_dsm")) + weight * out.get("loss_quality", torch.tensor(0.0))
    assert out["total"].item() == pytest.approx(parts.item(), rel=1e-6)
    out["total"].backward()
    trainable = model.rrdb if stage == "encoder" else model.unet
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())


def test_hybrid_c_enters_only_the_mixed_target(hr_crops):
    """DSM on both heads does not see c; DSM on eps_hat does. With a perfect data head and a useless noise head,
    a larger c (more weight on the data head) lowers the mixed error: ||eps_hat - eps|| = abar^c ||eps||."""
    lr = degrade(hr_crops[:2], 4)

    def loss_at(c, target):
        config = tiny_config(dsm_target=target)
        config.diffusion.hybrid_c = c
        model = tiny_model(config)
        cond = model.condition(lr)
        return dsm_loss(model, model.to_diffused(hr_crops[:2], cond), cond, config.loss,
                        torch.Generator().manual_seed(0)).item()

    assert loss_at(0.5, "heads") == loss_at(1.5, "heads")
    assert loss_at(0.5, "mixed") != pytest.approx(loss_at(1.5, "mixed"), rel=1e-4)

    sde = VPSDE()
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    r0, eps = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.randn(3, 3, 4, 4, dtype=torch.float64)
    x_t = sde.marginal(r0, t, eps)
    errors = []
    for c in (0.5, 1.0, 1.5):
        eps_hat, x0_hat = hybrid_mix(torch.zeros_like(eps), r0, x_t, t, sde, c)
        err = (eps_hat - eps).flatten(1).norm(dim=1)
        torch.testing.assert_close(err, sde.abar(t) ** c * eps.flatten(1).norm(dim=1))
        errors.append(err)
    assert (errors[0] > errors[1]).all() and (errors[1] > errors[2]).all()


def test_describe_quality_names_the_features_in_use():
    off = TrainingObjective(tiny_model(tiny_config()), tiny_config().loss, "diffusion")
    assert off.describe_quality() == "off"
    config = tiny_config(quality_weight=0.5, quality_features="laplacian", quality_solver="rk4", quality_steps=4)
    on = TrainingObjective(tiny_model(config), config.loss, "quality").describe_quality()
    assert "Laplacian pyramid L1 (weight-free)" in on and "rk4, 4 steps" in on and "weight 0.5" in on


def checkerboard(size: int = 32) -> torch.Tensor:
    """(-1)^(i + j) on [1 x 3 x size x size]: the pyramid's binomial blur maps it to 0 (1 - 4 + 6 - 4 + 1 = 0 per
    axis, and reflect padding continues it), so it lies wholly in the finest band."""
    i = torch.arange(size, dtype=torch.float64)
    return ((-1.0) ** (i[:, None] + i[None, :])).expand(1, 3, size, size)


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_detail_term_asks_for_the_amount_of_texture_not_its_phase(weight):
    """Closed forms on a checkerboard of amplitude a about 0.5: against a flat grey image the band L1 is a and
    the energy term adds weight * a (mean |band| a against 0 in every window); against the same checkerboard
    in opposite phase the band L1 is 2a and the energy term 0, whatever its weight."""
    a = 0.1
    distance = LaplacianPyramidDistance(energy_weight=weight).double()
    texture = 0.5 + a * checkerboard()
    flat = torch.full_like(texture, 0.5)
    assert distance(flat, texture).item() == pytest.approx(a * (1 + weight), rel=1e-12)
    assert distance(1.0 - texture, texture).item() == pytest.approx(2 * a, rel=1e-12)
    assert distance(texture, texture).item() == 0.0


def test_detail_term_is_local_to_its_windows():
    """Texture moved from the left half to the right half (window-aligned, 8-pixel windows of 32 x 32): each
    window's energy differs by a on the finest band wherever either image has texture away from the seam, so the
    energy term is close to a, unlike a global energy match, which would be 0."""
    a = 0.1
    distance = LaplacianPyramidDistance(energy_weight=1.0).double()
    left, right = torch.zeros(1, 3, 32, 32, dtype=torch.float64), torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    left[..., :16], right[..., 16:] = 1.0, 1.0
    x, y = 0.5 + a * checkerboard() * left, 0.5 + a * checkerboard() * right
    energy = distance(x, y) - LaplacianPyramidDistance().double()(x, y)
    assert 0.8 * a < energy.item() < 1.2 * a
    assert distance.local_energy(distance.bands(x)[0]).shape == (1, 3, 4, 4)


def test_detail_weight_reaches_the_distance_and_is_validated():
    config = config_from_dict({"loss": {"quality_weight": 0.5, "quality_detail_weight": 0.25}})
    objective = TrainingObjective(build_model(config), config.loss, stage="quality")
    assert objective.distance.energy_weight == 0.25
    assert "local band energy" in objective.describe_quality()
    for bad, message in (({"quality_detail_weight": -1.0}, "must be >= 0"),
                         ({"quality_detail_weight": 0.5, "quality_features": "vgg19"}, "laplacian")):
        with pytest.raises(ConfigError, match=f"loss.quality_detail_weight.*{message}"):
            config_from_dict({"loss": bad})
