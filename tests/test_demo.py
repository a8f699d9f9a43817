"""`pfsr demo`: a shortened run end to end (its own local Ray cluster, every stage a real `pfsr` subprocess), the
files it leaves and the report built from them; a failing stage named with a non-zero exit; the split of the
user's own images, local and on S3."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfsr.checkpoint import load
from pfsr.config import load_config
from pfsr.inference import DEFAULT_CHECKPOINT
from pfsr.pipeline.demo import (FINE_TUNE_SETTING, PHOTOS, QUICK, VAL_PHOTOS, StageFailed, check_fine_tuning,
                                split_own_images, stage_configs)

ROOT = Path(__file__).resolve().parents[1]


def run_demo(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pfsr", "demo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _ray_left_behind(temp_dir: str) -> list[str]:
    """Command lines of processes still running from the demo's Ray temp dir."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if temp_dir in line]


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo_out"
    proc = run_demo("--quick", "--out", str(out))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    # progress: a banner per stage with the command, elapsed times, and the cluster gone at the end
    for stage in ("data", "ray start", "prep train", "prep val", "train encoder", "train diffusion", "export",
                  "serve", "check fine-tuning"):
        assert re.search(rf"━━ \[\d+/\d+\] {stage} ━━", log), stage
        assert f"✓ {stage} done in" in log
    address, temp_dir = re.search(r"local Ray cluster at (\S+), .*\(temp dir (\S+)\)", log).groups()
    assert f"--ray-address {address}" in log and f"Ray cluster at {address} shut down" in log
    assert not Path(temp_dir).exists() and not _ray_left_behind(temp_dir)
    assert "ray stop" not in proc.stdout  # ray start's hints are only logged: that would stop every Ray here
    assert re.search(r"web page: http://127\.0\.0\.1:\d+/ ", log)
    assert "--init " + str(ROOT / "models" / "pfsr_x4_small.pt") in log  # fine-tuning the shipped model

    # data: the photos, two held back
    assert sorted(p.stem for p in (out / "data" / "val").glob("*.png")) == sorted(VAL_PHOTOS)
    assert len(list((out / "data" / "train").glob("*.png"))) == len(PHOTOS) - len(VAL_PHOTOS)
    assert list((out / "shards" / "train").glob("train-*.tar")) and list((out / "shards" / "val").glob("val-*.tar"))

    # timings: every stage ok with its time and command
    timings = json.loads((out / "timings.json").read_text())
    assert timings["status"] == "ok" and timings["failed_stage"] is None
    names = [s["name"] for s in timings["stages"]]
    assert names[:7] == ["data", "ray start", "prep train", "prep val", "train encoder", "train diffusion", "export"]
    assert names[-2:] == ["serve", "check fine-tuning"]
    assert names[7] == "evaluate shipped-dpmpp_2m-10"  # the shipped model first
    assert "evaluate demo-pf_ode" in names and "evaluate demo-dpmpp_2m-10" in names
    assert all(s["status"] == "ok" and (s["seconds"] > 0 or s["name"] == "check fine-tuning")  # reads 2 files
               for s in timings["stages"])
    assert sum(s["seconds"] for s in timings["stages"]) <= timings["total_seconds"]
    assert timings["machine"]["cores"] >= 1

    # the exported model: a serving checkpoint that loads with weights_only, with the shipped model's architecture
    ckpt = load(out / "models" / "pfsr_demo.pt", kind="serving")
    assert ckpt["step"] == timings["plan"]["diffusion_steps"] and ckpt["config"]["model"]["freeze_encoder"]
    shipped = load(ROOT / "models" / "pfsr_x4_small.pt", kind="serving")
    # all but the shipped model's noise predictor (seed 001), which the demo's stages leave out (init_from)
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in shipped["model"].items()
                                                             if not k.startswith("inverter.")}
    changed = [k for k, v in ckpt["model"].items() if not np.array_equal(v.numpy(), shipped["model"][k].numpy())]
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("rrdb.") for k in changed), changed[:5]

    # the fine-tuning check: the same figures as the two evaluations it compares
    check = json.loads((out / "fine_tuning.json").read_text())
    before, after = (json.loads((out / "eval" / f"{m}-{FINE_TUNE_SETTING}" / "metrics.json").read_text())
                     for m in ("shipped", "demo"))
    assert check["before_psnr_y"] == before["model"]["psnr_y"] and check["after_psnr_y"] == after["model"]["psnr_y"]
    assert check["ok"] and check["delta_db"] >= -0.3
    assert timings["models"]["shipped"].startswith("the shipped model") and "fine-tuned" in timings["models"]["demo"]

    # training curves from the runs' TensorBoard files: both stages, finite, every logged step
    curves = json.loads((out / "loss_curves.json").read_text())
    plan = timings["plan"]
    for stage, tag, steps in (("encoder", "train/loss_l1", plan["encoder_steps"]),
                              ("diffusion", "train/loss_dsm", plan["diffusion_steps"])):
        points = curves[stage][tag]
        assert [s for s, _ in points] == list(range(plan["log_every"], steps + 1, plan["log_every"]))
        assert all(math.isfinite(v) and v > 0 for _, v in points)
    assert curves["diffusion"]["val/psnr_y"]

    # evaluations: sane numbers on the held-back crops, grids that are PNGs
    for name, nfe in (("shipped-dpmpp_2m-10", 10), ("demo-pf_ode", None), ("demo-dpmpp_2m-10", 10)):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["n_images"] == plan["eval_limit"] and metrics["scale"] == 4
        assert 20 < metrics["bicubic"]["psnr_y"] < 50  # bicubic x4 on photo crops
        assert 0 < metrics["bicubic"]["ssim_y"] <= 1
        for section in ("model", "rrdb"):
            assert 5 < metrics[section]["psnr_y"] < 60 and -1 <= metrics[section]["ssim_y"] <= 1
        assert metrics["model"]["nfe"] == nfe if nfe else metrics["model"]["nfe"] >= 2
        grids = list((out / "eval" / name / "grids").glob("*.png"))
        assert grids and all(_png(g).shape[0] > 100 for g in grids)

    # the photo upscaled over HTTP: 4x the LR request, and its record
    serve = json.loads((out / "serve.json").read_text())
    lr, sr, hr = (_png(out / f"serve_{k}.png") for k in ("lr", "sr", "hr"))
    assert serve["status"] == 200 and sr.shape == hr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
    assert serve["nfe"] == "10"

    # report.html: self-contained (no file or network references), every section, every embedded PNG decodes
    html = (out / "report.html").read_text()
    assert not re.search(r'src="(?!data:)', html) and "http://" not in html.replace(escape(serve["url"]), "")
    for heading in ("The models", "Metrics on held-out images", "Quality against network evaluations",
                    "Comparison grids", "Upscaled over HTTP", "Training curves", "Time per stage"):
        assert heading in html
    # each model said in words, the shipped model's grids before the demo model's, the check's verdict
    shipped_at, demo_at = (html.index(f"<h3>{escape(t[:1].upper() + t[1:])}</h3>")
                           for t in (timings["models"]["shipped"], timings["models"]["demo"]))
    assert html.index("Comparison grids") < shipped_at < demo_at
    assert f"{check['before_psnr_y']:.2f} dB before (the shipped model)" in html
    assert 'class="bad"' not in html  # no section reports missing inputs
    assert "bicubic" in html and "RRDB L1 regression (demo)" in html and "PF-ODE dopri5" in html
    assert "RRDB L1 regression (shipped)" in html and "shipped model (models/pfsr_x4_small.pt)" in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 6
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    for png in ("quality_vs_nfe.png", "loss_curves.png", "timings.png", "serve_comparison.png"):
        assert _png(out / png).size > 0
    # all but the in-process data and check stages
    assert len(list((out / "logs").glob("*.log"))) == len(timings["stages"]) - 2

    # the report rebuilds from the files alone
    (out / "report.html").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "pfsr.report", str(out)], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"{check['before_psnr_y']:.2f} dB before" in (out / "report.html").read_text()


