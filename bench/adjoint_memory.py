"""Peak memory of one image-quality loss forward + backward: adjoint (torchdiffeq.odeint_adjoint) versus direct
backprop through the same K fixed RK4 steps, for K in 10, 25, 50, 100.

Goal (issue 3): the adjoint's peak grows at most 10% from K = 10 to K = 100; backprop keeps every step's
activations, so its peak grows about linearly in K. Each (mode, K) runs in a fresh Python process, so no
allocator cache or earlier peak carries over. What is measured is the memory the loss adds on top of the set-up
(model, batch, conditioning): on CUDA torch.cuda.max_memory_allocated minus the allocation before; on the CPU
the peak resident set size (ru_maxrss, Linux VmHWM, reset through /proc/self/clear_refs where the kernel allows)
minus the resident size before. The model is configs/tiny.yaml at random init with its zero-initialised convs
redrawn (bench/sampler_time.py), the feature distance the weight-free Laplacian pyramid, float32.

    python bench/adjoint_memory.py [--hr-size 32] [--batch 1] [--steps 10 25 50 100] [--device cpu]

Prints one JSON object and writes it to bench/results/adjoint_memory.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import run_benchmark, write_result
from pfsr.degradation import degrade
from pfsr.losses import LaplacianPyramidDistance, quality_loss
from pfsr.train import set_trainable
from sampler_time import hr_batch, perturbed_tiny_model

ROOT = Path(__file__).resolve().parents[1]
MODES = ("adjoint", "direct")
GOAL_GROWTH = 1.10
log = logging.getLogger("bench.adjoint_memory")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024
    except OSError:
        return False


def worker(mode: str, steps: int, args) -> dict:
    """One quality-loss forward + backward in this (fresh) process; memory the loss adds, in MiB."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = perturbed_tiny_model(args.seed).to(device).train()
    set_trainable(model, "quality")
    cfg = dataclasses.replace(model.config.loss, quality_solver="rk4", quality_steps=steps)
    distance = LaplacianPyramidDistance().to(device)
    hr = hr_batch(args.batch, args.hr_size).to(device)
    lr = degrade(hr, model.scale)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        hwm_reset = _reset_peak_rss()
        before = _status_kb("VmRSS") * 1024
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    cond = model.condition(lr)
    loss = quality_loss(model, cond, hr, distance, cfg, torch.Generator(device).manual_seed(0),
                        adjoint=mode == "adjoint")
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        extra = {"measure": "torch.cuda.max_memory_allocated - memory_allocated before"}
        peak = torch.cuda.max_memory_allocated() - before
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # without a reset, a set-up peak above the loss's would hide it: then only the excess is seen
        peak = maxrss - (before if hwm_reset else maxrss_before)
        extra = {"measure": "ru_maxrss after - " + ("VmRSS before (VmHWM reset)" if hwm_reset else "ru_maxrss before"),
                 "process_peak_rss_mib": round(maxrss / 2**20, 1)}
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
    return {"peak_mib": round(peak / 2**20, 2), "seconds": round(time.perf_counter() - t0, 2), "nfe_forward": 4 * steps,
            "loss": round(loss.item(), 6), "grad_norm": round(grad_norm, 6), **extra}


def run_fresh(mode: str, steps: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(steps), "--hr-size", str(args.hr_size),
           "--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)  # the worker's logs pass to stderr
    return json.loads(out.stdout)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    ap.add_argument("--hr-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adjoint_memory.json")
    args = ap.parse_args(argv)
    if args.worker:  # one measurement in a fresh process: its JSON object goes to the parent
        (steps,) = args.steps
        return worker(args.worker, steps, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    results: dict[str, dict[str, dict]] = {mode: {} for mode in MODES}
    for mode in MODES:
        for steps in args.steps:
            row = run_fresh(mode, steps, args)
            results[mode][str(steps)] = row
            log.info("%s K=%d: +%.1f MiB peak, %.1f s", mode, steps, row["peak_mib"], row["seconds"])
    lo, hi = str(min(args.steps)), str(max(args.steps))
    growth = {mode: round(results[mode][hi]["peak_mib"] / results[mode][lo]["peak_mib"], 3) for mode in MODES}
    per_step = {mode: round((results[mode][hi]["peak_mib"] - results[mode][lo]["peak_mib"]) / (int(hi) - int(lo)), 3)
                for mode in MODES}
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu ({platform.machine()}), {args.threads} torch thread(s)")
    result = {
        "benchmark": "adjoint_memory",
        "model": "configs/tiny.yaml, random init, zero-initialised convs redrawn N(0, 1/fan_in); float32",
        "input": f"{args.batch} x 3 x {args.hr_size} x {args.hr_size} HR crops of skimage astronaut, x4",
        "loss": "quality_loss, RK4 with K fixed steps (4 NFE a step), Laplacian pyramid L1",
        "device": device,
        "torch": torch.__version__,
        "peak_mib": {mode: {k: row["peak_mib"] for k, row in results[mode].items()} for mode in MODES},
        f"growth_{hi}_over_{lo}": growth,
        "mib_per_step": per_step,
        "goal_adjoint_growth_at_most": GOAL_GROWTH,
        "goal_met": growth["adjoint"] <= GOAL_GROWTH,
        "runs": results,
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    run_benchmark(main)
