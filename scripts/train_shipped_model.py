"""Train the shipped model (models/pfsr_x4_small.pt) within a time budget, and measure it on held-back photos.

The seed's three stages, each from the one before: encoder (L1 regression of the RRDB), diffusion (DSM, frozen
encoder) and quality (fine-tuning with the image-quality loss through the adjoint PF-ODE), then seed 001's
inversion stage (the noise predictor of sampler invsr over the frozen model), from
configs/pfsr_x4_small_{encoder,,quality,inversion}.yaml (the diffusion stage's is pfsr_x4_small.yaml), on the
shards of scripts/fetch_wallpapers.py (the wallpaper corpus) or of `pfsr prep`/`pfsr demo`. Each stage runs the
core training loop (pfsr.train.train_loop, the loop `pfsr train` runs in every Ray Train worker) in this process
on one device, so it also runs on a GPU machine without Ray. A stage first times a few steps, then sets its step
count (and the learning-rate halvings at 60% and 85% of it) to fill its share of --minutes (STAGE_SHARES, over the
stages of --stages).

    python scripts/fetch_wallpapers.py --out data/wallpapers          # the corpus, once
    python scripts/train_shipped_model.py --data data/wallpapers/shards --val-images data/wallpapers/val \
        --out runs/shipped --device cuda --minutes 9
    # on a CPU, in runs of at most 2 hours, each continued where the last stopped:
    python scripts/train_shipped_model.py --data data/wallpapers/shards --val-images data/wallpapers/val \
        --out runs/shipped --device cpu --minutes 600 --max-hours 2 [--resume]

Resumable: every --checkpoint-minutes, and when --max-hours is up, the running stage's training checkpoint
(weights, EMA, optimizer, scheduler, step count, data position) goes to OUT/<stage>_state.pt; a finished stage
leaves OUT/<stage>.pt. With --resume, finished stages are skipped and a started one continues from its state.

Writes to --out: encoder.pt, diffusion.pt, quality.pt, inversion.pt and pfsr_x4_small.pt (serving checkpoints of
the stages; the last is the last stage's), train_log.jsonl (one line per log step, appended across resumed runs),
train_curves.png (its losses), and shipped_metrics.json: PSNR/SSIM(Y), gradient energy and NFE of bicubic, the
RRDB baseline, PF-ODE (dopri5 1e-4) and the few-step solvers on the --val-images photos, whole, each against its
HR, which example_<photo>.png shows; and under stage_metrics, those of DPM-Solver++(2M) at 10 NFE with the
checkpoint of each earlier stage but the encoder (which stage helped). --resume on a finished run measures again.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from pfsr.checkpoint import (init_from, load, model_from_checkpoint, restore_state, save, serving_checkpoint,
                             training_checkpoint)
from pfsr.config import Config, ConfigError, load_config
from pfsr.data import iter_images, loader_from_config
from pfsr.degradation import degrade, to_uint8, upsample
from pfsr.inference import super_resolve
from pfsr.losses import TrainingObjective
from pfsr.metrics import gradient_energy, image_metrics
from pfsr.models import build_model
from pfsr.report import comparison_grid, detail_box, plot_loss_curves
from pfsr.train import format_metrics, make_state, train_loop

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS, TIMING_STEPS, TIMING_SHARE = 20, 50, 0.1
LR_HALVINGS = (0.6, 0.85)
STAGES = (("encoder", "pfsr_x4_small_encoder.yaml"), ("diffusion", "pfsr_x4_small.yaml"),
          ("quality", "pfsr_x4_small_quality.yaml"), ("inversion", "pfsr_x4_small_inversion.yaml"))
STAGE_SHARES = {"encoder": 0.2, "diffusion": 0.5, "quality": 0.15, "inversion": 0.15}  # of --minutes
SAMPLER_SETTINGS = (dict(method="pf_ode"), dict(method="dpmpp_2m", steps=10), dict(method="dpmpp_2m", steps=5),
                    dict(method="unipc", steps=4))
STAGE_SAMPLER_SETTINGS = (dict(method="dpmpp_2m", steps=10),)  # for the checkpoints of the stages before the last


def run_stage(config: Config, data: str, device: torch.device, budget_s: float, log_file, out: Path, init=None,
              deadline: float = float("inf"), checkpoint_s: float = 600):
    """Train one stage for about budget_s seconds (continuing OUT/<stage>_state.pt when there is one); returns
    (serving checkpoint, stage summary), or None when `deadline` (time.perf_counter()) came first: then the
    state is saved for --resume."""
    state_path = out / f"{config.train.stage}_state.pt"
    resumed = state_path.is_file()
    if resumed:
        saved = load(state_path, kind="training")
        state, config = restore_state(saved)
        print(f"{config.train.stage}: resuming at step {state.step}/{config.train.steps}", flush=True)
    else:
        torch.manual_seed(config.train.seed)
        state = make_state(build_model(config), config)
        if init is not None:
            init_from(state, init)
    state.model.to(device)
    state.ema.to(device)
    for per_param in state.optimizer.state.values():  # restored on the CPU
        for key, value in per_param.items():
            if torch.is_tensor(value) and key != "step":
                per_param[key] = value.to(device)
    tc = config.train
    stream = loader_from_config(config, data, position=state.data_position or None)
    loader = iter(stream)
    objective = TrainingObjective(state.model, config.loss, tc.stage).to(device)
    t0 = time.perf_counter()
    elapsed = float(saved["metrics"].get("seconds", 0.0)) if resumed else 0.0  # training time of earlier runs

    def save_state() -> None:
        state.data_position = stream.position()
        save(training_checkpoint(state, config, {"seconds": elapsed + time.perf_counter() - t0}), state_path)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        print(f"{tc.stage}: {format_metrics(step, tc.steps, metrics)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        log_file.write(json.dumps({"stage": tc.stage, "step": step, **metrics}) + "\n")
        log_file.flush()

    def run_until(step: int) -> float:
        train_loop(state, config, loader, objective=objective, device=device, until_step=step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    if not resumed:  # the step count is set once, from the first run's timing, and kept in the state
        warm = run_until(WARMUP_STEPS)  # loader workers starting, cuDNN autotuning: not timed
        now = warm  # TIMING_STEPS, or fewer where they would take more than TIMING_SHARE of the budget
        while state.step < WARMUP_STEPS + TIMING_STEPS and now - warm < TIMING_SHARE * budget_s:
            now = run_until(state.step + 1)
        seconds_per_step = (now - warm) / (state.step - WARMUP_STEPS)
        tc.steps = max(state.step + 1, int((budget_s - (warm - t0)) / seconds_per_step))
        tc.lr_decay_steps = [int(f * tc.steps) for f in LR_HALVINGS]
        tc.log_every = max(1, min(tc.log_every, tc.steps // 20))  # about 20 log lines a stage at least
        print(f"{tc.stage}: {seconds_per_step * 1000:.1f} ms/step after {WARMUP_STEPS} warm-up steps -> "
              f"{tc.steps} steps", flush=True)
    last_save = time.perf_counter()
    while state.step < tc.steps:
        # chunks of log_every steps: a checkpoint every checkpoint_s, and a stop at the deadline
        train_loop(state, config, loader, objective=objective, device=device, on_log=on_log,
                   until_step=min(tc.steps, state.step + tc.log_every))
        if time.perf_counter() >= deadline and state.step < tc.steps:
            save_state()
            print(f"{tc.stage}: stopped at step {state.step}/{tc.steps} (--max-hours); state in {state_path}, "
                  "continue with --resume", flush=True)
            return None
        if time.perf_counter() - last_save >= checkpoint_s and state.step < tc.steps:
            save_state()
            last_save = time.perf_counter()
    seconds = round(elapsed + time.perf_counter() - t0, 1)
    summary = {"steps": state.step, "seconds": seconds, "batch_size": config.data.batch_size,
               "crop": config.data.crop, "lr": tc.lr, "lr_decay_steps": tc.lr_decay_steps}
    return serving_checkpoint(training_checkpoint(state, config, {"seconds": seconds})), summary


FIGURE_PANELS = {"bicubic": "bicubic", "rrdb": "RRDB", "dpmpp_2m_10": "DPM-Solver++(2M), 10 NFE",
                 "invsr_1": "invsr, 1 NFE"}


@torch.no_grad()
def measure(model, photos: list[tuple[str, np.ndarray]], device: torch.device, figures: Optional[Path],
            settings: Sequence[dict] = SAMPLER_SETTINGS) -> dict:
    """Mean figures over the photos for bicubic, the RRDB head, and each sampler setting; HR gradient energy.
    Writes figures/example_<photo>.png (unless None): FIGURE_PANELS and HR side by side, with the most detailed
    square zoomed."""
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
        # seed 001's one-step sampler when the inversion stage ran
        for setting in tuple(settings) + ((dict(method="invsr", steps=1),) if model.inverter is not None else ()):
            t0 = time.perf_counter()
            sr, nfe = super_resolve(model, lr, **setting, seeds=[i])
            outputs["_".join(str(v) for v in setting.values())] = (sr, nfe, time.perf_counter() - t0)
        panels = []
        for key, (sr, nfe, seconds) in outputs.items():
            sr_rgb = to_uint8(sr)[0].permute(1, 2, 0).cpu().numpy()
            rows.setdefault(key, []).append({**image_metrics(sr_rgb, hr_rgb, s), "nfe": nfe, "seconds": seconds})
            if key in FIGURE_PANELS:
                panels.append((f"{FIGURE_PANELS[key]}: {rows[key][-1]['psnr_y']:.2f} dB", sr_rgb))
        if figures is not None:
            panels.append((f"HR ({Path(name).stem}, held back)", hr_rgb))
            figure = comparison_grid(panels, detail_box(hr_rgb, fraction=4))
            (figures / f"example_{Path(name).stem}.png").write_bytes(figure)
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
    ap.add_argument("--minutes", type=float, default=9.0, help="training time, all stages together")
    ap.add_argument("--stages", default="encoder,diffusion,quality,inversion", help="comma-separated, in order")
    ap.add_argument("--max-hours", type=float, default=None, help="stop after this long (save; then --resume)")
    ap.add_argument("--checkpoint-minutes", type=float, default=10.0, help="save the running stage this often")
    ap.add_argument("--resume", action="store_true", help="skip finished stages, continue the started one")
    ap.add_argument("--loader-workers", type=int, default=None, help="overrides data.num_workers")
    ap.add_argument("--batch-size", default=None,
                    help="overrides data.batch_size: one value, or one per stage of --stages (e.g. 16,16,4,8)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for every stage (YAML value), e.g. --set diffusion.mean=rrdb; repeatable")
    ap.add_argument("--init", type=Path, default=None,
                    help="serving checkpoint the first stage starts from (e.g. models/pfsr_x4_small.pt): a warm start")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed crop size

    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in dict(STAGES)]
    if unknown or not stages:
        ap.error(f"--stages: unknown stage {unknown[0] if unknown else ''!r}; choose from {', '.join(dict(STAGES))}")
    try:
        batch_sizes = [int(b) for b in args.batch_size.split(",")] if args.batch_size else [None]
    except ValueError:
        batch_sizes = []
    if len(batch_sizes) not in (1, len(stages)) or min(b or 1 for b in batch_sizes) < 1:
        ap.error(f"--batch-size {args.batch_size}: give one size, or one per stage of --stages ({len(stages)})")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            ap.error(f"--set {item}: expected SECTION.KEY=VALUE, e.g. diffusion.mean=rrdb")
        overrides[key] = yaml.safe_load(value)
    try:
        for stage in stages:
            load_config(ROOT / "configs" / dict(STAGES)[stage], overrides)
    except ConfigError as e:
        ap.error(f"--set: {e}")
    if args.init is not None and not args.init.is_file():
        ap.error(f"--init {args.init}: no such file")
    started = [s for s, _ in STAGES if (args.out / f"{s}.pt").is_file() or (args.out / f"{s}_state.pt").is_file()]
    if started and not args.resume:
        ap.error(f"{args.out} holds stage {started[0]} of an earlier run: pass --resume, or another --out")
    plan_path = args.out / "plan.json"  # the budget of the first run, kept for every resumed one
    plan = json.loads(plan_path.read_text()) if args.resume and plan_path.is_file() else \
        {"minutes": args.minutes, "stages": stages, "init": str(args.init) if args.init else None,
         "batch_sizes": dict(zip(stages, batch_sizes * len(stages) if len(batch_sizes) == 1 else batch_sizes)),
         "overrides": overrides}
    plan_path.write_text(json.dumps(plan) + "\n")
    deadline = time.perf_counter() + 3600 * args.max_hours if args.max_hours else float("inf")
    summary_path = args.out / "stages.json"
    summaries = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    init = load(plan["init"], kind="serving") if plan.get("init") else None
    config = None
    with open(args.out / "train_log.jsonl", "a") as log_file:
        for stage in plan["stages"]:
            config = load_config(ROOT / "configs" / dict(STAGES)[stage], plan.get("overrides"))
            config.data.num_workers = args.loader_workers or config.data.num_workers
            config.data.batch_size = plan.get("batch_sizes", {}).get(stage) or config.data.batch_size
            done = args.out / f"{stage}.pt"
            if done.is_file():
                init = load(done, kind="serving")
                print(f"{stage}: done earlier ({done})", flush=True)
                continue
            share = STAGE_SHARES[stage] / sum(STAGE_SHARES[s] for s in plan["stages"])
            result = run_stage(config, f"{args.data}/train", device, 60 * plan["minutes"] * share,
                               log_file, args.out, init=init, deadline=deadline,
                               checkpoint_s=60 * args.checkpoint_minutes)
            if result is None:
                return {"stopped_in": stage}
            init, summaries[stage] = result
            save(init, done)
            summary_path.write_text(json.dumps(summaries, indent=2) + "\n")
            (args.out / f"{stage}_state.pt").unlink(missing_ok=True)
    shipped = init
    save(shipped, args.out / "pfsr_x4_small.pt")

    model = build_model(config).to(device).eval()
    model.load_state_dict(shipped["model"])
    photos = list(iter_images(args.val_images or f"{args.data}/val"))
    result = {
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "stages": summaries,
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": measure(model, photos, device, args.out),
        # what each earlier stage's checkpoint gave with the default sampler: which stage helped
        "stage_metrics": {stage: measure(model_from_checkpoint(load(args.out / f"{stage}.pt")).to(device), photos,
                                         device, None, settings=STAGE_SAMPLER_SETTINGS)
                          for stage in plan["stages"][:-1] if stage != "encoder"},
    }
    (args.out / "shipped_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    curves: dict = {}
    for line in (args.out / "train_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for tag, value in entry.items():
            if tag.startswith("train/loss"):
                curves.setdefault(entry["stage"], {}).setdefault(tag, []).append([entry["step"], value])
    (args.out / "train_curves.png").write_bytes(plot_loss_curves(curves))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
