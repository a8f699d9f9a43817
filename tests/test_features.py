"""VGG19 feature distance and LPIPS (VGG) loaded through the real path from files in torchvision's state-dict
format (random weights: no pretrained weights are available offline), and the released LPIPS linear layers."""
from __future__ import annotations

import sys

import pytest
import torch

from pfsr.config import config_from_dict
from pfsr.errors import InputError
from pfsr.features import (LPIPS, VGG16_FILE, VGG19_FILE, VGG19Distance, find_backbone_weights,
                           lpips_lin_weights_path)
from pfsr.losses import TrainingObjective
from pfsr.metrics import image_metrics

# torchvision's vgg16 / vgg19 state dicts, written out by hand as the reference: features index -> (in, out) of
# each 3x3 conv (ReLUs and max-pools in between hold no tensors), and the classifier's three Linear layers.
TORCHVISION_VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                           14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
                           26: (512, 512), 28: (512, 512)}
TORCHVISION_VGG19_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                           14: (256, 256), 16: (256, 256), 19: (256, 512), 21: (512, 512), 23: (512, 512),
                           25: (512, 512), 28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512)}
TORCHVISION_CLASSIFIER = {0: (25088, 4096), 3: (4096, 4096), 6: (4096, 1000)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


def torchvision_state_dict(convs: dict[int, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """The full key set of a torchvision VGG file with He-initialised random convs. The classifier's tensors
    have their real shapes but share one element (stride 0), so the file stays small; loading ignores them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (cin, cout) in convs.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        state[f"features.{i}.bias"] = 0.01 * torch.randn(cout, generator=g)
    for i, (fin, fout) in TORCHVISION_CLASSIFIER.items():
        state[f"classifier.{i}.weight"] = torch.zeros(()).expand(fout, fin)
        state[f"classifier.{i}.bias"] = torch.zeros(()).expand(fout)
    return state


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vgg")
    files = {}
    for name, convs in ((VGG16_FILE, TORCHVISION_VGG16_CONVS), (VGG19_FILE, TORCHVISION_VGG19_CONVS)):
        state = torchvision_state_dict(convs, seed=len(convs))
        torch.save(state, root / name)
        files[name] = (root / name, state)
    return files


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def photo_batch(photos, size=64):
    """[2 x 3 x size x size] in [0, 1] from two real photos."""
    crops = [torch.from_numpy(photos[n][100:100 + size, 100:100 + size]).permute(2, 0, 1).float() / 255
             for n in ("astronaut", "coffee")]
    return torch.stack(crops)


def test_vgg19_distance_loads_torchvision_file(vgg_files, photos):
    path, state = vgg_files[VGG19_FILE]
    distance = VGG19Distance(path)
    own = distance.state_dict()
    assert set(own) == {k for k in state if k.startswith("features.")}  # classifier.* ignored
    for k, v in own.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    x = photo_batch(photos, 32).requires_grad_(True)
    y = photo_batch(photos, 32).flip(0)
    assert distance.embed(x).shape == (2, 512, 2, 2)  # relu5_4: 1/16 of the input, before the last pool
    assert distance(y, y).item() == 0
    d = distance(x, y)
    assert d.item() > 0
    d.backward()
    assert x.grad.abs().sum() > 0


def test_vgg19_found_in_torch_hub_checkpoints(vgg_files, empty_torch_home):
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / VGG19_FILE).symlink_to(vgg_files[VGG19_FILE][0])
    path, source = find_backbone_weights(VGG19_FILE, None)
    assert path == checkpoints / VGG19_FILE and "torch hub" in source
    assert VGG19Distance().source == source
    # the quality loss takes it from there when the config names no file
    config = config_from_dict({"loss": {"quality_features": "vgg19", "quality_weight": 0.5}})
    objective = TrainingObjective(torch.nn.Module(), config.loss, "quality")
    assert isinstance(objective.distance, VGG19Distance)
    assert not any(p.requires_grad for p in objective.distance.parameters())


def test_missing_weights_say_which_file_where_and_the_offline_option(empty_torch_home, tmp_path):
    path, reason = find_backbone_weights(VGG19_FILE, None)
    assert path is None and str(empty_torch_home / "hub" / "checkpoints") in reason
    path, reason = find_backbone_weights(VGG16_FILE, tmp_path / "nowhere.pth")
    assert path is None and "nowhere.pth" in reason

    with pytest.raises(InputError) as err:
        VGG19Distance(None)
    for part in (VGG19_FILE, "hub/checkpoints", "~/.cache/torch/hub/checkpoints", "quality_features: laplacian"):
        assert part in str(err.value)
    config = config_from_dict({"loss": {"quality_features": "vgg19", "quality_weight": 0.5}})
    with pytest.raises(InputError, match=VGG19_FILE):
        TrainingObjective(torch.nn.Module(), config.loss, "quality")
    with pytest.raises(InputError, match=VGG16_FILE) as err:
        LPIPS()
    assert "hub/checkpoints" in str(err.value)
    with pytest.raises(InputError, match="nowhere.pth"):
        LPIPS(tmp_path / "nowhere.pth")


class Payload:
    """Not a tensor: weights_only loading must refuse it."""


def test_loading_is_weights_only_and_checks_the_architecture(vgg_files, tmp_path):
    with pytest.raises(InputError, match=r"missing features\.16\."):
        VGG19Distance(vgg_files[VGG16_FILE][0])  # a VGG16 file is not a VGG19
    state = dict(vgg_files[VGG19_FILE][1], extra=Payload())
    torch.save(state, tmp_path / "pickled.pth")
    with pytest.raises(InputError, match="cannot read"):
        VGG19Distance(tmp_path / "pickled.pth")
    (tmp_path / "truncated.pth").write_bytes(vgg_files[VGG19_FILE][0].read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated.pth"):
        VGG19Distance(tmp_path / "truncated.pth")


def test_released_lpips_linear_layers(vgg_files):
    released = torch.load(lpips_lin_weights_path(), map_location="cpu", weights_only=True)
    model = LPIPS(vgg_files[VGG16_FILE][0])
    assert "lpips" not in sys.modules  # found, not imported (it would import torchvision)
    assert [tuple(lin.weight.shape) for lin in model.lins] == [(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    for k, lin in enumerate(model.lins):
        torch.testing.assert_close(lin.weight, released[f"lin{k}.model.1.weight"], rtol=0, atol=0)
        assert (lin.weight >= 0).all()  # the released layers are non-negative, so LPIPS >= 0
    assert set(model.state_dict()) == ({k for k in vgg_files[VGG16_FILE][1] if k.startswith("features.")}
                                       | {f"lins.{k}.weight" for k in range(5)})


def test_lpips_zero_for_identical_positive_and_symmetric(vgg_files, photos):
    model = LPIPS(vgg_files[VGG16_FILE][0])
    x = photo_batch(photos)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    same = model(x, x)
    assert same.shape == (2,) and (same == 0).all()
    d_xy, d_yx = model(x, y), model(y, x)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)
    # per-image: a batch gives what each image gives alone
    torch.testing.assert_close(model(x[1:], y[1:]), d_xy[1:])
    # more noise, farther away
    z = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (model(x, z) > d_xy).all()


def test_image_metrics_report_lpips_with_a_model(vgg_files, photos):
    model = LPIPS(vgg_files[VGG16_FILE][0])
    hr = photos["astronaut"][:64, :64]
    sr = (hr // 8 * 8).astype(hr.dtype)
    out = image_metrics(sr, hr, 4, lpips_model=model)
    assert out["lpips"] > 0
    assert image_metrics(hr, hr, 4, lpips_model=model)["lpips"] == 0
    assert image_metrics(sr, hr, 4)["lpips"] is None


def test_vgg19_features_are_conv5_4_before_its_relu(vgg_files, photos):
    """The reference code's `vgg19.features[:35]` (ECDP lib/model/percep.py lines 9-11): conv5_4's output, before its
    ReLU, written out here as torchvision's layer list (conv + ReLU, max-pools at indices 4, 9, 18, 27)."""
    import torch.nn.functional as F

    path, state = vgg_files[VGG19_FILE]
    x = photo_batch(photos, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    h = (x - mean[:, None, None]) / std[:, None, None]
    for i in range(35):
        if i in TORCHVISION_VGG19_CONVS:
            h = F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
        elif i in (4, 9, 18, 27):
            h = F.max_pool2d(h, 2)
        else:
            h = F.relu(h)
    features = VGG19Distance(path).embed(x)
    torch.testing.assert_close(features, h, rtol=1e-5, atol=1e-5)
    assert (features < 0).any()  # no ReLU after the last conv
