"""Images/s of `pfsr evaluate` (Ray Data: read tasks + an actor pool of model replicas) with 1 and 2 replicas.

The data are `--images` HR crops (`--size` square) of the scikit-image photos in a local folder; the model is
configs/tiny.yaml at seeded init (timing does not depend on the weights) unless --checkpoint is given; the sampler
the few-step dpmpp_2m. Each run is one `evaluate()` call on the same local Ray cluster, timed end to end
(dataset start, actor start-up, inference, metrics, reports), and the model's own solver seconds per image are
reported beside it. On a machine with fewer free cores than replicas, 2 replicas cannot be twice as fast.

    python bench/eval_throughput.py [--images 16] [--size 96] [--steps 4] [--replicas 1 2] [--checkpoint FILE]

Prints one JSON object and writes it to bench/results/eval_throughput.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from PIL import Image

from _common import load_photos, run_benchmark, write_result
from pfsr.pipeline.batching import SolverSettings
from pfsr.pipeline.evaluate import evaluate
from serve_load import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "eval_throughput.json"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]


def write_crops(folder: Path, n: int, size: int) -> None:
    """n size x size HR crops, taken in turn from the photos at spread-out positions."""
    photos = load_photos(PHOTOS)
    for i in range(n):
        img = photos[i % len(photos)]
        k = i // len(PHOTOS)
        y = min(img.shape[0] - size, 30 + 67 * k)
        x = min(img.shape[1] - size, 50 + 89 * k)
        Image.fromarray(img[y:y + size, x:x + size]).save(folder / f"{i:03d}.png")


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=96, help="HR side")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args()

    # logical CPUs beyond the cores: 2 one-CPU replicas on 2 cores must leave room for the read tasks
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    gpu = args.gpus_per_replica > 0
    settings = SolverSettings(method=args.sampler, steps=args.steps)
    result: dict = {"images": args.images, "hr_size": args.size, "sampler": args.sampler, "steps": args.steps,
                    "batch_size": args.batch_size, "cluster_cpus": ray.cluster_resources().get("CPU"),
                    "machine_cores": os.cpu_count(),
                    "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or 'cpu'})",
                    "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hr").mkdir()
        write_crops(tmp / "hr", args.images, args.size)
        checkpoint = args.checkpoint or str(tiny_checkpoint(tmp))
        result["checkpoint"] = args.checkpoint or "configs/tiny.yaml at seeded init"
        for replicas in args.replicas:
            t0 = time.perf_counter()
            report = evaluate(checkpoint=checkpoint, data=str(tmp / "hr"), out=str(tmp / f"out{replicas}"),
                              settings=settings, replicas=replicas, gpus_per_replica=args.gpus_per_replica,
                              batch_size=args.batch_size)
            wall = time.perf_counter() - t0
            result["runs"][str(replicas)] = {
                "replicas": replicas, "wall_s": round(wall, 2), "images_per_s": round(report["n_images"] / wall, 3),
                "model_seconds_per_image": round(report["model"]["seconds_per_image"], 3),
                "nfe": report["model"]["nfe"]}
            print(f"{replicas} replica(s): {report['n_images'] / wall:.3f} images/s ({wall:.1f} s)",
                  file=sys.stderr, flush=True)
    ray.shutdown()
    runs = [result["runs"][str(r)]["images_per_s"] for r in args.replicas]
    result["speedup_last_over_first"] = round(runs[-1] / runs[0], 3)
    return result


if __name__ == "__main__":
    run_benchmark(lambda: write_result(main(), RESULT))
