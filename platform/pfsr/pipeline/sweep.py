"""`pfsr sweep-c`: choose the hybrid constant c (diffusion.hybrid_c) with Ray Tune, by the seed's criterion.

One Tune trial per value of c (a function trainable with --cpus-per-trial / --gpus-per-trial, at most
--max-concurrent-trials at once) runs the core loop (`pfsr.train.train_loop`) for train.steps (--steps) from the
same seed, then scores its EMA model on the same fixed HR crops:

    prediction error   `pfsr.losses.prediction_error`: MSE of the mixed noise prediction eps_hat against the true
                       eps at the midpoints of --bins equal-width t bins over [t_min, 1], the same crops and noise
                       for every c; its mean over the bins is the criterion (and MSE of x0_hat against r0 beside it)
    val/psnr_y         `pfsr.pipeline.train.validate` on the validation images, when there are any

The c of the lowest mean error wins: seed 000 selects c per data set "to minimize the prediction error for the
hybrid parametrization". PSNR is reported beside it and not used. The crops come from the validation images
(held out) when there are any, else from the training shards. Outputs in --out (local or s3://):

    sweep.json   {"criterion", "best_c", "t_edges", "trials": [{"c", "error_eps", "error_eps_by_t", "error_r0",
                 "error_r0_by_t", "psnr_y", "steps", "seconds", "loss_dsm", "error"}, ...], ...}
    sweep.csv    one row per c: the scalars and error_eps_t0 ... by bin
    sweep.png    error against t per c; error and PSNR against c

With loss.dsm_target "heads" (the reference code's) training does not depend on c: every trial trains the same
network and the sweep measures how well each c mixes its two heads. With "mixed" the DSM loss is taken on the
mixed prediction, so c shapes the training as well.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from ray import tune

from .. import storage
from ..config import Config, config_from_dict, load_config
from ..data import list_shards, load_val_images, loader_from_config, random_crop_augment
from ..degradation import degrade, to_uint8
from ..diffusion import sde_from_config
from ..errors import InputError
from ..losses import noise_level_bins, prediction_error
from ..models.sr import PFSRModel, build_model
from ..report import _png, _plt
from ..train import format_metrics, make_state, train_loop
from .train import _absolute, _init_ray, validate

DEFAULT_VALUES = (0.5, 0.75, 1.0, 1.25, 1.5)
C_RANGE = (0.0, 2.0)  # (low, high]: c > 0 (config) and the seed's [0.5, 1.5] with a margin


def log(message: str) -> None:
    print(f"sweep: {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Trial side: one Tune trial per c.

def fixed_crops(images: Sequence[np.ndarray], n: int, crop: int, seed: int) -> np.ndarray:
    """n fixed HR crops [n x 3 x crop x crop] uint8: crop i from image i mod len(images), at a position drawn from
    (seed, i); images smaller than the crop are left out."""
    usable = [img for img in images if min(img.shape[:2]) >= crop]
    if not usable:
        raise InputError(f"no image of at least data.crop = {crop} px a side for the prediction error")
    crops = [random_crop_augment(usable[i % len(usable)], crop, np.random.default_rng((seed, i)), augment=False)
             for i in range(n)]
    return np.stack(crops).transpose(0, 3, 1, 2).copy()


@torch.no_grad()
def measure_prediction_error(model: PFSRModel, hr_crops: np.ndarray, t_edges: torch.Tensor, config: Config,
                             device: torch.device) -> dict[str, list[float]]:
    """`prediction_error` over HR crops [N x 3 x H x W] uint8, in chunks of data.batch_size, noise seeded by
    train.seed -> {"eps": [K], "r0": [K]} (means over all crops)."""
    model.eval()
    generator = torch.Generator(device).manual_seed(config.train.seed)
    total = {"eps": torch.zeros(len(t_edges) - 1, dtype=torch.float64),
             "r0": torch.zeros(len(t_edges) - 1, dtype=torch.float64)}
    for start in range(0, len(hr_crops), config.data.batch_size):
        # a copy: arrays from Ray's object store are read-only
        hr = torch.tensor(hr_crops[start:start + config.data.batch_size], device=device).float() / 255
        # 8-bit LR, as train_step and validate make it
        lr = to_uint8(degrade(hr, config.model.scale, config.data.degradation, generator=generator)).float() / 255
        cond = model.condition(lr)
        errors = prediction_error(model, model.to_diffused(hr, cond), cond, t_edges, generator)
        for key, value in errors.items():
            total[key] += value * hr.shape[0]  # chunk means weighted by size: the mean over all crops
    return {key: (value / len(hr_crops)).tolist() for key, value in total.items()}


def sweep_trial(params: dict[str, Any], *, config: dict[str, Any], data: str, hr_crops: np.ndarray,
                val_images: list[np.ndarray], t_edges: list[float], threads: int) -> None:
    """Tune function trainable: train with c = params["c"], then report the prediction error and val/psnr_y."""
    c = float(params["c"])
    config = config_from_dict(config | {"diffusion": config["diffusion"] | {"hybrid_c": c}})
    tc = config.train
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs not given to the trial
    torch.manual_seed(tc.seed)  # the same initial weights, data order and DSM noise for every c
    state = make_state(build_model(config), config)
    state.model.to(device)
    state.ema.to(device)
    loader = loader_from_config(config, data)
    last: dict[str, float] = {}

    def on_log(step: int, metrics: dict[str, float]) -> None:
        log(f"c = {c:g}: {format_metrics(step, tc.steps, metrics)}")
        last.update(metrics)
        if step < tc.steps:  # the last report carries the scores
            tune.report(metrics | {"step": step})

    t0 = time.perf_counter()
    train_loop(state, config, loader, device=device, on_log=on_log)
    seconds = time.perf_counter() - t0
    errors = measure_prediction_error(state.ema, hr_crops, torch.tensor(t_edges, dtype=torch.float64), config,
                                      device)
    psnr_y = validate(state.ema, val_images, config, device) if val_images else None
    log(f"c = {c:g}: prediction error {np.mean(errors['eps']):.4g}"
        + (f", val PSNR(Y) {psnr_y:.2f} dB" if psnr_y is not None else ""))
    tune.report(last | {"step": state.step, "seconds": seconds, "error/eps": float(np.mean(errors["eps"])),
                        "error/eps_by_t": errors["eps"], "error/r0": float(np.mean(errors["r0"])),
                        "error/r0_by_t": errors["r0"], "val/psnr_y": psnr_y})


# ----------------------------------------------------------------------------------------------------------------
# Driver side.

def check_values(values: Sequence[float]) -> list[float]:
    """The c values, sorted; refuses none, duplicates and values outside C_RANGE."""
    if not values:
        raise InputError("--values: give at least one value of diffusion.hybrid_c")
    low, high = C_RANGE
    bad = [v for v in values if not (math.isfinite(v) and low < v <= high)]
    if bad:
        raise InputError(f"--values: diffusion.hybrid_c must lie in ({low:g}, {high:g}] (the seed uses "
                         f"[0.5, 1.5]), got {', '.join(f'{v:g}' for v in bad)}")
    if len(set(values)) < len(values):
        raise InputError(f"--values: each value of diffusion.hybrid_c once, got {' '.join(f'{v:g}' for v in values)}")
    return sorted(float(v) for v in values)


def _trial_row(result: "tune.Result") -> dict[str, Any]:
    m = result.metrics or {}
    row = {"c": float(result.config["c"]), "error_eps": m.get("error/eps"), "error_eps_by_t": m.get("error/eps_by_t"),
           "error_r0": m.get("error/r0"), "error_r0_by_t": m.get("error/r0_by_t"), "psnr_y": m.get("val/psnr_y"),
           "steps": m.get("step"), "seconds": m.get("seconds"), "loss_dsm": m.get("train/loss_dsm"), "error": None}
    if result.error is not None or row["error_eps"] is None or not math.isfinite(row["error_eps"]):
        row["error"] = str(result.error).strip().splitlines()[-1] if result.error is not None else \
            f"no finite prediction error (last metrics: {m})"
    return row


def best_c(trials: Sequence[dict[str, Any]]) -> Optional[float]:
    """c of the lowest error_eps among the trials that finished; None when none did."""
    done = [t for t in trials if t["error"] is None]
    return min(done, key=lambda t: t["error_eps"])["c"] if done else None


def plot_sweep(report: dict[str, Any]) -> bytes:
    """PNG: prediction error against t (one line per c, log scale), and error and val PSNR(Y) against c."""
    plt = _plt()
    edges = np.asarray(report["t_edges"])
    mids = (edges[:-1] + edges[1:]) / 2
    done = [t for t in report["trials"] if t["error"] is None]
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in done:
        ax_t.plot(mids, t["error_eps_by_t"], "o-", label=f"c = {t['c']:g}" + (" (best)" if t["c"] == report["best_c"]
                                                                           else ""))
    ax_t.set_yscale("log")
    ax_t.set_xlabel("diffusion time t (bin midpoints)")
    ax_t.set_ylabel("MSE of the hybrid eps prediction")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    cs = [t["c"] for t in done]
    ax_c.plot(cs, [t["error_eps"] for t in done], "o-", color="C0")
    ax_c.axvline(report["best_c"], color="gray", linestyle="--")
    ax_c.set_xlabel("hybrid constant c")
    ax_c.set_ylabel("prediction error (mean over t bins)", color="C0")
    ax_c.grid(alpha=0.3)
    with_psnr = [t for t in done if t["psnr_y"] is not None]
    if with_psnr:
        ax_p = ax_c.twinx()
        ax_p.plot([t["c"] for t in with_psnr], [t["psnr_y"] for t in with_psnr], "s--", color="C1")
        ax_p.set_ylabel("val PSNR(Y) [dB]", color="C1")
    fig.suptitle(f"hybrid constant c: best {report['best_c']:g} ({report['steps']} steps per trial)")
    fig.tight_layout()
    return _png(fig)


def _csv(report: dict[str, Any]) -> bytes:
    bins = len(report["t_edges"]) - 1
    columns = ["c", "best", "error_eps", "error_r0", "psnr_y", "steps", "seconds", "loss_dsm", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns + [f"error_eps_t{k}" for k in range(bins)])
    for t in report["trials"]:
        writer.writerow([t["c"] == report["best_c"] if k == "best" else t[k] for k in columns]
                        + list(t["error_eps_by_t"] or [None] * bins))
    return buf.getvalue().encode()


def write_outputs(out: str, report: dict[str, Any]) -> list[str]:
    """sweep.csv, sweep.png and sweep.json (last: its presence means the sweep finished) under `out`."""
    files = [(storage.join(out, "sweep.csv"), _csv(report))]
    if report["best_c"] is not None:
        files.append((storage.join(out, "sweep.png"), plot_sweep(report)))
    files.append((storage.join(out, "sweep.json"), (json.dumps(report, indent=2) + "\n").encode()))
    for uri, data in files:
        storage.write_bytes(uri, data)
    return [uri for uri, _ in files]


def check_trial_resources(max_concurrent_trials: int, cpus_per_trial: float, gpus_per_trial: float) -> None:
    if max_concurrent_trials < 0:
        raise InputError(f"--max-concurrent-trials must be >= 0, got {max_concurrent_trials}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise InputError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {cpus_per_trial}, "
                         f"{gpus_per_trial}")


def default_tune_storage(out: str) -> str:
    """OUT/tune for a local OUT; a temp dir for s3:// (Tune's own files need not go to the bucket)."""
    return storage.join(out, "tune") if not storage.is_s3(out) else tempfile.mkdtemp(prefix="pfsr-tune-")