def _metrics(folder: Path, psnr_y: float) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"n_images": 3, "model": {"psnr_y": psnr_y}}))


@pytest.mark.parametrize("after, ok", [(27.71, True), (27.69, False), (28.5, True)])
def test_fine_tuning_fails_only_when_it_loses_more_than_the_tolerance(tmp_path, after, ok):
    _metrics(tmp_path / "eval" / f"shipped-{FINE_TUNE_SETTING}", 28.0)
    _metrics(tmp_path / "eval" / f"demo-{FINE_TUNE_SETTING}", after)
    if ok:
        assert check_fine_tuning(tmp_path, 0.3)["delta_db"] == pytest.approx(after - 28.0)
    else:
        with pytest.raises(StageFailed, match="lost 0.31 dB PSNR-Y"):
            check_fine_tuning(tmp_path, 0.3)
    assert json.loads((tmp_path / "fine_tuning.json").read_text())["ok"] is ok


def test_stage_configs_fine_tune_the_shipped_model_or_start_from_scratch(tmp_path):
    plan = QUICK.fine_tuning()
    assert (plan.diffusion_steps, plan.val_every) == (QUICK.fine_tune_diffusion_steps, QUICK.fine_tune_val_every)
    encoder, diffusion = (load_config(p) for p in stage_configs(tmp_path / "a", plan, DEFAULT_CHECKPOINT))
    assert encoder.model == load_config(ROOT / "configs" / "pfsr_x4_small_encoder.yaml").model
    assert diffusion.model == load_config(ROOT / "configs" / "pfsr_x4_small.yaml").model
    assert (encoder.train.stage, diffusion.train.stage) == ("encoder", "diffusion")
    assert diffusion.train.lr == encoder.train.lr == 5e-5 and diffusion.data.crop == 64
    assert (encoder.train.steps, diffusion.train.steps) == (QUICK.encoder_steps, QUICK.fine_tune_diffusion_steps)
    # the diffusion the shipped U-Net learned (its mean is the RRDB's output), not the config file's default
    shipped = load(DEFAULT_CHECKPOINT, kind="serving")["config"]["diffusion"]
    assert dataclasses.asdict(diffusion.diffusion) == shipped and shipped["mean"] == "rrdb"
    # the loss of the shipped model's last stage: DSM and the image-quality loss at every step
    last_stage = load_config(ROOT / "configs" / "pfsr_x4_small_quality.yaml").loss
    assert diffusion.loss == last_stage and last_stage.quality_weight > 0 and last_stage.quality_every == 1
    assert encoder.loss.quality_weight == 0
    encoder, diffusion = (load_config(p) for p in stage_configs(tmp_path / "b", QUICK))
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert diffusion.model == dataclasses.replace(tiny.model, freeze_encoder=True)
    assert diffusion.train.lr == tiny.train.lr and encoder.model == tiny.model
    assert diffusion.loss.quality_weight == 0 and diffusion.train.steps == QUICK.diffusion_steps


