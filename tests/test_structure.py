"""Seed 002 (SAM-DiffSR) on the platform: masks from `pfsr prep --masks` and `--masks-from` (label PNG, npy, COCO
RLE), the loader's masks following every augmentation, E(M) against numpy references of the official code, and the
structure-modulated noise (mean shift of x_t, heads, bit-identical baseline with E = 0)."""
from __future__ import annotations

import io
import json
import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pfsr import cli
from pfsr.config import load_config
from pfsr.data import iter_shard_samples, list_shards, make_train_loader, sample_image
from pfsr.diffusion import VPSDE
from pfsr.errors import InputError
from pfsr.losses import TrainingObjective, dsm_loss, modulated_noise
from pfsr.masks import (decode_label_png, decode_rle_counts, rope_grid, segment_felzenszwalb,
                        structure_encoding)
from pfsr.models.sr import build_model
from pfsr.train import make_state, train_loop

ROOT = Path(__file__).parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


# ----------------------------------------------------------------------------------------------------------------
# Independent numpy references of the official code (rotary-embedding-torch and merge_all_mask_to_one_RoPE).

def rope_reference(h: int, w: int) -> np.ndarray:
    """rotate_queries_or_keys(ones(1, 1, h, w)) of RotaryEmbedding(dim=w), step by step in numpy float64."""
    freqs = 1.0 / (10000 ** (np.arange(0, w, 2)[: w // 2].astype(np.float64) / w))
    angles = np.einsum("i,j->ij", np.arange(h, dtype=np.float64), freqs)
    angles = np.repeat(angles, 2, axis=1)  # '... n -> ... (n r)', r = 2
    rot = angles.shape[1]
    t = np.ones((h, w))
    x = t[:, :rot].reshape(h, rot // 2, 2)
    rotated_half = np.stack([-x[..., 1], x[..., 0]], axis=-1).reshape(h, rot)
    out = t.copy()
    out[:, :rot] = t[:, :rot] * np.cos(angles) + rotated_half * np.sin(angles)
    return out


def merge_reference(labels: np.ndarray) -> np.ndarray:
    """merge_all_mask_to_one_RoPE over the binary masks of labels 1..n (label 0: no mask)."""
    h, w = labels.shape
    rope = rope_reference(h, w)
    merged = np.zeros((h, w))
    for k in range(1, labels.max() + 1):
        mask = labels == k
        if mask.any():
            merged = np.where(mask, (rope * mask).mean(), merged)
    return merged


def rle_encode_reference(mask: np.ndarray) -> str:
    """pycocotools' rleEncode + rleToString: runs over column-major pixels, LEB128-like, differences from 3rd on."""
    flat = mask.T.reshape(-1).astype(bool)
    runs, value, count = [], False, 0
    for v in flat:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


@pytest.mark.parametrize("h, w", [(6, 8), (5, 7), (64, 64)])
def test_rope_grid_equals_the_numpy_reference(h, w):
    np.testing.assert_allclose(rope_grid(h, w, dtype=torch.float64).numpy(), rope_reference(h, w), rtol=0, atol=1e-12)


def test_structure_encoding_equals_the_official_merge():
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, 6, (24, 20)), np.zeros((24, 20), np.int64),
                       np.repeat(np.arange(4), 120).reshape(24, 20)])
    got = structure_encoding(torch.from_numpy(labels), dtype=torch.float64)
    assert got.shape == (3, 1, 24, 20)
    for i in range(3):
        np.testing.assert_allclose(got[i, 0].numpy(), merge_reference(labels[i]), rtol=0, atol=1e-14)
    assert np.all(got[1].numpy() == 0)


def test_rle_decoder_by_hand_and_against_the_reference_encoder():
    # by hand: 3x2 mask, column-major [0,1,1 | 1,0,0] -> runs 1, 3, 2 -> "132"
    np.testing.assert_array_equal(decode_rle_counts("132", 3, 2), [[0, 1], [1, 0], [1, 0]])
    # runs 1, 5, 2, 1: the fourth stored as 1 - 5 = -4 -> one char 28 + 48 = 'L' with its sign bit
    np.testing.assert_array_equal(decode_rle_counts("152L", 3, 3).T.reshape(-1), [0] + [1] * 5 + [0, 0, 1])
    rng = np.random.default_rng(1)
    for shape in [(17, 23), (40, 3), (1, 1)]:
        mask = rng.random(shape) < 0.3
        mask[: shape[0] // 2, : shape[1] // 2] = True  # long runs: multi-character numbers
        assert np.array_equal(decode_rle_counts(rle_encode_reference(mask), *shape), mask)
    with pytest.raises(ValueError, match="cover"):
        decode_rle_counts("132", 4, 2)


# ----------------------------------------------------------------------------------------------------------------
# Structure-modulated noise.

def test_x_t_has_exactly_the_stated_mean_shift_and_x0_is_recovered_from_eps_prime():
    sde = VPSDE(0.1, 20.0, 1e-3)
    g = torch.Generator().manual_seed(0)
    r0 = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 8, 8), generator=g)
    E = structure_encoding(labels, dtype=torch.float64)
    t = torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64)
    scale = 1.0
    eps_prime = modulated_noise(eps, t, sde, E, scale)
    x_t = sde.marginal(r0, t, eps_prime)
    # closed form in numpy: log alpha = -t^2 (bmax - bmin) / 4 - t bmin / 2, c(t) = scale sigma(t) beta(t)
    tn = t.numpy()
    alpha = np.exp(-0.25 * tn**2 * 19.9 - 0.05 * tn)
    sigma = np.sqrt(1 - alpha**2)
    c = scale * sigma * (0.1 + tn * 19.9)
    shift = (x_t - sde.marginal(r0, t, eps)).numpy()
    np.testing.assert_allclose(shift, np.broadcast_to((sigma * c)[:, None, None, None] * E.numpy(), shift.shape),
                               rtol=1e-9, atol=1e-15)  # x_t ~ 1: float64 differences carry ~1e-16
    assert np.abs(shift).max() > 0
    # both heads' targets stay consistent: x0 = (x_t - sigma eps') / alpha is r0
    x0 = (x_t.numpy() - sigma[:, None, None, None] * eps_prime.numpy()) / alpha[:, None, None, None]
    np.testing.assert_allclose(x0, r0.numpy(), rtol=0, atol=1e-10)


