"""`pfsr compare`: methods side by side on the same training budget, data and validation images, on Ray Tune.

A method is a small YAML file, a list of stages chained as `pfsr train --init` chains them:

    name: adaptive            # optional; default: the file's stem
    stages:
      - config: ../tiny_encoder.yaml   # relative to the method file
        steps: 100
      - config: ../tiny.yaml
        steps: 200
        overrides: {model.adaptive_condition: histogram}   # optional dotted overrides of that config

Methods compared together must have the same total training steps. One Tune trial per (method, seed) (the
machinery of `pfsr sweep-c`, `sweep.run_trials`) trains every stage with the core loop on the same shards, with
train.seed = the seed, each stage starting from the previous stage's EMA weights (`checkpoint.init_from`), then
scores the final EMA model on the same validation images at the same sampler settings (--samplers, few-step ones
included): PSNR(Y) (BasicSR: scale border cropped) of the SR of the 8-bit bicubic LR, and the NFE, with the
sampling noise of image i seeded by i. A method whose configs do not load (e.g. an option of a branch not merged
yet) is listed as unavailable with the reason, not run.

A difference between two methods at a setting is reported only when |mean_a - mean_b| > 2 x the pooled standard
deviation over seeds, sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)).

Outputs in --out: compare.json, compare.csv (one row per method, seed and setting), compare.png (PSNR against NFE
per method, bars: the standard deviation over seeds) and compare.html (self-contained: the plot inline).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from ray import tune

from .. import storage
from ..checkpoint import init_from, training_checkpoint
from ..config import ConfigError, config_from_dict, load_config
from ..data import list_shards, load_val_images, loader_from_config
from ..degradation import degrade, to_uint8
from ..errors import InputError
from ..inference import super_resolve_tiled
from ..metrics import psnr
from ..models.sr import PFSRModel, build_model
from ..report import _png, _plt
from ..sampling import SAMPLERS
from ..train import format_metrics, make_state, train_loop
from .sweep import check_trial_resources, default_tune_storage, run_trials
from .train import _absolute

DEFAULT_SAMPLERS = ("dpmpp_2m:1", "dpmpp_2m:2", "dpmpp_2m:4", "dpmpp_2m:10")


def log(message: str) -> None:
    print(f"compare: {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Methods and sampler settings.

def parse_sampler(text: str) -> dict[str, Any]:
    """'dpmpp_2m:4' -> {"sampler": "dpmpp_2m", "steps": 4}; 'pf_ode' -> adaptive dopri5 (steps None)."""
    method, _, steps = text.partition(":")
    if method not in SAMPLERS:
        raise InputError(f"--samplers {text}: unknown sampler {method!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    if steps and not (steps.isdigit() and int(steps) >= 1):
        raise InputError(f"--samplers {text}: steps must be a positive integer")
    return {"sampler": method, "steps": int(steps) if steps else None}


def load_method(path: str | Path) -> dict[str, Any]:
    """A method file -> {"name", "file", "stages": [{"config": dict, "file", "steps"}], "total_steps", "error"}.
    Config problems (a missing file, an unknown key) land in "error"; a malformed method file raises InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"method file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, list) or not stages:
        raise InputError(f"{path}: needs 'stages', a list of {{config: FILE, steps: N}}")
    method: dict[str, Any] = {"name": str(doc.get("name") or path.stem), "file": str(path), "stages": [],
                              "error": None}
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("config"), str) or \
                not isinstance(stage.get("steps"), int) or stage["steps"] < 1:
            raise InputError(f"{path}: stages[{i}]: needs config (a file) and steps (a positive integer)")
        file = (path.parent / stage["config"]).resolve()
        overrides = {**(stage.get("overrides") or {}), "train.steps": stage["steps"]}
        try:
            config = load_config(file, overrides).to_dict()
        except ConfigError as e:
            config, method["error"] = None, f"stages[{i}]: {e}"
        method["stages"].append({"file": str(file), "steps": stage["steps"], "config": config})
    method["total_steps"] = sum(s["steps"] for s in method["stages"])
    return method


