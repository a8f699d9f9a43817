"""`pfsr sweep-c` (issue 8): the prediction error by noise level against its closed form, and the Ray Tune sweep
of the hybrid constant c on `pfsr prep` shards of scikit-image's photos with configs/tiny.yaml (32 px crops, 10
steps per trial, trials one at a time, one CPU each; outputs and Tune's storage on a real S3 endpoint)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfsr import cli, storage
from pfsr.config import load_config
from pfsr.diffusion import append_dims
from pfsr.errors import InputError
from pfsr.losses import noise_level_bins, prediction_error
from pfsr.models.sr import PFSRModel
from pfsr.pipeline.sweep import sweep

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SPLITS = {"train": ["astronaut", "chelsea", "rocket"], "val": ["coffee"]}


class OffsetHeads(PFSRModel):
    """heads = the true (eps, r0) of x_t plus constants (a, b), so the mixed prediction's errors are known:
    eps_hat - eps = lambda a - (1 - lambda) (alpha / sigma) b, and x0_hat - r0 = -(sigma / alpha) (eps_hat - eps)."""

    r0: torch.Tensor
    a: float = 0.3
    b: float = -0.2

    def heads(self, x_t, t, cond):
        alpha, sigma = append_dims(self.sde.alpha(t), x_t.ndim), append_dims(self.sde.sigma(t), x_t.ndim)
        return (x_t - alpha * self.r0) / sigma + self.a, self.r0 + self.b


@pytest.mark.parametrize("c", [0.5, 1.0, 1.5])
def test_prediction_error_matches_the_closed_form(c):
    config = load_config(TINY, {"diffusion.hybrid_c": c})
    model = OffsetHeads(config).double()
    hr = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cond = model.condition(torch.nn.functional.avg_pool2d(hr, 4))
    model.r0 = model.to_diffused(hr, cond)
    sde, edges = model.sde, noise_level_bins(model.sde, 8)
    assert edges[0] == sde.t_min and edges[-1] == 1 and len(edges) == 9

    errors = prediction_error(model, model.r0, cond, edges, torch.Generator().manual_seed(1))
    t = (edges[:-1] + edges[1:]) / 2
    lam, alpha, sigma = sde.abar(t) ** c, sde.alpha(t), sde.sigma(t)
    expected = (lam * model.a - (1 - lam) * alpha / sigma * model.b) ** 2
    torch.testing.assert_close(errors["eps"], expected, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(errors["r0"], (sigma / alpha) ** 2 * expected, rtol=1e-9, atol=1e-14)


def test_prediction_error_is_zero_for_exact_heads_and_repeats_with_the_seed():
    config = load_config(TINY)
    model = OffsetHeads(config).double()
    model.a = model.b = 0.0
    hr = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    cond = model.condition(torch.nn.functional.avg_pool2d(hr, 4))
    model.r0 = model.to_diffused(hr, cond)
    edges = noise_level_bins(model.sde, 4)
    exact = prediction_error(model, model.r0, cond, edges, torch.Generator().manual_seed(0))
    assert exact["eps"].max() < 1e-20 and exact["r0"].max() < 1e-20

    torch.manual_seed(0)
    net = PFSRModel(config).eval()  # a real (untrained) network: a positive error, the same for the same seed
    hr = hr.float()
    cond = net.condition(torch.nn.functional.avg_pool2d(hr, 4))
    runs = [prediction_error(net, net.to_diffused(hr, cond), cond, edges, torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0]["eps"], runs[1]["eps"]) and (runs[0]["eps"] > 0).all()


@pytest.fixture(scope="module")
def shards(ray_cluster, photos, tmp_path_factory) -> str:
    """One local `pfsr prep` output: train shards (128 px sub-images) and val shards (whole images) of disjoint
    photos."""
    from pfsr.pipeline.prep import prep

    root = tmp_path_factory.mktemp("sweep_photos")
    out = root / "shards"
    for split, names in SPLITS.items():
        (root / split).mkdir()
        for name in names:
            Image.fromarray(photos[name]).save(root / split / f"{name}.png")
        prep(str(root / split), str(out), split=split, patch=128 if split == "train" else 0, step=128,
             min_shards=2 if split == "train" else 1)
    return str(out)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    """configs/tiny.yaml with 32 px crops, batch 4 and a short validation."""
    path = tmp_path_factory.mktemp("config") / "tiny_sweep.yaml"
    path.write_text(f"base: {TINY}\n"
                    "data: {crop: 32, batch_size: 4, val_images: 1, val_max_size: 64, shuffle_buffer: 16}\n"
                    "train: {log_every: 5, warmup_steps: 5, val_steps: 4}\n")
    return path


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_runs_one_trial_per_c_and_picks_the_lowest_error(shards, small_config, s3_bucket, capsys):
    out, tune_storage = f"s3://{s3_bucket}/sweep", f"s3://{s3_bucket}/tune"
    assert cli.main(["sweep-c", "--config", str(small_config), "--data", shards, "--values", "1.5", "0.5", "1.0",
                     "--steps", "10", "--out", out, "--storage", tune_storage, "--error-crops", "8",
                     "--max-concurrent-trials", "1"]) == 0
    printed = capsys.readouterr().out
    assert "best c = " in printed and "<- best" in printed

    report = json.loads(storage.read_bytes(f"{out}/sweep.json"))
    trials = report["trials"]
    assert [t["c"] for t in trials] == [0.5, 1.0, 1.5]
    assert report["val_data"] == shards  # the val split of --data, used by default
    assert len(report["t_edges"]) == 9 and report["t_edges"][0] == pytest.approx(1e-3) and report["t_edges"][-1] == 1
    for t in trials:
        assert t["error"] is None and t["steps"] == 10 and t["seconds"] > 0
        for key in ("error_eps_by_t", "error_r0_by_t"):
            assert len(t[key]) == 8 and all(math.isfinite(v) and v > 0 for v in t[key])
        assert t["error_eps"] == pytest.approx(np.mean(t["error_eps_by_t"]))
        assert math.isfinite(t["psnr_y"]) and 5 < t["psnr_y"] < 60
    assert report["best_c"] == trials[int(np.argmin([t["error_eps"] for t in trials]))]["c"]
    assert "prediction error" in report["criterion"]
    # dsm_target "heads": the same seed trains the same network for every c, and only the mix differs
    assert report["dsm_target"] == "heads"
    assert len({t["loss_dsm"] for t in trials}) == 1
    assert len({t["error_eps"] for t in trials}) == 3

    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/sweep.csv").decode())))
    assert [float(r["c"]) for r in rows] == [0.5, 1.0, 1.5]
    assert [r["best"] for r in rows].count("True") == 1 and len([k for k in rows[0] if k.startswith("error_eps_t")]) == 8
    assert storage.read_bytes(f"{out}/sweep.png").startswith(b"\x89PNG")
    assert report["tune_path"].startswith(tune_storage + "/sweep-c-")
    assert any(e.path.endswith("result.json") for e in storage.list_files(report["tune_path"]))  # Tune's own results


@pytest.mark.parametrize("values, message", [([], "at least one value of diffusion.hybrid_c"),
                                             ([0.5, 2.5], "diffusion.hybrid_c must lie in (0, 2]"),
                                             ([0.0], "diffusion.hybrid_c must lie in (0, 2]"),
                                             ([1.0, 1.0], "each value of diffusion.hybrid_c once")])
def test_bad_values_name_the_field(values, message, tmp_path):
    with pytest.raises(InputError, match="--values") as e:
        sweep(TINY, data=str(tmp_path), out=str(tmp_path / "out"), values=values)
    assert message in str(e.value)


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    base = ["sweep-c", "--config", str(TINY), "--out", str(tmp_path / "out")]
    assert cli.main([*base, "--data", str(tmp_path), "--values", "0.5", "3"]) == 2
    assert "--values: diffusion.hybrid_c must lie in (0, 2]" in capsys.readouterr().err
    assert cli.main([*base, "--data", str(tmp_path)]) == 2
    assert "no train-NNNNNN.tar shards" in capsys.readouterr().err
    assert cli.main([*base, "--data", str(tmp_path), "--bins", "0"]) == 2
    assert "--bins must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --values needs at least one number
        cli.main([*base, "--data", str(tmp_path), "--values"])
    assert not (tmp_path / "out").exists()
