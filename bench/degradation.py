"""Batched bicubic degradation on the device against Pillow image by image, on the same crops.

64 HR crops 192 x 192 from the scikit-image photos go to 48 x 48 (x4): pfsr.degradation.degrade (MATLAB's
kernel as two matrix products over the batch) on CPU, and on the GPU when there is one, against Pillow's BICUBIC
one crop at a time (uint8 in, uint8 out, as a data loader would), and kornia's antialiased bicubic for
reference. Also the share of one configs/tiny.yaml training step (pfsr.train.train_step) that the degradation
of its batch takes. Goals: on CPU at least Pillow's speed and at most 10% of a training step; on a GPU >= 50x
Pillow's throughput. Timings: fastest of --repeats, the contenders taking turns.

    python bench/degradation.py [--crops 64] [--size 192] [--scale 4] [--repeats 20]

Prints one JSON object and writes it to bench/results/degradation.json.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import load_photos, run_benchmark, write_result
from pfsr.config import load_config
from pfsr.degradation import degrade, to_uint8

ROOT = Path(__file__).resolve().parents[1]


def crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """[n x size x size x 3] uint8 random crops of the scikit-image photos."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - size + 1), rng.integers(0, img.shape[1] - size + 1)
        out.append(img[y:y + size, x:x + size])
    return np.stack(out)


def best_of(fns: dict, repeats: int, sync=lambda: None) -> dict:
    """name -> fastest of `repeats` timed calls of fns[name] (after one warm-up), seconds. The functions take
    turns, so that a shared machine's changing load hits them alike."""
    for fn in fns.values():
        fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def pillow(batch: np.ndarray, scale: int) -> list[np.ndarray]:
    size = batch.shape[1] // scale
    return [np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in batch]


def train_step_seconds(repeats: int) -> tuple[float, float, tuple[int, ...]]:
    """(seconds of one configs/tiny.yaml train step, seconds of the degradation of its batch, batch shape)."""
    from pfsr.losses import TrainingObjective
    from pfsr.models import build_model
    from pfsr.train import make_state, train_step

    config = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    state = make_state(build_model(config), config)
    objective = TrainingObjective(state.model, config.loss, config.train.stage)
    batch = crops(config.data.batch_size, config.data.crop, seed=1)
    hr = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float() / 255
    gen = torch.Generator().manual_seed(0)
    t = best_of({"step": lambda: train_step(objective, hr, state, config, generator=gen),
                 "degradation": lambda: degrade(hr, config.model.scale)}, max(3, repeats // 4))
    return t["step"], t["degradation"], tuple(hr.shape)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "degradation.json")
    args = ap.parse_args(argv)
    import kornia

    batch = crops(args.crops, args.size)
    lr_size = args.size // args.scale
    hr = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float() / 255  # NCHW, as the loader gives
    ref = np.stack(pillow(batch, args.scale)).astype(np.float64)

    def mae(lr: torch.Tensor) -> float:
        return round(float(np.abs(to_uint8(lr).permute(0, 2, 3, 1).cpu().numpy() - ref).mean()), 4)

    def kornia_fn(x: torch.Tensor) -> torch.Tensor:
        return kornia.geometry.transform.resize(x, (lr_size, lr_size), interpolation="bicubic", antialias=True)

    t = best_of({"pillow": lambda: pillow(batch, args.scale), "ours": lambda: degrade(hr, args.scale),
                 "kornia": lambda: kornia_fn(hr)}, args.repeats)
    pillow_s, ours_s, kornia_s = t["pillow"], t["ours"], t["kornia"]
    step_s, step_degrade_s, step_shape = train_step_seconds(args.repeats)

    result = {
        "benchmark": "degradation",
        "input": f"{args.crops} crops {args.size}x{args.size} of the skimage photos -> {lr_size}x{lr_size} "
                 f"(x{args.scale})",
        "torch": torch.__version__,
        "cpu": {
            "device": f"cpu ({platform.machine()}), {torch.get_num_threads()} torch threads",
            "pillow_one_by_one_ms": round(1e3 * pillow_s, 2),
            "ours_batched_ms": round(1e3 * ours_s, 2),
            "kornia_antialiased_bicubic_ms": round(1e3 * kornia_s, 2),
            "speedup_vs_pillow": round(pillow_s / ours_s, 2),
            "goal_speedup_vs_pillow": ">= 1",
            "mae_vs_pillow_per_255": {"ours": mae(degrade(hr, args.scale)), "kornia": mae(kornia_fn(hr).clamp(0, 1))},
        },
        "tiny_train_step": {
            "batch": list(step_shape),
            "train_step_ms": round(1e3 * step_s, 1),
            "degradation_ms": round(1e3 * step_degrade_s, 3),
            "degradation_share_pct": round(100 * step_degrade_s / step_s, 2),
            "goal_share_pct": "<= 10",
        },
    }
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        hr_gpu = hr.to(dev)
        gpu_s = best_of({"gpu": lambda: degrade(hr_gpu, args.scale)}, args.repeats, sync=torch.cuda.synchronize)["gpu"]
        result["gpu"] = {"device": torch.cuda.get_device_name(dev), "ours_batched_ms": round(1e3 * gpu_s, 3),
                         "throughput_vs_pillow": round(pillow_s / gpu_s, 1), "goal_throughput_vs_pillow": ">= 50",
                         "mae_vs_pillow_per_255": mae(degrade(hr_gpu, args.scale))}
    else:
        result["gpu"] = {"device": "none on this machine", "goal_throughput_vs_pillow": ">= 50"}
    return write_result(result, args.out)


if __name__ == "__main__":
    run_benchmark(main)