def check_methods(methods: Sequence[dict[str, Any]]) -> None:
    names = [m["name"] for m in methods]
    if len(set(names)) < len(names):
        raise InputError(f"--methods: method names must differ, got {names}")
    totals = {m["name"]: m["total_steps"] for m in methods}
    if len(set(totals.values())) > 1:
        raise InputError(f"--methods: methods compared together need the same total training steps, got {totals}")
    if not any(m["error"] is None for m in methods):
        reasons = "; ".join(f"{m['name']}: {m['error']}" for m in methods)
        raise InputError(f"--methods: no method can run: {reasons}")


# ----------------------------------------------------------------------------------------------------------------
# Trial side: one Tune trial per (method, seed).

def train_stages(stages: Sequence[dict[str, Any]], data: str, seed: int, device: torch.device,
                 label: str) -> tuple[PFSRModel, dict[str, float]]:
    """Train the stages one after another (each from the previous stage's EMA weights) -> (final EMA model, the
    last logged metrics)."""
    previous, last = None, {}
    for i, stage in enumerate(stages):
        cfg = stage["config"]
        config = config_from_dict(cfg | {"train": cfg["train"] | {"seed": seed}})
        torch.manual_seed(seed)
        state = make_state(build_model(config), config)
        if previous is not None:
            init_from(state, previous)
        state.model.to(device)
        state.ema.to(device)

        def on_log(step: int, metrics: dict[str, float]) -> None:
            log(f"{label} stage {i + 1}/{len(stages)}: {format_metrics(step, config.train.steps, metrics)}")
            last.update(metrics)

        train_loop(state, config, loader_from_config(config, data), device=device, on_log=on_log)
        previous = training_checkpoint(state, config)
    return state.ema, last


@torch.no_grad()
def score(model: PFSRModel, hr_images: Sequence[np.ndarray], settings: Sequence[dict[str, Any]],
          device: torch.device) -> list[dict[str, Any]]:
    """Mean PSNR(Y) and NFE over the images at each setting. Each HR [H x W x 3] uint8 is center-cropped to
    data.val_max_size (and to a multiple of the scale), its 8-bit bicubic LR super-resolved with seed i."""
    s, limit = model.scale, model.config.data.val_max_size
    pairs = []
    for img in hr_images:
        h, w = img.shape[:2]
        ch, cw = (min(h, limit), min(w, limit)) if limit else (h, w)
        ch, cw = ch // s * s, cw // s * s
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img[top:top + ch, left:left + cw].copy()
        hr = torch.from_numpy(img).permute(2, 0, 1)[None].to(device).float() / 255
        pairs.append((img, to_uint8(degrade(hr, s)).float() / 255))
    model.eval()
    rows = []
    for setting in settings:
        values, nfes = [], []
        for i, (img, lr) in enumerate(pairs):
            sr, nfe = super_resolve_tiled(model, lr, method=setting["sampler"], steps=setting["steps"], seed=i)
            values.append(psnr(to_uint8(sr[0]).permute(1, 2, 0).cpu(), img, crop_border=s, test_y_channel=True))
            nfes.append(nfe)
        rows.append(setting | {"psnr_y": float(np.mean(values)), "nfe": float(np.mean(nfes))})
    return rows


def compare_trial(params: dict[str, Any], *, methods: dict[str, list[dict[str, Any]]], data: str,
                  val_images: list[np.ndarray], settings: list[dict[str, Any]], threads: int) -> None:
    """Tune function trainable: train the stages of params["method"] with params["seed"], then score it."""
    name, seed = params["method"], int(params["seed"])
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs not given to the trial
    t0 = time.perf_counter()
    model, last = train_stages(methods[name], data, seed, device, f"{name} seed {seed}")
    seconds = time.perf_counter() - t0
    results = score(model, val_images, settings, device)
    log(f"{name} seed {seed}: " + ", ".join(f"{r['sampler']}:{r['steps']} {r['psnr_y']:.2f} dB" for r in results))
    tune.report({"seconds": seconds, "results": results, "loss_dsm": last.get("train/loss_dsm")})


