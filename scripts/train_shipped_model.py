"""Train the shipped model (models/pfsr_x4_small.pt) within a time budget, and measure it on held-back photos.

The two stages of the seed's recipe that the model needs, encoder (L1 regression of the RRDB) then diffusion
(DSM, frozen encoder), from configs/pfsr_x4_small_encoder.yaml and configs/pfsr_x4_small.yaml, on the shards
that `pfsr prep` (or `pfsr demo`) made of scikit-image's photos. Each stage runs the core training loop
(pfsr.train.train_loop, the loop `pfsr train` runs in every Ray Train worker) in this process on one device, so
it also runs on a GPU machine without Ray. A stage first times a few steps, then sets its step count (and the
learning-rate halvings at 60% and 85% of it) to fill its share of --minutes.

    python scripts/train_shipped_model.py --data demo_out/shards --out models/run --device cuda --minutes 6

Writes to --out: encoder.pt and pfsr_x4_small.pt (serving checkpoints), train_log.jsonl (one line per log
step), and shipped_metrics.json: PSNR/SSIM(Y), gradient energy and NFE of bicubic, the RRDB baseline, PF-ODE
(dopri5 1e-4) and the few-step solvers on the --val-images photos, whole, each against its HR.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pfsr.checkpoint import init_from, save, serving_checkpoint, training_checkpoint
from pfsr.config import Config, load_config
from pfsr.data import iter_images, loader_from_config
from pfsr.degradation import degrade, to_uint8, upsample
from pfsr.inference import super_resolve
from pfsr.losses import TrainingObjective
from pfsr.metrics import gradient_energy, image_metrics
from pfsr.models import build_model
from pfsr.train import format_metrics, make_state, train_loop

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS, TIMING_STEPS = 20, 50
LR_HALVINGS = (0.6, 0.85)
SAMPLER_SETTINGS = (dict(method="pf_ode"), dict(method="dpmpp_2m", steps=10), dict(method="dpmpp_2m", steps=5),
                    dict(method="unipc", steps=4))


def run_stage(config: Config, data: str, device: torch.device, budget_s: float, log_file, init=None):
    """Train one stage for about budget_s seconds; returns (serving checkpoint, stage summary)."""
    torch.manual_seed(config.train.seed)
    state = make_state(build_model(config), config)
    if init is not None:
        init_from(state, init)
    state.model.to(device)
    state.ema.to(device)
    tc = config.train
    loader = iter(loader_from_config(config, data))
    objective = TrainingObjective(state.model, config.loss, tc.stage).to(device)
    t0 = time.perf_counter()

    def on_log(step: int, metrics: dict[str, float]) -> None:
        print(f"{tc.stage}: {format_metrics(step, tc.steps, metrics)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        log_file.write(json.dumps({"stage": tc.stage, "step": step, **metrics}) + "\n")
        log_file.flush()

    def run_until(step: int) -> float:
        train_loop(state, config, loader, objective=objective, device=device, until_step=step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    warm = run_until(WARMUP_STEPS)  # loader workers starting, cuDNN autotuning: not timed
    seconds_per_step = (run_until(WARMUP_STEPS + TIMING_STEPS) - warm) / TIMING_STEPS
    tc.steps = max(state.step + 1, int((budget_s - (warm - t0)) / seconds_per_step))
    tc.lr_decay_steps = [int(f * tc.steps) for f in LR_HALVINGS]
    print(f"{tc.stage}: {seconds_per_step * 1000:.1f} ms/step after {WARMUP_STEPS} warm-up steps -> {tc.steps} "
          "steps", flush=True)
    train_loop(state, config, loader, objective=objective, device=device, on_log=on_log)
    summary = {"steps": state.step, "seconds": round(time.perf_counter() - t0, 1), "batch_size": config.data.batch_size,
               "crop": config.data.crop, "lr": tc.lr, "lr_decay_steps": tc.lr_decay_steps}
    return serving_checkpoint(training_checkpoint(state, config, {"seconds": summary["seconds"]})), summary


@torch.no_grad()
def measure(model, photos: list[tuple[str, np.ndarray]], device: torch.device) -> dict:
    """Mean figures over the photos for bicubic, the RRDB head, and each sampler setting; HR gradient energy."""
    s, multiple = model.scale, model.lr_multiple * model.scale
    rows: dict[str, list[dict]] = {}
    hr_energy = []
    for i, (name, img) in enumerate(photos):
        h, w = img.shape[0] // multiple * multiple, img.shape[1] // multiple * multiple
        hr_rgb = np.ascontiguousarray(img[:h, :w])
        hr = torch.from_numpy(hr_rgb).permute(2, 0, 1)[None].float().div(255).to(device)
        lr = to_uint8(degrade(hr, s)).float().div(255)  # 8-bit LR, as LR files are
        hr_energy.append(gradient_energy(hr_rgb, s))
        outputs = {"bicubic": (upsample(lr, s), 0, 0.0), "rrdb": (model.regress(lr), 1, 0.0)}
        for setting in SAMPLER_SETTINGS:
            t0 = time.perf_counter()
            sr, nfe = super_resolve(model, lr, **setting, seeds=[i])
            outputs["_".join(str(v) for v in setting.values())] = (sr, nfe, time.perf_counter() - t0)
        for key, (sr, nfe, seconds) in outputs.items():
            sr_rgb = to_uint8(sr)[0].permute(1, 2, 0).cpu().numpy()
            rows.setdefault(key, []).append({**image_metrics(sr_rgb, hr_rgb, s), "nfe": nfe, "seconds": seconds})
        print(f"measured {name}: " + ", ".join(f"{k} {v[-1]['psnr_y']:.2f}" for k, v in rows.items()), flush=True)
    result: dict = {"images": [name for name, _ in photos], "hr_gradient_energy": float(np.mean(hr_energy))}
    for key, values in rows.items():
        mean = {m: float(np.mean([v[m] for v in values])) for m in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb",
                                                                  "gradient_energy", "nfe", "seconds")}
        mean["gradient_energy_vs_hr"] = mean["gradient_energy"] / result["hr_gradient_energy"]
        result[key] = mean
    for key in rows:
        result[key]["delta_psnr_y_vs_bicubic"] = result[key]["psnr_y"] - result["bicubic"]["psnr_y"]
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="shards: DIR/train (and DIR/val for --val-images' default)")
    ap.add_argument("--val-images", default=None, help="held-back HR images: shards or folder (default DIR/val)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time, both stages together")
    ap.add_argument("--encoder-share", type=float, default=0.25, help="part of --minutes for the encoder stage")
    ap.add_argument("--loader-workers", type=int, default=None, help="overrides data.num_workers")
    ap.add_argument("--batch-size", type=int, default=None, help="overrides data.batch_size")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed crop size

    configs = [load_config(ROOT / "configs" / name) for name in ("pfsr_x4_small_encoder.yaml", "pfsr_x4_small.yaml")]
    for config in configs:
        config.data.num_workers = args.loader_workers or config.data.num_workers
        config.data.batch_size = args.batch_size or config.data.batch_size
    budget = 60 * args.minutes
    t0 = time.perf_counter()
    with open(args.out / "train_log.jsonl", "w") as log_file:
        encoder, encoder_summary = run_stage(configs[0], f"{args.data}/train", device, args.encoder_share * budget,
                                             log_file)
        save(encoder, args.out / "encoder.pt")
        remaining = budget - (time.perf_counter() - t0)
        shipped, diffusion_summary = run_stage(configs[1], f"{args.data}/train", device, remaining, log_file,
                                               init=encoder)
    save(shipped, args.out / "pfsr_x4_small.pt")

    model = build_model(configs[1]).to(device).eval()
    model.load_state_dict(shipped["model"])
    photos = list(iter_images(args.val_images or f"{args.data}/val"))
    result = {
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "stages": {"encoder": encoder_summary, "diffusion": diffusion_summary},
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": measure(model, photos, device),
    }
    (args.out / "shipped_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