def test_failing_stage_is_named_and_exits_nonzero(tmp_path):
    """Files with image names that are not images: prep rejects them all, the pipeline stops at the first stage
    that cannot go on, says which, exits non-zero, and still writes timings.json and report.html."""
    own = tmp_path / "own"
    own.mkdir()
    for i in range(3):
        (own / f"not_a_photo_{i}.png").write_bytes(b"plain text, not a PNG\n" * 10)
    out = tmp_path / "demo_out"
    proc = run_demo("--quick", "--data", str(own), "--out", str(out), timeout=600)
    assert proc.returncode not in (0, 2), proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = re.search(r"✗ stage '([^']+)' failed: .*its log: (\S+)", proc.stderr)
    assert failed, proc.stderr[-3000:]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["status"] == "failed" and timings["failed_stage"] == failed.group(1)
    assert timings["stages"][-1] == {**timings["stages"][-1], "name": failed.group(1), "status": "failed"}
    assert Path(failed.group(2)).is_file()
    assert re.search(r"Ray cluster at \S+ shut down", proc.stdout)
    html = (out / "report.html").read_text()
    assert f"in stage {failed.group(1)}" in html


def test_missing_data_fails_before_anything_starts(tmp_path):
    proc = run_demo("--quick", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert f"--data {tmp_path / 'nowhere'} does not exist" in proc.stderr
    assert "Ray cluster" not in proc.stdout


def _split_names(dest: Path) -> dict[str, list[str]]:
    return {s: sorted(str(p.relative_to(dest / s)) for p in (dest / s).rglob("*") if p.is_file())
            for s in ("train", "val")}


def test_own_images_split_deterministically_local_and_s3(tmp_path, photo_dir, s3_bucket):
    import boto3

    nested = tmp_path / "own"
    for i, p in enumerate(sorted(photo_dir.glob("*.png"))):  # a tree, with a non-image that is skipped
        target = nested / f"set{i % 2}" / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    (nested / "notes.txt").write_text("not an image")
    first = split_own_images(str(nested), tmp_path / "a")
    again = split_own_images(str(nested), tmp_path / "b")
    assert first == again == {"train": len(PHOTOS) - 1, "val": 1}
    names = _split_names(tmp_path / "a")
    assert names == _split_names(tmp_path / "b") and not set(names["train"]) & set(names["val"])

    s3 = boto3.client("s3")
    for p in nested.rglob("*.png"):
        s3.put_object(Bucket=s3_bucket, Key=f"photos/{p.relative_to(nested)}", Body=p.read_bytes())
    assert split_own_images(f"s3://{s3_bucket}/photos", tmp_path / "c") == first
    assert _split_names(tmp_path / "c") == names
    src = next(nested.rglob("*.png"))
    split = "val" if str(src.relative_to(nested)) in names["val"] else "train"
    assert (tmp_path / "c" / split / src.relative_to(nested)).read_bytes() == src.read_bytes()