# ----------------------------------------------------------------------------------------------------------------
# Driver side: statistics, outputs.

def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)), s the sample standard deviations."""
    na, nb = len(a), len(b)
    if na + nb <= 2:
        return math.nan
    ss = (na - 1) * np.var(a, ddof=1) if na > 1 else 0.0
    ss += (nb - 1) * np.var(b, ddof=1) if nb > 1 else 0.0
    return float(math.sqrt(ss / (na + nb - 2)))


def summarize(trials: list[dict[str, Any]], names: list[str], settings: list[dict[str, Any]]
              ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """-> (per method: per setting mean, std over seeds and NFE; differences between every pair of methods)."""
    per: dict[str, list[dict[str, Any]]] = {}
    values: dict[tuple[str, int], list[float]] = {}
    for name in names:
        done = [t for t in trials if t["method"] == name and t["error"] is None]
        per[name] = []
        for k, setting in enumerate(settings):
            v = [t["results"][k]["psnr_y"] for t in done]
            values[(name, k)] = v
            per[name].append(setting | {
                "psnr_y_mean": float(np.mean(v)) if v else None,
                "psnr_y_std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                "nfe": float(np.mean([t["results"][k]["nfe"] for t in done])) if done else None, "seeds": len(v)})
    diffs = []
    for a, b in itertools.combinations(names, 2):
        for k, setting in enumerate(settings):
            va, vb = values[(a, k)], values[(b, k)]
            if not va or not vb:
                continue
            diff, pooled = float(np.mean(vb) - np.mean(va)), pooled_std(va, vb)
            diffs.append(setting | {"a": a, "b": b, "diff_db": diff, "pooled_std_db": pooled,
                                    "reported": bool(math.isfinite(pooled) and abs(diff) > 2 * pooled)})
    return per, diffs


def plot_compare(report: dict[str, Any]) -> bytes:
    """PNG: mean PSNR(Y) against NFE per method, error bars the standard deviation over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rows) in enumerate(report["summary"].items()):
        rows = [r for r in rows if r["psnr_y_mean"] is not None]
        if not rows:
            continue
        ax.errorbar([r["nfe"] for r in rows], [r["psnr_y_mean"] for r in rows],
                    yerr=[r["psnr_y_std"] or 0.0 for r in rows], fmt="o-", capsize=3, color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("val PSNR(Y) [dB], mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{report['total_steps']} training steps per method, {report['seeds']} seeds "
                 f"(bars: std over seeds)")
    fig.tight_layout()
    return _png(fig)


def _setting_label(row: dict[str, Any]) -> str:
    return f"{row['sampler']}:{row['steps']}" if row["steps"] is not None else row["sampler"]


def render_html(report: dict[str, Any], png: Optional[bytes]) -> str:
    """The self-contained page: methods and stages, the plot inline, means +- std, reported differences, and the
    methods that were unavailable."""
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pfsr compare</title><style>"
             "body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}</style></head><body>",
             f"<h1>pfsr compare: {len(report['summary'])} methods, {report['seeds']} seeds, "
             f"{report['total_steps']} training steps each</h1>",
             f"<p>Training shards <code>{e(str(report['data']))}</code>; validation: {report['val_images']} image(s) "
             f"of <code>{e(str(report['val_data']))}</code>. {e(report['criterion'])}</p>", "<h2>Methods</h2><ul>"]
    for m in report["methods"]:
        stages = " &rarr; ".join(f"{e(Path(s['file']).name)} ({s['steps']} steps)" for s in m["stages"])
        status = f" <b>unavailable</b>: {e(m['error'])}" if m["error"] else ""
        parts.append(f"<li><b>{e(m['name'])}</b>: {stages}{status}</li>")
    parts.append("</ul>")
    if png is not None:
        parts.append(f"<img alt='PSNR against NFE' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    settings = report["settings"]
    parts.append("<h2>PSNR(Y) [dB], mean &plusmn; std over seeds (NFE)</h2><table><tr><th>method</th>" +
                 "".join(f"<th>{e(_setting_label(s))}</th>" for s in settings) + "</tr>")
    for name, rows in report["summary"].items():
        cells = "".join(f"<td>{r['psnr_y_mean']:.2f} &plusmn; {r['psnr_y_std'] or 0:.2f} ({r['nfe']:.0f})</td>"
                        if r["psnr_y_mean"] is not None else "<td>-</td>" for r in rows)
        parts.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
    parts.append("</table><h2>Differences</h2>")
    reported = [d for d in report["differences"] if d["reported"]]
    if reported:
        parts.append("<table><tr><th>setting</th><th>b - a</th><th>difference [dB]</th><th>pooled std</th></tr>")
        parts += [f"<tr><td>{e(_setting_label(d))}</td><td>{e(d['b'])} - {e(d['a'])}</td>"
                  f"<td>{d['diff_db']:+.3f}</td><td>{d['pooled_std_db']:.3f}</td></tr>" for d in reported]
        parts.append("</table>")
    else:
        parts.append("<p>None: no difference of means exceeds twice the pooled standard deviation over seeds.</p>")
    failed = [t for t in report["trials"] if t["error"]]
    if failed:
        parts.append("<h2>Failed trials</h2><ul>" + "".join(
            f"<li>{e(t['method'])} seed {t['seed']}: {e(t['error'])}</li>" for t in failed) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _csv(report: dict[str, Any]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "seed", "sampler", "steps", "nfe", "psnr_y", "seconds", "error"])
    for t in report["trials"]:
        for r in t["results"] or [{"sampler": None, "steps": None, "nfe": None, "psnr_y": None}]:
            writer.writerow([t["method"], t["seed"], r["sampler"], r["steps"], r["nfe"], r["psnr_y"], t["seconds"],
                             t["error"]])
    return buf.getvalue().encode()


def write_outputs(out: str, report: dict[str, Any]) -> list[str]:
    """compare.csv, compare.png, compare.html, and compare.json last (its presence: the comparison finished)."""
    png = plot_compare(report) if any(t["error"] is None for t in report["trials"]) else None
    files = [(storage.join(out, "compare.csv"), _csv(report))]
    if png is not None:
        files.append((storage.join(out, "compare.png"), png))
    files.append((storage.join(out, "compare.html"), render_html(report, png).encode()))
    files.append((storage.join(out, "compare.json"), (json.dumps(report, indent=2) + "\n").encode()))
    for uri, data in files:
        storage.write_bytes(uri, data)
    return [uri for uri, _ in files]


def _trial_row(result: "tune.Result") -> dict[str, Any]:
    m = result.metrics or {}
    row = {"method": result.config["method"], "seed": int(result.config["seed"]), "results": m.get("results"),
           "seconds": m.get("seconds"), "loss_dsm": m.get("loss_dsm"), "error": None}
    if result.error is not None or not row["results"]:
        row["error"] = str(result.error).strip().splitlines()[-1] if result.error is not None else "no results"
    return row


def compare(method_files: Sequence[str], *, data: str, val_data: str, out: str, seeds: int = 3,
            samplers: Sequence[str] = DEFAULT_SAMPLERS, storage_uri: Optional[str] = None,
            max_concurrent_trials: int = 1, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
            ray_address: Optional[str] = None) -> dict[str, Any]:
    """Run the comparison on the current (or a new local) Ray cluster; returns compare.json's content."""
    if seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {seeds}")
    check_trial_resources(max_concurrent_trials, cpus_per_trial, gpus_per_trial)
    settings = [parse_sampler(s) for s in samplers]
    methods = [load_method(f) for f in method_files]
    check_methods(methods)
    runnable = {m["name"]: m["stages"] for m in methods if m["error"] is None}
    for m in methods:
        if m["error"]:
            log(f"method {m['name']} is unavailable: {m['error']}")
    data, val_data = _absolute(data), _absolute(val_data)
    if not list_shards(data, "train"):
        raise InputError(f"--data {data}: no train-NNNNNN.tar shards (make them with `pfsr prep --split train`)")
    if not storage.exists(val_data):
        raise InputError(f"--val-data {val_data} does not exist")
    out = out if storage.is_s3(out) else _absolute(out)
    first = config_from_dict(next(iter(runnable.values()))[-1]["config"])
    val_images = load_val_images(val_data, limit=first.data.val_images)
    if not val_images:
        raise InputError(f"--val-data {val_data}: no validation images")
    threads = first.train.torch_threads or max(1, int(cpus_per_trial))
    log(f"{len(runnable)} methods x {seeds} seeds, {methods[0]['total_steps']} training steps each, "
        f"{max_concurrent_trials or 'any number'} trial(s) at a time; {len(val_images)} validation image(s) at "
        f"{', '.join(map(_setting_label, settings))}")
    grid, tune_path = run_trials(
        compare_trial, dict(methods=runnable, data=data, val_images=val_images, settings=settings, threads=threads),
        {"method": tune.grid_search(list(runnable)), "seed": tune.grid_search(list(range(seeds)))},
        name="compare", storage_uri=storage_uri or default_tune_storage(out),
        max_concurrent_trials=max_concurrent_trials, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
        ray_address=ray_address)
    trials = sorted((_trial_row(r) for r in grid), key=lambda t: (list(runnable).index(t["method"]), t["seed"]))
    summary, differences = summarize(trials, list(runnable), settings)
    report = {
        "criterion": "PSNR(Y) of the final EMA model on the validation images (center crops of data.val_max_size, "
                     "8-bit bicubic LR); a difference is reported only when the difference of the means exceeds "
                     "twice the pooled standard deviation over seeds",
        "total_steps": methods[0]["total_steps"], "seeds": seeds, "settings": settings, "data": data,
        "val_data": val_data, "val_images": len(val_images),
        "methods": [{k: m[k] for k in ("name", "file", "total_steps", "error")} | {
            "stages": [{"file": s["file"], "steps": s["steps"]} for s in m["stages"]]} for m in methods],
        "unavailable": {m["name"]: m["error"] for m in methods if m["error"]},
        "trials": trials, "summary": summary, "differences": differences, "tune_path": tune_path,
    }
    write_outputs(out, report)
    return report


def format_table(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [f"{'method':<16}" + "".join(f"{_setting_label(s):>20}" for s in settings)]
    for name, rows in report["summary"].items():
        lines.append(f"{name:<16}" + "".join(
            f"{r['psnr_y_mean']:>11.2f} +- {r['psnr_y_std'] or 0:<5.2f}" if r["psnr_y_mean"] is not None
            else f"{'-':>20}" for r in rows))
    for name, reason in report["unavailable"].items():
        lines.append(f"{name:<16} unavailable: {reason}")
    reported = [d for d in report["differences"] if d["reported"]]
    lines += [f"difference at {_setting_label(d)}: {d['b']} - {d['a']} = {d['diff_db']:+.3f} dB "
              f"(pooled std {d['pooled_std_db']:.3f})" for d in reported] or \
        ["no difference exceeds twice the pooled standard deviation over seeds"]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    report = compare(args.methods, data=args.data, val_data=args.val_data, out=args.out, seeds=args.seeds,
                     samplers=args.samplers, storage_uri=args.storage,
                     max_concurrent_trials=args.max_concurrent_trials, cpus_per_trial=args.cpus_per_trial,
                     gpus_per_trial=args.gpus_per_trial, ray_address=args.ray_address)
    print(format_table(report))
    print(f"wrote {storage.join(args.out, 'compare.json')}, compare.csv, compare.png and compare.html")
    failed = [f"{t['method']} seed {t['seed']}" for t in report["trials"] if t["error"]]
    if failed:
        print(f"pfsr compare: trials failed: {', '.join(failed)}", file=sys.stderr)
    if report["unavailable"]:
        print(f"pfsr compare: unavailable methods: {', '.join(report['unavailable'])}", file=sys.stderr)
    return 1 if failed or report["unavailable"] else 0
