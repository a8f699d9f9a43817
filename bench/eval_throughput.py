"""Images/s of `pfsr evaluate` (Ray Data: read tasks + an actor pool of model replicas) with 1 and 2 replicas, and
seconds and peak memory per output megapixel of whole photos through `pfsr upscale` for each sampler.

The data are `--images` HR crops (`--size` square) of the scikit-image photos in a local folder; the model is
configs/tiny.yaml at seeded init (timing does not depend on the weights) unless --checkpoint is given; the sampler
the few-step dpmpp_2m. Each run is one `evaluate()` call on the same local Ray cluster, timed end to end
(dataset start, actor start-up, inference, metrics, reports), and the model's own solver seconds per image are
reported beside it. On a machine with fewer free cores than replicas, 2 replicas cannot be twice as fast.

Whole photos ("whole_photo"): a scikit-image photo resized to --photo-size, degraded x4, upscaled back by the
shipped model in a fresh `pfsr upscale` process with --photo-threads torch threads, once per sampler at about 10
NFE (pf_ode: 3 RK4 steps, 12 NFE) and once at one megapixel with dpmpp_2m at 10 steps (the goals: at most 300 s and
3 GB on 2 cores). Each reports wall and CPU seconds (CPU seconds / threads is the wall time on free cores) and the
process's peak RSS, each per output megapixel too.

    python bench/eval_throughput.py [--images 16] [--size 96] [--steps 4] [--replicas 1 2] [--checkpoint FILE]
                                    [--photo-size 640x480] [--photo-threads 2] [--skip-megapixel]

Prints one JSON object (progress on stderr) and writes it to bench/results/eval_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from _common import load_photos, run_benchmark, write_result
from pfsr.degradation import degrade, to_uint8
from pfsr.pipeline.batching import SolverSettings
from pfsr.pipeline.evaluate import evaluate
from serve_load import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "eval_throughput.json"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
# about 10 network evaluations each
PHOTO_SAMPLERS = {"dpmpp_2m": 10, "dpmpp_2m_quadratic": 10, "unipc": 10, "sde": 10, "pf_ode": 3}
# a parent of its own reports its one child's (`pfsr upscale`) peak RSS and CPU time
MEASURE = ("import json, resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "print(json.dumps({'code': code, 'peak_kb': r.ru_maxrss, 'cpu_s': r.ru_utime + r.ru_stime}))")


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
    p.add_argument("--photo-size", default="640x480", help="whole-photo output WxH (multiples of 4)")
    p.add_argument("--photo-threads", type=int, default=2)
    p.add_argument("--skip-megapixel", action="store_true", help="no 1024 x 1024 dpmpp_2m run")
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
    result["goal_speedup_last_over_first"] = "up to the replica count, where as many cores are free"
    width, height = (int(v) for v in args.photo_size.split("x"))
    result["whole_photo"] = whole_photos(width, height, args.photo_threads, not args.skip_megapixel)
    return result


def upscale_photo(folder: Path, width: int, height: int, sampler: str, steps: int, threads: int) -> dict:
    """One `pfsr upscale` of the rocket photo at width x height output pixels in a fresh process."""
    (rocket,) = load_photos(["rocket"])
    hr = Image.fromarray(rocket[:, 35:604]).resize((width, height), Image.BICUBIC)  # 4:3 of the 640 x 427 photo
    lr = to_uint8(degrade(torch.from_numpy(np.array(hr)).permute(2, 0, 1)[None].float() / 255, 4))[0]
    src, dst = folder / f"lr_{width}x{height}.png", folder / f"sr_{width}x{height}_{sampler}.png"
    Image.fromarray(lr.permute(1, 2, 0).numpy()).save(src)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "platform")}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "pfsr", "upscale", str(src), str(dst),
                          "--sampler", sampler, "--steps", str(steps), "--device", "cpu"],
                         env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    found = json.loads(run.stdout.strip().splitlines()[-1])
    if found["code"] != 0:
        raise RuntimeError(f"pfsr upscale {sampler} at {width}x{height} failed")
    mp = width * height / 1e6
    out = {"output": f"{width}x{height}", "steps": steps, "wall_s": round(wall, 1), "cpu_s": round(found["cpu_s"], 1),
           "wall_s_per_output_mp": round(wall / mp, 1), "cpu_s_per_output_mp": round(found["cpu_s"] / mp, 1),
           "peak_rss_mb": round(found["peak_kb"] / 1024), "peak_rss_mb_per_output_mp": round(found["peak_kb"] / 1024 / mp)}
    print(f"whole photo {width}x{height} {sampler}: {out}", file=sys.stderr, flush=True)
    return out


def whole_photos(width: int, height: int, threads: int, megapixel: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result: dict = {"checkpoint": "models/pfsr_x4_small.pt", "torch_threads": threads,
                        "samplers": {name: upscale_photo(Path(tmp), width, height, name, steps, threads)
                                     for name, steps in PHOTO_SAMPLERS.items()}}
        if megapixel:
            one = upscale_photo(Path(tmp), 1024, 1024, "dpmpp_2m", 10, threads)
            result["megapixel_dpmpp_2m"] = {**one, "goal_wall_s_at_most": 300, "goal_peak_rss_mb_at_most": 3072}
    return result


if __name__ == "__main__":
    run_benchmark(lambda: write_result(main(), RESULT))
