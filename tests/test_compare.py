"""`pfsr compare`: method files, the same-budget rule, the reporting rule (difference of means > 2 x pooled std over
seeds) against hand-computed numbers, and a run on Ray Tune with 2 methods (one of two chained stages), 2 seeds
and a method that is unavailable."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from pfsr.cli import main
from pfsr.errors import InputError
from pfsr.pipeline.compare import check_methods, load_method, pooled_std, summarize

ROOT = Path(__file__).parents[1]
SMALL = {"model.rrdb_num_feat": 8, "model.rrdb_num_block": 2, "model.rrdb_num_grow_ch": 8,
         "model.rrdb_feature_blocks": [0, 1], "model.unet_base_channels": 16, "model.unet_channel_mult": [1, 2],
         "model.unet_attention_levels": [1], "data.crop": 32, "data.batch_size": 2, "data.val_images": 1,
         "data.val_max_size": 32, "train.warmup_steps": 1, "train.log_every": 2, "model.adaptive_condition_dims": 8}


def method_file(path: Path, stages: list[tuple[str, int, dict]]) -> Path:
    path.write_text(yaml.safe_dump({"stages": [{"config": str(ROOT / "configs" / c), "steps": n,
                                                "overrides": SMALL | o} for c, n, o in stages]}))
    return path


def test_pooled_std_and_the_reporting_rule_by_hand():
    # a = [1, 2, 3] (s^2 = 1), b = [2, 4] (s^2 = 2): pooled = sqrt((2 * 1 + 1 * 2) / 3) = sqrt(4/3)
    assert pooled_std([1, 2, 3], [2, 4]) == pytest.approx(math.sqrt(4 / 3), rel=1e-12)
    settings = [{"sampler": "dpmpp_2m", "steps": 1}, {"sampler": "dpmpp_2m", "steps": 4}]

    def trial(method, seed, v1, v4):
        return {"method": method, "seed": seed, "error": None,
                "results": [{"psnr_y": v1, "nfe": 1}, {"psnr_y": v4, "nfe": 4}]}

    # at 1 step: means 20 vs 21, pooled std 0.1 -> reported; at 4 steps: means 25 vs 25.1, pooled 0.1 -> not
    trials = [trial("a", 0, 19.9, 24.9), trial("a", 1, 20.1, 25.1), trial("b", 0, 20.9, 25.0), trial("b", 1, 21.1, 25.2),
              {"method": "b", "seed": 2, "error": "boom", "results": None}]
    per, diffs = summarize(trials, ["a", "b"], settings)
    assert per["b"][0]["psnr_y_mean"] == pytest.approx(21.0) and per["b"][0]["seeds"] == 2
    assert per["a"][0]["psnr_y_std"] == pytest.approx(math.sqrt(0.02))
    d1, d4 = diffs
    assert d1["diff_db"] == pytest.approx(1.0) and d1["pooled_std_db"] == pytest.approx(math.sqrt(0.02))
    assert d1["reported"] and not d4["reported"]


def test_method_files_are_checked(tmp_path):
    a = method_file(tmp_path / "a.yaml", [("tiny.yaml", 4, {})])
    b = method_file(tmp_path / "b.yaml", [("tiny_encoder.yaml", 2, {}), ("tiny.yaml", 3, {})])
    with pytest.raises(InputError, match="same total training steps"):
        check_methods([load_method(a), load_method(b)])
    missing = load_method(method_file(tmp_path / "m.yaml", [("tiny.yaml", 4, {"diffusion.mean": "rrdb"})]))
    assert missing["error"].startswith("stages[0]:") and "diffusion.mean" in missing["error"]
    (tmp_path / "bad.yaml").write_text("stages: [{config: tiny.yaml}]\n")
    with pytest.raises(InputError, match="needs config"):
        load_method(tmp_path / "bad.yaml")
    assert main(["compare", "--methods", str(a), str(tmp_path / "nope.yaml"), "--data", str(tmp_path),
                 "--val-data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_compare_two_methods_two_seeds_on_ray_tune(ray_cluster, photos, tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for name in ("astronaut", "rocket", "coffee"):
        pil = Image.fromarray(photos[name])
        pil.thumbnail((96, 96))
        pil.save(src / f"{name}.png")
    shards = tmp_path / "shards"
    assert main(["prep", "--source", str(src), "--out", str(shards), "--patch", "64", "--step", "32",
                 "--min-shards", "2"]) == 0
    methods = [method_file(tmp_path / "baseline.yaml", [("tiny.yaml", 4, {})]),
               method_file(tmp_path / "adaptive.yaml", [("tiny_encoder.yaml", 2, {}),
                                                        ("tiny.yaml", 2, {"model.adaptive_condition": "histogram"})]),
               method_file(tmp_path / "rrdb_mean.yaml", [("tiny.yaml", 4, {"diffusion.mean": "rrdb"})])]
    out = tmp_path / "out"
    code = main(["compare", "--methods", *map(str, methods), "--data", str(shards), "--val-data", str(src),
                 "--seeds", "2", "--samplers", "dpmpp_2m:1", "dpmpp_2m:2", "--out", str(out)])
    assert code == 1  # one method unavailable
    report = json.loads((out / "compare.json").read_text())
    assert list(report["summary"]) == ["baseline", "adaptive"] and "rrdb_mean" in report["unavailable"]
    assert [(t["method"], t["seed"], t["error"]) for t in report["trials"]] == [
        ("baseline", 0, None), ("baseline", 1, None), ("adaptive", 0, None), ("adaptive", 1, None)]
    for t in report["trials"]:
        assert [(r["sampler"], r["steps"], r["nfe"]) for r in t["results"]] == [("dpmpp_2m", 1, 1), ("dpmpp_2m", 2, 2)]
        assert all(5 < r["psnr_y"] < 60 for r in t["results"])
    # seeds differ (different weights), the same seed of one method is not the other's
    base = [t["results"][0]["psnr_y"] for t in report["trials"][:2]]
    assert base[0] != base[1]
    rows = (out / "compare.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "rrdb_mean</b>" in page and "unavailable" in page
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert len(report["differences"]) == 2
