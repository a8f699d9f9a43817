import subprocess
import sys

import pytest
import torch

from pfsr.config import load_config
from pfsr.degradation import downsample
from pfsr.models import RRDBNet, UNet, build_model

SMALL = {"model.rrdb_num_feat": 8, "model.rrdb_num_block": 2, "model.rrdb_num_grow_ch": 4,
         "model.rrdb_feature_blocks": [0, 1], "model.unet_base_channels": 8, "model.unet_channel_mult": [1, 2],
         "model.unet_num_res_blocks": 1, "model.unet_attention_levels": [1], "model.unet_num_heads": 2,
         "data.crop": 48}


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_shapes_for_every_scale(scale):
    model = build_model(load_config(overrides={**SMALL, "model.scale": scale}))
    hr = torch.rand(2, 3, 48, 48)
    lr = downsample(hr, scale)
    cond = model.condition(lr)
    assert cond.features.shape == (2, 16, 48 // scale, 48 // scale)  # 2 blocks x 8 channels at LR size
    assert cond.upsampled.shape == hr.shape
    e, d = model.heads(model.to_diffused(hr, cond), torch.full((2,), 0.5), cond)
    assert e.shape == d.shape == hr.shape
    assert model.regress(lr).shape == hr.shape


def test_wrong_size_names_the_multiple():
    model = build_model(load_config(overrides={**SMALL, "model.unet_channel_mult": [1, 2, 2, 2]}))
    with pytest.raises(ValueError, match="multiple of 8"):
        model.condition(torch.rand(1, 3, 5, 5))  # HR 20x20


def test_hybrid_heads_finite_at_both_ends():
    model = build_model(load_config(overrides=SMALL))
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.1)
    hr = torch.rand(1, 3, 16, 16)
    cond = model.condition(downsample(hr, 4))
    x = torch.randn_like(hr)
    for t in (model.sde.t_min, 1.0):
        eps, x0 = model.denoise(x, torch.full((1,), t), cond)
        assert torch.isfinite(eps).all() and torch.isfinite(x0).all()


def test_residual_round_trip():
    model = build_model(load_config(overrides=SMALL))
    hr = torch.rand(1, 3, 16, 16)
    cond = model.condition(downsample(hr, 4))
    torch.testing.assert_close(model.from_diffused(model.to_diffused(hr, cond), cond), hr)


def test_rrdb_keeps_basicsr_names():
    keys = RRDBNet(num_block=2, feature_blocks=(1,)).state_dict().keys()
    assert {"conv_first.weight", "body.0.rdb1.convs.0.weight", "conv_body.weight", "conv_last.weight"} <= set(keys)


def test_unet_rejects_bad_time_shape():
    unet = UNet(in_channels=6, out_channels=6, cond_channels=4, base_channels=8, channel_mult=(1,), attention_levels=())
    with pytest.raises(ValueError, match="t must have shape"):
        unet(torch.rand(2, 6, 8, 8), torch.rand(3), torch.rand(2, 4, 2, 2))


def test_frozen_encoder_gets_no_gradient():
    model = build_model(load_config(overrides={**SMALL, "model.freeze_encoder": True}))
    cond = model.condition(torch.rand(1, 3, 4, 4))
    assert not cond.features.requires_grad


def test_core_imports_no_ray():
    code = ("import sys, pfsr, pfsr.config, pfsr.diffusion, pfsr.models, pfsr.sampling, pfsr.losses, "
            "pfsr.degradation, pfsr.train, pfsr.checkpoint, pfsr.inference, pfsr.cli\n"
            "import importlib\n"
            "for m in ('pfsr.metrics', 'pfsr.features', 'pfsr.images', 'pfsr.data', 'pfsr.storage'):\n"
            "    try: importlib.import_module(m)\n"
            "    except ModuleNotFoundError as e:\n"
            "        if e.name != m: raise\n"
            "assert 'ray' not in sys.modules, [k for k in sys.modules if k.startswith('ray')]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attention_is_softmax_attention_in_the_fused_kernel():
    """The fused (flash) SDPA kernel accepts the block's q, k, v (the math kernel would hold the HW x HW matrix:
    GBs on a photo tile), and the block computes x + proj(softmax(q k^T / sqrt(d)) v) (float64 reference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pfsr.models.unet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(channels=16, num_heads=2).eval()
    torch.nn.init.normal_(block.proj.weight, std=0.2)
    x = torch.randn(2, 16, 6, 5)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = block(x)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x).reshape(2, 16, 30)).double()  # [N x 3C x HW]
    q, k, v = qkv.reshape(2, 3, 2, 8, 30).unbind(1)  # [N x heads x C/heads x HW]
    weights = torch.softmax(torch.einsum("nhci,nhcj->nhij", q, k) / 8 ** 0.5, dim=-1)
    attended = torch.einsum("nhij,nhcj->nhci", weights, v).reshape(2, 16, 30)
    expected = x.double() + torch.nn.functional.conv1d(attended, block.proj.weight.double(),
                                                       block.proj.bias.double()).reshape(2, 16, 6, 5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_init_from_an_inversion_checkpoint_keeps_all_but_its_inverter():
    """A stage after the inversion stage (the demo fine-tuning the shipped model) takes every weight but the noise
    predictor; weights of another architecture are still refused."""
    from pfsr.checkpoint import init_from, serving_checkpoint, training_checkpoint
    from pfsr.config import config_from_dict
    from pfsr.errors import InputError
    from pfsr.train import make_state

    def state_of(stage: str, rrdb_num_block: int = 4):
        config = config_from_dict({"model": {"rrdb_num_feat": 8, "rrdb_num_block": rrdb_num_block,
                                             "rrdb_feature_blocks": [0, rrdb_num_block - 1],
                                             "unet_base_channels": 16, "unet_channel_mult": [1, 2],
                                             "unet_attention_levels": [1]},
                                   "inversion": {"num_feat": 8, "num_block": 1}, "train": {"stage": stage}})
        return make_state(build_model(config), config), config

    source, inversion = state_of("inversion")
    assert source.model.inverter is not None
    ckpt = serving_checkpoint(training_checkpoint(source, inversion, {}))
    state, _ = state_of("encoder")
    assert init_from(state, ckpt) == []
    for name, value in state.ema.state_dict().items():
        torch.testing.assert_close(value, ckpt["model"][name], rtol=0, atol=0)
    with pytest.raises(InputError, match="weights this model does not"):
        init_from(state_of("encoder", rrdb_num_block=3)[0], ckpt)