SMALL = {"model.rrdb_num_feat": 8, "model.rrdb_num_block": 2, "model.rrdb_num_grow_ch": 8,
         "model.rrdb_feature_blocks": [0, 1], "model.unet_base_channels": 16, "model.unet_channel_mult": [1, 2],
         "model.unet_attention_levels": [1], "data.crop": 16, "data.batch_size": 2, "train.warmup_steps": 1,
         "train.log_every": 1}


def _tiny(**over):
    """configs/tiny.yaml made smaller still: seconds per step on a crowded 2-core machine."""
    return load_config(ROOT / "configs" / "tiny.yaml", SMALL | over)


def test_the_network_learns_eps_prime():
    """dsm_loss: input x_t from eps' and targets eps' (noise head) and r0 (data head), redone by hand."""
    config = _tiny(**{"diffusion.noise_modulation": "structure", "diffusion.noise_modulation_scale": 0.5})
    torch.manual_seed(0)
    model = build_model(config)
    r0 = torch.randn(2, 3, 16, 16)
    lr = torch.rand(2, 3, 4, 4)
    cond = model.condition(lr)
    E = structure_encoding(torch.randint(1, 5, (2, 16, 16)))
    loss = dsm_loss(model, r0, cond, config.loss, torch.Generator().manual_seed(5), structure=E)
    g = torch.Generator().manual_seed(5)
    sde = model.sde
    t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(2, generator=g)
    eps = torch.randn(r0.shape, generator=g)
    eps_prime = eps + (0.5 * sde.sigma(t) * sde.beta(t))[:, None, None, None] * E
    e, d = model.heads(sde.marginal(r0, t, eps_prime), t, cond)
    expected = ((e - eps_prime) ** 2).mean() + ((d - r0) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    plain = dsm_loss(model, r0, cond, config.loss, torch.Generator().manual_seed(5))
    assert abs(plain.item() - loss.item()) > 1e-4


def test_zero_structure_trains_bit_identically_to_the_baseline():
    batches_g = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 3, 16, 16, generator=batches_g) for _ in range(3)]
    zero = [torch.zeros(2, 16, 16, dtype=torch.int32)] * 3
    states = []
    for modulation, data in (("none", batches), ("structure", list(zip(batches, zero)))):
        config = _tiny(**{"diffusion.noise_modulation": modulation, "train.steps": 3})
        torch.manual_seed(0)
        state = make_state(build_model(config), config)
        train_loop(state, config, data, generator=torch.Generator().manual_seed(1))
        states.append(state.model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # and a non-zero mask does change the training
    config = _tiny(**{"diffusion.noise_modulation": "structure", "diffusion.noise_modulation_scale": 1.0,
                      "train.steps": 3})
    torch.manual_seed(0)
    state = make_state(build_model(config), config)
    masks = [torch.randint(1, 9, (2, 16, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    train_loop(state, config, list(zip(batches, masks)), generator=torch.Generator().manual_seed(1))
    assert any(not torch.equal(states[0][k], v) for k, v in state.model.state_dict().items())


def test_structure_training_without_masks_fails_clearly():
    config = _tiny(**{"diffusion.noise_modulation": "structure"})
    objective = TrainingObjective(build_model(config), config.loss, "diffusion")
    with pytest.raises(ValueError, match="needs the batch's masks"):
        objective(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 4, 4))


# ----------------------------------------------------------------------------------------------------------------
# Prep and loader (Ray Data).

def _samples(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_shard_samples(list_shards(str(out), "train"))}


@pytest.mark.ray
def test_prep_felzenszwalb_masks_are_cut_from_the_whole_image(tmp_path, photos, ray_cluster):
    src = tmp_path / "src"
    src.mkdir()
    whole = {}
    for name in ("chelsea", "coffee"):
        pil = Image.fromarray(photos[name])
        pil.thumbnail((160, 160))
        pil.save(src / f"{name}.png")
        whole[name] = np.asarray(pil)
    out = tmp_path / "out"
    assert cli.main(["prep", "--source", str(src), "--out", str(out), "--patch", "64", "--step", "64",
                     "--min-shards", "2", "--masks", "felzenszwalb"]) == 0
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    samples = _samples(out)
    assert len(manifest) == len(samples) > 4
    for row in manifest:
        sample = samples[row["key"]]
        assert row["mask"] == f"{row['key']}.mask.png" and json.loads(sample["json"])["mask"] == row["mask"]
        png = Image.open(io.BytesIO(sample["mask.png"]))
        assert png.mode.startswith("I;16")
        x0, y0, x1, y1 = row["crop"]
        labels = segment_felzenszwalb(whole[row["source"].split(".")[0]])
        np.testing.assert_array_equal(decode_label_png(sample["mask.png"]), labels[y0:y1, x0:x1])
    # evaluation and the image reader ignore the mask member
    assert sample_image(sample).shape == (64, 64, 3)


def _user_masks(tmp_path: Path, photos) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Images a (label PNG), b (npy), c (COCO RLE JSON), d (no mask), e (mis-sized mask)."""
    src, masks = tmp_path / "src", tmp_path / "masks"
    (src / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for i, name in enumerate("abcde"):
        img = photos["astronaut"][i * 40:i * 40 + 96, :128]
        Image.fromarray(img).save(src / "sub" / f"{name}.png")
        labels[name] = rng.integers(0, 300, (96, 128))
    Image.fromarray(labels["a"].astype(np.uint16)).save(masks / "sub" / "a.png")
    np.save(masks / "sub" / "b.npy", labels["b"])
    ann = []
    for k in (1, 2, 3):  # three overlapping SAM masks; a later one wins where they overlap
        m = np.zeros((96, 128), bool)
        m[k * 10:k * 10 + 40, k * 20:k * 20 + 50] = True
        ann.append({"segmentation": {"size": [96, 128], "counts": rle_encode_reference(m)}, "area": int(m.sum())})
    c = np.zeros((96, 128), np.int64)
    for k in (1, 2, 3):
        c[k * 10:k * 10 + 40, k * 20:k * 20 + 50] = k
    labels["c"] = c
    (masks / "sub" / "c.json").write_text(json.dumps(ann))
    np.save(masks / "sub" / "e.npy", labels["e"][:90])
    return src, masks, labels


@pytest.mark.ray
def test_prep_masks_from_a_folder_and_rejections(tmp_path, photos, ray_cluster):
    src, masks, labels = _user_masks(tmp_path, photos)
    out = tmp_path / "out"
    assert cli.main(["prep", "--source", str(src), "--out", str(out), "--patch", "64", "--step", "32",
                     "--min-shards", "2", "--masks-from", str(masks)]) == 0
    rejected = {r["source"]: r["reason"] for r in pq.read_table(out / "rejected.parquet").to_pylist()}
    assert rejected["sub/d.png"].startswith("missing mask: no sub/d{.png,.npy,.json}")
    assert rejected["sub/e.png"] == "mask size mismatch: mask 128x90, image 128x96"
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    samples = _samples(out)
    assert {r["source"] for r in manifest} == {"sub/a.png", "sub/b.png", "sub/c.png"}
    for row in manifest:
        x0, y0, x1, y1 = row["crop"]
        want = labels[row["source"][4]][y0:y1, x0:x1]
        np.testing.assert_array_equal(decode_label_png(samples[row["key"]]["mask.png"]), want)
    assert cli.main(["prep", "--source", str(src), "--out", str(tmp_path / "o2"), "--masks", "slic",
                     "--masks-from", str(masks)]) == 2


@pytest.mark.ray
def test_loader_masks_follow_every_augmentation(tmp_path, photos, ray_cluster):
    """Masks that number every pixel: each cropped, flipped, rotated mask pixel names the HR pixel beside it."""
    src, masks = tmp_path / "src", tmp_path / "masks"
    src.mkdir()
    masks.mkdir()
    images = {}
    for name in ("rocket", "chelsea", "coffee"):
        img = photos[name][:96, :128]
        images[name] = img
        Image.fromarray(img).save(src / f"{name}.png")
        np.save(masks / f"{name}.npy", np.arange(96 * 128).reshape(96, 128) + 1)
    out = tmp_path / "out"
    assert cli.main(["prep", "--source", str(src), "--out", str(out), "--patch", "0", "--min-shards", "1",
                     "--masks-from", str(masks)]) == 0
    kwargs = dict(crop=32, scale=4, batch_size=4, num_workers=0, seed=7)
    with_masks = list(itertools.islice(make_train_loader(str(out), with_masks=True, **kwargs), 6))
    plain = list(itertools.islice(make_train_loader(str(out), **kwargs), 6))
    kinds = set()
    for (hr, mask), hr_plain in zip(with_masks, plain):
        assert torch.equal(hr, hr_plain) and mask.dtype == torch.int32 and mask.shape == (4, 32, 32)
        for b in range(4):
            index = mask[b].numpy().astype(np.int64) - 1
            ys, xs = index // 128, index % 128
            got = (hr[b].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            assert any(np.array_equal(got, img[ys, xs]) for img in images.values())
            kinds.add((xs[0, 1] - xs[0, 0], ys[0, 1] - ys[0, 0], xs[1, 0] - xs[0, 0], ys[1, 0] - ys[0, 0]))
    assert len(kinds) >= 5  # flips and transposes all exercised (8 possible)
    # shards without masks: a clear error
    bare = tmp_path / "bare"
    assert cli.main(["prep", "--source", str(src), "--out", str(bare), "--patch", "0", "--min-shards", "1"]) == 0
    with pytest.raises(InputError, match="no mask.png member"):
        next(iter(make_train_loader(str(bare), with_masks=True, **kwargs)))
