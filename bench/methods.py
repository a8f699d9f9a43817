"""The seeds' methods side by side with `pfsr compare` on a CPU: configs/methods/*.yaml (baseline, structure-
modulated noise of seed 002, adaptive conditions of seed 004 with the histogram prior, and the rrdb mean
and InvSR methods of issue 14, listed as unavailable until that work is merged), 3 seeds each, on the tiny config.

Data: scikit-image's photos, `pfsr prep --masks felzenszwalb` (128 px sub-images) for training, chelsea and coffee
held back for validation (center crops of data.val_max_size). --steps sets every method's total training steps
(the stages keep their proportions), --batch-size the batch of every stage.

    python bench/methods.py [--steps 120] [--batch-size 4] [--seeds 3] [--val-size 128]

Prints one JSON object (compare.json's summary and differences) and writes bench/results/methods.json, and the
page, plot and table beside it (methods.html, methods.png, methods.csv).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _common import PHOTOS, load_photos, run_benchmark, write_result
from pfsr.cli import main as pfsr_main
from pfsr.pipeline.compare import compare

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("baseline", "structure", "adaptive", "rrdb_mean", "invsr")
HELD_BACK = ("chelsea", "coffee")


def scaled_method(src: Path, dest: Path, steps: int, batch_size: int, val_size: int) -> Path:
    """A copy of the method file with its stages' steps scaled to `steps` in all, the batch size and the
    validation crop (data.val_max_size) set."""
    doc = yaml.safe_load(src.read_text())
    total = sum(s["steps"] for s in doc["stages"])
    for i, stage in enumerate(doc["stages"]):
        stage["config"] = str((src.parent / stage["config"]).resolve())
        stage["steps"] = max(1, round(stage["steps"] * steps / total))
        stage["overrides"] = (stage.get("overrides") or {}) | {"data.batch_size": batch_size,
                                                               "data.val_max_size": val_size}
    doc["stages"][-1]["steps"] += steps - sum(s["steps"] for s in doc["stages"])
    dest.write_text(yaml.safe_dump(doc))
    return dest


def headline_figures(summary: dict, differences: list) -> dict:
    """Mean PSNR(Y) gain of every method over the baseline per setting, and how many differences are reported."""
    base = {(r["sampler"], r["steps"]): r["psnr_y_mean"] for r in summary.get("baseline", [])}
    gains = {name: {f"{r['sampler']}_{r['steps']}": r["psnr_y_mean"] - base[(r["sampler"], r["steps"])]
                    for r in rows if r["psnr_y_mean"] is not None and base.get((r["sampler"], r["steps"]))}
             for name, rows in summary.items() if name != "baseline"}
    return {"psnr_y_gain_over_baseline_db": gains, "reported_differences": sum(d["reported"] for d in differences),
            "goal": "seed 002 claims up to +0.74 dB PSNR (DIV2K, 400k steps); seed 004 better few-step samples "
                    "(5.14 FID at 6 NFE, CIFAR-10); a difference counts only beyond 2x the pooled std over seeds"}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--val-size", type=int, default=128, help="center crop of the validation photos (HR px)")
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m:1", "dpmpp_2m:2", "dpmpp_2m:4", "dpmpp_2m:10"])
    args = p.parse_args()
    import ray

    from PIL import Image

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pfsr-bench-methods-"))
    try:
        for split, names in {"train": [n for n in PHOTOS if n not in HELD_BACK], "val": list(HELD_BACK)}.items():
            (work / split).mkdir()
            for name, img in zip(names, load_photos(names)):
                Image.fromarray(img).save(work / split / f"{name}.png")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        code = pfsr_main(["prep", "--source", str(work / "train"), "--out", str(work / "shards"), "--patch", "128",
                          "--step", "128", "--min-shards", "2", "--masks", "felzenszwalb"])
        if code:
            sys.exit(code)
        files = [scaled_method(ROOT / "configs" / "methods" / f"{m}.yaml", work / f"{m}.yaml", args.steps,
                               args.batch_size, args.val_size) for m in METHODS]
        report = compare([str(f) for f in files], data=str(work / "shards"), val_data=str(work / "val"),
                         out=str(work / "out"), seeds=args.seeds, samplers=args.samplers)
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        for ext in ("html", "png", "csv"):
            if (work / "out" / f"compare.{ext}").exists():
                shutil.copy(work / "out" / f"compare.{ext}", results / f"methods.{ext}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "methods",
        "what": f"pfsr compare on the tiny config, {args.steps} training steps per method (batch "
                f"{args.batch_size}), {args.seeds} seeds; PSNR(Y) on the held-back photos {', '.join(HELD_BACK)} "
                f"(center {args.val_size} px crops), 8-bit bicubic x4 LR",
        "seconds": round(time.perf_counter() - t0, 1),
        **headline_figures(report["summary"], report["differences"]),
        "summary": report["summary"], "differences": report["differences"], "unavailable": report["unavailable"],
        "failed_trials": [t for t in report["trials"] if t["error"]],
        "seconds_per_trial": {t["method"]: t["seconds"] for t in report["trials"] if t["error"] is None},
    }
    return write_result(result, ROOT / "bench" / "results" / "methods.json")


if __name__ == "__main__":
    run_benchmark(main)
