"""`pfsr evaluate` with Ray Data on the shared local cluster: a folder of photo crops, and `pfsr prep` shards,
checkpoint and output on a real S3 endpoint (moto server)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pfsr import cli, storage
from pfsr.checkpoint import load_model
from pfsr.degradation import degrade, to_uint8, upsample
from pfsr.features import LPIPS_VGG16_TAPS, VGG16_CFG, vgg_features
from pfsr.inference import super_resolve_tiled
from pfsr.metrics import psnr
from pfsr.pipeline.evaluate import SECTIONS, image_seed, plot_quality_vs_nfe
from pfsr.pipeline.prep import prep

pytestmark = pytest.mark.ray

PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket"]
QUALITY = {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "lpips"}


def _u8(x: torch.Tensor) -> np.ndarray:
    return to_uint8(x[0]).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory, photos) -> Path:
    """HR crops (96 x 80, not a multiple of 8 wide: 81 px are cropped to 80) of six photos, as PNG."""
    root = tmp_path_factory.mktemp("hr")
    for name in PHOTOS:
        img = photos[name]
        top, left = img.shape[0] // 3, img.shape[1] // 3
        Image.fromarray(img[top:top + 96, left:left + 81]).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def random_vgg16(tmp_path_factory) -> Path:
    """A file shaped like torchvision's vgg16-397923af.pth (random trunk): exercises the LPIPS path offline; its
    values mean nothing."""
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg_features(VGG16_CFG, LPIPS_VGG16_TAPS[-1] + 1).state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def folder_run(ray_cluster, tiny_checkpoint, hr_dir, random_vgg16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "dpmpp_2m_2"
    assert cli.main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(hr_dir), "--out", str(out),
                     "--sampler", "dpmpp_2m", "--steps", "2", "--limit", "4", "--batch-size", "2",
                     "--lpips-weights", str(random_vgg16)]) == 0
    return out


def test_folder_evaluation_writes_the_reports(folder_run, tiny_checkpoint, hr_dir):
    report = json.loads((folder_run / "metrics.json").read_text())
    assert {"n_images", "scale", "sampler", "steps", *SECTIONS} <= set(report)
    assert (report["n_images"], report["scale"], report["sampler"], report["steps"]) == (4, 4, "dpmpp_2m", 2)
    assert set(report["model"]) == QUALITY | {"nfe", "seconds_per_image"}
    assert set(report["bicubic"]) == set(report["rrdb"]) == QUALITY
    assert report["model"]["nfe"] == 2 and report["model"]["seconds_per_image"] > 0
    assert 20 < report["bicubic"]["psnr_y"] < 35, report["bicubic"]  # x4 bicubic on photos
    assert report["bicubic"]["psnr_y"] > report["bicubic"]["psnr_rgb"] - 1  # Y is the easier channel
    assert report["lpips_backbone"]["source"].startswith("given path")
    assert all(math.isfinite(report[s]["lpips"]) and report[s]["lpips"] >= 0 for s in SECTIONS)

    table = pq.read_table(folder_run / "per_image.parquet").to_pylist()
    assert [r["key"] for r in table] == sorted(PHOTOS)[:4]  # --limit takes the first images by name
    assert {(r["height"], r["width"]) for r in table} == {(96, 80)}
    assert sorted(p.stem for p in (folder_run / "grids").glob("*.png")) == sorted(PHOTOS)[:4]
    assert Image.open(folder_run / "grids" / "astronaut.png").format == "PNG"

    # Pinned to an independent computation: bicubic from the training degradation, and the PF-SR sample of the
    # same seed through `pfsr upscale`'s path (one image alone, while the replica batched two at a time).
    model = load_model(tiny_checkpoint)
    row = table[0]
    hr = np.asarray(Image.open(hr_dir / f"{row['key']}.png"))[:, :80]
    lr = degrade(torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255, 4)
    assert row["bicubic_psnr_y"] == pytest.approx(psnr(_u8(upsample(lr, 4)), hr, 4, test_y_channel=True), abs=1e-9)
    sr, nfe = super_resolve_tiled(model, lr, method="dpmpp_2m", steps=2, seed=image_seed(0, row["key"]))
    assert nfe == row["nfe"] == 2
    assert row["model_psnr_y"] == pytest.approx(psnr(_u8(sr), hr, 4, test_y_channel=True), abs=0.02)


def test_shards_on_s3_with_two_replicas_and_the_nfe_plot(folder_run, tiny_checkpoint, hr_dir, s3_bucket,
                                                         tmp_path, monkeypatch):
    shards, ckpt, out = f"s3://{s3_bucket}/shards", f"s3://{s3_bucket}/models/tiny.pt", f"s3://{s3_bucket}/eval/rk4"
    prep(str(hr_dir), shards, split="val", patch=0, min_shards=2)
    storage.write_bytes(ckpt, tiny_checkpoint.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no VGG16 weights anywhere
    assert cli.main(["evaluate", "--checkpoint", ckpt, "--data", shards, "--out", out, "--sampler", "pf_ode",
                     "--steps", "1", "--limit", "3", "--replicas", "2", "--compare", str(folder_run)]) == 0

    report = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    assert report["n_images"] == 3 and report["model"]["nfe"] == 4  # rk4: 4 evaluations a step
    assert all(report[s]["lpips"] is None for s in SECTIONS)
    assert report["lpips_backbone"]["path"] is None and "vgg16-397923af.pth" in report["lpips_backbone"]["reason"]
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/per_image.parquet"))).to_pylist()
    assert all(r["model_lpips"] is None for r in rows)
    # the same HR pixels through the shards: the same bicubic figures as the folder run
    local = {r["key"]: r for r in pq.read_table(folder_run / "per_image.parquet").to_pylist()}
    shared = [(r, local[r["key"].split("_png_")[0]]) for r in rows if r["key"].split("_png_")[0] in local]
    assert shared, ([r["key"] for r in rows], sorted(local))
    for r, l in shared:
        assert r["bicubic_psnr_y"] == pytest.approx(l["bicubic_psnr_y"], abs=1e-9)
    assert storage.read_bytes(f"{out}/quality_vs_nfe.png").startswith(b"\x89PNG")

    points = plot_quality_vs_nfe([str(folder_run), out], str(tmp_path / "q.png"))
    assert sorted(points) == ["dpmpp_2m", "pf_ode rk4"]
    assert [p["nfe"] for p in points["pf_ode rk4"]] == [4]
    assert (tmp_path / "q.png").read_bytes().startswith(b"\x89PNG")


def test_bad_arguments_fail_with_a_message(ray_cluster, tiny_checkpoint, hr_dir, tmp_path, capsys):
    base = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(hr_dir), "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--scale", "2"]) == 2
    assert "does not match the checkpoint's scale x4" in capsys.readouterr().err
    assert cli.main([*base, "--sampler", "euler"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert cli.main([*base, "--lpips-weights", str(tmp_path / "missing.pth")]) == 2
    assert "--lpips-weights" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main([*base[:4], str(tmp_path / "empty"), *base[5:]]) == 2
    assert "no val-NNNNNN.tar shards and no images" in capsys.readouterr().err
