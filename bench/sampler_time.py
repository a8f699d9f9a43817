"""Wall time and network evaluations (NFE) of the samplers on one model and one batch of inputs.

The seed reports 75-80% less time for the probability-flow ODE (dopri5, rtol = atol = 1e-4) than for the reverse
SDE with 1000 Euler-Maruyama steps; this measures it on configs/tiny.yaml, plus DPM-Solver++(2M) and UniPC at
10 steps. The model is randomly initialised (no training): its zero-initialised convolutions (the U-Net's
output conv and the residual/attention output projections) are redrawn from N(0, 1/fan_in) with a fixed seed, so
that eps_hat depends on x_t and t and the ODE is not trivial. NFE counts evaluations of the whole batch;
ms_per_nfe shows whether the machine's load changed between solvers. The few-step solvers' outputs are compared
with pf_ode's (RMSE of the diffused variable; the SDE's sample is a different draw, so it has none).
One torch thread by default: on a shared 2-core machine more threads make timings swing with other jobs' load.

    python bench/sampler_time.py [--batch 2] [--hr-size 64] [--sde-steps 1000] [--threads 1] [--device cuda]

Prints one JSON object and writes it to bench/results/sampler_time.json.
"""
from __future__ import annotations

import argparse
import logging
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from _common import run_benchmark, write_result
from pfsr.config import load_config
from pfsr.degradation import degrade
from pfsr.models import build_model
from pfsr.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.sampler_time")


def perturbed_tiny_model(seed: int):
    """configs/tiny.yaml at random init with its zero-initialised weights redrawn from N(0, 1/fan_in)."""
    torch.manual_seed(seed)
    model = build_model(load_config(ROOT / "configs" / "tiny.yaml")).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.ndim > 1 and not p.any():
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def hr_batch(batch: int, size: int) -> torch.Tensor:
    """`batch` HR crops [B x 3 x size x size] in [0, 1] from scikit-image's astronaut photo."""
    from skimage import data

    img = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1).float().div(255)
    step = (img.shape[-1] - size) // max(batch, 1)
    return torch.stack([img[:, 100:100 + size, i * step:i * step + size] for i in range(batch)])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(method: str, eps_fn, x0_fn, x_T, sde, **kwargs) -> tuple[torch.Tensor, dict]:
    synchronize(x_T.device)
    t0 = time.perf_counter()
    res = sample(eps_fn, x_T, sde, method=method, x0_fn=x0_fn,
                 generator=torch.Generator(x_T.device).manual_seed(0), **kwargs)
    synchronize(x_T.device)
    seconds = time.perf_counter() - t0
    log.info("%s %s: %.2f s, %d NFE", method, kwargs, seconds, res.nfe)
    return res.x, {"wall_s": round(seconds, 3), "nfe": res.nfe, "ms_per_nfe": round(1000 * seconds / res.nfe, 1),
                   **kwargs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hr-size", type=int, default=64)
    ap.add_argument("--sde-steps", type=int, default=1000)
    ap.add_argument("--few-steps", type=int, default=10, help="steps of dpmpp_2m and unipc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampler_time.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = perturbed_tiny_model(args.seed).to(device)
    hr = hr_batch(args.batch, args.hr_size).to(device)
    with torch.no_grad():
        cond = model.condition(degrade(hr, model.scale))
        eps_fn, x0_fn = model.denoiser_fns(cond)
        x_T = torch.randn(hr.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
        eps_fn(x_T, torch.ones(args.batch, device=device))  # warm-up: first-call allocations out of the timings
        samplers = {}
        ref, samplers["pf_ode"] = run("pf_ode", eps_fn, x0_fn, x_T, model.sde, rtol=1e-4, atol=1e-4)
        _, samplers["sde"] = run("sde", eps_fn, x0_fn, x_T, model.sde, steps=args.sde_steps)
        for method in ("dpmpp_2m", "unipc"):
            x, samplers[method] = run(method, eps_fn, x0_fn, x_T, model.sde, steps=args.few_steps)
            samplers[method]["rmse_vs_pf_ode"] = round((x - ref).pow(2).mean().sqrt().item(), 5)

    pf, sde_row = samplers["pf_ode"], samplers["sde"]
    result = {
        "benchmark": "sampler_time",
        "model": "configs/tiny.yaml, random init, zero-initialised convs redrawn N(0, 1/fan_in) (untrained)",
        "input": f"{args.batch} x 3 x {args.hr_size} x {args.hr_size} HR crops of skimage astronaut, x{model.scale}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.machine()}), {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "samplers": samplers,
        "pf_ode_time_saving_vs_sde_pct": round(100 * (1 - pf["wall_s"] / sde_row["wall_s"]), 1),
        "pf_ode_nfe_saving_vs_sde_pct": round(100 * (1 - pf["nfe"] / sde_row["nfe"]), 1),
        "goal_time_saving_vs_sde_pct": "75-80 (seed)",
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    run_benchmark(main)