def run_trials(trial: Callable[..., None], trial_kwargs: dict[str, Any], param_space: dict[str, Any], *, name: str,
               storage_uri: str, max_concurrent_trials: int, cpus_per_trial: float, gpus_per_trial: float,
               ray_address: Optional[str]) -> tuple["tune.ResultGrid", str]:
    """One Ray Tune trial of the function trainable `trial(params, **trial_kwargs)` per point of param_space (grid
    searches), with --cpus/--gpus-per-trial each, at most max_concurrent_trials at once (0: any number), actors
    reused across trials. Shared by `pfsr sweep-c` and `pfsr compare`. -> (results, Tune run path)."""
    filesystem, storage_path = storage.resolve(storage_uri)
    _init_ray(ray_address)
    trainable = tune.with_resources(tune.with_parameters(trial, **trial_kwargs),
                                    {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tuner = tune.Tuner(trainable, param_space=param_space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials or None,
                                                   reuse_actors=True),  # no process start and imports per trial
                       run_config=tune.RunConfig(name=run_name, storage_path=storage_path,
                                                 storage_filesystem=filesystem, verbose=1))
    tune_path = storage.join(storage_uri, run_name)
    log(f"Ray Tune run {tune_path}")
    return tuner.fit(), tune_path


def _default_val(config: Config, data: str) -> Optional[str]:
    if config.data.val:
        return config.data.val
    return data if list_shards(data, "val") else None


def sweep(config: Config | str, *, data: str, out: str, val_data: Optional[str] = None,
          values: Sequence[float] = DEFAULT_VALUES, steps: Optional[int] = None, storage_uri: Optional[str] = None,
          bins: int = 8, error_crops: int = 16, max_concurrent_trials: int = 1, cpus_per_trial: float = 1,
          gpus_per_trial: float = 0, ray_address: Optional[str] = None) -> dict[str, Any]:
    """Run the sweep on the current (or a new local) Ray cluster; returns sweep.json's content."""
    values = check_values(values)
    if not isinstance(config, Config):
        config = load_config(config, {"train.steps": steps} if steps else None)
    elif steps:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps)).validate()
    if config.train.stage == "encoder":
        raise InputError("train.stage: sweep-c trains the diffusion (or quality) stage; the encoder stage has no c")
    for flag, value, minimum in (("--bins", bins, 1), ("--error-crops", error_crops, 1)):
        if value < minimum:
            raise InputError(f"{flag} must be >= {minimum}, got {value}")
    check_trial_resources(max_concurrent_trials, cpus_per_trial, gpus_per_trial)
    data = _absolute(data)
    if not list_shards(data, "train"):
        raise InputError(f"--data {data}: no train-NNNNNN.tar shards (make them with `pfsr prep --split train`)")
    val_data = _absolute(val_data) or _default_val(config, data)
    if val_data and not storage.exists(val_data):
        raise InputError(f"--val-data {val_data} does not exist")
    out = out if storage.is_s3(out) else _absolute(out)
    storage_uri = storage_uri or default_tune_storage(out)

    # The same crops, noise and validation images for every c: read once here, shipped through the object store.
    images = load_val_images(val_data or data, limit=max(error_crops, config.data.val_images),
                             split="val" if val_data else "train")
    crops = fixed_crops(images, error_crops, config.data.crop, config.train.seed)
    val_images = images[:config.data.val_images] if val_data else []
    t_edges = noise_level_bins(sde_from_config(config.diffusion), bins).tolist()

    threads = config.train.torch_threads or max(1, int(cpus_per_trial))
    source = f"{len(crops)} {'held-out' if val_data else 'training'} HR crops of {config.data.crop} px"
    log(f"{len(values)} trials (c = {', '.join(f'{v:g}' for v in values)}), {config.train.steps} steps each, "
        f"{max_concurrent_trials or 'any number'} at a time; prediction error on {source}, {bins} t bins; "
        f"val PSNR on {len(val_images)} image(s)")
    grid, tune_path = run_trials(
        sweep_trial, dict(config=config.to_dict(), data=data, hr_crops=crops, val_images=val_images,
                          t_edges=t_edges, threads=threads),
        {"c": tune.grid_search(values)}, name="sweep-c", storage_uri=storage_uri,
        max_concurrent_trials=max_concurrent_trials, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
        ray_address=ray_address)

    trials = sorted((_trial_row(r) for r in grid), key=lambda t: t["c"])
    report = {
        "criterion": f"lowest mean over {bins} equal-width t bins in [{config.diffusion.t_min:g}, 1] of the MSE "
                     "between the hybrid noise prediction eps_hat (the heads mixed with abar(t)^c) and the true "
                     f"noise, on {source} (seed 000: c minimizes the prediction error of the hybrid "
                     "parametrization); val PSNR(Y) reported beside it, not used",
        "best_c": best_c(trials), "t_edges": t_edges, "steps": config.train.steps, "data": data,
        "val_data": val_data, "error_crops": len(crops), "dsm_target": config.loss.dsm_target, "trials": trials,
        "tune_path": tune_path,
    }
    write_outputs(out, report)
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'c':>6} {'error eps':>11} {'error r0':>11} {'PSNR(Y)':>8} {'steps':>6} {'seconds':>8}"]
    for t in report["trials"]:
        if t["error"] is not None:
            lines.append(f"{t['c']:6g}  failed: {t['error']}")
            continue
        psnr = f"{t['psnr_y']:8.2f}" if t["psnr_y"] is not None else f"{'-':>8}"
        mark = "  <- best" if t["c"] == report["best_c"] else ""
        lines.append(f"{t['c']:6g} {t['error_eps']:11.4g} {t['error_r0']:11.4g} {psnr} {t['steps']:6d} "
                     f"{t['seconds']:8.1f}{mark}")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    report = sweep(args.config, data=args.data, out=args.out, val_data=args.val_data, values=args.values,
                   steps=args.steps, storage_uri=args.storage, bins=args.bins, error_crops=args.error_crops,
                   max_concurrent_trials=args.max_concurrent_trials, cpus_per_trial=args.cpus_per_trial,
                   gpus_per_trial=args.gpus_per_trial, ray_address=args.ray_address)
    print(format_table(report))
    failed = [t["c"] for t in report["trials"] if t["error"] is not None]
    print(f"wrote {storage.join(args.out, 'sweep.json')}, sweep.csv and sweep.png")
    if report["best_c"] is None:
        print("pfsr sweep-c: every trial failed", file=sys.stderr)
        return 1
    print(f"best c = {report['best_c']:g} ({report['criterion']})")
    if failed:
        print(f"pfsr sweep-c: trials failed for c = {', '.join(f'{c:g}' for c in failed)}", file=sys.stderr)
        return 1
    return 0
