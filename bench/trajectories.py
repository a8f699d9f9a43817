"""Seed 004's claim on PF-SR: do adaptive conditions straighten the PF-ODE trajectories? Baseline and adaptive
conditions (histogram prior) trained on the same budget (configs/methods/baseline.yaml and adaptive.yaml, the same
seed, shards and steps), then on the held-back photos (chelsea, coffee; center crops of --crop px, 8-bit bicubic
x4 LR, x_T seeded by the image):

    curvature        mean over the 50 steps of first-order DPM-Solver (DDIM) of ||x0_hat(t_k) - x_end||^2 /
                     ||x_end||^2: how far the data prediction drifts along the trajectory (0: a straight one;
                     with the oracle code on point masses it is 0, tests/test_adaptive.py)
    dopri5_nfe       network evaluations of pf_ode (adaptive dopri5) at rtol = atol = 1e-3
    nfe_within_0.1db the fewest dpmpp_2m steps whose PSNR(Y) is within 0.1 dB of the converged dopri5
                     (rtol = atol = 1e-5) of the same model, among 1, 2, 3, 4, 5, 6, 8, 10, 15, 20

    python bench/trajectories.py [--steps 120] [--crop 64]

Prints one JSON object and writes bench/results/trajectories.json.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import PHOTOS, load_photos, run_benchmark, write_result
from pfsr.cli import main as pfsr_main
from pfsr.degradation import degrade, to_uint8
from pfsr.inference import _prior
from pfsr.metrics import psnr
from pfsr.pipeline.compare import load_method, train_stages
from pfsr.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
HELD_BACK = ("chelsea", "coffee")
DPM_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20)


@torch.no_grad()
def measure(model, hr_images: list[np.ndarray], crop: int) -> dict:
    model.eval()
    s = model.scale
    curv, dopri_nfe, psnr_ref, psnr_dpm = [], [], [], {k: [] for k in DPM_STEPS}
    for i, img in enumerate(hr_images):
        h, w = img.shape[:2]
        img = img[(h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop].copy()
        hr = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        lr = to_uint8(degrade(hr, s)).float() / 255
        cond = model.condition(lr, code_seeds=[i])
        eps_fn, x0_fn = model.denoiser_fns(cond)
        x_T = _prior(cond.upsampled.shape, [i], lr.device, lr.dtype)
        preds = []

        def recording_x0(x, t):
            preds.append(x0_fn(x, t))
            return preds[-1]

        end = sample(eps_fn, x_T, model.sde, method="dpmpp_2m", steps=50, x0_fn=recording_x0).x
        # the 50-step solver with a first-order final step: its x0 predictions along the way vs the end point
        curv.append(float(np.mean([((p - end) ** 2).sum().item() / (end ** 2).sum().item() for p in preds])))

        def score(x):
            sr = model.from_diffused(x, cond).clamp(0, 1)
            return psnr(to_uint8(sr[0]).permute(1, 2, 0).numpy(), img, crop_border=s, test_y_channel=True)

        loose = sample(eps_fn, x_T, model.sde, method="pf_ode", rtol=1e-3, atol=1e-3)
        dopri_nfe.append(loose.nfe)
        psnr_ref.append(score(sample(eps_fn, x_T, model.sde, method="pf_ode", rtol=1e-5, atol=1e-5).x))
        for k in DPM_STEPS:
            psnr_dpm[k].append(score(sample(eps_fn, x_T, model.sde, method="dpmpp_2m", steps=k, x0_fn=x0_fn).x))
    ref = float(np.mean(psnr_ref))
    dpm = {k: float(np.mean(v)) for k, v in psnr_dpm.items()}
    within = [k for k in DPM_STEPS if abs(dpm[k] - ref) <= 0.1]
    return {"curvature": float(np.mean(curv)), "dopri5_nfe": float(np.mean(dopri_nfe)),
            "psnr_y_dopri5_converged": ref, "psnr_y_dpmpp_2m": {str(k): v for k, v in dpm.items()},
            "nfe_within_0.1db": within[0] if within else None}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=64)
    args = p.parse_args()
    import ray

    from PIL import Image

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pfsr-bench-traj-"))
    try:
        (work / "train").mkdir()
        names = [n for n in PHOTOS if n not in HELD_BACK]
        for name, img in zip(names, load_photos(names)):
            Image.fromarray(img).save(work / "train" / f"{name}.png")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        assert pfsr_main(["prep", "--source", str(work / "train"), "--out", str(work / "shards"), "--patch", "128",
                          "--step", "128", "--min-shards", "2"]) == 0
        val = load_photos(HELD_BACK)
        out = {}
        for name in ("baseline", "adaptive"):
            method = load_method(ROOT / "configs" / "methods" / f"{name}.yaml")
            for stage in method["stages"]:
                stage["config"]["train"]["steps"] = args.steps * stage["steps"] // method["total_steps"]
                stage["config"]["data"]["batch_size"] = args.batch_size
            model, last = train_stages(method["stages"], str(work / "shards"), 0, torch.device("cpu"), name)
            out[name] = measure(model, val, args.crop) | {"loss_dsm": last.get("train/loss_dsm")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, a = out["baseline"], out["adaptive"]
    result = {
        "benchmark": "trajectories",
        "what": f"tiny config, {args.steps} steps each (batch {args.batch_size}), seed 0; {len(HELD_BACK)} held-back "
                f"photos, {args.crop} px HR crops",
        "seconds": round(time.perf_counter() - t0, 1),
        "curvature_ratio_adaptive_over_baseline": a["curvature"] / b["curvature"],
        "goal_curvature_ratio_adaptive_over_baseline": "< 1 (seed 004: adaptive conditions straighten)",
        "baseline": b, "adaptive": a,
    }
    return write_result(result, ROOT / "bench" / "results" / "trajectories.json")


if __name__ == "__main__":
    run_benchmark(main)
